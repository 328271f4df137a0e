"""glmq.kernels.attention under the Triton interpreter (CPU), against the fp32 torch reference.

Tolerances (STYLE.md #7): a float kernel's max error vs the fp32 reference is at most twice the error of plain
eager PyTorch attention computed in the same dtype (scores, P and P.V in that dtype, as every flash kernel
rounds P for the tensor-core P.V). The 8-bit modes are judged by SQNR in dB against recorded floors.
"""

from __future__ import annotations

import os

# Must precede the first import of the kernel module: @triton.jit reads it when the kernels are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from glmq.kernels import _attention as A  # noqa: E402
from glmq.kernels import attention, attention_ref  # noqa: E402
from glmq.quant.metrics import sqnr_db  # noqa: E402

pytestmark = pytest.mark.skipif(not A._interpreting(), reason="needs TRITON_INTERPRET=1 at import")

# SQNR floors (dB) vs the exact fp32 attention on random data with an offset in K (what mean-smoothing is for),
# recorded from this suite: int8 measured ~39-40, fp8 (int8 Q.K^T + e4m3 P.V) ~28. Random data is a hard case
# for 8-bit attention: near-uniform P makes the outputs small relative to the quantization noise.
SQNR_FLOOR_DB = {"int8": 36.0, "fp8": 25.0}
# The kernel against attention_ref's emulation of the same quantization: only the running (vs global) row max
# used to scale P before its e4m3 cast, and bf16 output rounding, remain.
SQNR_VS_EMULATION_DB = {"int8": 40.0, "fp8": 30.0}


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype=torch.bfloat16, seed=0, k_offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, Sk, D, generator=g) + k_offset * torch.randn(1, 1, 1, D, generator=g)).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


def _visible(B, Sq, Sk, causal, kpm, kv_len):
    """[B, 1, Sq, Sk] bool: which keys each query sees (the documented semantics, written independently)."""
    seq = kv_len.long() if kv_len is not None else torch.full((B,), Sk)
    cols = torch.arange(Sk)
    ok = (cols[None, :] < seq[:, None])[:, None, None, :].expand(B, 1, Sq, Sk).clone()
    if kpm is not None:
        ok &= kpm[:, None, None, :]
    if causal:
        pos = torch.arange(Sq)[None, :] + (seq[:, None] - Sq)  # bottom-right aligned
        ok &= (cols[None, None, :] <= pos[:, :, None])[:, None]
    return ok


def _eager_same_dtype(q, k, v, ok):
    """Plain PyTorch attention in the inputs' dtype: PyTorch's own error for the tolerance."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.float().masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0, like the kernel
    return p.to(q.dtype) @ v


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _sqnr_db(out, ref):
    return sqnr_db(ref, out)  # glmq's one SQNR takes (reference, test)


def _check_float(B, Hq, Hkv, Sq, Sk, D, causal, with_kpm, with_kv_len, dtype=torch.bfloat16, seed=0):
    q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    kpm = torch.rand(B, Sk, generator=g) > 0.3 if with_kpm else None
    kv_len = torch.randint(max(1, Sq), Sk + 1, (B,), generator=g, dtype=torch.int32) if with_kv_len else None
    out = attention(q, k, v, causal=causal, key_padding_mask=kpm, kv_len=kv_len)
    # Ground truth one precision above the inputs: fp32 math for fp16/bf16, fp64 for fp32.
    truth = torch.float64 if dtype == torch.float32 else torch.float32
    ref = attention_ref(q.to(truth), k.to(truth), v.to(truth), causal=causal, key_padding_mask=kpm,
                        kv_len=kv_len)
    base = _eager_same_dtype(q, k, v, _visible(B, Sq, Sk, causal, kpm, kv_len))
    err, base_err = _max_err(out, ref), _max_err(base, ref)
    print(f"B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} D{D} {dtype} causal={causal} kpm={with_kpm} kv_len={with_kv_len}: "
          f"kernel err {err:.3e}, eager-{dtype} err {base_err:.3e}")
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert err <= 2 * base_err or err == 0.0


SHAPES = [  # B, Hq, Hkv, Sq, Sk, D
    (1, 2, 2, 1, 1, 64),        # degenerate
    (2, 4, 2, 37, 53, 64),      # GQA 2, lengths not multiples of any block
    (1, 32, 2, 19, 45, 128),    # GLM-Image AR heads: GQA 16, D 128
    (2, 3, 3, 50, 50, 128),     # MHA, odd head count
    (1, 2, 1, 23, 70, 96),      # D 96 (not a power of two), queries are the last 23 of 70 positions
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["nomask", "kpm"])
def test_bf16_matches_reference(shape, causal, with_kpm):
    _check_float(*shape, causal, with_kpm, False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_dtypes(dtype):
    _check_float(2, 4, 2, 33, 70, 64, True, True, True, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kv_len_matches_truncated_cache(causal):
    # A static cache: kv_len[b] valid keys, the rest garbage (large values that would dominate if read).
    q, k, v = _inputs(2, 4, 2, 6, 40, 64)
    k[:, :, 25:] = 100.0
    v[:, :, 25:] = 100.0
    kv_len = torch.tensor([25, 17], dtype=torch.int32)
    out = attention(q, k, v, causal=causal, kv_len=kv_len)
    _check_float(2, 4, 2, 6, 40, 64, causal, False, True)
    for b, n in enumerate(kv_len.tolist()):
        trunc = attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=causal)
        print(f"batch {b}: kv_len {n} vs truncated cache, max diff {_max_err(out[b:b + 1], trunc):.3e}")
        assert torch.equal(out[b:b + 1], trunc)


@pytest.mark.parametrize("with_kpm,with_kv_len", [(False, False), (True, True)], ids=["plain", "masked"])
def test_decode_split_k(with_kpm, with_kv_len):
    # One query token, GQA 32/2, a cache length that is no multiple of the split size; several splits run.
    _check_float(2, 32, 2, 1, 203, 128, False, with_kpm, with_kv_len)
    _check_float(1, 8, 8, 1, 77, 64, True, with_kpm, with_kv_len)  # causal is a no-op for the last position


def test_rows_without_visible_keys_are_zero():
    q, k, v = _inputs(2, 2, 2, 9, 20, 64)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False
    out = attention(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    # Causal with more queries than keys: the first Sq - Sk queries sit before position 0.
    q, k, v = _inputs(1, 2, 2, 12, 5, 64)
    out = attention(q, k, v, causal=True)
    assert out[:, :, :7].abs().max() == 0
    assert _max_err(out, attention_ref(q, k, v, causal=True)) <= 2 * _max_err(
        _eager_same_dtype(q, k, v, _visible(1, 12, 5, True, None, None)), attention_ref(q, k, v, causal=True))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("causal,with_kpm", [(False, False), (False, True), (True, True)],
                         ids=["full", "kpm", "causal-kpm"])
def test_8bit_sqnr(precision, causal, with_kpm):
    # Two query tiles and three K quantization blocks (128 keys), ragged tails, GQA 2.
    q, k, v = _inputs(1, 4, 2, 150, 300, 64, k_offset=3.0)
    kpm = (torch.rand(1, 300, generator=torch.Generator().manual_seed(3)) > 0.2) if with_kpm else None
    out = attention(q, k, v, causal=causal, key_padding_mask=kpm, precision=precision)
    exact = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm)
    emulated = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm, precision=precision)
    s_exact, s_emu = _sqnr_db(out, exact), _sqnr_db(out, emulated)
    print(f"{precision} causal={causal} kpm={with_kpm}: SQNR vs exact {s_exact:.1f} dB "
          f"(floor {SQNR_FLOOR_DB[precision]}), vs emulated quantization {s_emu:.1f} dB")
    assert torch.isfinite(out).all()
    assert s_exact >= SQNR_FLOOR_DB[precision]
    assert s_emu >= SQNR_VS_EMULATION_DB[precision]


def test_smoothing_makes_int8_robust_to_key_offset():
    # A large shared offset in K (common after QK-LayerNorm's absent centering per head): smoothing removes it.
    q, k, v = _inputs(1, 2, 2, 64, 96, 64, k_offset=20.0)
    s = _sqnr_db(attention(q, k, v, precision="int8"), attention_ref(q, k, v))
    print(f"int8 with K offset 20: SQNR {s:.1f} dB")
    assert s >= SQNR_FLOOR_DB["int8"]


@pytest.mark.parametrize("precision,cfg", [
    ("bf16", (32, 32, 4, 1, True)), ("int8", (64, 64, 4, 3, True)), ("int8", (128, 128, 8, 3, False)),
    ("fp8", (64, 128, 4, 2, True)), ("fp8", (64, 64, 4, 2, False)),
], ids=lambda x: str(x))
def test_tile_configs_and_tma_path(precision, cfg, monkeypatch):
    # 8-bit: K tiles of 64 keys each read their 128-key block's scale; TMA descriptors vs plain loads.
    monkeypatch.setattr(A, "_FORCE_CONFIG", cfg)
    q, k, v = _inputs(2, 4, 2, 70, 100, 64, k_offset=2.0)
    kpm = torch.rand(2, 100, generator=torch.Generator().manual_seed(5)) > 0.2
    out = attention(q, k, v, causal=True, key_padding_mask=kpm, precision=precision)
    ref = attention_ref(q, k, v, causal=True, key_padding_mask=kpm, precision=precision)
    if precision == "bf16":
        base = _eager_same_dtype(q, k, v, _visible(2, 70, 100, True, kpm, None))
        print(f"{cfg} bf16: err {_max_err(out, ref):.3e} vs eager {_max_err(base, ref):.3e}")
        assert _max_err(out, ref) <= 2 * _max_err(base, ref)
    else:
        print(f"{cfg} {precision}: SQNR vs emulation {_sqnr_db(out, ref):.1f} dB")
        assert _sqnr_db(out, ref) >= SQNR_VS_EMULATION_DB[precision]


def test_strided_views_and_scale():
    # DiT layout: [B, S, H, D] projections viewed as [B, H, S, D] without a copy.
    g = torch.Generator().manual_seed(7)
    qs, ks, vs = (torch.randn(2, 41, 4, 64, generator=g).bfloat16() for _ in range(3))
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
    out = attention(q, k, v, scale=0.3)
    out_c = attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3)
    assert torch.equal(out, out_c)
    ref = attention_ref(q, k, v, scale=0.3)
    base = _eager_same_dtype(q * 0.3 * 8.0, k, v, _visible(2, 41, 41, False, None, None))  # 8 = sqrt(64)
    assert _max_err(out, ref) <= 2 * _max_err(base, ref)


def test_reference_matches_sdpa_fp32():
    q, k, v = _inputs(2, 4, 2, 30, 45, 32, dtype=torch.float32)
    kpm = torch.rand(2, 45, generator=torch.Generator().manual_seed(1)) > 0.3
    ok = _visible(2, 30, 45, True, kpm, None)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=ok).nan_to_num(0.0)
    assert _max_err(attention_ref(q, k, v, causal=True, key_padding_mask=kpm), sdpa) < 1e-5


def test_custom_op_and_fake_tensor():
    q, k, v = _inputs(1, 4, 2, 5, 9, 32)
    torch.library.opcheck(torch.ops.glmq.attention.default, (q, k, v, True, 0.2, None, "bf16", None),
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert attention(fq, fk, fv, causal=True).shape == (1, 4, 5, 32)


@pytest.mark.parametrize("bad,match", [
    (dict(k=torch.zeros(1, 3, 9, 32, dtype=torch.bfloat16), v=torch.zeros(1, 3, 9, 32, dtype=torch.bfloat16)),
     "multiple of key/value heads"),
    (dict(key_padding_mask=torch.ones(1, 9)), "key_padding_mask must be bool"),
    (dict(precision="int4"), "unknown precision"),
    (dict(kv_len=torch.ones(2, dtype=torch.int32)), "kv_len must be"),
    (dict(q=torch.zeros(1, 4, 5, 32)), "share one dtype"),
    (dict(q=torch.zeros(1, 4, 5, 32, dtype=torch.float64), k=torch.zeros(1, 2, 9, 32, dtype=torch.float64),
          v=torch.zeros(1, 2, 9, 32, dtype=torch.float64)), "share one dtype among float16/bfloat16/float32"),
])
def test_input_checks_name_the_constraint(bad, match):
    q, k, v = _inputs(1, 4, 2, 5, 9, 32)
    args = dict(q=q, k=k, v=v)
    args.update({n: bad.pop(n) for n in ("q", "k", "v") if n in bad})
    with pytest.raises(ValueError, match=match):
        attention(args["q"], args["k"], args["v"], **bad)


def test_package_import_is_lazy():
    code = ("import sys, glmq, glmq.kernels as K; assert 'torch' not in sys.modules and 'triton' not in "
            "sys.modules; K.attention; assert hasattr(__import__('torch').ops.glmq, 'attention')")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})
