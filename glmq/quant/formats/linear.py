"""``QuantLinear``: an ``nn.Linear`` whose weight is stored in a glmq format, and the swap that installs it.

The module is thin: it holds a :class:`~glmq.quant.formats.base.QuantFormat` (``glmq.quant.formats``) and
that format's stored tensors as buffers under their stored names (``fmt.expected_tensors``), so that
``load_state_dict`` of a quantized checkpoint fills it directly; the layouts are documented in each format's
module. ``bias`` (optional) keeps its original dtype. ``forward`` asks the format for the product, by ``mode``:

- ``"kernel"``: the format's kernel matmul through ``glmq.kernels`` (int4 -> Triton W4A16; fp8_e4m3 -> W8A8
  fp8 ``torch._scaled_mm``, sm_89+; int8 -> W8A8 ``torch._int_mm``). Raises where the kernel cannot run.
- ``"reference"``: the kernel's pure-torch reference (float32; W8A8 formats quantize activations too).
- ``"weight_only"``: dequantize the weight to the input's dtype and ``F.linear``.
- ``"auto"`` (default): ``"kernel"`` where the format says it runs (CUDA, a capable GPU, a bf16/fp16 input
  for int4), else ``"weight_only"``.

Which mode a checkpoint's layers get comes from the planner (:func:`glmq.quant.plan.runtime_mode`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from glmq.quant.formats import QuantFormat, get_format

__all__ = ["QuantLinear", "swap_linears", "MODES", "as_run_on_gpu", "runtime_output"]

MODES = ("auto", "kernel", "reference", "weight_only")
_PLAN_KEYS = ("format", "mode")


def _as_format(fmt: QuantFormat | str, params: dict[str, Any]) -> QuantFormat:
    """A format instance, or one built by name from the registry with ``params``."""
    if isinstance(fmt, QuantFormat):
        if params:
            raise ValueError(f"format parameters {sorted(params)} given with a built format {fmt}; "
                             "pass them to get_format instead")
        return fmt
    return get_format(fmt, **params)


class QuantLinear(nn.Module):
    """A linear layer ``y = x @ W.T + bias`` with ``W`` stored in a glmq quantization format.

    Attributes:
        in_features, out_features: as ``nn.Linear``.
        format: the :class:`QuantFormat` (e.g. ``Int4Format(group_size=128, symmetric=False)``).
        mode: ``"auto"``, ``"kernel"``, ``"reference"`` or ``"weight_only"`` (see the module docstring).

    Buffers: the format's stored tensors under their stored names (``weight``, ``weight_scale``, and
    ``weight_zero`` for asymmetric int4), and ``bias`` (or None). ``module.to(dtype)`` / ``.half()`` move
    these buffers but keep the dtypes of the quantized ones; only ``bias`` changes dtype.

    Build with :meth:`from_linear` (quantize or wrap an existing ``nn.Linear``) or :meth:`empty` (for loading).
    A format may be given by instance or by registry name plus its parameters (``"int4", group_size=64``).
    """

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | str, *, bias: bool = False,
                 mode: str = "auto", device: torch.device | str | None = None,
                 bias_dtype: torch.dtype = torch.bfloat16, **params: Any) -> None:
        super().__init__()
        fmt = _as_format(fmt, params)
        fmt.check((out_features, in_features))
        self.in_features = in_features
        self.out_features = out_features
        self.format = fmt
        self.mode = mode
        specs = fmt.expected_tensors("", (out_features, in_features))
        self._quant_names = tuple(specs)
        for name, (shape, dtype) in specs.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def empty(cls, in_features: int, out_features: int, fmt: QuantFormat | str, bias: bool, *,
              device: torch.device | str | None = "meta", bias_dtype: torch.dtype = torch.bfloat16,
              mode: str = "auto", **params: Any) -> "QuantLinear":
        """Uninitialized buffers, by default on the meta device, to be filled by ``load_state_dict``.

        On meta, load with ``load_state_dict(sd, assign=True)`` (or call ``to_empty`` first).
        ``params``: the format's parameters when ``fmt`` is a name.
        """
        return cls(in_features, out_features, fmt, bias=bias, mode=mode, device=device, bias_dtype=bias_dtype,
                   **params)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: QuantFormat | str,
                    tensors: Optional[dict[str, torch.Tensor]] = None, *, mode: str = "auto",
                    **params: Any) -> "QuantLinear":
        """A QuantLinear computing ``linear``, on its device.

        Args:
            linear: the float layer; its bias is kept (unless ``tensors`` holds one).
            fmt: a :class:`QuantFormat`, or a registry name with its parameters in ``params``.
            tensors: already quantized stored tensors (bare names, e.g. from a ``glmq.quant.algorithms``
                algorithm), plus optionally ``bias``; None quantizes ``linear.weight`` with the format's
                round-to-nearest parameters (``fmt.quantize``).
            mode: see the module docstring.
        """
        fmt = _as_format(fmt, params)
        device = linear.weight.device
        bias_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
        if tensors is None:
            with torch.no_grad():
                tensors = fmt.quantize(linear.weight)
        has_bias = "bias" in tensors or linear.bias is not None
        module = cls(linear.in_features, linear.out_features, fmt, bias=has_bias, mode=mode, device="meta",
                     bias_dtype=bias_dtype)
        state = {name: t.detach().to(device) for name, t in tensors.items()}
        if has_bias and "bias" not in state:
            state["bias"] = linear.bias.detach().clone()
        module._check_tensors(state)
        module.load_state_dict(state, assign=True)
        return module

    def _check_tensors(self, state: dict[str, torch.Tensor]) -> None:
        quant = {k: v for k, v in state.items() if k != "bias"}
        self.format.validate_tensors(quant, (self.out_features, self.in_features))
        if "bias" in state and (self.bias is None or tuple(state["bias"].shape) != (self.out_features,)):
            raise ValueError(f"bias must be [{self.out_features}] for a layer with a bias; "
                             f"got {list(state['bias'].shape)}")

    # -- behaviour ---------------------------------------------------------------------------------------

    @property
    def fmt_name(self) -> str:
        """The format's registry name (``self.format.name``)."""
        return self.format.name

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown QuantLinear mode {value!r}; valid modes: {', '.join(MODES)}")
        self._mode = value

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The format's stored tensors (bare names -> this module's buffers, no copies), bias excluded."""
        return {name: self._buffers[name] for name in self._quant_names}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in ``dtype`` (computed in float32)."""
        return self.format.dequantize(self.stored_tensors(), (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode, fmt, tensors = self._mode, self.format, self.stored_tensors()
        if mode == "auto":
            mode = "kernel" if fmt.kernel_runs(x, (self.out_features, self.in_features)) else "weight_only"
        if mode == "kernel":
            return fmt.matmul(x, tensors, self.bias)
        if mode == "reference":
            return fmt.matmul_kernel_ref(x, tensors, self.bias)
        return fmt.matmul_dequantized(x, tensors, self.bias)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype), .half(), .bfloat16() convert every floating buffer: that would turn fp8 codes
        # and the scales into other dtypes. Apply fn (device moves), but keep quantized buffers' dtypes.
        kept = {}
        for name in self._quant_names:
            t = self._buffers.get(name)
            if t is not None:
                kept[name] = t
                self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"bias={self.bias is not None}, mode={self.mode}")


def as_run_on_gpu(mode: str) -> str:
    """The mode whose pure-torch computation is what ``mode`` runs on a capable GPU: ``"auto"`` becomes
    ``"reference"`` (the kernel's reference: W8A8 formats quantize activations per token, as their kernels
    do), other modes stay. On a CPU ``"auto"`` itself falls back to weight-only, which would hide the
    activation error of every W8A8 layer from an evaluation."""
    return "reference" if mode == "auto" else mode


def runtime_output(fmt: QuantFormat, tensors: dict[str, torch.Tensor], x: torch.Tensor, mode: str,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a weight stored as ``tensors`` (bare names, any number of output rows) in
    ``fmt``, computed by :meth:`QuantLinear.forward` in ``as_run_on_gpu(mode)``: what the runtime computes
    for a layer planned with ``mode`` (:attr:`glmq.quant.plan.LayerPlan.mode`), on any device. The
    fidelity report scores layers through this function, so that its figures are the runtime's."""
    n, k = fmt._stored_shape(tensors)
    layer = QuantLinear(k, n, fmt, bias=bias is not None, mode=as_run_on_gpu(mode), device="meta",
                        bias_dtype=bias.dtype if bias is not None else torch.float32)
    state = dict(tensors, bias=bias) if bias is not None else dict(tensors)
    layer.load_state_dict(state, assign=True)
    return layer(x)


def swap_linears(module: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Replace named ``nn.Linear`` submodules of ``module`` in place by :class:`QuantLinear`.

    Args:
        module: the model (or any module) whose linears to replace.
        plan: qualified submodule name -> a :class:`QuantFormat`, or ``{"format": QuantFormat or registry
            name, "mode": ...}`` (``mode`` optional, default ``"auto"``). The loader builds it from a
            checkpoint's ``quantization_config`` (:func:`glmq.runtime.loader.quant_plan`).

    A linear whose weight is on the meta device becomes :meth:`QuantLinear.empty` on meta (to be filled by
    ``load_state_dict(..., assign=True)``); a linear with real weights is quantized with the format's
    round-to-nearest (:meth:`QuantLinear.from_linear`), so the module keeps working.

    Returns:
        ``module`` itself.
    """
    for name, spec in plan.items():
        if isinstance(spec, (QuantFormat, str)):
            spec = {"format": spec}
        if not isinstance(spec, dict) or "format" not in spec or set(spec) - set(_PLAN_KEYS):
            got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(f"plan entry {name!r}: needs 'format' and only {', '.join(_PLAN_KEYS)}; got {got}")
        fmt = _as_format(spec["format"], {})
        mode = spec.get("mode", "auto")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = module.get_submodule(parent_name) if parent_name else module
            old = getattr(parent, child)
        except AttributeError:
            raise ValueError(f"plan entry {name!r}: no such submodule in {type(module).__name__}") from None
        if isinstance(old, QuantLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"plan entry {name!r}: is a {type(old).__name__}, not an nn.Linear")
        if old.weight.is_meta:
            bias_dtype = old.bias.dtype if old.bias is not None else old.weight.dtype
            new = QuantLinear.empty(old.in_features, old.out_features, fmt, old.bias is not None,
                                    device="meta", bias_dtype=bias_dtype, mode=mode)
        else:
            new = QuantLinear.from_linear(old, fmt, mode=mode)
        setattr(parent, child, new)
    return module
