"""``QuantLinear``: an ``nn.Linear`` whose weight is stored quantized, and the swap that installs it.

The module holds the stored tensors of glmq's formats as buffers under their stored names, so that
``load_state_dict`` of a quantized checkpoint fills it directly (``W [N, K]`` = [out_features, in_features]):

=========== ========================== ============================== =================== ==============
format      ``weight``                 ``weight_scale``               ``weight_zero``     dequantized
=========== ========================== ============================== =================== ==============
int4        uint8 [N, K // 2]          bfloat16 [N, K // G]           bfloat16 [N, K // G] (q - z) * s
            (low nibble = even k)                                     (asymmetric only)   z = 8 if sym.
fp8_e4m3    float8_e4m3fn [N, K]       float32 [N, 1]                 -                   q * s
int8        int8 [N, K] in [-127, 127] float32 [N, 1]                 -                   q * s
=========== ========================== ============================== =================== ==============

plus ``bias`` (optional, the original dtype). ``forward`` picks a path by ``mode``:

- ``"kernel"``: int4 -> Triton W4A16 kernels; fp8_e4m3 -> W8A8 fp8 (``torch._scaled_mm``, sm_89+);
  int8 -> W8A8 int8 (``torch._int_mm``). Raises where the kernel cannot run.
- ``"reference"``: the kernels' pure-torch references (float32; W8A8 formats quantize activations too).
- ``"auto"`` (default): ``"kernel"`` where it can run (CUDA, a capable GPU, a bf16/fp16 input for int4),
  else weight-only: dequantize the weight to the input's dtype and ``F.linear``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from glmq.kernels.int4_matmul import GROUP_SIZES, int4_dequantize, int4_matmul, int4_matmul_ref
from glmq.kernels.w8a8_linear import (fp8_linear, fp8_linear_ref, fp8_supported, int8_linear, int8_linear_ref,
                                      int8_supported, weight_only_linear)

__all__ = ["QuantLinear", "swap_linears", "FORMATS", "MODES"]

FORMATS = ("int4", "fp8_e4m3", "int8")
MODES = ("auto", "kernel", "reference", "weight_only")
_QUANT_BUFFERS = ("weight", "weight_scale", "weight_zero")
_PLAN_KEYS = ("fmt_name", "group_size", "symmetric", "mode")


def _check_format(fmt_name: str, group_size: Optional[int], symmetric: bool) -> Optional[int]:
    """Validate format parameters; returns the effective group size (None for per-channel formats)."""
    if fmt_name not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt_name!r}; valid formats: {', '.join(FORMATS)}")
    if fmt_name == "int4":
        group_size = 128 if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
        return group_size
    if group_size is not None:
        raise ValueError(f"{fmt_name} is per output channel: group_size must be None, got {group_size}")
    if not symmetric:
        raise ValueError(f"{fmt_name} is symmetric only: symmetric must be True")
    return None


def _stored_specs(fmt_name: str, out_features: int, in_features: int, group_size: Optional[int],
                  symmetric: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the quantized buffers of one layer."""
    n, k = out_features, in_features
    if fmt_name == "int4":
        specs = {"weight": ((n, k // 2), torch.uint8), "weight_scale": ((n, k // group_size), torch.bfloat16)}
        if not symmetric:
            specs["weight_zero"] = ((n, k // group_size), torch.bfloat16)
        return specs
    wdtype = torch.float8_e4m3fn if fmt_name == "fp8_e4m3" else torch.int8
    return {"weight": ((n, k), wdtype), "weight_scale": ((n, 1), torch.float32)}


def rtn_quantize(weight: torch.Tensor, fmt_name: str, group_size: Optional[int] = None,
                 symmetric: bool = True) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of a float weight ``[N, K]`` into the stored tensors of ``fmt_name``.

    A local stand-in until ``glmq.quant`` provides the formats' own quantizers. int4 symmetric uses
    ``s = amax / 7`` per group (codes ``q = round(w / s) + 8`` clamped to 0..15); asymmetric uses the group's
    range including 0, ``s = (max - min) / 15`` and an integer zero point. fp8/int8 use one scale per row,
    ``amax / 448`` and ``amax / 127``. Scales are rounded to their stored dtype before the codes are chosen.
    """
    group_size = _check_format(fmt_name, group_size, symmetric)
    w = weight.detach().float()
    n, k = w.shape
    if fmt_name == "int4":
        if k % group_size:
            raise ValueError(f"int4: in_features={k} must be a multiple of group_size={group_size}")
        g = w.reshape(n, k // group_size, group_size)
        if symmetric:
            s = (g.abs().amax(-1) / 7).to(torch.bfloat16)
            s = torch.where(s == 0, torch.ones_like(s), s)
            q = (g / s.float()[..., None]).round().clamp(-8, 7) + 8
            out = {"weight_scale": s}
        else:
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            s = ((hi - lo) / 15).to(torch.bfloat16)
            s = torch.where(s == 0, torch.ones_like(s), s)
            z = (-lo / s.float()).round().clamp(0, 15).to(torch.bfloat16)
            q = (g / s.float()[..., None] + z.float()[..., None]).round().clamp(0, 15)
            out = {"weight_scale": s, "weight_zero": z}
        q = q.to(torch.uint8).reshape(n, k)
        out["weight"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        return out
    qmax = 448.0 if fmt_name == "fp8_e4m3" else 127.0
    s = w.abs().amax(1, keepdim=True) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    y = (w / s).clamp(-qmax, qmax)
    q = y.to(torch.float8_e4m3fn) if fmt_name == "fp8_e4m3" else y.round().to(torch.int8)
    return {"weight": q.contiguous(), "weight_scale": s.contiguous()}


class QuantLinear(nn.Module):
    """A linear layer ``y = x @ W.T + bias`` with ``W`` stored in one of glmq's quantized formats.

    Attributes:
        in_features, out_features: as ``nn.Linear``.
        fmt_name: ``"int4"``, ``"fp8_e4m3"`` or ``"int8"``.
        group_size: int4 group size (32/64/128); None for the per-channel formats.
        symmetric: int4 without a zero point (``w = (q - 8) * s``); always True for fp8/int8.
        mode: ``"auto"``, ``"kernel"`` or ``"reference"`` (see the module docstring).

    Buffers (stored names): ``weight``, ``weight_scale``, ``weight_zero`` (int4 asymmetric), ``bias`` (or None).
    ``module.to(dtype)`` / ``.half()`` move these buffers but keep the dtypes of the quantized ones; only
    ``bias`` changes dtype.

    Build with :meth:`from_linear` (quantize or wrap an existing ``nn.Linear``) or :meth:`empty` (for loading).
    """

    def __init__(self, in_features: int, out_features: int, fmt_name: str, *, bias: bool = False,
                 group_size: Optional[int] = None, symmetric: bool = True, mode: str = "auto",
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.group_size = _check_format(fmt_name, group_size, symmetric)
        if fmt_name == "int4" and in_features % self.group_size:
            raise ValueError(f"int4: in_features={in_features} must be a multiple of group_size={self.group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.fmt_name = fmt_name
        self.symmetric = symmetric
        self.mode = mode
        for name, (shape, dtype) in _stored_specs(fmt_name, out_features, in_features, self.group_size,
                                                  symmetric).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if fmt_name != "int4" or symmetric:
            self.register_buffer("weight_zero", None)
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def empty(cls, in_features: int, out_features: int, fmt_name: str, bias: bool, *,
              device: torch.device | str | None = "meta", bias_dtype: torch.dtype = torch.bfloat16,
              **params: Any) -> "QuantLinear":
        """Uninitialized buffers, by default on the meta device, to be filled by ``load_state_dict``.

        On meta, load with ``load_state_dict(sd, assign=True)`` (or call ``to_empty`` first).
        ``params``: ``group_size``, ``symmetric``, ``mode``.
        """
        return cls(in_features, out_features, fmt_name, bias=bias, device=device, bias_dtype=bias_dtype, **params)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt_name: str, tensors: Optional[dict[str, torch.Tensor]] = None,
                    **params: Any) -> "QuantLinear":
        """A QuantLinear computing ``linear``, on its device.

        Args:
            linear: the float layer; its bias is kept (unless ``tensors`` holds one).
            fmt_name: ``"int4"``, ``"fp8_e4m3"`` or ``"int8"``.
            tensors: already quantized stored tensors (``weight``, ``weight_scale``, ``weight_zero``, ``bias``);
                None quantizes ``linear.weight`` with round-to-nearest (:func:`rtn_quantize`).
            params: ``group_size``, ``symmetric``, ``mode``.
        """
        group_size, symmetric = params.get("group_size"), params.get("symmetric", True)
        device = linear.weight.device
        bias_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
        if tensors is None:
            tensors = rtn_quantize(linear.weight, fmt_name, group_size, symmetric)
        has_bias = "bias" in tensors or linear.bias is not None
        module = cls(linear.in_features, linear.out_features, fmt_name, bias=has_bias, device="meta",
                     bias_dtype=bias_dtype, **params)
        state = {name: t.detach().to(device) for name, t in tensors.items()}
        if has_bias and "bias" not in state:
            state["bias"] = linear.bias.detach().clone()
        module._check_tensors(state)
        module.load_state_dict(state, assign=True)
        return module

    def _check_tensors(self, state: dict[str, torch.Tensor]) -> None:
        expected = {name: (tuple(b.shape), b.dtype) for name, b in self._buffers.items() if b is not None}
        unknown = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unknown or missing:
            raise ValueError(f"{self.fmt_name} tensors: missing {missing}, unexpected {unknown}; "
                             f"expected exactly {sorted(expected)}")
        for name, t in state.items():
            shape, dtype = expected[name]
            if tuple(t.shape) != shape or (name != "bias" and t.dtype != dtype):
                raise ValueError(f"{self.fmt_name} tensor {name!r} must be {dtype} {list(shape)}, "
                                 f"got {t.dtype} {list(t.shape)}")

    # -- behaviour ---------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown QuantLinear mode {value!r}; valid modes: {', '.join(MODES)}")
        self._mode = value

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out_features, in_features]`` in ``dtype`` (computed in float32)."""
        if self.fmt_name == "int4":
            w = int4_dequantize(self.weight, self.weight_scale, self.weight_zero, group_size=self.group_size)
        else:
            w = self.weight.float() * self.weight_scale
        return w.to(dtype)

    def _kernel_runs(self, x: torch.Tensor) -> bool:
        if x.device.type != "cuda":
            return False
        if self.fmt_name == "int4":
            return x.dtype in (torch.bfloat16, torch.float16)
        if self.fmt_name == "fp8_e4m3":
            return fp8_supported(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0
        return int8_supported(x.device) and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self._mode
        if mode == "auto":
            mode = "kernel" if self._kernel_runs(x) else "weight_only"
        args = (x, self.weight, self.weight_scale)
        if self.fmt_name == "int4":
            if mode == "weight_only":
                return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            fn = int4_matmul if mode == "kernel" else int4_matmul_ref
            return fn(*args, self.weight_zero, group_size=self.group_size, bias=self.bias)
        if mode == "weight_only":
            return weight_only_linear(*args, self.bias)
        if self.fmt_name == "fp8_e4m3":
            return (fp8_linear if mode == "kernel" else fp8_linear_ref)(*args, self.bias)
        return (int8_linear if mode == "kernel" else int8_linear_ref)(*args, self.bias)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype), .half(), .bfloat16() convert every floating buffer: that would turn fp8 codes
        # and the scales into other dtypes. Apply fn (device moves), but keep quantized buffers' dtypes.
        kept = {}
        for name in _QUANT_BUFFERS:
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
        group = f", group_size={self.group_size}, symmetric={self.symmetric}" if self.fmt_name == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt_name}{group}, "
                f"bias={self.bias is not None}, mode={self.mode}")


def swap_linears(module: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace named ``nn.Linear`` submodules of ``module`` in place by :class:`QuantLinear`.

    Args:
        module: the model (or any module) whose linears to replace.
        plan: qualified submodule name -> ``{"fmt_name": ..., "group_size": ..., "symmetric": ..., "mode": ...}``
            (only ``fmt_name`` required).

    A linear whose weight is on the meta device becomes :meth:`QuantLinear.empty` on meta (to be filled by
    ``load_state_dict(..., assign=True)``); a linear with real weights is quantized with round-to-nearest
    (:meth:`QuantLinear.from_linear`), so the module keeps working.

    Returns:
        ``module`` itself.
    """
    for name, spec in plan.items():
        unknown = sorted(set(spec) - set(_PLAN_KEYS))
        if unknown or "fmt_name" not in spec:
            raise ValueError(f"plan entry {name!r}: needs 'fmt_name' and only {', '.join(_PLAN_KEYS)}; "
                             f"got {sorted(spec)}")
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
        params = {key: value for key, value in spec.items() if key != "fmt_name"}
        if old.weight.is_meta:
            bias_dtype = old.bias.dtype if old.bias is not None else old.weight.dtype
            new = QuantLinear.empty(old.in_features, old.out_features, spec["fmt_name"], old.bias is not None,
                                    device="meta", bias_dtype=bias_dtype, **params)
        else:
            new = QuantLinear.from_linear(old, spec["fmt_name"], **params)
        setattr(parent, child, new)
    return module
