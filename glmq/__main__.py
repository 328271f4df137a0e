from glmq.cli import main
import sys
sys.exit(main())
