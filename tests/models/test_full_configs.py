"""The full-size configs reproduce the released GLM-Image architecture (built on the meta device)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from glmq.io.layout import BY_NAME
from glmq.models.build import build_component, tensor_specs


def _specs(name):
    comp = BY_NAME[name]
    model = build_component(comp, "full")
    return {n: (dt, shape) for n, dt, shape in tensor_specs(model, comp.dtype)}


def _params(specs, prefix=""):
    total = 0
    for n, (_, shape) in specs.items():
        if n.startswith(prefix):
            k = 1
            for d in shape:
                k *= d
            total += k
    return total


@pytest.fixture(scope="module")
def ar():
    return _specs("vision_language_encoder")


def test_ar_parameter_counts(ar):
    # GLM_IMAGE.md: 10.11 B in all; text LM 8.85 B, vision tower 1.16 B, VQ 0.04 B, lm_head 0.07 B.
    assert round(_params(ar) / 1e9, 2) == 10.11
    assert round(_params(ar, "model.language_model.") / 1e9, 2) == 8.85
    assert round(_params(ar, "model.visual.") / 1e9, 2) == 1.16
    assert round(_params(ar, "model.vqmodel.") / 1e9, 2) == 0.04
    assert round(_params(ar, "lm_head.") / 1e9, 2) == 0.07


def test_ar_text_decoder_shapes(ar):
    L = "model.language_model.layers.{}."
    layers = {int(m.group(1)) for n in ar if (m := re.match(r"model\.language_model\.layers\.(\d+)\.", n))}
    assert layers == set(range(40))
    for i in (0, 39):
        p = L.format(i)
        assert ar[p + "self_attn.q_proj.weight"][1] == (4096, 4096)
        assert ar[p + "self_attn.k_proj.weight"][1] == (256, 4096)  # 2 KV heads x 128
        assert ar[p + "self_attn.v_proj.weight"][1] == (256, 4096)
        assert ar[p + "self_attn.q_proj.bias"][1] == (4096,)
        assert ar[p + "self_attn.o_proj.weight"][1] == (4096, 4096)
        assert ar[p + "mlp.gate_up_proj.weight"][1] == (27392, 4096)
        assert ar[p + "mlp.down_proj.weight"][1] == (4096, 13696)
        norms = [n for n in ar if n.startswith(p) and "norm" in n]
        assert len(norms) == 4  # four RMSNorms per layer
    assert ar["model.language_model.embed_tokens.weight"][1] == (168064, 4096)
    assert ar["lm_head.weight"][1] == (16512, 4096)
    assert ar["model.vqmodel.quantize.embedding.weight"][1] == (16384, 2048)
    assert ar["model.visual.blocks.0.attn.qkv.weight"][1] == (3 * 1536, 1536)
    assert {dt for dt, _ in ar.values()} == {"bfloat16"}


def test_dit_matches_release_not_class_defaults():
    dit = _specs("transformer")
    assert round(_params(dit) / 1e9, 2) == 6.93
    blocks = Counter(int(n.split(".")[1]) for n in dit if n.startswith("transformer_blocks."))
    assert set(blocks) == set(range(30)) and len(set(blocks.values())) == 1
    b = "transformer_blocks.0."
    for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"):
        assert dit[b + name + ".weight"][1] == (4096, 4096)  # 32 heads x 128
    assert dit[b + "ff.net.0.proj.weight"][1] == (16384, 4096)
    assert dit[b + "ff.net.2.weight"][1] == (4096, 16384)
    assert dit[b + "norm1.linear.weight"][1] == (12 * 4096, 512)
    assert dit["prior_token_embedding.weight"][1] == (16384, 4096)
    assert dit["glyph_projector.net.0.proj.weight"][1] == (4096, 1472)
    assert dit["proj_out.weight"][1] == (2 * 2 * 16, 4096)
    for name in ("prior_projector.net.0.proj.weight", "norm_out.linear.weight"):
        assert name in dit


def test_vae_and_glyph_encoder():
    vae = _specs("vae")
    assert round(_params(vae) / 1e9, 2) == 0.41
    assert not any("quant_conv" in n for n in vae)  # use_quant_conv / use_post_quant_conv are off
    assert not any("attentions" in n for n in vae)  # no mid-block attention
    t5 = _specs("text_encoder")
    assert round(_params(t5) / 1e9, 2) == 0.22
    assert t5["shared.weight"] == ("float32", (384, 1472))
    assert "encoder.embed_tokens.weight" not in t5  # tied: stored once, as save_pretrained does
    assert t5["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][1] == (3584, 1472)
