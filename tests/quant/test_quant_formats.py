"""Contract suite every registered quantization format must pass, plus format-specific layout checks.

SQNR floors are the numbers measured on the fixed-seed weights below (torch 2.13 CPU), kept with a
MARGIN_DB margin; a format added to the registry fails here until its floors are recorded.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from glmq.errors import GlmqError
from glmq.quant.formats import (
    Fp8Format,
    Int4Format,
    format_from_config,
    get_format,
    pack_int4,
    unpack_int4,
)
from glmq.quant.metrics import sqnr_db
from glmq.evaluate.outliers import make_outlier_layer
from glmq.testing import format_variants

MARGIN_DB = 0.25

# str(fmt) -> (Gaussian weight SQNR, outlier-layer weight SQNR) in dB, RTN, measured on _weights().
SQNR_FLOORS_DB = {
    "int4(group_size=32, symmetric=True)": (20.74, 17.83),
    "int4(group_size=32, symmetric=False)": (21.85, 19.95),
    "int4(group_size=64, symmetric=True)": (19.83, 16.18),
    "int4(group_size=64, symmetric=False)": (20.81, 18.10),
    "int4(group_size=128, symmetric=True)": (19.05, 14.72),
    "int4(group_size=128, symmetric=False)": (19.95, 16.44),
    "fp8_e4m3": (31.56, 31.74),
    "int8": (41.84, 34.75),
}


FORMAT_CASES = [pytest.param(f, id=str(f).replace(" ", "")) for f in format_variants()]

# Awkward but legal shapes: N not a power of two, K a multiple of 128 but not of 256 (GLM-Image's vision
# width 1536 = 12 x 128 and the DiT's glyph width 1472 = 23 x 64 appear below).
N, K = 320, 1536


@functools.cache
def _weights(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gaussian, outlier-layer) weights [N, K]; cached, so tests must not modify them."""
    gauss = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    outlier = make_outlier_layer(N, K, n_tokens=2048, seed=0).weight
    return gauss.to(dtype), outlier.to(dtype)


def _roundtrip(fmt, w: torch.Tensor) -> torch.Tensor:
    return fmt.dequantize(fmt.quantize(w), tuple(w.shape))


# ---- the shared contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_sqnr_floor(fmt):
    gauss, outlier = _weights()
    got = (sqnr_db(gauss, _roundtrip(fmt, gauss)), sqnr_db(outlier, _roundtrip(fmt, outlier)))
    print(f"{fmt}: SQNR gaussian {got[0]:.2f} dB, outlier {got[1]:.2f} dB")
    assert str(fmt) in SQNR_FLOORS_DB, f"record SQNR floors for {fmt}: measured {got[0]:.2f}, {got[1]:.2f} dB"
    floors = SQNR_FLOORS_DB[str(fmt)]
    for label, value, floor in zip(("gaussian", "outlier"), got, floors):
        assert value >= floor - MARGIN_DB, f"{fmt} {label}: {value:.2f} dB < floor {floor} - {MARGIN_DB}"


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_bf16_and_strided_weights_quantize_like_fp32(fmt):
    gauss, _ = _weights(torch.bfloat16)
    a = fmt.quantize(gauss)
    b = fmt.quantize(gauss.float())
    c = fmt.quantize(gauss.float().T.contiguous().T)  # same values, column-major strides
    for key in a:
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
        assert torch.equal(a[key].view(torch.uint8), c[key].view(torch.uint8)), key


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_requantize_is_bit_exact(fmt):
    """Stored codes survive dequantize -> quantize with the same scales: what GPTQ relies on."""
    _, w = _weights()
    t = fmt.quantize(w)
    again = fmt.quantize(fmt.dequantize(t, (N, K)), scale=t["weight_scale"], zero=t.get("weight_zero"))
    assert set(again) == set(t)
    for key in t:
        assert torch.equal(again[key].view(torch.uint8), t[key].view(torch.uint8)), key


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_fake_quantize_matches_dequantize(fmt):
    _, w = _weights()
    scale, zero = fmt.qparams(w)
    g = fmt.group_size_for(K)
    expand = lambda t: None if t is None else t.repeat_interleave(g, dim=1)  # noqa: E731
    fake = fmt.fake_quantize(w, expand(scale), expand(zero))
    assert torch.equal(fake, _roundtrip(fmt, w))


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_matmul_ref_matches_dequantized_matmul(fmt):
    _, w = _weights()
    t = fmt.quantize(w)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, K, generator=gen)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    want = x @ fmt.dequantize(t, (N, K)).T + bias.float()
    got = fmt.matmul_ref(x, t, bias)
    print(f"{fmt}: max |matmul_ref - x @ deq^T| = {(got - want).abs().max():.3g}")
    assert got.shape == (3, 7, N) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)  # fp32 tolerances
    assert fmt.matmul_ref(x.to(torch.bfloat16), t).dtype == torch.bfloat16
    with pytest.raises(GlmqError, match="input features"):
        fmt.matmul_ref(x[..., :-2], t)


# W8A8 kernel references against the float32 weight-only product: the cost of per-token activation
# quantization on the outlier layer's weights and Gaussian activations (measured: fp8 33.6 dB, int8 43.5 dB).
W8A8_OUTPUT_SQNR_DB = {"fp8_e4m3": 28.0, "int8": 38.0}


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_runtime_paths(fmt):
    """What QuantLinear.forward calls: the weight-only fallback is F.linear of the dequantized weight in
    x's dtype, the kernel reference is matmul_ref (weight-only kernels) or a W8A8 product within its SQNR
    floor, and no kernel claims to run on the CPU."""
    _, w = _weights()
    t = fmt.quantize(w)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, K, generator=gen).to(torch.bfloat16)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    deq = fmt.dequantize(t, (N, K))
    got = fmt.matmul_dequantized(x, t, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, N)
    assert torch.equal(got, torch.nn.functional.linear(x, deq.to(torch.bfloat16), bias))
    ref = fmt.matmul_ref(x.float(), t, bias)
    kref = fmt.matmul_kernel_ref(x, t, bias)
    assert kref.dtype == torch.bfloat16 and kref.shape == (2, 5, N)
    if fmt.kernel_quantizes_activations:
        floor = W8A8_OUTPUT_SQNR_DB[fmt.name]
        print(f"{fmt}: W8A8 kernel reference vs weight-only {sqnr_db(ref, kref.float()):.2f} dB (floor {floor})")
        assert sqnr_db(ref, kref.float()) >= floor
    else:
        assert torch.equal(kref, fmt.matmul_ref(x, t, bias))
    assert not fmt.kernel_runs(x, (N, K))


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_expected_tensors_match_quantize(fmt):
    _, w = _weights()
    t = fmt.quantize(w.to(torch.bfloat16))
    want = fmt.expected_tensors("", (N, K))
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == want
    prefix = "model.language_model.layers.0.mlp.down_proj"
    prefixed = fmt.expected_tensors(prefix, (N, K))
    assert prefixed == {f"{prefix}.{k}": v for k, v in want.items()}
    assert all(v.is_contiguous() for v in t.values())
    nbytes = sum(v.numel() * v.element_size() for v in t.values())
    assert fmt.nbytes((N, K)) == nbytes
    assert fmt.bytes_per_weight((N, K)) == nbytes / (N * K)


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_dequantize_validates_tensors(fmt):
    _, w = _weights()
    t = fmt.quantize(w)
    with pytest.raises(GlmqError, match="expects tensors"):
        fmt.dequantize({k: v for k, v in t.items() if k != "weight_scale"}, (N, K))
    with pytest.raises(GlmqError, match="weight_scale"):
        fmt.dequantize({**t, "weight_scale": t["weight_scale"].to(torch.float16)}, (N, K))
    with pytest.raises(GlmqError):
        fmt.dequantize(t, (N + 1, K))


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_config_round_trip(fmt):
    config = json.loads(json.dumps(fmt.config()))
    assert config["format"] == fmt.name and config["version"] == fmt.version
    rebuilt = format_from_config(config)
    assert rebuilt == fmt and rebuilt.config() == fmt.config()
    assert get_format(fmt.name, **fmt.params()) == fmt
    with pytest.raises(GlmqError, match="version"):
        format_from_config({**config, "version": 99})
    with pytest.raises(GlmqError, match="does not match"):
        format_from_config({**config, "scale_dtype": "float16"})


@pytest.mark.parametrize("fmt", FORMAT_CASES)
@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((K,), torch.float32, "2-D"),
        ((2, N, K), torch.float32, "2-D"),
        ((0, K), torch.float32, "empty"),
        ((N, K), torch.int32, "floating-point"),
    ],
)
def test_check_rejects(fmt, shape, dtype, match):
    with pytest.raises(GlmqError, match=match):
        fmt.check(shape, dtype)
    with pytest.raises(GlmqError, match=match):
        fmt.quantize(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("fmt", FORMAT_CASES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_raise(fmt, bad):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
    w[17, 300] = bad
    with pytest.raises(GlmqError, match="NaN/Inf"):
        fmt.quantize(w)
    with pytest.raises(GlmqError, match="NaN/Inf"):
        fmt.quantize(w.to(torch.bfloat16))


@pytest.mark.parametrize("fmt", FORMAT_CASES)
def test_zero_rows_and_groups(fmt):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(3))
    w[5] = 0
    w[N - 1] = 0
    w[9, :128] = 0  # one all-zero group inside a nonzero row
    w[11, 128:] = 1e-30  # tiny but nonzero: must not divide by zero
    w[13] = 1e-38  # below the smallest normal scale
    t = fmt.quantize(w)
    deq = fmt.dequantize(t, (N, K))
    assert torch.isfinite(deq).all()
    assert not deq[5].any() and not deq[N - 1].any() and not deq[9, :128].any()
    assert all(torch.isfinite(v.float()).all() for v in t.values())
    keep = torch.ones(N, dtype=torch.bool)
    keep[[5, 9, 11, 13, N - 1]] = False
    assert sqnr_db(w[keep], deq[keep]) > 10


def test_registry_errors_list_valid_names():
    with pytest.raises(GlmqError, match="valid formats: int4, fp8_e4m3, int8"):
        get_format("nf4")
    with pytest.raises(GlmqError, match="it takes version, group_size, symmetric"):
        get_format("int4", bits=3)
    with pytest.raises(GlmqError, match="valid formats"):
        format_from_config({"format": "q4_k"})
    with pytest.raises(GlmqError, match="'format' key"):
        format_from_config({"group_size": 128})


# ---- int4 layout -------------------------------------------------------------------------------------------


def test_int4_pack_layout_by_hand():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]  # low nibble = even k
    assert torch.equal(unpack_int4(packed), codes)


def test_int4_pack_unpack_bit_exact():
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (37, 2 * 3 * 128), generator=gen, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (37, 3 * 128) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8).view(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[:, :-1])


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_stored_values_follow_the_documented_formula(symmetric):
    fmt = Int4Format(group_size=32, symmetric=symmetric)
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(5))
    t = fmt.quantize(w)
    q = unpack_int4(t["weight"]).float().view(6, 3, 32)
    s = t["weight_scale"].float().unsqueeze(-1)
    z = 8.0 if symmetric else t["weight_zero"].float().unsqueeze(-1)
    assert torch.equal(fmt.dequantize(t, (6, 96)), ((q - z) * s).view(6, 96))
    # Codes are round-to-nearest within the clamp range.
    expect = torch.round(w.view(6, 3, 32) / s + (0 if symmetric else z))
    expect = expect.clamp(-8, 7) + 8 if symmetric else expect.clamp(0, 15)
    assert torch.equal(q, expect)
    if not symmetric:
        assert torch.equal(t["weight_zero"].float(), t["weight_zero"].float().round())  # RTN: integer zeros


def test_int4_accepts_float_zero_points():
    fmt = Int4Format(group_size=64, symmetric=False)
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(6))
    scale, zero = fmt.qparams(w)
    zero = (zero.float() + 0.37).to(torch.bfloat16)
    t = fmt.quantize(w, scale=scale, zero=zero)
    assert torch.equal(t["weight_zero"], zero)
    assert sqnr_db(w, fmt.dequantize(t, (8, 128))) > 15


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_rejects_k_not_divisible_by_group(group_size):
    fmt = Int4Format(group_size=group_size)
    k = 1472 if group_size == 128 else 1472 + 16  # 1472: GLM-Image DiT text_embed_dim, 23 x 64
    with pytest.raises(GlmqError, match=f"divisible by {group_size}"):
        fmt.check((64, k))
    with pytest.raises(GlmqError, match=f"divisible by {group_size}"):
        fmt.quantize(torch.randn(64, k))
    if group_size == 128:
        Int4Format(group_size=64).check((64, 1472))


def test_int4_rejects_bad_parameters():
    with pytest.raises(GlmqError, match="group_size must be one of 32, 64, 128"):
        Int4Format(group_size=48)
    with pytest.raises(GlmqError, match="symmetric"):
        Int4Format(symmetric="yes")
    with pytest.raises(ValueError, match="zero point"):
        Int4Format(symmetric=False).quantize(torch.randn(4, 128), scale=torch.ones(4, 1))


def test_bytes_per_weight_values():
    assert Int4Format(group_size=128).bytes_per_weight() == 0.5 + 2 / 128
    assert Int4Format(group_size=32, symmetric=False).bytes_per_weight() == 0.5 + 4 / 32
    assert Int4Format(group_size=64).bytes_per_weight((N, K)) == 0.5 + 2 / 64
    assert get_format("int8").bytes_per_weight() == 1.0
    assert get_format("fp8_e4m3").bytes_per_weight((4096, 13696)) == 1 + 4 / 13696


# ---- fp8 runtime reference ---------------------------------------------------------------------------------


def test_fp8_w8a8_reference_close_to_weight_only():
    fmt = Fp8Format()
    lay = make_outlier_layer(N, K, n_tokens=64, seed=7)
    t = fmt.quantize(lay.weight)
    x = lay.activations
    from glmq.kernels.w8a8_linear import quantize_rows_ref

    xq, xs = quantize_rows_ref(x, torch.float8_e4m3fn)  # what the W8A8 kernel and its reference do to x
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (64, 1)
    assert (xq.float().abs().amax(dim=-1) == 448).all()
    act_sqnr = sqnr_db(x, xq.float() * xs)
    out_sqnr = sqnr_db(fmt.matmul_ref(x, t), fmt.matmul_kernel_ref(x, t))
    print(f"fp8 per-token activations: SQNR {act_sqnr:.2f} dB; W8A8 vs weight-only output {out_sqnr:.2f} dB")
    assert act_sqnr > 29 and out_sqnr > 26


# ---- one real GLM-Image width ------------------------------------------------------------------------------


def test_real_width_down_proj_int4():
    """mlp.down_proj of the AR text decoder: [4096, 13696], int4 g128 asymmetric, outlier weights."""
    fmt = Int4Format(group_size=128, symmetric=False)
    w = make_outlier_layer(4096, 13696, n_tokens=8, seed=8).weight
    t = fmt.quantize(w)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == fmt.expected_tensors("", (4096, 13696))
    got = sqnr_db(w, fmt.dequantize(t, (4096, 13696)))
    print(f"int4 g128 asym at [4096, 13696]: SQNR {got:.2f} dB")
    assert got >= SQNR_FLOORS_DB[str(fmt)][1] - MARGIN_DB
