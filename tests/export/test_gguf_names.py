"""GGUF names and metadata for GLM-Image, checked against the full-size models built on the meta device."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from glmq.errors import GlmqError
from glmq.quant.formats.gguf import names as gn

# The released AR: GlmImageConfig defaults plus the text rope parameters (GLM_IMAGE.md).
ROPE = {"rope_type": "default", "rope_theta": 10000, "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}
DIT_CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128, num_attention_heads=32,
    text_embed_dim=1472, time_embed_dim=512, condition_dim=256, prior_vq_quantizer_codebook_size=16384,
)


@pytest.fixture(scope="module")
def ar():
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = GlmImageConfig()
    config.text_config.rope_parameters = dict(ROPE)
    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(config)
    return config, {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dit():
    from diffusers import GlmImageTransformer2DModel

    with torch.device("meta"):
        model = GlmImageTransformer2DModel(**DIT_CONFIG)
    return dict(model.config), {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_ar_names_bijective(ar) -> None:
    _, shapes = ar
    forward = {name: gn.ar_gguf_name(name) for name in shapes}
    print(f"{len(forward)} AR tensors, longest GGUF name {max(map(len, forward.values()))} chars")
    assert len(set(forward.values())) == len(forward), "two tensors share a GGUF name"
    for hf, gg in forward.items():
        assert gn.ar_hf_name(gg) == hf
        assert len(gg.encode()) <= gn.GGUF_MAX_NAME
    assert forward["model.language_model.layers.7.mlp.gate_up_proj.weight"] == "blk.7.ffn_up.weight"
    assert forward["model.language_model.layers.0.post_mlp_layernorm.weight"] == "blk.0.post_ffw_norm.weight"
    assert forward["lm_head.weight"] == "output.weight"
    assert forward["model.vqmodel.quantize.embedding.weight"] == "v.vq.codebook.weight"
    assert sum(g.startswith("blk.39.") for g in forward.values()) == 13


def test_ar_names_match_gguf_py_tables(ar) -> None:
    """Text decoder names equal gguf-py's GLM4 mapping; vision tower names its vision-encoder mapping."""
    _, shapes = ar
    text_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4, 40)
    vision_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 40)
    checked = 0
    for name in shapes:
        if name.startswith("model.language_model.") or name == "lm_head.weight":
            expected = text_map.get_name(name.replace("language_model.", ""), try_suffixes=(".weight", ".bias"))
        elif name.startswith("model.visual."):
            expected = vision_map.get_name(name.removeprefix("model."), try_suffixes=(".weight", ".bias"))
        else:
            continue  # the VQ tokenizer has no llama.cpp counterpart
        assert expected is not None, name
        assert gn.ar_gguf_name(name) == expected, name
        checked += 1
    assert checked == len(shapes) - 5


def test_unknown_names_fail_helpfully() -> None:
    with pytest.raises(GlmqError, match="not part of GLM-Image's AR"):
        gn.ar_gguf_name("model.language_model.layers.0.mlp.gate_proj.weight")
    with pytest.raises(GlmqError):
        gn.ar_hf_name("blk.0.ffn_gate.weight")
    with pytest.raises(GlmqError, match="longer than"):
        gn.dit_gguf_name("x" * 64)


def test_dit_names(dit) -> None:
    _, shapes = dit
    names = {gn.dit_gguf_name(n): n for n in shapes}
    assert len(names) == len(shapes) and all(gn.dit_hf_name(g) == h for g, h in names.items())
    print(f"{len(names)} DiT tensors, longest name {max(map(len, names))} chars")


def _read_metadata(path) -> dict:
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _write(path, arch: str, entries) -> None:
    writer = gguf.GGUFWriter(path, arch)
    gn.write_metadata(writer, entries)
    writer.add_tensor("dummy", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_ar_metadata_round_trip(ar, tmp_path) -> None:
    from transformers import GlmImageConfig

    config, _ = ar
    entries = gn.ar_metadata(config.to_dict(), name="GLM-Image", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    path = tmp_path / "ar.gguf"
    _write(path, gn.AR_ARCH, entries)
    md = _read_metadata(path)
    a = "glm-image"
    expected = {
        "general.architecture": "glm-image",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
        f"{a}.block_count": 40,
        f"{a}.context_length": 131072,
        f"{a}.embedding_length": 4096,
        f"{a}.feed_forward_length": 13696,
        f"{a}.attention.head_count": 32,
        f"{a}.attention.head_count_kv": 2,
        f"{a}.attention.key_length": 128,
        f"{a}.rope.dimension_count": 64,
        f"{a}.rope.dimension_sections": [8, 12, 12, 0],
        f"{a}.rope.freq_base": 10000.0,
        f"{a}.vocab_size": 168064,
        f"{a}.vision_vocab_size": 16512,
        f"{a}.image_start_token_id": 16384,
        f"{a}.image_end_token_id": 16385,
        f"{a}.image_token_id": 167855,
        "tokenizer.ggml.eos_token_id": 16385,
        f"{a}.vision.block_count": 40,
        f"{a}.vision.embedding_length": 1536,
        f"{a}.vq.codebook_size": 16384,
    }
    for key, value in expected.items():
        print(key, md.get(key))
        assert md[key] == value, key
    assert md[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    # Lossless rebuild of the config from the file.
    rebuilt = GlmImageConfig(**gn.hf_config_from_metadata(md))
    assert rebuilt.to_dict() == config.to_dict()


def test_dit_metadata_round_trip(dit, tmp_path) -> None:
    from diffusers import GlmImageTransformer2DModel

    config, _ = dit
    path = tmp_path / "dit.gguf"
    _write(path, gn.DIT_ARCH, gn.dit_metadata(config, file_type=gguf.LlamaFileType.MOSTLY_Q8_0))
    md = _read_metadata(path)
    assert md["general.architecture"] == "glm_image"
    rebuilt = gn.hf_config_from_metadata(md)
    assert rebuilt == {k: v for k, v in json.loads(json.dumps(config)).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = GlmImageTransformer2DModel.from_config(rebuilt)
    assert model.config.num_layers == 30 and model.config.num_attention_heads == 32


def test_metadata_rejects_foreign_files() -> None:
    with pytest.raises(GlmqError, match="not a glmq GLM-Image export"):
        gn.hf_config_from_metadata({"general.architecture": "llama"})
    with pytest.raises(GlmqError, match="text_config"):
        gn.ar_metadata({"model_type": "llama"})
