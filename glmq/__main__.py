import os
import sys

try:
    from glmq.cli import main

    code = main()
except KeyboardInterrupt:  # a Ctrl-C before glmq.cli.main put its own handler in place, or after it returned
    sys.stderr.write("glmq: interrupted; any .partial output is kept and the same command resumes it\n")
    sys.stderr.flush()
    os._exit(2)  # not sys.exit: see glmq.cli.main
sys.exit(code)
