"""GGUF tensor names and metadata for GLM-Image.

The AR (``GlmImageForConditionalGeneration``) is written under its own architecture, ``glm-image``: its
text decoder has llama.cpp's GLM4 layout (fused ``gate_up_proj`` stored as ``ffn_up``, four RMSNorms per
layer), so its tensors take gguf-py's GLM4 names; the vision tower takes the ``v.*`` names gguf-py gives
vision encoders (mmproj), and the VQ tokenizer ``v.vq.*``. No llama.cpp build runs ``glm-image`` yet: the
names follow its conventions so that tools (and a future port) read the file naturally, and the metadata
carries the full Hugging Face config so glmq rebuilds the model losslessly.

The DiT (``GlmImageTransformer2DModel``) follows ComfyUI-GGUF's convention for image models: tensor names
are the diffusers state-dict names unchanged and ``general.architecture`` names the model type
(``glm_image``). ComfyUI-GGUF checks that string against a fixed list of supported architectures, which
does not include GLM-Image yet; diffusers' GGUF loader reads the names as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_VERSION, GGUFValueType

from glmq.errors import GlmqError

__all__ = [
    "AR_ARCH",
    "DIT_ARCH",
    "GGUF_MAX_NAME",
    "MetadataEntry",
    "ar_gguf_name",
    "ar_hf_name",
    "ar_metadata",
    "dit_gguf_name",
    "dit_hf_name",
    "dit_metadata",
    "hf_config_from_metadata",
    "write_metadata",
]

AR_ARCH = "glm-image"
DIT_ARCH = "glm_image"
GGUF_MAX_NAME = 63  # ggml keeps tensor names in a 64-byte buffer with a terminating NUL

IMAGE_START_TOKEN_ID = 16384
IMAGE_END_TOKEN_ID = 16385

# (Hugging Face name, GGUF name); "{n}" is a layer index, "{p}" the parameter (weight or bias).
_AR_NAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.embed_tokens.weight", "token_embd.weight"),
    ("model.language_model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.language_model.layers.{n}.input_layernorm.weight", "blk.{n}.attn_norm.weight"),
    ("model.language_model.layers.{n}.post_self_attn_layernorm.weight", "blk.{n}.post_attention_norm.weight"),
    ("model.language_model.layers.{n}.post_attention_layernorm.weight", "blk.{n}.ffn_norm.weight"),
    ("model.language_model.layers.{n}.post_mlp_layernorm.weight", "blk.{n}.post_ffw_norm.weight"),
    ("model.language_model.layers.{n}.self_attn.q_proj.{p}", "blk.{n}.attn_q.{p}"),
    ("model.language_model.layers.{n}.self_attn.k_proj.{p}", "blk.{n}.attn_k.{p}"),
    ("model.language_model.layers.{n}.self_attn.v_proj.{p}", "blk.{n}.attn_v.{p}"),
    ("model.language_model.layers.{n}.self_attn.o_proj.{p}", "blk.{n}.attn_output.{p}"),
    # llama.cpp's GLM4 keeps the fused [gate; up] projection whole under the ffn_up name.
    ("model.language_model.layers.{n}.mlp.gate_up_proj.{p}", "blk.{n}.ffn_up.{p}"),
    ("model.language_model.layers.{n}.mlp.down_proj.{p}", "blk.{n}.ffn_down.{p}"),
    ("model.visual.patch_embed.proj.{p}", "v.patch_embd.{p}"),
    ("model.visual.embeddings.position_embedding.weight", "v.position_embd.weight"),
    ("model.visual.blocks.{n}.norm1.{p}", "v.blk.{n}.ln1.{p}"),
    ("model.visual.blocks.{n}.norm2.{p}", "v.blk.{n}.ln2.{p}"),
    ("model.visual.blocks.{n}.attn.qkv.{p}", "v.blk.{n}.attn_qkv.{p}"),
    ("model.visual.blocks.{n}.attn.proj.{p}", "v.blk.{n}.attn_out.{p}"),
    ("model.visual.blocks.{n}.mlp.fc1.{p}", "v.blk.{n}.ffn_up.{p}"),
    ("model.visual.blocks.{n}.mlp.fc2.{p}", "v.blk.{n}.ffn_down.{p}"),
    ("model.vqmodel.quantize.embedding.weight", "v.vq.codebook.weight"),
    ("model.vqmodel.quant_conv.{p}", "v.vq.quant_conv.{p}"),
    ("model.vqmodel.post_quant_conv.{p}", "v.vq.post_quant_conv.{p}"),
)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


_HF_TO_GGUF = tuple((_template_regex(hf), gg) for hf, gg in _AR_NAMES)
_GGUF_TO_HF = tuple((_template_regex(gg), hf) for hf, gg in _AR_NAMES)


def _translate(name: str, table: tuple[tuple[re.Pattern[str], str], ...], what: str) -> str:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    raise GlmqError(f"no {what} name for tensor {name!r}: it is not part of GLM-Image's AR as glmq knows it")


def ar_gguf_name(hf_name: str) -> str:
    """GGUF name of an AR tensor, e.g. ``model.language_model.layers.3.mlp.gate_up_proj.weight`` ->
    ``blk.3.ffn_up.weight``. Raises :class:`GlmqError` for names outside the AR."""
    return _translate(hf_name, _HF_TO_GGUF, "GGUF")


def ar_hf_name(gguf_name: str) -> str:
    """Inverse of :func:`ar_gguf_name`."""
    return _translate(gguf_name, _GGUF_TO_HF, "Hugging Face")


def dit_gguf_name(diffusers_name: str) -> str:
    """GGUF name of a DiT tensor: the diffusers name itself (ComfyUI-GGUF convention), checked for length."""
    if len(diffusers_name.encode()) > GGUF_MAX_NAME:
        raise GlmqError(f"tensor name {diffusers_name!r} is longer than GGUF's {GGUF_MAX_NAME} bytes")
    return diffusers_name


def dit_hf_name(gguf_name: str) -> str:
    """Inverse of :func:`dit_gguf_name` (the identity)."""
    return gguf_name


# ----------------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class MetadataEntry:
    """One GGUF key/value; ``sub_type`` is the element type of an ARRAY."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None


def write_metadata(writer: Any, entries: Iterable[MetadataEntry]) -> None:
    """Add ``entries`` to a ``gguf.GGUFWriter`` (which sets ``general.architecture`` itself)."""
    for e in entries:
        if e.key != "general.architecture":
            writer.add_key_value(e.key, e.value, e.vtype, e.sub_type)


def _u32(key: str, value: Any) -> MetadataEntry:
    return MetadataEntry(key, int(value), GGUFValueType.UINT32)


def _f32(key: str, value: Any) -> MetadataEntry:
    return MetadataEntry(key, float(value), GGUFValueType.FLOAT32)


def _str(key: str, value: str) -> MetadataEntry:
    return MetadataEntry(key, value, GGUFValueType.STRING)


def _get(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in cfg:
        raise GlmqError(f"the GLM-Image config has no {where}{key}: is this a GlmImageConfig?")
    return cfg[key]


def ar_metadata(
    hf_config: Mapping[str, Any], *, name: str | None = None, file_type: int | None = None
) -> list[MetadataEntry]:
    """The GGUF metadata an AR export writes: ``general.*``, the ``glm-image.*`` hyper-parameters (llama.cpp
    key names where one exists), the special token ids, and ``glm-image.hf_config``: the full
    ``GlmImageConfig.to_dict()`` as JSON, from which :func:`hf_config_from_metadata` rebuilds the model.

    ``hf_config`` is ``GlmImageConfig.to_dict()`` (nested ``text_config``, ``vision_config``,
    ``vq_config``). ``file_type`` is a ``gguf.LlamaFileType`` value (e.g. ``MOSTLY_Q4_K_M``).
    """
    text = _get(hf_config, "text_config", "")
    vision = _get(hf_config, "vision_config", "")
    vq = _get(hf_config, "vq_config", "")
    a = AR_ARCH
    hidden = int(_get(text, "hidden_size", "text_config."))
    heads = int(_get(text, "num_attention_heads", "text_config."))
    head_dim = int(text.get("head_dim") or hidden // heads)
    rope = text.get("rope_parameters") or {}
    rotary_dims = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    sections = [int(s) for s in rope.get("mrope_section", [])]
    sections += [0] * (4 - len(sections))  # llama.cpp's M-RoPE reads four sections

    entries = [
        _str("general.architecture", a),
        _u32("general.quantization_version", GGML_QUANT_VERSION),
    ]
    if name:
        entries.append(_str("general.name", name))
    if file_type is not None:
        entries.append(_u32("general.file_type", file_type))
    entries += [
        _u32(f"{a}.vocab_size", _get(text, "vocab_size", "text_config.")),
        _u32(f"{a}.vision_vocab_size", _get(text, "vision_vocab_size", "text_config.")),
        _u32(f"{a}.context_length", _get(text, "max_position_embeddings", "text_config.")),
        _u32(f"{a}.embedding_length", hidden),
        _u32(f"{a}.feed_forward_length", _get(text, "intermediate_size", "text_config.")),
        _u32(f"{a}.block_count", _get(text, "num_hidden_layers", "text_config.")),
        _u32(f"{a}.attention.head_count", heads),
        _u32(f"{a}.attention.head_count_kv", _get(text, "num_key_value_heads", "text_config.")),
        _u32(f"{a}.attention.key_length", head_dim),
        _u32(f"{a}.attention.value_length", head_dim),
        _f32(f"{a}.attention.layer_norm_rms_epsilon", _get(text, "rms_norm_eps", "text_config.")),
        _u32(f"{a}.rope.dimension_count", rotary_dims),
        _f32(f"{a}.rope.freq_base", rope.get("rope_theta", 10000.0)),
        MetadataEntry(f"{a}.rope.dimension_sections", sections, GGUFValueType.ARRAY, GGUFValueType.INT32),
        _u32(f"{a}.image_start_token_id", hf_config.get("image_start_token_id", IMAGE_START_TOKEN_ID)),
        _u32(f"{a}.image_end_token_id", hf_config.get("image_end_token_id", IMAGE_END_TOKEN_ID)),
        _u32(f"{a}.image_token_id", _get(hf_config, "image_token_id", "")),
        _u32("tokenizer.ggml.eos_token_id", text.get("eos_token_id", IMAGE_END_TOKEN_ID)),
    ]
    if text.get("pad_token_id") is not None:
        entries.append(_u32("tokenizer.ggml.padding_token_id", text["pad_token_id"]))
    entries += [
        _u32(f"{a}.vision.block_count", _get(vision, "depth", "vision_config.")),
        _u32(f"{a}.vision.embedding_length", _get(vision, "hidden_size", "vision_config.")),
        _u32(f"{a}.vision.feed_forward_length", _get(vision, "intermediate_size", "vision_config.")),
        _u32(f"{a}.vision.attention.head_count", _get(vision, "num_heads", "vision_config.")),
        _f32(f"{a}.vision.attention.layer_norm_epsilon", _get(vision, "layer_norm_eps", "vision_config.")),
        _u32(f"{a}.vision.patch_size", _get(vision, "patch_size", "vision_config.")),
        _u32(f"{a}.vision.image_size", _get(vision, "image_size", "vision_config.")),
        _u32(f"{a}.vision.spatial_merge_size", vision.get("spatial_merge_size", 1)),
        _u32(f"{a}.vq.codebook_size", _get(vq, "num_embeddings", "vq_config.")),
        _u32(f"{a}.vq.embedding_length", _get(vq, "embed_dim", "vq_config.")),
        _u32(f"{a}.vq.latent_channels", _get(vq, "latent_channels", "vq_config.")),
        _str(f"{a}.hf_config", json.dumps(hf_config, sort_keys=True)),
    ]
    return entries


def dit_metadata(diffusers_config: Mapping[str, Any], *, file_type: int | None = None) -> list[MetadataEntry]:
    """GGUF metadata of a DiT export: ComfyUI-GGUF's keys (``general.architecture``, quantization version,
    file type) plus ``glm_image.config``, the diffusers config as JSON (private ``_*`` keys dropped)."""
    config = {k: v for k, v in diffusers_config.items() if not k.startswith("_")}
    entries = [
        _str("general.architecture", DIT_ARCH),
        _u32("general.quantization_version", GGML_QUANT_VERSION),
    ]
    if file_type is not None:
        entries.append(_u32("general.file_type", file_type))
    entries.append(_str(f"{DIT_ARCH}.config", json.dumps(config, sort_keys=True)))
    return entries


def hf_config_from_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The model config stored by :func:`ar_metadata` or :func:`dit_metadata`, from a ``{key: value}`` view of
    a GGUF file's metadata (``GGUFReader`` fields decoded to Python values)."""
    arch = metadata.get("general.architecture")
    key = {AR_ARCH: f"{AR_ARCH}.hf_config", DIT_ARCH: f"{DIT_ARCH}.config"}.get(arch) if isinstance(arch, str) else None
    if key is None or key not in metadata:
        raise GlmqError(f"this GGUF file is not a glmq GLM-Image export (general.architecture = {str(arch)[:60]!r})")
    from glmq.io.safe_read import loads_json

    raw = metadata[key]
    if not isinstance(raw, str):
        raise GlmqError(f"GGUF metadata {key} is not a string")
    config = loads_json(raw, "GGUF metadata", key)
    if not isinstance(config, dict):
        raise GlmqError(f"GGUF metadata {key} is not a JSON object")
    return config
