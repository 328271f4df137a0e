"""Where a result came from: the git commit of the code that ran, whether the tree had local changes, the
exact command, the date. Every benchmark writes this into its results file (``benchmarks/results/``).

Standard library only: ``benchmarks/check_hf_export_gpu.py`` loads this file by path so that its process
never imports the ``glmq`` package.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import subprocess
import sys
from pathlib import Path

# glmq/bench/provenance.py -> the checkout's root (or site-packages for an installed copy).
REPO = Path(__file__).resolve().parents[2]

# Declared by whoever launches a copy of the tree whose .git is absent or stale (the GPU machine's copy
# carried the session's starting HEAD, so git named the wrong commit there): when set it wins over git, and
# is recorded as the source.
COMMIT_ENV, DIRTY_ENV = "GLMQ_GIT_COMMIT", "GLMQ_GIT_DIRTY"

# Environment variables that change what glmq, torch or the benchmarks do (PYTORCH_CUDA_ALLOC_CONF,
# GLMQ_PIN_MEMORY, BENCH_DRY, TRITON_INTERPRET, ...): part of how a result was made, though not of argv.
ENV_PREFIXES = ("GLMQ_", "BENCH_", "PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "CUDA_", "CUBLAS_", "NCCL_",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASS", "CREDENTIAL")


def _git(args: list[str], cwd: Path) -> str | None:
    # GIT_DIR, GIT_WORK_TREE, GIT_INDEX_FILE (set inside git hooks, for one) would point git at another
    # repository than the one this file lives in. --no-optional-locks: `git status` must not take the
    # index lock of a tree someone is committing in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, env=env, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip("\n") if out.returncode == 0 else None  # keep the leading blank of " M path"


def _is_code(porcelain_line: str) -> bool:
    """A ``git status --porcelain`` line that changes what runs: any change to a tracked file, or an untracked
    (not ignored) Python file or file inside the package. Other untracked files, such as new results, do not."""
    if not porcelain_line.startswith("??"):
        return True
    path = porcelain_line[3:].strip().strip('"')
    return path.endswith(".py") or path.startswith("glmq/")


_COMMAND: list[str] | None = None


def set_command(args: list[str] | None) -> None:
    """The command line to record from now on (the ``glmq`` CLI sets its own argv, which callers that run it
    in-process do not have in ``sys.argv``, and clears it with None when it returns)."""
    global _COMMAND
    _COMMAND = list(args) if args is not None else None


def _command(argv: list[str] | None) -> str:
    """The command line as typed, shell-quoted: ``python -X faulthandler benchmarks/x.py --out DIR``,
    ``python -m glmq bench ...``, or ``glmq bench ...`` for the console script. The interpreter is named by
    its file name only (its folder says where it was installed, not what ran)."""
    if argv is None and _COMMAND is not None:
        argv = _COMMAND
    if argv is not None:
        args = list(argv)
    else:
        args = list(getattr(sys, "orig_argv", None) or sys.argv)
        script = sys.argv[0] if sys.argv else ""
        # A console script (``glmq``, ``pytest``) runs as ``python /venv/bin/glmq ...``: name it alone.
        if script and not script.endswith(".py") and script not in ("-c", "-m") and Path(script).is_file():
            args = [script, *sys.argv[1:]]
        if args:
            args[0] = Path(args[0]).name
    return " ".join(shlex.quote(a) for a in args)


def _environment_variables() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(ENV_PREFIXES) and k not in (COMMIT_ENV, DIRTY_ENV)
            and not any(w in k for w in _SECRET_WORDS)}


def provenance(argv: list[str] | None = None, *, repo: Path | None = None) -> dict:
    """``git_commit`` (HEAD of the checkout this glmq was imported from; None outside one, e.g. an installed
    wheel; ``GLMQ_GIT_COMMIT``, when set, declares it instead), ``git_dirty`` (tracked files changed or untracked code
    files present; None when unknown), ``git_from`` (``"git"``, ``"GLMQ_GIT_COMMIT"`` or None), ``command``
    (``argv``, default the process's command line, shell-quoted), ``env`` (the variables named by
    ``ENV_PREFIXES`` that were set) and ``date`` (UTC, ISO 8601).

    ``repo`` (default: the folder holding this glmq) is only for looking at another checkout."""
    repo = Path(repo).resolve() if repo is not None else REPO
    commit = dirty = source = None
    # Two lines: the top level of the work tree that contains `repo`, then HEAD. An installed copy inside
    # some other checkout (site-packages under a .venv/ in a clone) must not report that clone's HEAD.
    if os.environ.get(COMMIT_ENV):
        commit, source = os.environ[COMMIT_ENV], COMMIT_ENV
        flag = os.environ.get(DIRTY_ENV, "").strip().lower()
        dirty = {"1": True, "true": True, "0": False, "false": False}.get(flag)
    else:
        head = _git(["rev-parse", "--show-toplevel", "HEAD"], repo)
        lines = head.splitlines() if head else []
        if len(lines) == 2 and Path(lines[0]).resolve() == repo:
            commit, source = lines[1], "git"
            status = _git(["status", "--porcelain", "--untracked-files=all"], repo)
            if status is not None:
                dirty = any(_is_code(line) for line in status.splitlines())
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "git_from": source,
        "command": _command(argv),
        "env": _environment_variables(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def provenance_markdown(prov: dict, label: str = "Provenance") -> str:
    """One Markdown line for a results ``.md``: commit (and whether the tree was dirty), command, date."""
    commit = prov.get("git_commit")
    if commit is None:
        where = "commit not recorded (no git checkout)"
    else:
        state = {True: ", with uncommitted changes", False: "", None: ", clean state unknown"}[prov.get("git_dirty")]
        where = f"commit `{commit}`{state}"
        if prov.get("git_from") not in (None, "git"):
            where += f" (declared by {prov['git_from']})"
    cmd = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in prov.get("env", {}).items()), prov.get("command", "")])
    fence = "``" if "`" in cmd else "`"
    return f"{label}: {where}; command {fence}{cmd}{fence}; {prov.get('date')}."


def write_table_result(out: Path, stem: str, result: dict, title: str, columns: list[str],
                       rows: list[list]) -> list[str]:
    """``out/stem.json`` (``result``, which carries its provenance) and ``out/stem.md``: the title, the provenance
    line when the result has one, and one Markdown table; returns the Markdown's lines."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {title}", ""]
    if "provenance" in result:
        lines += [provenance_markdown(result["provenance"]), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines
