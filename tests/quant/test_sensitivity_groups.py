"""The sensitivity sweep's layer groups (benchmarks/bench_sensitivity.py) name real tensors of the released
model, so a rename upstream cannot silently empty a group the recipes' comments cite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from glmq.io.layout import BY_NAME
from glmq.models.build import build_model
from glmq.models.configs import component_config

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sensitivity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sensitivity", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_group_matches_released_tensors():
    bench = _bench()
    models = {c: build_model(BY_NAME[c], component_config(c, "full")) for c in ("vision_language_encoder", "transformer")}
    expected = {"ar.embed_tokens": 1, "ar.lm_head": 1, "ar.vision_tower": 40 * 4, "ar.vq_codebook": 1,
                "dit.patch_embed": 1, "dit.prior_token_embedding": 1, "dit.norm_out_proj_out": 2,
                "dit.adaln_norm1": 30, "ref.ar_decoder_linears": 40 * 6, "ref.dit_block_linears": 30 * 6}
    for group, (comp, patterns, _) in bench.GROUPS.items():
        names = bench.group_names(models[comp], patterns)
        print(group, len(names))
        assert names, group
        if group in expected:
            assert len(names) == expected[group], group
