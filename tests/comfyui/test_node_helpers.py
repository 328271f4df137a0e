"""The parts of the ComfyUI node pack that do not need ComfyUI: finding checkpoint folders, image tensors.

The pack's modules are loaded by path (the pack is a ComfyUI custom-node folder, not part of glmq);
``folders.py`` and ``images.py`` import nothing from ComfyUI.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

PACK = Path(__file__).resolve().parents[2] / "comfyui_glmq"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"comfyui_glmq_{name}", PACK / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


folders = _module("folders")
images = _module("images")


def _fake_checkpoint(path: Path, class_name: str = "GlmImagePipeline") -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return path


def test_find_checkpoints_names_depth_and_order(tmp_path):
    a, b = tmp_path / "glm_image", tmp_path / "diffusers"
    _fake_checkpoint(a / "GLM-Image-q")
    _fake_checkpoint(b / "zai-org" / "GLM-Image")             # two levels down, as a hub download lays it out
    _fake_checkpoint(b / "sdxl", class_name="StableDiffusionXLPipeline")  # another model: not offered
    (b / "broken").mkdir()
    (b / "broken" / "model_index.json").write_text("{not json")
    _fake_checkpoint(b / "GLM-Image-q")                        # same name as in the first root: the first wins
    _fake_checkpoint(a / "x" / "y" / "too-deep")
    found = folders.find_checkpoints([a, b, tmp_path / "missing"])
    assert found == {"GLM-Image-q": a / "GLM-Image-q", "zai-org/GLM-Image": b / "zai-org" / "GLM-Image"}


def test_find_checkpoints_finds_a_real_tiny_folder(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "glm_image" / "tiny")
    found = folders.find_checkpoints([tmp_path / "glm_image"])
    assert list(found) == ["tiny"]
    size = folders.weight_bytes(found["tiny"])
    expected = sum(p.stat().st_size for p in tiny_dir.rglob("*.safetensors"))
    assert size == expected > 0


def test_to_pil_rounds_drops_alpha_and_keeps_batch():
    x = torch.rand(2, 5, 7, 4)
    pil = images.to_pil(x)
    assert len(pil) == 2 and pil[0].size == (7, 5) and pil[0].mode == "RGB"
    want = np.round(x[1, ..., :3].numpy() * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(pil[1]), want)
    gray = images.to_pil(torch.full((1, 3, 3, 1), 0.5))[0]
    assert np.asarray(gray).tolist() == [[[128] * 3] * 3] * 3
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        images.to_pil(torch.rand(3, 5, 7))


def test_from_pipeline_is_channels_last_float_on_cpu():
    x = torch.rand(1, 3, 4, 6, dtype=torch.bfloat16)
    out = images.from_pipeline(x)
    assert out.shape == (1, 4, 6, 3) and out.dtype == torch.float32
    assert torch.equal(out[0, 2, 5], x[0, :, 2, 5].float())
    # Round trip through PIL: 8-bit quantization is the only loss.
    back = images.from_pipeline(torch.from_numpy(np.array(images.to_pil(out)[0])).permute(2, 0, 1)[None] / 255.0)
    assert (back - out).abs().max() <= 0.5 / 255 + 1e-6
