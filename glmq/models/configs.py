"""GLM-Image component configurations at two sizes.

``full`` is the released zai-org/GLM-Image architecture (see ``../shared/GLM_IMAGE.md``): AR 10.11 B
parameters, DiT 6.93 B with 32 heads x 128 (not the diffusers class defaults of 64 x 40), VAE 0.41 B,
glyph encoder 0.22 B. ``tiny`` keeps every structural feature (GQA, M-RoPE sections, vision tower, VQ,
glyph encoder, 4-level VAE) at widths that run a whole text-to-image in about a second on a CPU, and
satisfies the cross-component constraints the pipeline relies on:

- ``mrope_section`` sums to ``head_dim * partial_rotary_factor / 2``;
- the DiT prior codebook is at least the AR's vision vocabulary (so every sampled id embeds);
- the VQ ``latent_channels`` equals the vision tower width;
- the vision patch size equals the processor's (16);
- DiT patch size x VAE downsampling factor == 16 (AR tokens are 1/32 and upsampled 2x);
- glyph ``d_model`` equals the DiT ``text_embed_dim``; DiT ``in_channels`` equals the VAE latent channels.

Configs are plain dicts of constructor keyword arguments, so they can be built on any device and written
as JSON without importing the model libraries here.
"""

from __future__ import annotations

import copy
from typing import Any

SIZES = ("tiny", "full")

# Token ids the GLM-Image tokenizer and pipeline hard-code; the tiny tokenizer keeps them.
SPECIAL_TOKEN_IDS = {
    "<|dit_token_16384|>": 16384,  # image start; the processor's bos_token
    "<|dit_token_16385|>": 16385,  # image end / EOS of the AR
    "<sop>": 167845,  # grid size start
    "<eop>": 167846,  # grid size end
    "<|image|>": 167855,  # placeholder for a reference image's tokens
}
PAD_TOKEN_ID = 167841

_FULL: dict[str, dict[str, Any]] = {
    "vision_language_encoder": {
        "text_config": {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000,
                "partial_rotary_factor": 0.5,
                "mrope_section": [8, 12, 12],
            },
        },
    },
    "transformer": {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 30,
        "attention_head_dim": 128,
        "num_attention_heads": 32,
        "text_embed_dim": 1472,
        "time_embed_dim": 512,
        "condition_dim": 256,
        "prior_vq_quantizer_codebook_size": 16384,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": [128, 512, 1024, 1024],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 3,
        "norm_num_groups": 32,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        # The release ships per-channel latent statistics; random weights get neutral ones.
        "latents_mean": [0.0] * 16,
        "latents_std": [1.0] * 16,
    },
    "text_encoder": {
        "d_model": 1472,
        "d_ff": 3584,
        "d_kv": 64,
        "num_heads": 6,
        "num_layers": 12,
        "vocab_size": 384,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
    },
}

_TINY: dict[str, dict[str, Any]] = {
    "vision_language_encoder": {
        "text_config": {
            "vocab_size": 168064,  # the special token ids above must embed
            # 128 wide so every int4 group size (32/64/128) divides the linear layers' inputs.
            "hidden_size": 128,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # Tiny vision vocabulary: EOS (16385) and the out-of-codebook ids cannot be sampled, so the
            # stock pipeline never crashes on the tiny model.
            "vision_vocab_size": 128,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 3, 3],  # head_dim 32 * 0.5 / 2 = 8
            },
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "image_size": 64,
            "patch_size": 16,
            "intermediate_size": 48,
        },
        "vq_config": {"embed_dim": 16, "num_embeddings": 128, "latent_channels": 32},
    },
    "transformer": {
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "text_embed_dim": 32,
        "time_embed_dim": 16,
        "condition_dim": 8,
        "prior_vq_quantizer_codebook_size": 128,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "latents_mean": [0.0] * 4,
        "latents_std": [1.0] * 4,
    },
    "text_encoder": {
        "d_model": 32,
        "d_ff": 48,
        "d_kv": 8,
        "num_heads": 4,
        "num_layers": 2,
        "vocab_size": 384,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
    },
}

SCHEDULER = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": True,
    "time_shift_type": "linear",
    "base_shift": 0.25,
    "max_shift": 0.75,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Image processor settings: the vision tower's patch size, no spatial merge, one frame per image.
IMAGE_PROCESSOR = {"patch_size": 16, "merge_size": 1, "temporal_patch_size": 1}


def component_config(component: str, size: str) -> dict[str, Any]:
    """Constructor keyword arguments for a weight-bearing component at ``size`` ("tiny" or "full")."""
    from glmq.errors import GlmqError

    table = {"tiny": _TINY, "full": _FULL}.get(size)
    if table is None:
        raise GlmqError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    if component not in table:
        raise GlmqError(f"unknown component {component!r}; valid components: {', '.join(table)}")
    return copy.deepcopy(table[component])
