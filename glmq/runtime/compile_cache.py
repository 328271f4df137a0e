"""Compilation that outlives the process: a second process reuses what the first one compiled and tuned.

One folder, ``$GLMQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/glmq``, else ``~/.cache/glmq`` (``glmq.load(...,
cache_dir=)`` overrides both), holds:

- ``inductor/``: PyTorch's Inductor caches (``TORCHINDUCTOR_CACHE_DIR``): the FX graph cache (compiled
  kernels and wrappers), the AOTAutograd cache and Inductor's autotuning results. With them a later process
  traces the model again (Dynamo) but compiles nothing: the tiny AR's first compiled generation on 2 CPU cores
  took 36.3 s in an empty cache and 3.9 s in a second process over it (tests/runtime/test_compile_cache.py,
  recorded in benchmarks/results/batch_tests_cpu2.json).
- ``triton/``: Triton's kernel cache (``TRITON_CACHE_DIR``): glmq's own Triton kernels and Inductor's.
- ``autotune/``: glmq's attention tile choices (:func:`glmq.kernels._attention.tuned_configs`), one file per
  card, torch, Triton and kernel source, written after a call that tuned something and adopted by the next
  process instead of timing the candidates again.
- ``compiled/``: a marker per model, card and versions, written after a compiled call completed; ``glmq
  generate --compile auto`` compiles only when one is there (the cache then makes compiling cheap).

Compiling itself goes through :func:`compile_static`, which gives a long-lived process room for more than
Dynamo's default eight graphs per function.

PyTorch's cache entries are pickles: the folder is created private (0700), and one that another user owns or
others can write is not used (compilation then goes to PyTorch's default places, in this process only).
Variables the user set (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) win over the default folder; an
explicit folder (the argument or ``GLMQ_CACHE_DIR``) wins over them. A corrupt entry is never fatal: PyTorch
recompiles over one (with a warning), glmq ignores a bad autotune file or entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path

from glmq.runtime.placement import _debug

CACHE_ENV = "GLMQ_CACHE_DIR"
_ACTIVE: Path | None = None


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$GLMQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/glmq``, else
    ``~/.cache/glmq``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "glmq"


def _private(folder: Path) -> bool:
    """Make ``folder`` (0700) or check that it is this user's and nobody else can write it."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = folder.stat()
    except OSError as e:
        _debug(f"compile cache {folder}: not usable ({e.strerror or e})")
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        _debug(f"compile cache {folder}: not used (another user's, or writable by others)")
        return False
    return True


def activate(override: str | os.PathLike | None = None) -> Path | None:
    """Point PyTorch's and Triton's compile caches at the glmq cache folder (see the module docstring); returns
    the folder, or None when it cannot be used. Call before anything compiles."""
    global _ACTIVE
    root = cache_root(override)
    explicit = bool(override) or bool(os.environ.get(CACHE_ENV))
    if not _private(root):
        return None
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        if explicit or not os.environ.get(var):
            os.environ[var] = str(root / sub)
    _ACTIVE = root
    return root


def active_root() -> Path | None:
    """The folder the last :func:`activate` chose (None before one, or when it could not be used)."""
    return _ACTIVE


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def _versions(device) -> list:
    import torch

    import glmq

    card = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    triton = None
    with contextlib.suppress(ImportError):
        import triton as _triton

        triton = _triton.__version__
    return [glmq.__version__, torch.__version__, triton, card]


def _write_json(path: Path, data: dict) -> None:
    """Atomically (a name of this process's own, then a rename); a failure only costs the next process time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:
        _debug(f"compile cache: could not write {path} ({e.strerror or e})")
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    from glmq.errors import GlmqError
    from glmq.io.safe_read import read_json

    try:
        return read_json(path, "cache entry", max_bytes=4 * 1024 * 1024)
    except GlmqError as e:
        if path.exists():
            _debug(f"compile cache: ignoring {path}: {e}")
        return None


# -- glmq's autotuning -------------------------------------------------------------------------------------------

def _encode(value):
    import torch

    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    import torch

    if isinstance(value, dict):
        dtype = getattr(torch, str(value.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {value}")
        return dtype
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise ValueError(f"unexpected value {value!r}")


class AutotuneStore:
    """glmq's attention autotuning choices for one card, torch, Triton and kernel source, on disk."""

    def __init__(self, root: Path, device):
        from glmq.kernels import _attention

        source = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (_attention, _attention._k)))
        self.path = root / "autotune" / f"attention-{_fingerprint(*_versions(device), source.hexdigest())}.json"
        self._saved = 0

    def load(self) -> int:
        """Adopt the saved choices; returns how many (a bad file or entry is skipped, never fatal)."""
        from glmq.kernels import _attention

        data = _read_json(self.path)
        pairs = []
        for entry in (data or {}).get("pairs", []) if isinstance((data or {}).get("pairs"), list) else []:
            try:
                key, cfg = entry
                pairs.append((_decode(key), _decode(cfg)))
            except (TypeError, ValueError):
                _debug(f"compile cache: skipping a bad autotune entry in {self.path}")
        adopted = _attention.adopt_tuned_configs(pairs)
        self._saved = len(_attention.tuned_configs())
        return adopted

    def save(self) -> None:
        """Write the choices when this process tuned more since the last load or save."""
        from glmq.kernels import _attention

        pairs = _attention.tuned_configs()
        if len(pairs) > self._saved:
            _write_json(self.path, {"version": 1, "pairs": [[_encode(k), _encode(c)] for k, c in pairs]})
            self._saved = len(pairs)


# -- compiling ------------------------------------------------------------------------------------------------

# Graphs Dynamo keeps per compiled function before it runs the function eager for every new shape. Its default,
# 8, is few for a process that lives long: each image size, DiT chunk of rows and AR batch width is a shape
# (``dynamic=False``), and a server or a ComfyUI session meets more than eight.
RECOMPILE_LIMIT = 64


def compile_static(fn):
    """``torch.compile(fn, dynamic=False)``: one specialized graph per shape, with Dynamo's limit on graphs per
    function raised to :data:`RECOMPILE_LIMIT` (never lowered; the setting is process-wide)."""
    import torch
    import torch._dynamo.config as dynamo_config

    if dynamo_config.recompile_limit < RECOMPILE_LIMIT:
        dynamo_config.recompile_limit = RECOMPILE_LIMIT
    return torch.compile(fn, dynamic=False)


# -- which models have been compiled here -------------------------------------------------------------------------

def _switches() -> list:
    """The settings that change what gets compiled (a whole AR step or one layer; which int4 kernel the graphs
    call; how the DiT's activations are quantized): a marker left under other settings does not stand for
    this process's compilation."""
    from glmq.kernels.w8a8_linear import act_quant_choice
    from glmq.quant.formats import tinygemm
    from glmq.runtime.ar_engine import compile_mode

    return [f"GLMQ_AR_COMPILE={compile_mode()}", f"GLMQ_INT4_KERNEL={tinygemm.choice()}",
            f"GLMQ_ACT_QUANT={act_quant_choice()}"]


def _marker(root: Path, model: str | os.PathLike, device) -> Path:
    return root / "compiled" / f"{_fingerprint(*_versions(device), *_switches(), Path(model).resolve())}.json"


def mark_compiled(root: Path, model: str | os.PathLike, device) -> None:
    """Record that a compiled call of ``model`` completed on this card with these versions and switches."""
    path = _marker(root, model, device)
    if not path.exists():
        _write_json(path, {"model": str(Path(model).resolve()), "versions": _versions(device),
                           "switches": _switches()})


def was_compiled(root: Path | None, model: str | os.PathLike, device) -> bool:
    """Whether :func:`mark_compiled` ran for ``model`` on this card with these versions and switches."""
    return root is not None and _read_json(_marker(root, model, device)) is not None
