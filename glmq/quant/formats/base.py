"""The interface every storage format implements.

A *format* says how one ``nn.Linear`` weight ``W`` of shape ``[N_out, K_in]`` is stored: which tensors sit
under the linear's prefix in the safetensors file, with which shapes and dtypes, and how to turn them back
into numbers. A format does not choose its scales cleverly: it offers round-to-nearest parameters
(:meth:`QuantFormat.qparams`) and accepts precomputed ones, so that algorithms (RTN, HQQ, GPTQ, in
``glmq.quant.algorithms``) stay separate from the layouts they fill.

Every format here is *grouped affine along K*: the columns of ``W`` fall into groups of ``G`` consecutive
``k`` (``G = K`` for per-output-channel formats), each row and group has one scale ``s`` (and, for
asymmetric formats, one zero point ``z``), and each weight is an integer or float8 code ``q`` with
``w ~= (q - z) * s``. :meth:`QuantFormat.fake_quantize` applies exactly that map, elementwise, to any
slice of columns, which is what GPTQ needs column by column.

Formats are frozen dataclasses with a ``version`` field; :meth:`QuantFormat.config` describes one
precisely enough for a loader that has never seen the file, and ``format_from_config`` (in the registry)
rebuilds it.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from glmq.errors import GlmqError

Shape = tuple[int, ...]
TensorSpec = dict[str, tuple[Shape, torch.dtype]]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in configs and safetensors headers)."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantFormat(ABC):
    """A storage layout for one linear weight ``[N_out, K_in]``; see the module docstring.

    Subclasses are frozen dataclasses whose fields are the format's parameters plus ``version``; they set
    the class attributes below and implement the abstract methods. All tensor methods run on whatever
    device their inputs are on and compute in fp32.
    """

    name: ClassVar[str]
    """Registry key, also the ``"format"`` entry of :meth:`config`."""
    # Every format also has ``symmetric`` (a field where the format offers the choice, else a ClassVar):
    # True when it stores no zero point.
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    """Layout versions this code reads and writes."""

    version: int = 1

    def __post_init__(self) -> None:
        if self.version not in self.VERSIONS:
            raise GlmqError(
                f"{self.name} format version {self.version} is not supported by this glmq "
                f"(supported: {', '.join(map(str, self.VERSIONS))}); upgrade glmq or re-quantize."
            )

    # ---- description -----------------------------------------------------------------------------------

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """A JSON-able dict describing the layout precisely (format, version, bits, group size, packing,
        dtypes, the dequantization formula). ``format_from_config(fmt.config()) == fmt``."""

    def params(self) -> dict[str, Any]:
        """The constructor arguments (dataclass fields), JSON-able."""
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantFormat:
        """Rebuild a format from :meth:`config`; descriptive keys present in ``config`` must agree."""
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            fmt = cls(**{k: v for k, v in config.items() if k in fields})
        except TypeError as e:
            raise GlmqError(f"bad {cls.name} format config {config}: {e}") from None
        described = fmt.config()
        wrong = {k: (config[k], described[k]) for k in config if k in described and config[k] != described[k]}
        if wrong:
            detail = "; ".join(f"{k}: got {got!r}, this glmq writes {want!r}" for k, (got, want) in wrong.items())
            raise GlmqError(f"{cls.name} format config does not match the layout glmq implements ({detail}).")
        return fmt

    def group_size_for(self, k_in: int) -> int:
        """Number of consecutive ``k`` sharing one scale (``k_in`` for per-output-channel formats)."""
        return k_in

    # ---- validation --------------------------------------------------------------------------------------

    def check(self, shape: Shape, dtype: torch.dtype = torch.bfloat16) -> None:
        """Raise :class:`GlmqError` if a weight of this shape and dtype cannot be stored in this format."""
        shape = tuple(shape)
        if len(shape) != 2:
            raise GlmqError(
                f"{self.name} stores 2-D linear weights [N_out, K_in]; got a tensor of shape {list(shape)}."
            )
        if min(shape) <= 0:
            raise GlmqError(f"{self.name} cannot store an empty weight of shape {list(shape)}.")
        if dtype not in _FLOAT_DTYPES:
            raise GlmqError(
                f"{self.name} quantizes floating-point weights (float32/float16/bfloat16); got {dtype_name(dtype)}."
            )

    @abstractmethod
    def expected_tensors(self, prefix: str, shape: Shape) -> TensorSpec:
        """``{full tensor name: (shape, dtype)}`` that a quantized linear of weight ``shape`` stores under
        ``prefix`` (bias excluded: it stays ``{prefix}.bias`` in its original dtype). ``prefix`` may be ``""``
        for the bare names that :meth:`quantize` returns."""

    def validate_tensors(self, tensors: dict[str, torch.Tensor], shape: Shape) -> None:
        """Raise :class:`GlmqError` unless ``tensors`` (bare names) has exactly the expected names, shapes
        and dtypes for a weight of ``shape``."""
        self.check(shape, torch.float32)
        want = self.expected_tensors("", shape)
        if set(tensors) != set(want):
            raise GlmqError(
                f"{self.name} expects tensors {sorted(want)} for a weight of shape {list(shape)}; "
                f"got {sorted(tensors)}."
            )
        for key, (w_shape, w_dtype) in want.items():
            t = tensors[key]
            if tuple(t.shape) != w_shape or t.dtype != w_dtype:
                raise GlmqError(
                    f"{self.name} tensor '{key}' should be {dtype_name(w_dtype)} {list(w_shape)}; "
                    f"got {dtype_name(t.dtype)} {list(t.shape)}."
                )

    def checked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Validate a weight (:meth:`check`, then finite values) and return it as fp32 (a copy only when
        the dtype changes); raises :class:`GlmqError` on NaN/Inf."""
        self.check(tuple(weight.shape), weight.dtype)
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise GlmqError(
                f"cannot quantize a weight of shape {list(weight.shape)} to {self.name}: "
                f"it holds {bad} NaN/Inf value(s)."
            )
        return w

    # ---- numbers -----------------------------------------------------------------------------------------

    @abstractmethod
    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest ``(scale, zero)`` for ``weight`` ``[N, K]``, in the stored dtypes and shapes
        (``[N, K // group]``); ``zero`` is ``None`` for symmetric formats."""

    @abstractmethod
    def fake_quantize(
        self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Quantize then dequantize ``weight`` elementwise with ``scale``/``zero`` broadcastable to it
        (e.g. ``weight`` ``[N, m]`` with ``[N, 1]`` for one column, or ``[N, groups, G]`` with
        ``[N, groups, 1]``). Returns fp32 values bit-identical to what
        :meth:`dequantize` gives for the stored codes."""

    @abstractmethod
    def quantize(
        self, weight: torch.Tensor, *, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Quantize ``weight`` ``[N, K]`` (any float dtype) into the stored tensors, keyed by bare name
        (``"weight"``, ``"weight_scale"``, ``"weight_zero"``). ``scale``/``zero`` override the RTN
        parameters (shapes as :meth:`qparams` returns). Raises :class:`GlmqError` for NaN/Inf weights or a
        shape the format cannot hold."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], shape: Shape) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` that the stored ``tensors`` (bare names) represent."""

    def matmul_ref(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reference ``y = x @ W^T + bias`` for the stored weight: ``x`` ``[..., K]`` -> ``[..., N]``.

        Pure torch, computed in fp32 (dequantized weight, fp32 accumulate, bias added in fp32) and returned
        in ``x.dtype``. Every kernel consuming this layout is tested against it.
        """
        shape = self._stored_shape(tensors)
        if x.shape[-1] != shape[1]:
            raise GlmqError(f"matmul_ref: x has {x.shape[-1]} input features, the weight expects K={shape[1]}.")
        w = self.dequantize(tensors, shape)
        y = x.float() @ w.T
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    # ---- runtime: what QuantLinear.forward calls ------------------------------------------------------

    kernel_quantizes_activations: ClassVar[bool] = False
    """True when :meth:`matmul` quantizes ``x`` as well (W8A8); the planner then maps a recipe's
    ``activations = "weight_only"`` to the dequantize-then-matmul path instead."""

    def kernel_runs(self, x: torch.Tensor, shape: Shape) -> bool:
        """Whether :meth:`matmul` can run for input ``x`` and a weight of ``shape`` here (device, dtype,
        alignment). False for formats without a kernel."""
        return False

    def matmul(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Kernel matmul ``x @ W^T + bias`` through ``glmq.kernels`` (the fast path), ``x`` ``[..., K]`` ->
        ``[..., N]`` in ``x.dtype``. W8A8 formats quantize ``x`` per token first. Raises where the kernel
        cannot run; :meth:`kernel_runs` says where it can."""
        raise GlmqError(f"{self.name} has no kernel; use matmul_dequantized or matmul_ref.")

    def matmul_kernel_ref(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pure-torch reference of :meth:`matmul`, the same numbers in fp32 (the kernel's ``*_ref``): for a
        weight-only kernel this is :meth:`matmul_ref`; W8A8 formats quantize ``x`` as the kernel does."""
        return self.matmul_ref(x, tensors, bias)

    def matmul_dequantized(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weight-only fallback for any device: dequantize to ``x.dtype``, then ``F.linear`` (the stored
        tensors are not validated here: this runs on every forward)."""
        w = self._dequantize_stored(tensors).to(x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    @abstractmethod
    def _dequantize_stored(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`dequantize` without validation: the fp32 weight ``[N, K]`` of well-formed ``tensors``."""

    @abstractmethod
    def _stored_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        """The logical weight shape ``(N, K)`` recovered from stored tensors."""

    def nbytes(self, shape: Shape) -> int:
        """Exact bytes stored for a weight of ``shape`` (scales and zeros included, bias excluded)."""
        spec = self.expected_tensors("", shape).values()
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in spec)

    def bytes_per_weight(self, shape: Shape | None = None) -> float:
        """Stored bytes per weight element, scales and zeros amortized.

        Exact for ``shape``; without it, exact for group-wise formats and the large-``K`` limit for
        per-output-channel formats (whose per-row scale costs ``4 / K`` bytes more per weight).
        """
        if shape is None:
            return self._asymptotic_bytes_per_weight()
        return self.nbytes(shape) / math.prod(shape)

    @abstractmethod
    def _asymptotic_bytes_per_weight(self) -> float: ...

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items() if k != "version")
        return f"{self.name}({args})" if args else self.name


def guard_scale(scale: torch.Tensor) -> torch.Tensor:
    """Replace zero scales (all-zero rows or groups) by 1 and keep the rest >= the smallest normal fp32,
    so that ``w / s`` never divides by zero and every code of a zero group dequantizes to exactly 0."""
    one = torch.ones((), dtype=scale.dtype, device=scale.device)
    return torch.where(scale > 0, scale, one).clamp_min(torch.finfo(torch.float32).tiny)


# The W8A8 kernel functions of each per-channel format, looked up once (see PerChannelFormat._kernels).
_W8A8_KERNELS: dict[str, tuple[Any, Any, Any]] = {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannelFormat(QuantFormat):
    """Shared body of the symmetric per-output-channel formats (int8, fp8): ``weight`` ``[N, K]`` of
    ``code_dtype``, ``weight_scale`` float32 ``[N, 1]`` with ``s = amax(|w_row|) / qmax``, ``w ~= q * s``."""

    symmetric: ClassVar[bool] = True
    code_dtype: ClassVar[torch.dtype]
    qmax: ClassVar[float]

    @abstractmethod
    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes of ``code_dtype`` for fp32 ``w`` and fp32 ``scale`` broadcastable to it."""

    def _base_config(self) -> dict[str, Any]:
        return {
            "format": self.name,
            "version": self.version,
            "bits": 8,
            "granularity": "per output channel",
            "symmetric": True,
            "weight_dtype": dtype_name(self.code_dtype),
            "scale_dtype": "float32",
            "scale_shape": "[N, 1]",
            "scale_rule": f"amax(|w_row|) / {self.qmax:g}",
            "dequant": "q * s",
        }

    def expected_tensors(self, prefix: str, shape: Shape) -> TensorSpec:
        n, k = shape
        dot = f"{prefix}." if prefix else ""
        return {f"{dot}weight": ((n, k), self.code_dtype), f"{dot}weight_scale": ((n, 1), torch.float32)}

    def _asymptotic_bytes_per_weight(self) -> float:
        return float(torch.empty((), dtype=self.code_dtype).element_size())

    def _stored_shape(self, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        n, k = tensors["weight"].shape
        return n, k

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        amax = weight.float().abs().amax(dim=-1, keepdim=True)
        return guard_scale(amax / self.qmax), None

    def fake_quantize(
        self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None
    ) -> torch.Tensor:
        if zero is not None:
            raise ValueError(f"{self.name} is symmetric and stores no zero point; pass zero=None.")
        s = scale.float()
        return self._codes(weight.float(), s).float() * s

    def quantize(
        self, weight: torch.Tensor, *, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if zero is not None:
            raise ValueError(f"{self.name} is symmetric and stores no zero point; pass zero=None.")
        w = self.checked_weight(weight)
        if scale is None:
            scale, _ = self.qparams(w)
        else:
            if tuple(scale.shape) != (w.shape[0], 1):
                raise ValueError(f"{self.name} scale must have shape [{w.shape[0]}, 1]; got {list(scale.shape)}.")
            scale = scale.float()
            if not bool((torch.isfinite(scale) & (scale > 0)).all()):
                raise ValueError(f"{self.name} scales must be finite and positive.")
        return {"weight": self._codes(w, scale).contiguous(), "weight_scale": scale.contiguous()}

    def dequantize(self, tensors: dict[str, torch.Tensor], shape: Shape) -> torch.Tensor:
        self.validate_tensors(tensors, shape)
        return self._dequantize_stored(tensors)

    def _dequantize_stored(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight"].float() * tensors["weight_scale"]

    # ---- runtime: W8A8 kernels (glmq.kernels.w8a8_linear), imported on first use ------------------------

    kernel_quantizes_activations: ClassVar[bool] = True
    kernel_alignment: ClassVar[int]
    """K and N must be multiples of this for the kernel's GEMM (``torch._scaled_mm``: 16, ``_int_mm``: 8)."""

    kernel_names: ClassVar[tuple[str, str, str]]
    """``(linear, linear_ref, supported)``: this format's functions in ``glmq.kernels.w8a8_linear``."""

    def _kernels(self) -> tuple[Any, Any, Any]:
        fns = _W8A8_KERNELS.get(self.name)
        if fns is None:  # on first use: the kernels import triton; afterwards a dict lookup per forward
            from glmq.kernels import w8a8_linear

            fns = _W8A8_KERNELS[self.name] = tuple(getattr(w8a8_linear, n) for n in self.kernel_names)
        return fns

    def kernel_runs(self, x: torch.Tensor, shape: Shape) -> bool:
        if x.device.type != "cuda":
            return False
        a = self.kernel_alignment
        return self._kernels()[2](x.device) and shape[0] % a == 0 and shape[1] % a == 0

    def matmul(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._kernels()[0](x, tensors["weight"], tensors["weight_scale"], bias)

    def matmul_kernel_ref(
        self, x: torch.Tensor, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._kernels()[1](x, tensors["weight"], tensors["weight_scale"], bias)
