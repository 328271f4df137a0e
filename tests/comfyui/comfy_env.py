"""A ComfyUI virtualenv for the ComfyUI server test, cached outside the repository.

ComfyUI's requirements bring their own torch (pinning glmq's CPU torch there breaks torchvision), so the
server runs in a virtualenv of its own: ComfyUI's requirements plus glmq (editable, so its dependencies
come in). Building it takes minutes; it is kept under ``$GLMQ_TEST_CACHE`` (default
``~/.cache/glmq-tests``) in a folder keyed by a hash of ComfyUI's requirements.txt and the Python
version, and is reused while that key holds. A folder without its ready marker (an interrupted build) is
rebuilt. Run as a script to build it ahead of the tests: ``python tests/comfyui/comfy_env.py COMFY_DIR``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NODE_PACK = REPO / "comfyui_glmq"
# Bump when what the build installs changes (e.g. another package beside requirements.txt).
SCHEMA = "1"
READY = ".glmq-ready"


def cache_root() -> Path:
    return Path(os.environ.get("GLMQ_TEST_CACHE", Path.home() / ".cache" / "glmq-tests"))


def env_key(comfy_dir: Path) -> str:
    h = hashlib.sha256()
    h.update((comfy_dir / "requirements.txt").read_bytes())
    h.update(f"\npython {sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}\n".encode())
    h.update(f"schema {SCHEMA}\n".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_env(comfy_dir: Path, log=sys.stderr) -> Path:
    """The cached ComfyUI virtualenv's python, with glmq from this checkout importable in it."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"comfyui-venv-{env_key(comfy_dir)}"
    py = venv_python(venv)
    with open(root / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not build the same folder at once
        if not (venv / READY).exists():
            if venv.exists():
                shutil.rmtree(venv)
            _run([sys.executable, "-m", "venv", str(venv)], log)
            _run([str(py), "-m", "pip", "install", "-q", "-r", str(comfy_dir / "requirements.txt"),
                  "requests"], log)
            (venv / READY).write_text("ok\n")
        # The cached folder may have been made from another checkout, or before glmq's dependencies changed:
        # (re)install glmq, editable, whenever this checkout's path or pyproject.toml differ from the last
        # install's. `pip install -e` brings glmq's own dependencies (torch>=2.9 is met by ComfyUI's torch).
        stamp = venv / ".glmq-install"
        want = f"{REPO}\n{hashlib.sha256((REPO / 'pyproject.toml').read_bytes()).hexdigest()}\n"
        probe = subprocess.run(
            [str(py), "-c", "import glmq, pathlib; print(pathlib.Path(glmq.__file__).resolve().parent)"],
            capture_output=True, text=True, cwd=root)  # not the checkout: `-c` would import glmq from the cwd
        if (probe.returncode != 0 or Path(probe.stdout.strip()) != (REPO / "glmq")
                or not stamp.exists() or stamp.read_text() != want):
            _run([str(py), "-m", "pip", "install", "-q", "-e", str(REPO)], log)
            stamp.write_text(want)
    return py


def prepare_tree(comfy_dir: Path, work: Path, models: dict[str, Path]) -> Path:
    """A runnable copy of the ComfyUI tree under ``work`` (ComfyUI writes user/, temp/, output/ and a database
    beside main.py), with glmq's node pack linked into custom_nodes/ and ``models`` (name -> pipeline folder)
    copied into models/glm_image/."""
    root = work / "ComfyUI"
    shutil.copytree(comfy_dir, root, ignore=shutil.ignore_patterns("__pycache__", ".git", "user", "temp", "output"))
    (root / "custom_nodes").mkdir(exist_ok=True)  # absent from the shared tree
    (root / "custom_nodes" / NODE_PACK.name).symlink_to(NODE_PACK, target_is_directory=True)
    (root / "models" / "glm_image").mkdir(parents=True, exist_ok=True)
    for name, src in models.items():
        shutil.copytree(src, root / "models" / "glm_image" / name)
    (root / "input").mkdir(exist_ok=True)
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(python: Path, root: Path, log_path: Path, port: int | None = None,
                 timeout: float = 240) -> tuple[subprocess.Popen, str]:
    """Start ``main.py --cpu`` on a loopback port and wait until /system_stats answers; (process, base URL).
    Raises RuntimeError (with the log's tail) if it exits or does not answer in time."""
    port = port or free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-auto-launch"], cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited at start (code {proc.returncode}):\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=5) as r:
                if r.status == 200:
                    json.loads(r.read())
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"ComfyUI did not answer in {timeout} s:\n{_tail(log_path)}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


if __name__ == "__main__":
    comfy = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "ComfyUI"
    print(ensure_env(comfy, log=sys.stdout))
