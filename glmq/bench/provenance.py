"""Where a result came from: the git commit of the code that ran, whether the tree had local changes, the
exact command, the date. Every benchmark writes this into its results file (``benchmarks/results/``)."""

from __future__ import annotations

import datetime as dt
import shlex
import subprocess
import sys
from pathlib import Path


_COMMAND: list[str] | None = None


def set_command(args: list[str]) -> None:
    """The command line to record (the ``glmq`` CLI sets its own, which in-process callers do not see in
    ``sys.argv``)."""
    global _COMMAND
    _COMMAND = list(args)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(argv: list[str] | None = None) -> dict:
    """``git_commit`` (None outside a git checkout, e.g. an installed wheel), ``git_dirty`` (uncommitted
    changes to tracked files), ``command`` (the process's command line, shell-quoted) and ``date`` (UTC)."""
    import os

    repo = Path(__file__).resolve().parent.parent.parent
    declared = os.environ.get("GLMQ_GIT_COMMIT")  # a copy whose .git is absent or stale (the GPU machine's)
    commit = declared or _git(["rev-parse", "HEAD"], repo)
    status = None if declared else (_git(["status", "--porcelain", "--untracked-files=no"], repo) if commit else None)
    args = list(argv if argv is not None else (_COMMAND or sys.argv))
    if args and args[0].endswith("__main__.py"):
        args[0] = "python -m glmq"
    elif args:
        args[0] = Path(args[0]).name
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "command": " ".join([args[0], *(shlex.quote(a) for a in args[1:])]) if args else "",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
