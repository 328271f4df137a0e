"""bitsandbytes' serialized layouts, produced without bitsandbytes.

A checkpoint quantized with bitsandbytes stores, per ``nn.Linear``, the entries that bitsandbytes'
``Linear4bit`` / ``Linear8bitLt`` put in ``state_dict()``; transformers' and diffusers' ``from_pretrained``
rebuild the layers from them when ``config.json`` carries the matching ``quantization_config``. The
functions here compute those entries from a float weight so that glmq's exporters can stream a checkpoint
tensor by tensor on any machine, bitsandbytes installed or not.

NF4 (``Linear4bit``, ``quant_type="nf4"``), blocks of ``blocksize`` (64) consecutive weights, row-major:

- ``weight``: uint8 ``(numel // 2, 1)``; each byte holds two 4-bit indices into the NF4 table, the
  earlier weight in the high nibble. A weight's index is that of the NF4 value nearest to
  ``w * (1 / absmax)`` (ties to the lower value), ``absmax`` being its block's largest ``|w|``.
- ``weight.absmax``: float32 per block; with double quantization (``compress_statistics=True``) it is
  instead uint8: ``absmax - offset`` (``offset`` = mean absmax) quantized in blocks of 256 to the nearest
  value of bitsandbytes' signed 8-bit dynamic map, with ``weight.nested_absmax`` (float32 per 256 blocks)
  and ``weight.nested_quant_map`` (the 256-value map).
- ``weight.quant_map``: the 16 NF4 values (float32).
- ``weight.quant_state.bitsandbytes__nf4``: uint8 bytes of a JSON object with ``quant_type``,
  ``blocksize``, ``dtype`` (the weight's dtype when quantized), ``shape`` and, with double quantization,
  ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

Int8 (``Linear8bitLt``, LLM.int8 with ``has_fp16_weights=False``): the weight is cast to fp16; per output
row ``SCB = max |w|`` (float32) and ``weight = round(w * (127 / SCB))`` (int8, ties to even), plus
``weight_format`` (uint8 0: row-major).

Where bitsandbytes' CPU extension searches the 8-bit dynamic map for the double-quantized absmax, it uses an
approximate lookup that can return a neighbour of the nearest value (mostly for values within ~1e-4 of
zero, where the map is dense). glmq always takes the nearest value, as bitsandbytes' pure-PyTorch backend
does; both decode the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import torch

from glmq.errors import GlmqError

__all__ = [
    "NF4_CODE",
    "bnb_quantization_config",
    "dynamic_map",
    "int8_dequantize",
    "int8_state_dict",
    "nf4_dequantize",
    "nf4_state_dict",
]

# The NF4 table (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], as bitsandbytes stores them (float32).
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TINY = 1e-38  # bitsandbytes' floor on a block's absmax when scaling (an all-zero block stays zero)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (float32, 256 sorted values in [-1, 1]).

    Seven decades of magnitude: decade ``k`` (0..6) holds ``2**k`` values ``10**(k-6) * m``, ``m`` the
    midpoints of ``2**k`` equal steps from 0.1 to 1 (computed in float32), with both signs; plus 0 and 1.
    """
    values: list[float] = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (k - 6)
        # The products are float32 tensor ops (not Python doubles): that rounding is part of the map.
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for each entry of ``scaled``; a value exactly
    half-way between two codes takes the lower one."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.searchsorted(bounds, scaled.contiguous(), side="left")


def _blockwise(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat float32 ``values`` into blocks; return (absmax per block, values scaled to [-1, 1])."""
    n = values.numel()
    nblocks = -(-n // blocksize)
    padded = torch.zeros(nblocks * blocksize, dtype=torch.float32)
    padded[:n] = values
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1), -1, 1).reshape(-1)[:n]
    return absmax, scaled


def _weight_2d(weight: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise GlmqError(f"{what} takes a 2-D nn.Linear weight (out_features, in_features)")
    if weight.dtype not in _DTYPE_NAMES:
        raise GlmqError(f"{what} takes a float32, float16 or bfloat16 weight; got {weight.dtype}")
    if weight.device.type == "meta":
        raise GlmqError(f"{what} needs the weight's values; got a meta tensor")
    w = weight.detach().cpu()
    if not torch.isfinite(w).all():
        raise GlmqError(f"{what}: the weight holds NaN or infinite values")
    return w


def nf4_state_dict(
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    double_quant: bool = True,
    blocksize: int = 64,
) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` entries of a bitsandbytes ``Linear4bit`` (NF4) holding ``weight``.

    ``weight``: (out_features, in_features) float32/float16/bfloat16; its dtype is recorded as the
    layer's original dtype. ``bias`` is passed through unchanged. Keys are relative to the layer's prefix
    and in bitsandbytes' order: ``weight``, ``bias``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``.
    """
    w = _weight_2d(weight, "nf4_state_dict")
    if blocksize not in _BLOCKSIZES:
        raise GlmqError(f"bitsandbytes 4-bit block size must be one of {_BLOCKSIZES}; got {blocksize}")
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    absmax, scaled = _blockwise(w.reshape(-1).float(), blocksize)
    idx = _nearest_code(scaled, code).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, torch.zeros(1, dtype=torch.uint8)])
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)

    out: dict[str, torch.Tensor] = {"weight": packed}
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": _DTYPE_NAMES[w.dtype],
        "shape": list(w.shape),
    }
    if double_quant:
        offset = absmax.mean()
        nested_code = dynamic_map()
        nested_absmax, nested_scaled = _blockwise(absmax - offset, _NESTED_BLOCKSIZE)
        out["weight.absmax"] = _nearest_code(nested_scaled, nested_code).to(torch.uint8)
        out["weight.quant_map"] = code
        out["weight.nested_absmax"] = nested_absmax
        out["weight.nested_quant_map"] = nested_code
        meta.update(nested_blocksize=_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    else:
        out["weight.absmax"] = absmax
        out["weight.quant_map"] = code
    out["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def nf4_dequantize(entries: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference decode of :func:`nf4_state_dict` entries (or bitsandbytes' own) to a dense weight."""
    try:
        meta = json.loads(bytes(entries["weight.quant_state.bitsandbytes__nf4"].tolist()))
        packed, code = entries["weight"], entries["weight.quant_map"]
        absmax = entries["weight.absmax"]
    except KeyError as e:
        raise GlmqError(f"not a bitsandbytes NF4 layer: missing state-dict entry {e}") from None
    shape, blocksize = meta["shape"], meta["blocksize"]
    if "nested_blocksize" in meta:
        nested = entries["weight.nested_quant_map"][absmax.long()]
        scale = entries["weight.nested_absmax"].repeat_interleave(meta["nested_blocksize"])[: absmax.numel()]
        absmax = nested * scale + meta["nested_offset"]
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    n = shape[0] * shape[1]
    values = code[idx.long()][:n] * absmax.float().repeat_interleave(blocksize)[:n]
    return values.reshape(shape).to(dtype)


def int8_state_dict(weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` entries of a bitsandbytes ``Linear8bitLt`` (``has_fp16_weights=False``) holding
    ``weight``: ``weight`` (int8, same shape), ``bias`` (unchanged), ``SCB`` (float32 per output row) and
    ``weight_format`` (uint8 0, row-major)."""
    w = _weight_2d(weight, "int8_state_dict").to(torch.float16)
    if not torch.isfinite(w).all():
        raise GlmqError("int8_state_dict: the weight exceeds the fp16 range bitsandbytes' int8 format needs")
    scb = w.abs().amax(dim=1).float()
    # An all-zero row has SCB 0: store zeros (bitsandbytes divides by zero there).
    q = torch.round(w * (127.0 / scb.clamp(min=_TINY)).unsqueeze(1)).to(torch.int8)
    out: dict[str, torch.Tensor] = {"weight": q}
    if bias is not None:
        out["bias"] = bias.detach().cpu()
    out["SCB"] = scb
    out["weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return out


def int8_dequantize(entries: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference decode of :func:`int8_state_dict` entries: ``weight * SCB / 127``."""
    return (entries["weight"].float() * (entries["SCB"].float() / 127.0).unsqueeze(1)).to(dtype)


def bnb_quantization_config(
    mode: Literal["nf4", "int8"],
    *,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: Sequence[str] | None = None,
    int8_threshold: float = 6.0,
) -> dict[str, Any]:
    """The ``quantization_config`` object of ``config.json`` for a bitsandbytes checkpoint.

    transformers' and diffusers' ``BitsAndBytesConfig`` serialize to the same keys (this dict equals their
    ``to_dict()``), so one function serves both the AR and the DiT. ``skip_modules`` lists the module
    names left in full precision (``llm_int8_skip_modules``, e.g. ``["lm_head"]``).
    """
    if mode not in ("nf4", "int8"):
        raise GlmqError(f"unknown bitsandbytes mode {mode!r}; valid modes: nf4, int8")
    if compute_dtype not in ("float32", "float16", "bfloat16"):
        raise GlmqError(f"bnb compute dtype must be float32, float16 or bfloat16; got {compute_dtype!r}")
    four = mode == "nf4"
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": not four,
        "_load_in_4bit": four,
        "llm_int8_threshold": float(int8_threshold),
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4" if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "bnb_4bit_compute_dtype": compute_dtype if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": four,
        "load_in_8bit": not four,
    }
