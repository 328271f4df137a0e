"""Every part of the tiny model matters: breaking one drops the figure the fidelity tests check well below the
lowest figure they accept (tests/conftest.py TINY_DEFAULT; benchmarks/results/tiny_fidelity_cpu2/ records
each break's figure). Otherwise a broken block, layer or path could pass every fidelity check."""

from __future__ import annotations

import pytest
import torch

from glmq.evaluate.faults import ar_parts, dit_parts, zeroed
from glmq.evaluate.fidelity import (ar_grid_logits, ar_grid_sequence, compare_logits, dit_inputs, dit_velocity,
                                    load_dequantized)
from glmq.io.reader import PipelineReader
from glmq.quant.metrics import sqnr_db

TIMESTEPS = (999, 750, 500, 250, 0)


@pytest.fixture(scope="module")
def dit(tiny_dir):
    return load_dequantized(PipelineReader(tiny_dir).component("transformer"))


@torch.no_grad()
def test_every_dit_block_layer_and_path_matters(dit, tiny_default_fidelity):
    """Zeroing any block's attention or MLP, any block linear (the layers recipes quantize, AdaLN included),
    the glyph path or the prior path: the velocity SQNR against the intact DiT (the statistic the report
    check bounds: the minimum over five timesteps) falls below the highest figure a broken model may reach."""
    _, _, ceiling = tiny_default_fidelity["dit_velocity_sqnr_db_min"]
    inputs = dit_inputs(dit.config, 8, 0)
    ref = {t: dit_velocity(dit, inputs, t) for t in TIMESTEPS}

    def figure(kwargs=inputs):
        return min(sqnr_db(ref[t], dit_velocity(dit, kwargs, t)) for t in TIMESTEPS)

    parts = dit_parts(dit)
    blocks = dit.config.num_layers
    assert len(parts) == blocks * (2 + 7) + 2  # attn1, ff and their 7 linears (norm1's AdaLN too) per block
    got = {}
    for name, module in parts.items():
        with zeroed(module):
            got[name] = figure()
    # The paths' inputs themselves: glyph embeddings zeroed, prior tokens dropped (the unconditional pass).
    got["glyph embeddings"] = figure(dict(inputs, encoder_hidden_states=torch.zeros_like(inputs["encoder_hidden_states"])))
    got["prior tokens dropped"] = figure(dict(inputs, prior_token_drop=torch.ones_like(inputs["prior_token_drop"])))
    for name, value in got.items():
        print(f"{name:45s} {value:6.2f} dB (ceiling {ceiling:.2f})")
    assert max(got.values()) <= ceiling, max(got.items(), key=lambda kv: kv[1])


@torch.no_grad()
def test_every_ar_attention_and_mlp_matters(tiny_dir, tiny_default_fidelity):
    """Zeroing any decoder layer's attention or MLP output (or any of their linears but q_proj/k_proj): the AR
    logits SQNR against the intact AR falls below the ceiling. Zeroing q_proj or k_proj only makes attention
    uniform, which a random model's near-uniform attention over 1280 tokens barely notices (15.2 dB for the last
    layer, benchmarks/results/tiny_fidelity_cpu2/); every quantized layer, those two included, is checked at
    run time on its own (tests/quant/test_layer_outputs.py::test_runtime_layers_give_the_report_s_output_sqnr)."""
    from transformers import GlmImageProcessor

    _, _, ceiling = tiny_default_fidelity["ar_logits_sqnr_db"]
    ar = load_dequantized(PipelineReader(tiny_dir).component("vision_language_encoder"))
    seq, prompt_len = ar_grid_sequence(GlmImageProcessor.from_pretrained(tiny_dir / "processor"), ar.config, 0)
    ref = ar_grid_logits(ar, seq, prompt_len)
    got = {}
    for name, module in ar_parts(ar).items():
        if name.endswith(("q_proj", "k_proj")):
            continue
        with zeroed(module):
            got[name] = compare_logits(ref, ar_grid_logits(ar, seq, prompt_len))["logits_sqnr_db"]
        print(f"{name:50s} {got[name]:6.2f} dB (ceiling {ceiling:.2f})")
    assert len(got) == 2 * ar.config.text_config.num_hidden_layers + 4 * ar.config.text_config.num_hidden_layers
    assert max(got.values()) <= ceiling, max(got.items(), key=lambda kv: kv[1])
