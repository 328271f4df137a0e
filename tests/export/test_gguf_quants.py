"""glmq's GGUF block quantizers against gguf-py's decoders, and the Q4_K_M type plan.

gguf-py is used only as the oracle: its ``dequantize`` must read our bytes to exactly our own decode
(bit-exact float32), and for the reference-rule types its ``quantize`` must produce our bytes.
"""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from glmq.errors import GlmqError
from glmq.quant.formats.gguf import blocks as gq

ALL_TYPES = list(gq.QUANT_TYPES)
REFERENCE_RULE_TYPES = [T.Q8_0, T.Q5_0, T.Q5_1]  # bytes must equal gguf-py's own quantizer


def _dataset(kind: str) -> np.ndarray:
    """37 awkward rows x 4096 (GLM-Image's hidden size) of weight-like data, rounded to bf16 like the
    released checkpoint."""
    rng = np.random.default_rng({"gaussian": 1, "student_t": 2, "outliers": 3}[kind])
    shape = (37, 4096)
    if kind == "gaussian":
        x = rng.standard_normal(shape) * 0.02
    elif kind == "student_t":  # heavy tails: df=3
        x = rng.standard_t(3, shape) * 0.015
    else:  # rare large outliers (0.2 % of the weights, 25x)
        x = rng.standard_normal(shape) * 0.02
        mask = rng.random(shape) < 0.002
        x[mask] *= 25
    x = x.astype(np.float32)
    return (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # truncate to bf16 values


def _special_rows() -> np.ndarray:
    """Rows that stress the scale logic: zeros, constants, one sign only, sparse, tiny, large, one spike."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 512)).astype(np.float32)
    x[0] = 0
    x[1] = 0.5
    x[2] = -0.25
    x[3] = np.abs(x[3])
    x[4] = -np.abs(x[4])
    x[5, ::3] = 0
    x[6] *= 1e-5  # scales near fp16's underflow
    x[7] *= 300.0
    x[8] = 0.001
    x[8, 100] = 40.0  # one spike per row
    x[9, :256] *= 1e-3  # one quiet super-block next to a loud one
    return x


# SQNR floors (dB): this file's measurements (numpy 2.4.6, gguf 0.19.0; the data is seeded) minus 0.3 dB.
SQNR_FLOOR = {
    ("gaussian", T.Q8_0): 45.1, ("gaussian", T.Q5_0): 27.0, ("gaussian", T.Q5_1): 28.1,
    ("gaussian", T.Q4_K): 22.6, ("gaussian", T.Q5_K): 28.6, ("gaussian", T.Q6_K): 35.0,
    ("student_t", T.Q8_0): 40.7, ("student_t", T.Q5_0): 23.6, ("student_t", T.Q5_1): 25.6,
    ("student_t", T.Q4_K): 20.7, ("student_t", T.Q5_K): 26.5, ("student_t", T.Q6_K): 31.9,
    ("outliers", T.Q8_0): 39.9, ("outliers", T.Q5_0): 22.2, ("outliers", T.Q5_1): 26.3,
    ("outliers", T.Q4_K): 20.7, ("outliers", T.Q5_K): 26.6, ("outliers", T.Q6_K): 30.8,
}


def _bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    same_kind = a.shape == b.shape and a.dtype == b.dtype == np.float32
    return same_kind and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("kind", ["gaussian", "student_t", "outliers"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_bit_exact_and_sqnr(kind: str, qtype: T) -> None:
    x = _dataset(kind)
    raw = gq.quantize(x, qtype)
    assert raw.dtype == np.uint8
    assert raw.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
    ours = gq.dequantize(raw, qtype)
    theirs = gguf.quants.dequantize(raw, qtype)
    sqnr = gq.sqnr_db(x, ours)
    rmse = float(np.sqrt(np.mean((ours.astype(np.float64) - x) ** 2)))
    print(f"{kind:10s} {qtype.name:5s} SQNR {sqnr:6.2f} dB  RMSE {rmse:.3e}  floor {SQNR_FLOOR[kind, qtype]}")
    assert _bit_equal(ours, theirs), "gguf-py decodes our blocks differently from our own decoder"
    assert sqnr >= SQNR_FLOOR[kind, qtype]


@pytest.mark.parametrize("qtype", REFERENCE_RULE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
def test_reference_rule_bytes_equal_gguf_py(kind: str, qtype: T) -> None:
    x = _dataset(kind)
    assert np.array_equal(gq.quantize(x, qtype), gguf.quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_special_rows(qtype: T) -> None:
    x = _special_rows()
    with np.errstate(divide="raise", over="raise", invalid="raise"):  # underflow to fp16 zero is fine
        raw = gq.quantize(x, qtype)
        ours = gq.dequantize(raw, qtype)
    assert _bit_equal(ours, gguf.quants.dequantize(raw, qtype))
    assert np.isfinite(ours).all()
    assert (ours[0] == 0).all()  # zeros stay zeros
    per_row = [gq.sqnr_db(x[i], ours[i]) for i in range(1, x.shape[0])]
    print(qtype.name, "per-row SQNR dB:", " ".join(f"{s:.1f}" for s in per_row))
    # Never worse than storing zeros (row 6 sits below fp16's range and may decode to zero).
    assert min(per_row) >= -1e-9
    assert per_row[0] > 30 and per_row[1] > 30  # constant rows are (nearly) exact


@pytest.mark.parametrize(
    ("ours", "baseline", "min_gain_db"),
    [(T.Q4_K, T.Q4_1, 0.3), (T.Q5_K, T.Q5_1, 0.3), (T.Q6_K, T.Q5_1, 3.0)],
    ids=["Q4_K-vs-Q4_1", "Q5_K-vs-Q5_1", "Q6_K-vs-Q5_1"],
)
def test_k_quants_beat_gguf_py_block_types(ours: T, baseline: T, min_gain_db: float) -> None:
    """Our K quants (4.5/5.5/6.56 bits per weight) against gguf-py's own 32-block quantizers (5/6 bpw)."""
    for kind in ("gaussian", "student_t", "outliers"):
        x = _dataset(kind)
        s_ours = gq.sqnr_db(x, gq.dequantize(gq.quantize(x, ours), ours))
        s_base = gq.sqnr_db(x, gguf.quants.dequantize(gguf.quants.quantize(x, baseline), baseline))
        print(f"{kind:10s} ours {ours.name} {s_ours:6.2f} dB  gguf-py {baseline.name} {s_base:6.2f} dB")
        assert s_ours >= s_base + min_gain_db


def test_gguf_writer_round_trip(tmp_path) -> None:
    """Raw bytes go through GGUFWriter(raw_dtype=...) and come back with the logical shape."""
    x = _dataset("gaussian")[:, :1536]
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "glm-image")
    raws = {}
    for qtype in ALL_TYPES:
        raws[qtype] = gq.quantize(x, qtype)
        writer.add_tensor(f"t.{qtype.name}", raws[qtype], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    for qtype, raw in raws.items():
        t = got[f"t.{qtype.name}"]
        assert t.tensor_type == qtype
        assert tuple(int(s) for s in reversed(t.shape)) == x.shape
        assert np.array_equal(np.asarray(t.data).reshape(raw.shape), raw)


def test_refuses_bad_input() -> None:
    x = np.zeros((4, 320), dtype=np.float32)  # 320 = 10 x 32 but not a multiple of 256
    gq.quantize(x, T.Q8_0)
    with pytest.raises(GlmqError, match="multiple of 256"):
        gq.quantize(x, T.Q4_K)
    with pytest.raises(GlmqError, match="multiple of 32"):
        gq.quantize(np.zeros((2, 48), np.float32), T.Q8_0)
    with pytest.raises(GlmqError, match="2-D"):
        gq.quantize(np.zeros(256, np.float32), T.Q6_K)
    bad = np.ones((2, 256), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(GlmqError, match="NaN"):
        gq.quantize(bad, T.Q6_K)
    with pytest.raises(GlmqError, match="fp16 range"):
        gq.quantize(np.full((1, 32), 1e8, np.float32), T.Q8_0)
    with pytest.raises(GlmqError, match="valid types: Q8_0"):
        gq.quantize(x, T.IQ2_XXS)


@pytest.mark.slow
def test_real_size_speed() -> None:
    """GLM-Image's ffn_down (4096 x 13696) in Q8_0 and the same count of values in the K types."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4096, 13696), dtype=np.float32) * 0.02)
    for qtype, arr in [(T.Q8_0, x), (T.Q5_0, x), (T.Q4_K, x.reshape(13696, 4096)), (T.Q6_K, x.reshape(13696, 4096))]:
        t0 = time.perf_counter()
        raw = gq.quantize(arr, qtype)
        dt = time.perf_counter() - t0
        print(f"{qtype.name} {arr.shape[0]}x{arr.shape[1]}: {dt:.2f} s ({arr.size / dt / 1e6:.0f} M values/s)")
        assert raw.shape == gguf.quants.quant_shape_to_byte_shape(arr.shape, qtype)
        assert dt < 60


# ---------------------------------------------------------------------------------------------------------
# Q4_K_M plan


def _ar_gguf_shapes() -> dict[str, tuple[int, ...]]:
    """GGUF names and shapes of the full-size AR, written out from GLM_IMAGE.md's dims (the names module's
    tests check these names against the model itself)."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (168064, 4096),
        "output_norm.weight": (4096,),
        "output.weight": (16512, 4096),
        "v.patch_embd.weight": (1536, 3, 16, 16),
        "v.patch_embd.bias": (1536,),
        "v.position_embd.weight": (16384, 1536),
        "v.vq.codebook.weight": (16384, 2048),
        "v.vq.quant_conv.weight": (2048, 1536, 1, 1),
        "v.vq.quant_conv.bias": (2048,),
        "v.vq.post_quant_conv.weight": (1536, 2048, 1, 1),
        "v.vq.post_quant_conv.bias": (1536,),
    }
    for n in range(40):
        b = f"blk.{n}."
        shapes |= {
            b + "attn_norm.weight": (4096,), b + "post_attention_norm.weight": (4096,),
            b + "ffn_norm.weight": (4096,), b + "post_ffw_norm.weight": (4096,),
            b + "attn_q.weight": (4096, 4096), b + "attn_q.bias": (4096,),
            b + "attn_k.weight": (256, 4096), b + "attn_k.bias": (256,),
            b + "attn_v.weight": (256, 4096), b + "attn_v.bias": (256,),
            b + "attn_output.weight": (4096, 4096),
            b + "ffn_up.weight": (27392, 4096), b + "ffn_down.weight": (4096, 13696),
        }
        v = f"v.blk.{n}."
        shapes |= {
            v + "ln1.weight": (1536,), v + "ln1.bias": (1536,), v + "ln2.weight": (1536,), v + "ln2.bias": (1536,),
            v + "attn_qkv.weight": (4608, 1536), v + "attn_qkv.bias": (4608,),
            v + "attn_out.weight": (1536, 1536), v + "attn_out.bias": (1536,),
            v + "ffn_up.weight": (6144, 1536), v + "ffn_up.bias": (6144,),
            v + "ffn_down.weight": (1536, 6144), v + "ffn_down.bias": (1536,),
        }
    return shapes


def test_q4_k_m_plan() -> None:
    shapes = _ar_gguf_shapes()
    plan = gq.q4_k_m_plan(shapes)
    assert set(plan) == set(shapes)
    more = {0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39}  # 40 layers
    assert plan["output.weight"] == T.Q6_K
    assert plan["token_embd.weight"] == T.Q4_K
    assert plan["output_norm.weight"] == T.F32
    for n in range(40):
        b = f"blk.{n}."
        assert plan[b + "attn_v.weight"] == (T.Q6_K if n in more else T.Q4_K)
        # 13696 is not a multiple of 256: llama.cpp's fallbacks Q6_K -> Q8_0, Q4_K -> Q5_0
        assert plan[b + "ffn_down.weight"] == (T.Q8_0 if n in more else T.Q5_0)
        for t in ("attn_q", "attn_k", "attn_output", "ffn_up"):
            assert plan[b + t + ".weight"] == T.Q4_K
        for t in ("attn_q.bias", "attn_norm.weight", "post_ffw_norm.weight"):
            assert plan[b + t] == T.F32
    assert plan["v.blk.3.attn_qkv.weight"] == T.BF16 and plan["v.blk.3.attn_qkv.bias"] == T.F32
    assert plan["v.vq.codebook.weight"] == T.BF16 and plan["v.patch_embd.weight"] == T.BF16

    def nbytes(name: str) -> float:
        n = int(np.prod(shapes[name]))
        block, size = gguf.GGML_QUANT_SIZES[plan[name]]
        return n / block * size

    text = [k for k in shapes if not k.startswith("v.")]
    bpw = 8 * sum(nbytes(k) for k in text) / sum(int(np.prod(shapes[k])) for k in text)
    print(f"Q4_K_M plan, text decoder: {bpw:.3f} bits per weight, {sum(nbytes(k) for k in text) / 1e9:.2f} GB")
    assert 4.5 < bpw < 5.5


def test_dit_plan() -> None:
    shapes = {
        "transformer_blocks.0.attn1.to_q.weight": (4096, 4096),
        "transformer_blocks.0.attn1.to_q.bias": (4096,),
        "transformer_blocks.0.ff.net.2.weight": (4096, 16384),
        "glyph_projector.net.0.proj.weight": (4096, 1472),
        "prior_token_embedding.weight": (16384, 4096),
        "proj_out.weight": (64, 4096),
        "odd.weight": (64, 1472),  # 1472 = 46 x 32: K type falls back to a 32-block type
    }
    plan = gq.dit_plan(shapes, T.Q4_K)
    assert plan["transformer_blocks.0.attn1.to_q.weight"] == T.Q4_K
    assert plan["transformer_blocks.0.attn1.to_q.bias"] == T.F32
    assert plan["transformer_blocks.0.ff.net.2.weight"] == T.Q4_K
    assert plan["glyph_projector.net.0.proj.weight"] == T.BF16
    assert plan["prior_token_embedding.weight"] == T.BF16
    assert plan["proj_out.weight"] == T.BF16
    assert plan["odd.weight"] == T.Q5_0
    assert gq.dit_plan(shapes, T.Q8_0)["odd.weight"] == T.Q8_0
    with pytest.raises(GlmqError):
        gq.dit_plan(shapes, T.IQ2_XXS)
