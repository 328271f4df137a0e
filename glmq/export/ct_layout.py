"""compressed-tensors' on-disk layout for glmq's formats (what llm-compressor writes, vLLM, SGLang and
transformers read), written without importing the ``compressed-tensors`` package.

Facts of the layout (read from compressed-tensors 0.20.1, ``compressors/pack_quantized`` and
``compressors/naive_quantized``; the tests check every one against that library):

- **pack-quantized** (integer weights, weight-only): ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]``,
  element ``k`` of a row at bits ``bits * k`` of the row's little-endian bit stream, stored as
  ``q + 2**(bits-1)`` (signed codes offset to unsigned); ``weight_scale`` ``[N, K // G]`` (group) or
  ``[N, 1]`` (channel); ``weight_shape`` int64 ``[2]``; asymmetric only: ``weight_zero_point`` int32
  ``[ceil(N * bits / 32), K // G]``, the signed integer zero points packed the same way along ``N``.
  Dequantization: ``(q - zp) * scale``, computed in the scale's dtype.
- **float-quantized** (fp8 W8A8), **int-quantized** (int8 W8A8), **naive-quantized** (anything else
  unpacked): ``weight`` in fp8 / int8, ``weight_scale`` ``[N, 1]``; ``q * scale``.

glmq's int4 packs two codes ``u = q + 8`` per byte, low nibble first, so its bytes read as little-endian
int32 words *are* ``weight_packed``; a zero point is representable exactly when glmq's is an integer
(round-to-nearest gives one, HQQ gives floats). glmq's fp8 and int8 are the per-channel symmetric
float-quantized / int-quantized layouts with float32 scales as they are (int8 codes -127..127 fit
compressed-tensors' -128..127).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from glmq.errors import GlmqError

if TYPE_CHECKING:
    import torch

    from glmq.quant.formats.base import QuantFormat

CT_VERSION = "0.20.1"
"""The compressed-tensors release whose layout and config schema this module writes and its tests check."""

PACK = "pack-quantized"
FLOAT = "float-quantized"
INT = "int-quantized"
NAIVE = "naive-quantized"


def _args(bits: int, kind: str, *, symmetric: bool = True, group_size: int | None = None,
          strategy: str, dynamic: bool = False) -> dict[str, Any]:
    """One ``QuantizationArgs`` as compressed-tensors serializes it."""
    out: dict[str, Any] = {"num_bits": bits, "type": kind, "symmetric": symmetric, "group_size": group_size,
                           "strategy": strategy, "dynamic": dynamic, "observer": None}
    if not symmetric:
        out["zp_dtype"] = "torch.int8"
    return out


def scheme_for(fmt: QuantFormat, activations: str) -> tuple[str, dict[str, Any]]:
    """``(compression format, QuantizationScheme dict without targets)`` for a glmq layer.

    int4 (weight-only, whatever ``activations`` says: glmq runs it as W4A16) -> pack-quantized W4A16;
    fp8 with ``dynamic_per_token`` -> float-quantized FP8 W8A8 (per-channel weights, dynamic per-token
    activations); int8 with ``dynamic_per_token`` -> int-quantized W8A8; 8-bit weight-only -> int8 as
    pack-quantized W8A16 (what llm-compressor writes), fp8 as naive-quantized FP8 W8A16.
    """
    if fmt.name == "int4":
        w = _args(4, "int", symmetric=fmt.symmetric, group_size=fmt.group_size, strategy="group")
        return PACK, {"weights": w, "input_activations": None, "output_activations": None, "format": PACK}
    if fmt.name in ("fp8_e4m3", "int8"):
        kind = "float" if fmt.name == "fp8_e4m3" else "int"
        w = _args(8, kind, strategy="channel")
        if activations == "dynamic_per_token":
            a = _args(8, kind, strategy="token", dynamic=True)
            form = FLOAT if kind == "float" else INT
            return form, {"weights": w, "input_activations": a, "output_activations": None, "format": form}
        form = NAIVE if kind == "float" else PACK
        return form, {"weights": w, "input_activations": None, "output_activations": None, "format": form}
    raise GlmqError(f"format {fmt.name!r} has no compressed-tensors equivalent in this glmq")


def tensor_specs(fmt: QuantFormat, activations: str, prefix: str,
                 shape: tuple[int, int]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of the entries one layer stores (bias excluded), in writing order."""
    n, k = shape
    form, scheme = scheme_for(fmt, activations)
    if form == PACK:
        bits = scheme["weights"]["num_bits"]
        groups = k // fmt.group_size_for(k)
        scale_dtype = "bfloat16" if fmt.name == "int4" else "float32"
        out = [(f"{prefix}.weight_packed", "int32", (n, -(-k * bits // 32))),
               (f"{prefix}.weight_scale", scale_dtype, (n, groups)),
               (f"{prefix}.weight_shape", "int64", (2,))]
        if not scheme["weights"]["symmetric"]:
            out.append((f"{prefix}.weight_zero_point", "int32", (-(-n * bits // 32), groups)))
        return out
    code = "float8_e4m3fn" if fmt.name == "fp8_e4m3" else "int8"
    return [(f"{prefix}.weight", code, (n, k)), (f"{prefix}.weight_scale", "float32", (n, 1))]


# ----------------------------------------------------------------------------------------------------------
# Bit packing


def _little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise GlmqError("compressed-tensors export packs int32 words from bytes and needs a little-endian host")


def pack_bytes_int32(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[R, B]`` -> int32 ``[R, ceil(B / 4)]``: byte ``b`` of a row at bits ``8 * (b % 4)`` of word
    ``b // 4`` (zero-padded), i.e. the row read as little-endian int32 words."""
    import torch

    _little_endian()
    rows, nbytes = data.shape
    pad = -nbytes % 4
    if pad:
        data = torch.cat([data, data.new_zeros(rows, pad)], dim=1)
    # Through a flat view: a one-row tensor can be contiguous with any stride(0), which view() rejects.
    return data.contiguous().reshape(-1).view(torch.int32).reshape(rows, -1)


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values ``[R, C]`` (0..15) -> int32 ``[R, ceil(C / 8)]``, value ``c`` at bits ``4c``."""
    import torch

    pad = -u.shape[1] % 2
    if pad:
        u = torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1)
    u = u.to(torch.uint8)
    return pack_bytes_int32(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 values ``[R, cols]``."""
    import torch

    _little_endian()
    rows = packed.shape[0]
    b = packed.contiguous().reshape(-1).view(torch.uint8).reshape(rows, -1)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)[:, :cols]


# ----------------------------------------------------------------------------------------------------------
# glmq tensors -> compressed-tensors tensors


def int_zero_points(zero: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """glmq's asymmetric int4 zero points (bf16, code units 0..15) as the nearest integers, and whether
    they all were integers already (the repack is then exact)."""
    import torch

    z = zero.float()
    zi = torch.round(z).clamp_(0, 15)
    return zi, bool(torch.equal(zi, z))


def refit_integer_zero(target: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                       iters: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 parameters with integer zero points fitted to ``target`` ``[N, K]``, starting from a
    float-zero solution ``scale``/``zero`` ``[N, K // G]``: per group, for ``z'`` = floor and ceil of ``z``,
    alternate round-to-nearest codes and the least-squares scale (kept in bf16) ``iters`` times, and keep
    the better ``z'``. Returns ``(codes [N, K], scale bf16, zero)``."""
    import torch

    n, k = target.shape
    t = target.float().reshape(n, k // group_size, group_size)
    s0 = scale.float()
    best = None
    for z in (torch.floor(zero.float()).clamp_(0, 15), torch.ceil(zero.float()).clamp_(0, 15)):
        s = s0
        for it in range(iters + 1):
            u = torch.round(t / s.unsqueeze(-1) + z.unsqueeze(-1)).clamp_(0, 15)
            if it == iters:  # codes for the final scale
                break
            d = u - z.unsqueeze(-1)
            den = d.square().sum(-1)
            fit = ((t * d).sum(-1) / den.clamp_min(1e-30)).to(torch.bfloat16).float()
            s = torch.where((den > 0) & (fit > 0), fit, s)  # a degenerate group keeps its scale
        err = ((u - z.unsqueeze(-1)) * s.unsqueeze(-1) - t).square().sum(-1)
        if best is None:
            best = [err, u, s, z]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better.unsqueeze(-1), u, best[1]),
                    torch.where(better, s, best[2]), torch.where(better, z, best[3])]
    return best[1].reshape(n, k), best[2].to(torch.bfloat16), best[3]


def convert_layer(fmt: QuantFormat, activations: str, tensors: dict[str, torch.Tensor],
                  shape: tuple[int, int], target: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """glmq's stored tensors of one layer (bare names) -> compressed-tensors' (bare names), plus whether
    the result dequantizes to exactly glmq's weight.

    Only one case is not exact: asymmetric int4 with non-integer zero points (HQQ). Without ``target`` its
    zero points are rounded to integers and the codes re-rounded against glmq's dequantized weight with the
    same scales, ``u' = clamp(round((u - z) + z'), 0, 15)`` (a least-squares refit against glmq's own weight
    gained 0.03 dB on a 512x1024 Gaussian layer and costs far more). With ``target`` (the source weight, when
    quantizing from bf16) the integer zero points and scales are refitted to it
    (:func:`refit_integer_zero`).
    """
    import torch

    n, k = shape
    form, scheme = scheme_for(fmt, activations)
    if fmt.name == "int4":
        out = {"weight_scale": tensors["weight_scale"].contiguous(),
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        exact = True
        packed = tensors["weight"]
        if not fmt.symmetric:
            zi, exact = int_zero_points(tensors["weight_zero"])
            if not exact:
                from glmq.quant.formats.int4 import pack_int4, unpack_int4

                g = fmt.group_size
                if target is not None:
                    codes, out["weight_scale"], zi = refit_integer_zero(target, tensors["weight_scale"],
                                                                        tensors["weight_zero"], g)
                else:
                    u = unpack_int4(packed).float().reshape(n, k // g, g)
                    z = tensors["weight_zero"].float().unsqueeze(-1)
                    codes = torch.round(u - z + zi.unsqueeze(-1)).clamp_(0, 15).reshape(n, k)
                packed = pack_int4(codes)
            # signed zero point zp = z - 8 is stored offset back to z: pack the unsigned values along N
            out["weight_zero_point"] = pack_nibbles(zi.T.to(torch.uint8)).T.contiguous()
        out["weight_packed"] = pack_bytes_int32(packed)
        return out, exact
    if form == PACK:  # int8 weight-only: codes + 128 as bytes
        q = tensors["weight"]
        u = (q.to(torch.int16) + 128).to(torch.uint8)
        return {"weight_packed": pack_bytes_int32(u), "weight_scale": tensors["weight_scale"].contiguous(),
                "weight_shape": torch.tensor([n, k], dtype=torch.int64)}, True
    return {"weight": tensors["weight"].contiguous(), "weight_scale": tensors["weight_scale"].contiguous()}, True


def dequantize_ct(fmt: QuantFormat, activations: str, tensors: dict[str, torch.Tensor],
                  shape: tuple[int, int]) -> torch.Tensor:
    """fp32 weight ``[N, K]`` that compressed-tensors tensors of this layer represent (pure torch reference
    of compressed-tensors' decompression, in fp32)."""
    import torch

    n, k = shape
    form, _ = scheme_for(fmt, activations)
    scale = tensors["weight_scale"].float()
    if fmt.name == "int4":
        g = fmt.group_size
        u = unpack_nibbles(tensors["weight_packed"], k).float()
        if fmt.symmetric:
            z = torch.full_like(scale, 8.0)
        else:
            z = unpack_nibbles(tensors["weight_zero_point"].T, n).T.float()
        return ((u.reshape(n, k // g, g) - z.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(n, k)
    if form == PACK:
        b = tensors["weight_packed"].contiguous().reshape(-1).view(torch.uint8).reshape(n, -1)[:, :k]
        return (b.float() - 128.0) * scale
    return tensors["weight"].float() * scale
