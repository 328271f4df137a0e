"""Bound and type-check a component's ``config.json`` before any model is built from it.

The upstream constructors trust their configs: a string head count raises deep inside ``__init__``, a
``hidden_size`` of 10^9 asks for a 672 TB embedding, and ``num_layers`` of 10^7 builds modules for hours,
even on the meta device. :func:`check_config` runs first wherever glmq builds a component
(:func:`glmq.models.build.build_model`, so ``inspect``, every converter and ``glmq.load`` alike):

1. every field the builders read must have the right type (positive bounded ints, strings, lists of them,
   booleans), checked on the raw JSON and on the sub-configs;
2. layer counts are capped at :data:`LAYER_CAP_FACTOR` times the release's (building modules is the cost
   that parameters do not measure);
3. the parameter count estimated from the shapes of ``GLM_IMAGE.md`` (pure arithmetic, nothing built)
   must not exceed :data:`PARAM_CAP_FACTOR` times the released component's.

Defaults for absent fields come from the upstream classes themselves, so an estimate sees what the
constructor would build. ``tests/models/test_check_config.py`` holds the estimates against exact meta-device
counts for the tiny and full configs.
"""

from __future__ import annotations

import inspect
from typing import Any

from glmq.errors import CheckpointError
from glmq.io.safe_read import want_bool, want_dict, want_int, want_int_list, want_number, want_str

# Released parameter counts (GLM_IMAGE.md) and the most glmq accepts.
RELEASED_PARAMS = {"ar": 10.11e9, "dit": 6.93e9, "glyph": 0.22e9, "vae": 0.41e9}
PARAM_CAP_FACTOR = 4
LAYER_CAP_FACTOR = 4
MAX_WIDTH = 1 << 17  # any hidden/intermediate width; the release's largest is 13696
MAX_VOCAB = 1 << 22  # the release's largest is 168064
MAX_TOKEN_ID = 1 << 31

# role -> sub-config ("" for top level) -> field -> (kind, upper bound for ints)
_LAYERS = {("ar", "text_config", "num_hidden_layers"): 40, ("ar", "vision_config", "depth"): 40,
           ("dit", "", "num_layers"): 30, ("glyph", "", "num_layers"): 12, ("glyph", "", "num_decoder_layers"): 12,
           ("vae", "", "layers_per_block"): 3}

_W, _V, _T = ("int", MAX_WIDTH), ("int", MAX_VOCAB), ("token", MAX_TOKEN_ID)
SCHEMA: dict[str, dict[str, dict[str, tuple]]] = {
    "ar": {
        "": {"image_token_id": _T, "image_start_token_id": _T, "image_end_token_id": _T,
             "tie_word_embeddings": ("bool",)},
        "text_config": {"vocab_size": _V, "hidden_size": _W, "intermediate_size": _W, "num_hidden_layers": _W,
                        "num_attention_heads": _W, "num_key_value_heads": _W, "head_dim": ("int?", MAX_WIDTH),
                        "max_position_embeddings": ("int", 1 << 24), "vision_vocab_size": _V,
                        "hidden_act": ("str",), "attention_bias": ("bool",), "rms_norm_eps": ("num",),
                        "pad_token_id": ("token?", MAX_TOKEN_ID), "eos_token_id": ("token?", MAX_TOKEN_ID),
                        "rope_parameters": ("dict?",)},
        "vision_config": {"depth": _W, "hidden_size": _W, "num_heads": _W, "in_channels": ("int", 64),
                          "image_size": ("int", 1 << 16), "patch_size": ("int", 1024), "spatial_merge_size":
                          ("int", 64), "intermediate_size": _W, "hidden_act": ("str",), "attention_bias": ("bool",),
                          "layer_norm_eps": ("num",)},
        "vq_config": {"embed_dim": _W, "num_embeddings": _V, "latent_channels": _W, "in_channels": ("int", 64)},
    },
    "dit": {"": {"patch_size": ("int", 64), "in_channels": ("int", 1024), "out_channels": ("int", 1024),
                 "num_layers": _W, "attention_head_dim": _W, "num_attention_heads": _W, "text_embed_dim": _W,
                 "time_embed_dim": _W, "condition_dim": _W, "prior_vq_quantizer_codebook_size": _V}},
    "glyph": {"": {"d_model": _W, "d_ff": _W, "d_kv": _W, "num_heads": _W, "num_layers": _W,
                   "num_decoder_layers": ("int?", MAX_WIDTH), "vocab_size": _V,
                   "relative_attention_num_buckets": ("int", 1 << 16),
                   "relative_attention_max_distance": ("int", 1 << 24), "feed_forward_proj": ("str",),
                   "is_encoder_decoder": ("bool",), "layer_norm_epsilon": ("num",)}},
    "vae": {"": {"in_channels": ("int", 64), "out_channels": ("int", 64), "latent_channels": ("int", 1024),
                 "layers_per_block": _W, "norm_num_groups": ("int", 1024), "sample_size": ("int?", 1 << 16),
                 "block_out_channels": ("ints", MAX_WIDTH, 8), "down_block_types": ("strs", 8),
                 "up_block_types": ("strs", 8), "act_fn": ("str",), "latents_mean": ("nums?", 1024),
                 "latents_std": ("nums?", 1024), "use_quant_conv": ("bool",), "use_post_quant_conv": ("bool",),
                 "mid_block_add_attention": ("bool",), "force_upcast": ("bool",),
                 "scaling_factor": ("num",), "shift_factor": ("num?",)}},
}


def _check_field(value: Any, spec: tuple, where: str, field: str) -> None:
    kind = spec[0]
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    if kind == "int":
        want_int(value, where, field, lo=1, hi=spec[1])
    elif kind == "token":
        if isinstance(value, list):  # eos_token_id may be a list of ids
            want_int_list(value, where, field, hi=spec[1], max_len=64)
        else:
            want_int(value, where, field, lo=0, hi=spec[1])
    elif kind == "str":
        want_str(value, where, field, max_len=256)
    elif kind == "bool":
        want_bool(value, where, field)
    elif kind == "num":
        want_number(value, where, field)
    elif kind == "dict":
        want_dict(value, where, field)
    elif kind == "ints":
        values = want_int_list(value, where, field, lo=1, hi=spec[1], max_len=spec[2])
        if not values:
            raise CheckpointError(f"{where}: {field} must not be empty")
    elif kind == "strs":
        from glmq.io.safe_read import want_list

        for i, v in enumerate(want_list(value, where, field, max_len=spec[1])):
            want_str(v, where, f"{field}[{i}]", max_len=256)
    elif kind == "nums":
        from glmq.io.safe_read import want_list

        for i, v in enumerate(want_list(value, where, field, max_len=spec[1])):
            want_number(v, where, f"{field}[{i}]")
    else:  # pragma: no cover - a schema typo
        raise AssertionError(kind)


def _defaults(role: str) -> dict[str, dict[str, Any]]:
    """The upstream constructors' defaults, per sub-config (nothing is built)."""
    if role == "ar":
        from transformers import GlmImageTextConfig, GlmImageVisionConfig, GlmImageVQVAEConfig

        return {"": {}, "text_config": GlmImageTextConfig().to_dict(), "vision_config": GlmImageVisionConfig().to_dict(),
                "vq_config": GlmImageVQVAEConfig().to_dict()}
    if role == "glyph":
        from transformers import T5Config

        return {"": T5Config().to_dict()}
    if role == "dit":
        from diffusers import GlmImageTransformer2DModel as cls
    elif role == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        raise ValueError(role)
    sig = inspect.signature(cls.__init__)
    return {"": {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}}


def resolved(role: str, config: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Per sub-config, the fields the builder will see: the config's values over the upstream defaults,
    each type-checked."""
    schema = SCHEMA[role]
    defaults = _defaults(role)
    out: dict[str, dict[str, Any]] = {}
    for sub, fields in schema.items():
        raw = config if sub == "" else config.get(sub)
        if raw is None:
            raw = {}
        prefix = f"{sub}." if sub else ""
        want_dict(raw, where, sub or "config")
        merged = {**defaults.get(sub, {}), **raw}
        for field, spec in fields.items():
            if field in merged:
                _check_field(merged[field], spec, where, prefix + field)
        for (r, s, field), released in _LAYERS.items():
            if r == role and s == sub and merged.get(field) is not None:
                cap = LAYER_CAP_FACTOR * released
                if merged[field] > cap:
                    raise CheckpointError(f"{where}: {prefix}{field} = {merged[field]} is more than {cap} "
                                          f"({LAYER_CAP_FACTOR}x the released {released})")
        out[sub] = merged
    return out


def estimate_params(role: str, r: dict[str, dict[str, Any]]) -> int:
    """Parameters of the component a resolved config describes, from the layer shapes (GLM_IMAGE.md).

    Counts the weight matrices and embeddings that dominate; biases and norms are ignored (well under 1%).
    """
    if role == "ar":
        t, v, q = r["text_config"], r["vision_config"], r["vq_config"]
        h, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
        hd = t.get("head_dim") or h // heads
        per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * t["intermediate_size"]
        text = t["num_hidden_layers"] * per_layer + (t["vocab_size"] + t["vision_vocab_size"]) * h
        vh = v["hidden_size"]
        vision = v["depth"] * (4 * vh * vh + 2 * vh * v["intermediate_size"]) + v["in_channels"] * v["patch_size"] ** 2 * vh
        vq = q["num_embeddings"] * q["embed_dim"] + 2 * q["embed_dim"] * q["latent_channels"]
        return text + vision + vq
    if role == "dit":
        c = r[""]
        d = c["num_attention_heads"] * c["attention_head_dim"]
        # per block: q, k, v, out (4 d^2), a 4x GELU MLP (8 d^2), AdaLN modulation (time_embed -> 12 d)
        blocks = c["num_layers"] * (12 * d * d + 12 * d * c["time_embed_dim"])
        embeds = (c["prior_vq_quantizer_codebook_size"] + c["text_embed_dim"] + 2 * c["condition_dim"]) * d
        patch = 2 * c["patch_size"] ** 2 * (c["in_channels"] + c["out_channels"]) * d
        return blocks + embeds + patch
    if role == "glyph":
        c = r[""]
        d, inner = c["d_model"], c["num_heads"] * c["d_kv"]
        mlp = (3 if str(c.get("feed_forward_proj", "")).startswith("gated") else 2) * d * c["d_ff"]
        return c["num_layers"] * (4 * d * inner + mlp) + c["vocab_size"] * d
    if role == "vae":
        c = r[""]
        chans, lpb = c["block_out_channels"], c["layers_per_block"]
        # encoder lpb and decoder lpb + 1 resnets of two 3x3 convs per level, plus a 3x3 resampler per level;
        # two mid blocks of two resnets at the last width
        convs = sum(9 * ch * ch * (2 * lpb + 2 * (lpb + 1) + 2) for ch in chans)
        return convs + 8 * 9 * chans[-1] ** 2
    raise ValueError(role)


def check_config(role: str, config: Any, where: str) -> int:
    """Raise :class:`CheckpointError` for a config glmq must not build; return the estimated parameters."""
    if role not in SCHEMA:
        raise ValueError(f"no config checks for role {role!r}")
    want_dict(config, where, "config")
    params = estimate_params(role, resolved(role, config, where))
    cap = PARAM_CAP_FACTOR * RELEASED_PARAMS[role]
    if params > cap:
        raise CheckpointError(f"{where}: describes about {params / 1e9:.3g} B parameters, more than {cap / 1e9:.3g} B "
                              f"({PARAM_CAP_FACTOR}x the released component); refusing to build it")
    return params
