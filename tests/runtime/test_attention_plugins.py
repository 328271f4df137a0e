"""glmq attention plugged into tiny GLM-Image models (CPU): same outputs as the stock attention.

Tolerance (STYLE.md #7): with the stock model run in float64 as the truth, the plugged-in fp32 model's error is
at most twice the stock fp32 model's error (plus a float64-level floor for paths that are exact).
The Triton path runs under TRITON_INTERPRET=1; backend="ref" exercises the torch reference path.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before glmq.kernels' Triton code is first imported

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from glmq.runtime import attention as RA  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import GlmImageTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache  # noqa: E402


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_within(name, plug, stock, truth, floor=1e-12):
    e_plug, e_stock = _err(plug, truth), _err(stock, truth)
    print(f"{name}: plugged err {e_plug:.3e}, stock err {e_stock:.3e} (vs float64 stock)")
    assert e_plug <= 2 * e_stock + floor


# ------------------------------------------------------------------------------------------------------ DiT
def _tiny_dit():
    torch.manual_seed(0)
    return GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=128,
    ).eval()


def _dit_inputs(batch=2, text_len=5, hw=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n_img = (hw // 2) ** 2
    return dict(  # drawn in fp32 and cast, so every dtype sees the same values
        hidden_states=torch.randn(batch, 4, hw, hw, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g).to(dtype),
        prior_token_id=torch.randint(0, 128, (batch, n_img), generator=g),
        prior_token_drop=torch.tensor([False, True][:batch]),
        timestep=torch.tensor([999.0, 979.0][:batch], dtype=dtype),
        target_size=torch.tensor([[64.0, 64.0]] * batch, dtype=dtype),
        crop_coords=torch.zeros(batch, 2, dtype=dtype),
    )


def _run_dit(model, inputs, kv_mode=None, **kw):
    """Forward; with kv_mode "read"/"skip", first write a reference image into a fresh KV cache."""
    with torch.no_grad():
        kv = None
        if kv_mode is not None:
            kv = GlmImageKVCache(num_layers=len(model.transformer_blocks))
            kv.set_mode("write")
            ref = _dit_inputs(batch=1, text_len=3, seed=9, dtype=inputs["hidden_states"].dtype)
            ref["timestep"] = torch.zeros(1, dtype=ref["timestep"].dtype)
            model(**ref, kv_caches=kv)
            kv.set_mode(kv_mode)
        return model(**inputs, kv_caches=kv, **kw).sample


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("kv_mode", [None, "read", "skip"], ids=["nocache", "read", "skip"])
def test_dit_processor_matches_stock(backend, kv_mode):
    stock = _tiny_dit()
    truth = _run_dit(copy.deepcopy(stock).double(), _dit_inputs(dtype=torch.float64), kv_mode)
    out_stock = _run_dit(stock, _dit_inputs(), kv_mode)
    plugged = copy.deepcopy(stock)
    proc = RA.install_dit_attention(plugged, precision="bf16", backend=backend)
    assert all(b.attn1.processor is proc for b in plugged.transformer_blocks)
    out = _run_dit(plugged, _dit_inputs(), kv_mode)
    _assert_within(f"DiT {backend} kv={kv_mode}", out, out_stock, truth)


def test_dit_read_mode_uses_the_cache():
    # Guard against a vacuous comparison: attending to the cached reference must change the output.
    model = _tiny_dit()
    RA.install_dit_attention(model, backend="triton")
    inputs = _dit_inputs()
    assert _err(_run_dit(model, inputs, "read"), _run_dit(model, inputs, "skip")) > 1e-4


def test_dit_stock_mask_mode_reproduces_diffusers():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    stock = _tiny_dit()
    truth = _run_dit(copy.deepcopy(stock).double(), _dit_inputs(dtype=torch.float64), attention_mask=mask)
    out_stock = _run_dit(stock, _dit_inputs(), attention_mask=mask)
    plugged = copy.deepcopy(stock)
    RA.install_dit_attention(plugged, mask_mode="stock")
    _assert_within("DiT stock mask", _run_dit(plugged, _dit_inputs(), attention_mask=mask), out_stock, truth)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_dit_padding_mask_mode_ignores_padded_text(backend):
    # mask_mode="padding": padded glyph tokens must not affect the image, i.e. equal dropping them outright.
    model = _tiny_dit()
    RA.install_dit_attention(model, mask_mode="padding", backend=backend)
    padded = _dit_inputs(batch=1, text_len=5)
    dropped = dict(padded, encoder_hidden_states=padded["encoder_hidden_states"][:, :3])
    padded["encoder_hidden_states"][:, 3:] = 50.0  # loud padding
    out_padded = _run_dit(model, padded, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    out_dropped = _run_dit(model, dropped)
    print(f"padding mode, {backend}: max diff {_err(out_padded, out_dropped):.3e}")
    assert _err(out_padded, out_dropped) < 1e-4


def test_dit_int8_processor_sqnr():
    # 8-bit attention inside the tiny DiT (bf16 weights): output close to the stock bf16 model's.
    stock = _tiny_dit().to(torch.bfloat16)
    inputs = _dit_inputs(dtype=torch.bfloat16)
    out_stock = _run_dit(stock, inputs).float()
    RA.install_dit_attention(stock, precision="int8")
    out = _run_dit(stock, inputs).float()
    sqnr = 10 * torch.log10(out_stock.pow(2).sum() / (out - out_stock).pow(2).sum()).item()
    print(f"tiny DiT, int8 attention vs stock bf16: SQNR {sqnr:.1f} dB")
    assert sqnr > 25.0


def test_dit_processor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown precision"):
        RA.GlmqDiTAttnProcessor(precision="int4")
    with pytest.raises(ValueError, match="unknown mask_mode"):
        RA.GlmqDiTAttnProcessor(mask_mode="ignore")


# ------------------------------------------------------------------------------------------------------- AR
def _tiny_ar():
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    cfg = GlmImageConfig(
        text_config=dict(vocab_size=300, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, vision_vocab_size=256, pad_token_id=0,
                         eos_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=16,
                           image_size=64),
        vq_config=dict(embed_dim=16, num_embeddings=256, latent_channels=32),
    )
    torch.manual_seed(0)
    return GlmImageForConditionalGeneration(cfg).eval()


def _ar_generate(model, attn, ids, mask=None, steps=3, static=False, dtype=torch.float32):
    """Prefill + `steps` single-token decode steps; returns the last hidden states of every call."""
    from transformers import DynamicCache, StaticCache

    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation(attn)
    lm = model.model.language_model
    cache = (StaticCache(config=lm.config, max_cache_len=ids.shape[1] + steps + 4) if static
             else DynamicCache(config=lm.config))
    outs = []
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        outs.append(out.last_hidden_state)
        for _ in range(steps):
            nxt = torch.randint(2, 300, (ids.shape[0], 1), generator=g)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = lm(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
            outs.append(out.last_hidden_state)
    return outs


def test_register_ar_attention_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert RA.register_ar_attention() == RA.register_ar_attention() == "glmq"
    assert AttentionInterface._global_mapping["glmq"] is RA.glmq_ar_attention
    assert "glmq" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("case", ["dynamic", "static", "padded"])
def test_ar_attention_matches_sdpa(case):
    RA.register_ar_attention()
    model = _tiny_ar()
    ids = torch.randint(2, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = None
    if case == "padded":  # left padding: prefill falls back to SDPA, decode uses the kernel's key padding
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, :4] = 0
    static = case == "static"
    truth = _ar_generate(model, "sdpa", ids, mask, static=static, dtype=torch.float64)
    stock = _ar_generate(model, "sdpa", ids, mask, static=static)
    plugged = _ar_generate(model, "glmq", ids, mask, static=static)
    for step, (p, s, t) in enumerate(zip(plugged, stock, truth)):
        rows = mask[:, :, None].bool() if (mask is not None and step == 0) else torch.ones(1, dtype=torch.bool)
        # Padded prefill rows are garbage in every implementation; compare the real tokens.
        _assert_within(f"AR {case} step {step}", p * rows, s * rows, t * rows, floor=1e-6)


def test_ar_plugin_routes_through_the_kernel(monkeypatch):
    # Prefill (causal, no mask) and decode (one query) must reach glmq.kernels.attention, not the fallback.
    from glmq.kernels import _attention as A

    calls = []
    real = A.attention
    monkeypatch.setattr(A, "attention", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    import glmq.kernels

    monkeypatch.setattr(glmq.kernels, "attention", A.attention)
    RA.register_ar_attention()
    _ar_generate(_tiny_ar(), "glmq", torch.randint(2, 300, (1, 7)), steps=1)
    print("kernel calls (query shapes):", calls)
    assert any(s[2] == 7 for s in calls) and any(s[2] == 1 for s in calls)


def test_ar_function_non_causal_like_the_vision_tower():
    # The vision tower calls the same function per image with is_causal=False, no mask, head dim 96.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 23, 96, generator=g, dtype=torch.float64) for _ in range(3))
    truth, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    stock, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, is_causal=False)
    out, _ = RA.glmq_ar_attention(module, q.float(), k.float(), v.float(), None, is_causal=False)
    assert out.shape == (1, 23, 2, 96)
    _assert_within("AR fn, non-causal D96", out, stock, truth, floor=1e-7)


@pytest.mark.parametrize("q_len,padded", [(1, False), (1, True), (6, True)], ids=["decode", "decode-pad", "prefill"])
def test_ar_function_uses_static_cache_kv_len(q_len, padded):
    # glmq.runtime.ar_engine's contract: kv_len [B] slots written (queries are the last q of them), an optional
    # key_padding_mask [B, max_len], and the equivalent dense mask; unwritten slots hold garbage.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 4
    g = torch.Generator().manual_seed(6)
    B, Hq, Hkv, D, max_len = 2, 8, 2, 16, 24
    kv_len = torch.tensor([13, 9], dtype=torch.int32)
    q = torch.randn(B, Hq, q_len, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, max_len, D, generator=g, dtype=torch.float64) for _ in range(2))
    keys = torch.arange(max_len)
    key_ok = keys[None, :] < kv_len[:, None]
    kpm = None
    if padded:
        kpm = torch.ones(B, max_len, dtype=torch.bool)
        kpm[1, :3] = False  # left padding of the second prompt
        key_ok &= kpm
    for b in range(B):
        k[b, :, int(kv_len[b]):] = 1e3  # garbage in unwritten slots
        v[b, :, int(kv_len[b]):] = 1e3
    pos = kv_len[:, None] - q_len + torch.arange(q_len)[None, :]  # [B, q]
    dense = (key_ok[:, None, :] & (keys[None, None, :] <= pos[:, :, None]))[:, None]  # [B, 1, q, max_len]
    rows = dense.any(-1, keepdim=True).transpose(1, 2)  # [B, q, 1, 1]: padded query rows see nothing here
    truth, _ = sdpa_attention_forward(module, q, k, v, dense)
    stock, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), dense)
    out, _ = RA.glmq_ar_attention(module, q.float(), k.float(), v.float(), dense, kv_len=kv_len,
                                  key_padding_mask=kpm)
    _assert_within(f"AR fn, static cache q={q_len} padded={padded}", out * rows, stock.nan_to_num() * rows,
                   truth.nan_to_num() * rows, floor=1e-7)
