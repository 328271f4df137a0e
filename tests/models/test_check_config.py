"""Configs are type-checked and size-bounded before any model is built (glmq.models.check_config)."""

from __future__ import annotations

import time

import pytest

from glmq.errors import CheckpointError
from glmq.io.layout import BY_NAME
from glmq.models.build import build_model
from glmq.models.check_config import RELEASED_PARAMS, check_config
from glmq.models.configs import component_config
from glmq.testing import assert_one_line_error

COMPONENTS = ("vision_language_encoder", "transformer", "text_encoder", "vae")


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_estimate_matches_meta_count(name, size):
    """The arithmetic estimate agrees with the exact count of the model built on the meta device."""
    comp = BY_NAME[name]
    cfg = component_config(name, size)
    est = check_config(comp.role, cfg, name)
    exact = sum(p.numel() for p in build_model(comp, cfg).parameters())
    print(name, size, est, exact, est / exact)
    assert 0.85 <= est / exact <= 1.15
    if size == "full":  # the released sizes, as GLM_IMAGE.md reports them
        assert 0.95 <= exact / RELEASED_PARAMS[comp.role] <= 1.05


def _refused(name, edit, *needles):
    comp = BY_NAME[name]
    cfg = component_config(name, "tiny")
    edit(cfg)
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        build_model(comp, cfg)
    assert time.perf_counter() - t < 5  # refused before anything is built
    assert_one_line_error(e.value, f"{name}/config.json", *needles)


def test_string_head_count():
    _refused("transformer", lambda c: c.update(num_attention_heads="32"), "num_attention_heads must be an integer")


def test_huge_hidden_size():
    _refused("vision_language_encoder", lambda c: c["text_config"].update(hidden_size=10**9), "hidden_size")
    # within the per-field bound but far beyond the release as a whole
    _refused("vision_language_encoder", lambda c: c["text_config"].update(hidden_size=65536, vocab_size=1 << 21),
             "B parameters")


def test_layer_counts_bounded():
    _refused("transformer", lambda c: c.update(num_layers=10**7), "num_layers")
    _refused("text_encoder", lambda c: c.update(num_layers=49), "num_layers = 49 is more than 48")
    _refused("vision_language_encoder", lambda c: c["vision_config"].update(depth=10**5), "depth")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(block_out_channels="128"), "block_out_channels must be a list"),
    (lambda c: c.update(block_out_channels=[]), "must not be empty"),
    (lambda c: c.update(block_out_channels=[8, -16]), "block_out_channels[1]"),
    (lambda c: c.update(down_block_types=[1, 2, 3, 4]), "down_block_types[0] must be a string"),
    (lambda c: c.update(latents_std=[float("inf")] * 4), "latents_std[0] must be a finite number"),
    (lambda c: c.update(use_quant_conv="no"), "use_quant_conv must be true or false"),
])
def test_vae_field_types(edit, needle):
    _refused("vae", edit, needle)


def test_sub_config_types():
    _refused("vision_language_encoder", lambda c: c.update(text_config=[1]), "text_config must be a JSON object")
    _refused("vision_language_encoder", lambda c: c["text_config"].update(hidden_act=7), "hidden_act must be a string")
    _refused("text_encoder", lambda c: c.update(d_ff=1.5), "d_ff must be an integer")
