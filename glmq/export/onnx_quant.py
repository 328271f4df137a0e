"""Weight quantization of exported ONNX graphs, as a rewrite of linear layers whose weight is an initializer.

The exporter emits an ``nn.Linear`` of weight ``W`` [N, K] as ``MatMul(x, Transpose(W))`` (x of rank >= 3) or
``Gemm(x, W, bias, transB=1)`` (x of rank 2). This module quantizes ``W`` with a glmq format and replaces
that pattern:

- ``int8`` (standard ONNX QDQ): ``DequantizeLinear(q, scale, zero_point=0, axis)`` feeding the MatMul/Gemm.
  ``q`` is glmq's int8 code matrix (transposed to [K, N] with ``axis=1`` for MatMul, as is for Gemm with
  ``axis=0``), ``scale`` glmq's per-output-channel scale in the graph's float dtype. DequantizeLinear
  computes ``q * scale``: in an fp32 graph exactly glmq's dequantized weight.
- ``int4`` (ONNX Runtime's ``com.microsoft::MatMulNBits``, bits=4, block_size = glmq group size ``G``).
  ONNX Runtime's documented layout (its ``MatMulNBits`` schema): ``B`` uint8 [N, k_blocks, blob_size]
  with ``k_blocks = K / G``, ``blob_size = G * bits / 8``, codes packed along K, low nibble first;
  ``scales`` [N, k_blocks] in the dtype of A; optional ``zero_points`` either packed uint8
  [N, ceil(k_blocks * bits / 8)] (same nibble order, along the blocks) or unpacked in the dtype of A
  [N, k_blocks]; default zero point ``2^(bits-1) = 8``; ``w = (q - zero_point) * scale``. glmq's int4
  layout (uint8 [N, K/2], low nibble = even k; bf16 scales and zeros [N, K/G]; ``w = (q - z) * s``,
  ``z = 8`` when symmetric) is therefore ``B = weight.reshape(N, K/G, G/2)``; integer zero points (RTN)
  are packed, fractional ones (HQQ) stay unpacked floats. :func:`matmulnbits_dequantize_ref` decodes the
  documented layout in numpy; the tests check it against glmq's own dequantization, bit for bit.
- ``int8`` as ``MatMulNBits`` bits=8 (``int8_layout="matmulnbits"``): the same per-channel codes in ONNX
  Runtime's own layout, so that a session loads them as they are. ``B`` uint8 [N, K / block, block] holds
  ``q + 128`` (the default 8-bit zero point is 128), ``scales`` [N, K / block] repeats each row's scale;
  ``w = (B - 128) * scale = q * scale`` exactly. With QDQ, ONNX Runtime rewrites every
  ``DequantizeLinear -> MatMul`` into this form itself while it creates the session, holding the int8
  weights and the rewritten ones at once (see benchmarks/results/onnx_full_cpu2.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"

# How int8 weights are written: standard ONNX QDQ (any runtime) or ONNX Runtime's MatMulNBits bits=8.
INT8_LAYOUTS = ("qdq", "matmulnbits")
# MatMulNBits block along K for int8 codes (every block of a row shares the row's scale, so any block is
# exact; ONNX Runtime's CPU kernels take powers of two from 16). Largest that divides K, down to 16.
NBITS8_BLOCKS = (128, 64, 32, 16)

# Which glmq format quantizes which graph under each --weights mode. The DiT stays at int8 under int4: it
# is compute-bound, so 4-bit weights would cost quality for no speed (glmq's recipes keep it at 8 bits too).
MODE_FORMATS: dict[str, dict[str, str]] = {
    "int8": {"ar_decoder": "int8", "dit": "int8"},
    "int4": {"ar_decoder": "int4", "dit": "int8"},
}


@dataclass
class QuantResult:
    """What a rewrite did to one graph, for ``glmq_onnx.json``."""

    format: dict[str, Any]
    layers: list[str] = field(default_factory=list)  # checkpoint names of the quantized weights
    kept_float: dict[str, str] = field(default_factory=dict)  # checkpoint name -> why it stayed float
    qdq_fallback: list[str] = field(default_factory=list)  # int8 layers left QDQ: K fits no MatMulNBits block

    def to_json(self) -> dict:
        out = {"format": self.format, "num_layers": len(self.layers), "layers": self.layers,
               "kept_float": self.kept_float}
        if self.qdq_fallback:
            out["qdq_fallback"] = self.qdq_fallback
        return out


# ---- layouts ---------------------------------------------------------------------------------------------


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [..., M] -> uint8 [..., ceil(M / 2)], element 2j in the low nibble of byte j."""
    m = codes.shape[-1]
    if m % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=codes.dtype)], axis=-1)
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, m: int) -> np.ndarray:
    lo = packed & 0xF
    hi = packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)[..., :m]


def int4_to_matmulnbits(tensors: dict, group_size: int, np_dtype: np.dtype) -> dict[str, np.ndarray]:
    """glmq int4 tensors (torch, bare names) -> MatMulNBits inputs ``B``, ``scales`` and, if asymmetric,
    ``zero_points`` (packed uint8 when every zero is an integer code, else unpacked ``np_dtype``)."""
    w = tensors["weight"].numpy()
    n, half_k = w.shape
    k = 2 * half_k
    k_blocks = k // group_size
    out = {
        "B": np.ascontiguousarray(w.reshape(n, k_blocks, group_size // 2)),
        "scales": tensors["weight_scale"].float().numpy().astype(np_dtype),
    }
    zero = tensors.get("weight_zero")
    if zero is not None:
        z = zero.float().numpy()
        if np.all(z == np.round(z)) and z.min() >= 0 and z.max() <= 15:
            out["zero_points"] = pack_nibbles(z.astype(np.uint8))
        else:
            out["zero_points"] = z.astype(np_dtype)
    return out


def int8_to_matmulnbits(tensors: dict, np_dtype: np.dtype) -> tuple[dict[str, np.ndarray], int] | None:
    """glmq int8 tensors (codes [N, K], scale [N, 1]) -> (MatMulNBits bits=8 ``B`` and ``scales``, block size),
    or None when K has no block size in :data:`NBITS8_BLOCKS` (the layer then stays QDQ)."""
    q = tensors["weight"].numpy()
    n, k = q.shape
    block = next((b for b in NBITS8_BLOCKS if k % b == 0), None)
    if block is None:
        return None
    b = (q.view(np.uint8) ^ np.uint8(0x80)).reshape(n, k // block, block)  # two's complement: q + 128
    scale = tensors["weight_scale"].float().numpy().reshape(n, 1).astype(np_dtype)
    return {"B": b, "scales": np.ascontiguousarray(np.broadcast_to(scale, (n, k // block)))}, block


def matmulnbits_dequantize_ref(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int,
                               n: int, bits: int, block_size: int) -> np.ndarray:
    """The fp32 weight [N, K] that MatMulNBits inputs represent, decoded from ONNX Runtime's documented
    layout (see the module docstring); bits 4 or 8."""
    if bits not in (4, 8):
        raise ValueError("this reference decodes bits=4 and bits=8 only")
    k_blocks = -(-k // block_size)
    if b.shape != (n, k_blocks, block_size * bits // 8) or scales.shape != (n, k_blocks):
        raise ValueError(f"bad MatMulNBits shapes B {b.shape}, scales {scales.shape} for N={n}, K={k}")
    # [N, k_blocks, block_size] codes
    q = (unpack_nibbles(b, block_size) if bits == 4 else b).astype(np.float32)
    if zero_points is None:
        z = np.full((n, k_blocks), float(2 ** (bits - 1)), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        z = (unpack_nibbles(zero_points, k_blocks) if bits == 4 else zero_points[:, :k_blocks]).astype(np.float32)
    else:
        z = zero_points.astype(np.float32)
    w = (q - z[..., None]) * scales.astype(np.float32)[..., None]
    return w.reshape(n, k_blocks * block_size)[:, :k]


# ---- graph rewrite ---------------------------------------------------------------------------------------


@dataclass
class _Use:
    kind: str  # "matmul_t": MatMul(x, Transpose(W)); "gemm": Gemm(x, W, C, transB=1)
    node: onnx.NodeProto
    transpose: onnx.NodeProto | None = None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def linear_uses(weight: str, consumers: dict[str, list[onnx.NodeProto]]) -> list[_Use] | None:
    """Every use of initializer ``weight`` as a linear layer's weight, or None if it has any other use."""
    uses = []
    for node in consumers.get(weight, []):
        if node.op_type == "Transpose" and list(_attrs(node).get("perm", [1, 0])) == [1, 0]:
            after = consumers.get(node.output[0], [])
            if not after or any(c.op_type != "MatMul" or list(c.input).index(node.output[0]) != 1 for c in after):
                return None
            uses += [_Use("matmul_t", c, node) for c in after]
        elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] == weight and node.input[0] != weight:
            a = _attrs(node)
            if a.get("transB", 0) != 1 or a.get("transA", 0) != 0 or a.get("alpha", 1.0) != 1.0 \
                    or a.get("beta", 1.0) != 1.0:
                return None
            uses.append(_Use("gemm", node))
        else:
            return None
    return uses or None


class LinearRewriter:
    """Rewrites the linear layers of one graph; new initializers go to ``emit(name, array)``."""

    def __init__(self, model: onnx.ModelProto, emit: Callable[[str, np.ndarray], None], np_dtype: np.dtype):
        self.model = model
        self.graph = model.graph
        self.emit = emit
        self.np_dtype = np_dtype
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self.removed: set[str] = set()  # outputs of the Transposes that a rewrite made dead
        self.prepend: list[onnx.NodeProto] = []  # DequantizeLinear nodes: they read initializers only
        self.added_ms = False

    def uses(self, weight: str) -> list[_Use] | None:
        return linear_uses(weight, self.consumers)

    def _drop_transposes(self, uses: list[_Use]) -> None:
        for u in uses:
            if u.transpose is not None:
                self.removed.add(u.transpose.output[0])

    def int8(self, weight: str, tensors: dict, uses: list[_Use]) -> None:
        q = tensors["weight"].numpy()  # int8 [N, K]
        scale = tensors["weight_scale"].numpy().reshape(-1).astype(self.np_dtype)  # [N]
        self.emit(f"{weight}.scale", scale)
        self.emit(f"{weight}.zero_point", np.zeros(scale.shape, dtype=np.int8))
        dq_nodes = []
        if any(u.kind == "matmul_t" for u in uses):
            self.emit(f"{weight}.qweight_t", np.ascontiguousarray(q.T))
            out = f"{weight}.dequantized_t"
            dq_nodes.append(helper.make_node("DequantizeLinear", [f"{weight}.qweight_t", f"{weight}.scale",
                                             f"{weight}.zero_point"], [out], name=f"{weight}/DequantizeLinear_t",
                                             axis=1))
            for u in uses:
                if u.kind == "matmul_t":
                    u.node.input[1] = out
        if any(u.kind == "gemm" for u in uses):
            self.emit(f"{weight}.qweight", q)
            out = f"{weight}.dequantized"
            dq_nodes.append(helper.make_node("DequantizeLinear", [f"{weight}.qweight", f"{weight}.scale",
                                             f"{weight}.zero_point"], [out], name=f"{weight}/DequantizeLinear",
                                             axis=0))
            for u in uses:
                if u.kind == "gemm":
                    u.node.input[1] = out
        self._drop_transposes(uses)
        self.prepend += dq_nodes

    def int4(self, weight: str, tensors: dict, uses: list[_Use], group_size: int) -> None:
        n, half_k = tensors["weight"].shape
        self._matmulnbits(weight, int4_to_matmulnbits(tensors, group_size, self.np_dtype), uses, n=n,
                          k=2 * half_k, bits=4, block_size=group_size)

    def int8_matmulnbits(self, weight: str, tensors: dict, uses: list[_Use]) -> bool:
        """int8 codes as MatMulNBits bits=8; False (nothing done) when K fits no block size."""
        converted = int8_to_matmulnbits(tensors, self.np_dtype)
        if converted is None:
            return False
        packed, block = converted
        n, k = tensors["weight"].shape
        self._matmulnbits(weight, packed, uses, n=n, k=k, bits=8, block_size=block)
        return True

    def _matmulnbits(self, weight: str, packed: dict[str, np.ndarray], uses: list[_Use], *, n: int, k: int,
                     bits: int, block_size: int) -> None:
        names = {key: f"{weight}.{key}" for key in packed}
        for key, arr in packed.items():
            self.emit(names[key], arr)
        base = [names["B"], names["scales"], names.get("zero_points", "")]
        for i, u in enumerate(uses):
            if u.kind == "matmul_t":
                inputs = [u.node.input[0], *base]
            else:  # Gemm: its bias becomes MatMulNBits' bias input (g_idx left out)
                bias = u.node.input[2] if len(u.node.input) > 2 else ""
                inputs = [u.node.input[0], *base, "", bias]
            while inputs and inputs[-1] == "":
                inputs.pop()
            new = helper.make_node("MatMulNBits", inputs, list(u.node.output), name=f"{weight}/MatMulNBits_{i}",
                                   domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block_size)
            u.node.CopyFrom(new)
        self._drop_transposes(uses)
        self.added_ms = True

    def finish(self) -> None:
        """Drop the replaced Transposes, put the DequantizeLinear nodes first (the graph stays topologically
        sorted) and declare the com.microsoft opset if MatMulNBits was used."""
        kept = []
        for n in self.graph.node:
            if not (n.op_type == "Transpose" and n.output[0] in self.removed):
                copy = onnx.NodeProto()
                copy.CopyFrom(n)
                kept.append(copy)
        self.graph.ClearField("node")
        self.graph.node.extend(self.prepend + kept)
        if self.added_ms and not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

