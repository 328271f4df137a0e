"""Load GLM-Image components into the upstream classes, quantized layers as :class:`QuantLinear`.

Each component is built on the meta device from its ``config.json``; the linear layers a glmq
``quantization_config`` lists are swapped for empty :class:`~glmq.quant.formats.linear.QuantLinear` modules;
then the module is materialized on the target device and every stored tensor is copied in, one at a time.
Nothing is ever held twice, and nothing is randomly initialized only to be overwritten. Works for the bf16
release, make-tiny folders and ``glmq quantize`` output alike.

A stored tensor whose dtype and shape are the module's (every quantized buffer; float tensors stored in the
compute dtype) is read straight into the module's memory (:class:`Filler`): on the CPU with plain reads into
the tensor itself, up to four tensors at once on threads; on a GPU through two pinned staging buffers, reading
the next chunk while the previous one copies, and checking NaN/Inf on the device. Other tensors (a cast on the
way) are read into a CPU tensor, checked there and copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from glmq.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from glmq.io.reader import ComponentReader

# Set to 1 to have glmq.load hash every file against the manifest (sha256) instead of checking sizes only.
VERIFY_HASHES_ENV = "GLMQ_VERIFY_HASHES"


def check_before_load(path: str | Path) -> None:
    """Validate a folder exactly as ``glmq inspect`` does, before ``glmq.load`` allocates anything.

    Layout, every config (types and sizes: :mod:`glmq.models.check_config`), every component's tensor
    names, shapes and dtypes against its config, GGUF byte layouts, and the manifest when there is one.
    The manifest check compares file sizes by default, which catches truncation and swapped shards at no
    cost; sha256 hashing of every file (about 10 s per 10 GB) runs when ``GLMQ_VERIFY_HASHES=1``, as
    ``glmq inspect`` does by default. NaN/Inf values are refused while each tensor is loaded.
    """
    import os

    from glmq.checkpoint.validate import check_pipeline

    hashes = os.environ.get(VERIFY_HASHES_ENV, "") not in ("", "0")
    _, _, problems = check_pipeline(path, hashes=hashes, gguf=True)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{path}: does not match its glmq-manifest.json: {problems[0]}{more}")


def quant_plan(cr: ComponentReader) -> dict[str, dict]:
    """``swap_linears`` plan for a component's glmq ``quantization_config`` (empty when unquantized)."""
    qcfg = cr.quantization_config
    if qcfg is None:
        return {}
    if qcfg.get("quant_method") != "glmq":
        raise CheckpointError(
            f"{cr.folder}: quantized by {qcfg.get('quant_method')!r}; glmq loads its own quantization and bf16 "
            "checkpoints (stock diffusers loads bitsandbytes folders)"
        )
    from glmq.quant.formats.qconfig import layer_formats
    from glmq.quant.plan import runtime_mode

    return {name: {"format": fmt, "mode": runtime_mode(fmt, acts)} for name, (fmt, acts) in layer_formats(qcfg).items()}


STAGING_BYTES = 64 << 20  # each of the two staging buffers of a GPU load
FILL_WORKERS = 4  # threads reading tensors into a CPU module at once


class Filler:
    """Stored tensors straight into same-dtype, same-shape module tensors.

    A CPU target is filled by plain reads into its own bytes. Any other target goes through two staging
    buffers of ``chunk`` bytes (pinned host memory when the target is on a CUDA GPU), alternating: the next
    chunk is read while the previous one copies (``non_blocking``), and a buffer is reused only once the copy
    out of it has finished. ``staged=True`` forces the staging path on the CPU too (tests). CPU targets are
    filled by ``workers`` threads at once (each reads into its own tensor); :meth:`finish` waits for them.
    NaN/Inf: a CPU target is checked by the thread that read it; device targets are counted on the device.
    :meth:`finish` raises the first error in the order the tensors were given; :meth:`close` stops what is
    left after an error.
    """

    def __init__(self, *, chunk: int = STAGING_BYTES, staged: bool | None = None, workers: int | None = None):
        import os

        self.chunk = chunk
        self.staged = staged
        self.workers = workers or min(FILL_WORKERS, os.cpu_count() or 1)
        self.pool = None
        self.jobs: list = []
        self.buffers: list = []
        self.events: list = [None, None]
        self.turn = 0
        self.pending: list[tuple[str, object]] = []

    @staticmethod
    def fits(info, target: torch.Tensor) -> bool:
        return (target.is_contiguous() and tuple(target.shape) == tuple(info.shape)
                and str(target.dtype).removeprefix("torch.") == info.dtype)

    def fill(self, info, target: torch.Tensor, what: str) -> None:
        """Fill ``target`` with the stored tensor ``info`` (``what`` names it in errors)."""
        import torch

        from glmq.io.finite import count_nonfinite_lazy
        from glmq.io.safetensors_io import read_error, read_into

        if info.nbytes == 0:
            return
        flat = target.detach().reshape(-1).view(torch.uint8)
        staged = target.device.type != "cpu" if self.staged is None else self.staged
        if not staged:
            if self.workers == 1:
                return self._direct(info, target, flat, what)
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(max_workers=self.workers)
            self.jobs.append(self.pool.submit(self._direct, info, target, flat, what))
            return
        try:
            with open(info.file, "rb") as f:
                for begin in range(0, info.nbytes, self.chunk):
                    n = min(self.chunk, info.nbytes - begin)
                    buf = self._buffer(target.device)
                    read_into(f, info, memoryview(buf[:n].numpy()), begin)
                    flat[begin:begin + n].copy_(buf[:n], non_blocking=True)
                    self._copied(target.device)
        except OSError as e:
            raise read_error(info, e) from None
        self.pending.append((what, count_nonfinite_lazy(target)))

    @staticmethod
    def _direct(info, target: torch.Tensor, flat: torch.Tensor, what: str) -> None:
        from glmq.io.finite import check_finite
        from glmq.io.safetensors_io import read_error, read_into

        try:
            with open(info.file, "rb") as f:
                read_into(f, info, memoryview(flat.numpy()))
        except OSError as e:
            raise read_error(info, e) from None
        check_finite(target, what)

    def _buffer(self, device: torch.device):
        """The staging buffer whose turn it is, once the copy out of it has finished."""
        import torch

        if not self.buffers:
            pin = device.type == "cuda"
            try:
                self.buffers = [torch.empty(self.chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
            except RuntimeError:  # no pinned memory to be had: pageable buffers, synchronous copies
                self.buffers = [torch.empty(self.chunk, dtype=torch.uint8) for _ in range(2)]
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()
        return self.buffers[self.turn]

    def _copied(self, device: torch.device) -> None:
        import torch

        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.events[self.turn] = event
        self.turn = 1 - self.turn

    def finish(self) -> None:
        """Wait for the CPU fills, then read the device counts back (one transfer for all of them); raise the
        first error or NaN/Inf found."""
        import torch

        from glmq.io.finite import nonfinite_error

        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job.result()
        if not self.pending:
            return
        counts = torch.stack([c for _, c in self.pending]).cpu().tolist()
        for (what, _), bad in zip(self.pending, counts):
            if bad:
                raise nonfinite_error(what, bad)
        self.pending.clear()

    def close(self) -> None:
        """Cancel the fills not started and wait for the running ones (after an error, before the model goes)."""
        for job in self.jobs:
            job.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def load_component(cr: ComponentReader, *, device: str | torch.device = "cpu", dtype=None,
                   dequantize: bool = False) -> nn.Module:
    """The component's upstream module on ``device``; float tensors in ``dtype`` (default: as stored).

    Quantized layers become :class:`QuantLinear` modules, or with ``dequantize`` plain ``nn.Linear`` layers
    holding the dequantized weights (the reference math every quantized kernel is tested against; what the
    fidelity evaluation runs).
    """
    import torch

    from glmq.models.build import build_model
    from glmq.quant.formats.linear import QuantLinear, swap_linears

    model = build_model(cr.component, cr.config)
    plan = quant_plan(cr)
    dequantized: dict = {}
    if plan and dequantize:
        from glmq.quant.formats.qconfig import layer_formats

        dequantized = {name: fmt for name, (fmt, _) in layer_formats(cr.quantization_config).items()}
        plan = {}
    if plan:
        swap_linears(model, plan)
    # Tied parameters (T5's shared / encoder.embed_tokens) are stored once; to_empty unties them.
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    tied_groups = [names for names in tied.values() if len(names) > 1]
    aliases = {n for names in tied_groups for n in names[1:]}
    if dtype is not None:
        # On the meta device, before memory exists: a cast after to_empty would read and convert every
        # uninitialized float (7.6 of 26 s of a CPU load of the full folder, benchmarks/results/load_breakdown_cpu2/).
        # QuantLinear keeps its quantized buffers' dtypes. nn.Module.to, not diffusers' override, which warns on
        # every cast about "modules that should be kept in float32" even when that list is empty.
        torch.nn.Module.to(model, dtype)
    model.to_empty(device=device)
    for first, *rest in tied_groups:
        for alias in rest:
            owner_name, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner_name), attr, model.get_parameter(first))
    expected = set(model.state_dict().keys())
    stored = set(cr.names())
    # A dequantized layer's weight is computed from its stored quantized tensors.
    from_quantized: dict[str, str] = {}
    for prefix, fmt in dequantized.items():
        for qname in fmt.expected_tensors(prefix, tuple(model.get_submodule(prefix).weight.shape)):
            from_quantized[qname] = prefix
    missing = sorted(expected - stored - aliases - {f"{prefix}.weight" for prefix in dequantized})
    if missing:
        raise CheckpointError(f"{cr.folder}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    with torch.no_grad():
        for prefix, fmt in dequantized.items():
            weight = model.get_submodule(prefix).weight
            shape = tuple(weight.shape)
            stored_q = {q.removeprefix(prefix + "."): cr.get(q) for q in fmt.expected_tensors(prefix, shape)}
            weight.copy_(fmt.dequantize(stored_q, shape).to(weight.dtype))
        from glmq.io.reader import ComponentReader

        infos = cr.tensors if isinstance(cr, ComponentReader) else {}  # GGUF components go through cr.get
        filler = Filler()
        try:
            _fill_all(cr, model, infos, filler, expected=expected, aliases=aliases, from_quantized=from_quantized)
            filler.finish()
        finally:
            filler.close()
    _init_nonpersistent_buffers(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _fill_all(cr, model, infos: dict, filler: Filler, *, expected: set, aliases: set, from_quantized: dict) -> None:
    """Every stored tensor of ``cr`` into ``model``: checked against the module, then filled or read, cast, copied."""
    from glmq.quant.formats.linear import QuantLinear

    for name in cr.names():
        if name in from_quantized:
            continue
        if name not in expected or name in aliases:
            raise CheckpointError(f"{cr.folder}: unexpected tensor {name!r}")
        module_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        target = getattr(owner, attr)
        info = infos.get(name)
        value = None if info is not None else cr.get(name)
        shape = tuple(info.shape) if info is not None else tuple(value.shape)
        stored = info.dtype if info is not None else str(value.dtype).removeprefix("torch.")
        if shape != tuple(target.shape):
            raise CheckpointError(f"{cr.folder}: tensor {name!r} has shape {list(shape)}, "
                                  f"the model expects {list(target.shape)}")
        _check_dtype(cr, name, stored, target, quantized=isinstance(owner, QuantLinear) and attr != "bias")
        if info is not None and filler.fits(info, target):
            filler.fill(info, target, f"{info.file}: tensor {name!r}")
            continue
        if value is None:
            value = cr.get(name)
        if isinstance(owner, QuantLinear) and attr != "bias":
            target.copy_(value)  # quantized buffers keep their storage dtype
        else:
            target.copy_(value.to(target.dtype))


_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_dtype(cr, name: str, got: str, target: torch.Tensor, *, quantized: bool) -> None:
    """Refuse a stored tensor (dtype name ``got``) whose dtype the layer would silently reinterpret.

    Quantized buffers must match their storage dtype exactly; float parameters take any plain float dtype
    (cast losslessly or to the compute dtype), never integers, booleans or fp8 codes.
    """
    want = str(target.dtype).removeprefix("torch.")
    ok = got == want if quantized or not target.is_floating_point() else got in _FLOAT_DTYPES
    if not ok:
        expected = want if quantized or not target.is_floating_point() else "a float dtype (" + ", ".join(_FLOAT_DTYPES) + ")"
        raise CheckpointError(f"{cr.folder}: tensor {name!r} is stored as {got}; the layer expects {expected}")


def _init_nonpersistent_buffers(model: nn.Module) -> None:
    """Recompute buffers that are not stored (rotary tables) with the upstream initializer.

    Only modules holding nothing but such buffers are re-initialized, so loaded weights are never touched.
    """
    state_keys = set(model.state_dict().keys())
    for mod_name, module in model.named_modules():
        own = [f"{mod_name}.{n}" if mod_name else n for n, b in module.named_buffers(recurse=False) if b is not None]
        unsaved = [n for n in own if n not in state_keys]
        if not unsaved:
            continue
        if list(module.parameters(recurse=False)) or len(unsaved) != len(own):
            raise RuntimeError(f"{type(module).__name__} mixes saved and unsaved tensors; cannot re-initialize it")
        init = getattr(model, "_init_weights", None)
        if init is None:
            raise RuntimeError(f"{type(module).__name__} has unsaved buffers and no initializer")
        init(module)


def open_component(root: Path, name: str):
    """A tensor source for component ``name`` of the pipeline folder ``root`` (safetensors or GGUF)."""
    from glmq.io.layout import BY_NAME, read_json
    from glmq.io.reader import ComponentReader

    comp = BY_NAME[name]
    folder = Path(root) / name
    cfg = read_json(folder / "config.json", f"{name} config.json")
    qcfg = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else cfg
    if qcfg.get("quant_method") == "gguf":
        from glmq.quant.formats.gguf.reader import GgufComponent

        return GgufComponent(folder, comp)
    return ComponentReader(folder, comp)
