"""The fused decode kernels (glmq.kernels.decode_fused) against upstream's operations (their ``*_ref``), under
TRITON_INTERPRET=1 on the CPU; and the decode engine with them (glmq.runtime.ar_fused)."""

from __future__ import annotations

import pytest
import torch

from glmq.kernels.decode_fused import rms_norm, rms_norm_ref, rotary, rotary_ref, silu_mul, silu_mul_ref


def _err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).abs().max())


@pytest.mark.parametrize("d", [4096, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_is_within_twice_upstreams_own_bf16_error(d, with_residual):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(5, 3, d, generator=g) * 3).bfloat16()
    w = (1 + 0.1 * torch.randn(d, generator=g)).bfloat16()
    r = torch.randn(5, 3, d, generator=g).bfloat16() if with_residual else None
    exact = rms_norm_ref(x.double(), w.double(), 1e-5, None if r is None else r.double())
    got, upstream = rms_norm(x, w, 1e-5, r), rms_norm_ref(x, w, 1e-5, r)
    print(f"d={d} residual={with_residual}: kernel {_err(got, exact):.3e}, upstream bf16 {_err(upstream, exact):.3e}, "
          f"elements differing from upstream {int((got != upstream).sum())} of {got.numel()}")
    assert got.dtype == upstream.dtype == torch.bfloat16 and got.shape == x.shape
    assert _err(got, exact) <= 2 * _err(upstream, exact)
    # Where upstream rounds, the kernel rounds: it agrees with upstream on almost every element.
    assert int((got != upstream).sum()) <= 0.01 * got.numel()


def test_rms_norm_in_float32_and_on_a_strided_row_view():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 64, generator=g)
    w = torch.randn(64, generator=g)
    last = x[:, -1:]  # the engine's final norm reads the last position of each row
    torch.testing.assert_close(rms_norm(last, w, 1e-6), rms_norm_ref(last, w, 1e-6), rtol=2e-6, atol=2e-6)


def test_rotary_is_upstreams_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    b, s, d, rot = 2, 3, 128, 64  # GLM-Image: head_dim 128, the first half rotated
    q = torch.randn(b, s, 32, d, generator=g).bfloat16()
    k = torch.randn(b, s, 2, d, generator=g).bfloat16()
    ang = torch.randn(b, s, rot, generator=g)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
    (qo, ko), (qr, kr) = rotary(q, k, cos, sin), rotary_ref(q, k, cos, sin)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)
    assert torch.equal(qo[..., rot:], q[..., rot:]) and not torch.equal(qo[..., :rot], q[..., :rot])


def test_silu_mul_is_within_twice_upstreams_own_bf16_error():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 2 * 13696, generator=g) * 2).bfloat16()
    exact = silu_mul_ref(x.double())
    got, upstream = silu_mul(x), silu_mul_ref(x)
    print(f"silu_mul: kernel {_err(got, exact):.3e}, upstream bf16 {_err(upstream, exact):.3e}")
    assert got.shape == (4, 13696) and _err(got, exact) <= 2 * _err(upstream, exact)


def test_the_engine_with_the_fused_layer_makes_the_same_tokens(monkeypatch):
    from glmq.models.build import build_processor
    from glmq.runtime import ar_fused
    from glmq.runtime.ar_engine import ArEngine, ArRequest
    from glmq.testing import tiny_ar

    model = tiny_ar()
    processor = build_processor()
    inp = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": "a 'red' fox"}]}]],
                                        tokenize=True, target_h=64, target_w=64, return_dict=True,
                                        return_tensors="pt")

    def run():
        engine = ArEngine(model)
        req = ArRequest(inp["input_ids"], inp["image_grid_thw"], inp.get("images_per_sample"), None,
                        inp.get("attention_mask"), torch.Generator().manual_seed(5))
        (tokens, logits), = engine.generate_batch([req], output_logits=True)
        return engine, tokens, logits

    monkeypatch.delenv("GLMQ_AR_FUSED", raising=False)  # unset: fused on CUDA only (no interpreter there)
    plain, tokens, logits = run()
    assert ar_fused.wanted(torch.device("cuda")) and not ar_fused.wanted(torch.device("cpu"))
    monkeypatch.setenv("GLMQ_AR_FUSED", "0")
    assert not ar_fused.wanted(torch.device("cuda"))
    monkeypatch.setenv("GLMQ_AR_FUSED", "1")
    calls = []
    import glmq.kernels.decode_fused as fused

    real = fused._rotary_impl
    monkeypatch.setattr(fused, "_rotary_impl", lambda *a: calls.append(1) or real(*a))
    engine, tokens2, logits2 = run()
    assert engine.fused and not plain.fused and calls  # the fused layer ran
    diff = float((logits2 - logits).abs().max())
    print(f"logits, fused against upstream layers (fp32): max |diff| {diff:.2e}")
    assert torch.equal(tokens, tokens2) and diff < 1e-4
    monkeypatch.setenv("GLMQ_AR_FUSED", "yes")
    from glmq.errors import GlmqError

    with pytest.raises(GlmqError, match="GLMQ_AR_FUSED"):
        ArEngine(model)
