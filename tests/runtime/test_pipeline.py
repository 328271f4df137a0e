"""glmq.load on the tiny model: parity with stock diffusers, quantized fidelity, image-to-image, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import glmq
from glmq.errors import GlmqError
from glmq.runtime.memory import GiB, StageSizes, choose_mode
from glmq.testing import assert_user_error, run_cli_inprocess

PROMPT = "a shop sign that says 'glmq' over a door"


def _fixed_inputs(pipe, seed=0):
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, 16), generator=g)
    latents = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    return prior, latents


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return glmq.load(tiny_dir, device="cpu")


def test_matches_stock_diffusers_given_the_same_prior_tokens_and_noise(tiny_dir, pipe):
    from diffusers import GlmImagePipeline

    stock = GlmImagePipeline.from_pretrained(tiny_dir, torch_dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    prior, latents = _fixed_inputs(pipe)
    ours = pipe(PROMPT, height=64, width=64, num_inference_steps=6, prior_token_ids=prior, latents=latents,
                output_type="pt")
    theirs = stock(PROMPT, height=64, width=64, num_inference_steps=6, prior_token_ids=prior, latents=latents,
                   output_type="pt").images
    rel = float((ours - theirs).norm() / theirs.norm())
    print("relative difference to stock", rel)
    assert ours.shape == theirs.shape == (1, 3, 64, 64)
    assert rel < 1e-3


def test_text_to_image_end_to_end_returns_pil(pipe):
    out = pipe(PROMPT, height=64, width=64, num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    assert len(out) == 1 and isinstance(out[0], Image.Image) and out[0].size == (64, 64)
    t = pipe.last_times
    assert t.ar_tokens == 256 + 4 + 1 and t.dit_steps == 3 and t.total_s > 0


def test_same_seed_same_image(pipe):
    a = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
             output_type="pt")
    b = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
             output_type="pt")
    assert torch.equal(a, b)


def test_image_to_image_runs_end_to_end(pipe):
    g = torch.Generator().manual_seed(0)
    ref = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    out = pipe("make it blue", image=[ref, ref], height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert out[0].size == (64, 64)
    assert pipe.last_times.ar_tokens == 4 + 1  # image-to-image generates only the target grid


@pytest.mark.parametrize("sizes", [[(100, 60)], [(64, 64), (48, 80)]])
def test_image_to_image_with_references_the_processor_resizes(pipe, sizes):
    """References whose floor-to-16-pixels size disagrees with the processor's grid (upstream's rule, which
    then fails adding the prior embeddings to the reference patches): glmq sizes them from the grid."""
    g = torch.Generator().manual_seed(0)
    refs = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]
    inputs = pipe._ar_inputs("x", refs, 64, 64)
    grids = inputs["image_grid_thw"][: len(refs)].tolist()
    assert any(((h // 16) * 16, (w // 16) * 16) != (2 * gh * 16, 2 * gw * 16)
               for (w, h), (_, gh, gw) in zip(sizes, grids))  # upstream's sizes would not match
    out = pipe("make it blue", image=refs, height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_image_to_image_with_given_reference_tokens(pipe):
    """Reference ids and grids passed in (skipping the vision tower): a tensor of grids and a list of them give
    the same image, and a grid count that does not match the images is a clear error."""
    g = torch.Generator().manual_seed(0)
    refs = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in ((64, 64), (80, 48))]
    ids, grids = pipe._reference_tokens(pipe._ar_inputs("x", refs, 64, 64), len(refs))
    prior, latents = _fixed_inputs(pipe)
    kw = dict(height=64, width=64, num_inference_steps=2, prior_token_ids=prior, latents=latents, output_type="pt",
              prior_token_image_ids=ids)
    as_tensor = pipe("make it blue", image=refs, source_image_grid_thw=grids, **kw)
    as_list = pipe("make it blue", image=refs, source_image_grid_thw=list(grids), **kw)
    assert torch.equal(as_tensor, as_list)
    with pytest.raises(GlmqError, match="2 reference image"):
        pipe("make it blue", image=refs, source_image_grid_thw=grids[:1], **kw)


def test_staged_modes_keep_the_ar_engine_and_drop_its_graphs(pipe, monkeypatch):
    """Staged/offload re-upload the AR for every image: the engine (and its compiled step) stays, the CUDA
    graphs captured with the old weight addresses go; resident keeps both."""
    pipe(PROMPT, height=64, width=64, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    engine = pipe._engine_for()
    state = next(iter(engine._states.values()))
    for mode, kept in (("resident", True), ("staged", False), ("offload", False)):
        monkeypatch.setattr(pipe, "mode", mode)
        state.graphs["captured"] = object()  # stands in for a CUDA graph (none are captured on the CPU)
        assert pipe._engine_for() is engine
        assert ("captured" in state.graphs) == kept, mode


def test_quantized_checkpoint_stays_within_its_recorded_fidelity(tiny_dir, tmp_path, pipe):
    from glmq.quant.convert import quantize

    report = quantize(tiny_dir, tmp_path / "q", progress=False)
    qpipe = glmq.load(tmp_path / "q", device="cpu")
    prior, latents = _fixed_inputs(pipe, seed=5)
    kwargs = dict(height=64, width=64, num_inference_steps=20, prior_token_ids=prior, latents=latents,
                  output_type="pt")
    ref, got = pipe(PROMPT, **kwargs), qpipe(PROMPT, **kwargs)
    from glmq.quant.metrics import psnr

    measured = float(psnr(ref, got))
    recorded = report["model_level"]["image"]["psnr_db"]
    print("image PSNR through glmq.load", measured, "recorded by quantize", recorded)
    assert measured >= min(recorded - 1.0, 60.0)


def test_memory_modes_follow_the_budget():
    s = StageSizes(ar_weights=6 * GiB, vision_weights=2 * GiB, glyph_weights=GiB, dit_weights=7 * GiB,
                   vae_weights=GiB, ar_activations=GiB // 2, dit_activations=2 * GiB, vae_activations=GiB,
                   largest_ar_block=GiB // 8, largest_dit_block=GiB // 4)
    assert choose_mode(s, None) == "resident"
    assert choose_mode(s, 80 * GiB) == "resident"
    assert choose_mode(s, 14 * GiB) == "staged"
    assert choose_mode(s, 9 * GiB) == "offload"
    with pytest.raises(GlmqError, match="does not fit"):
        choose_mode(s, 2 * GiB)


def test_generate_cli_writes_a_png_and_reports_json(tiny_dir, tmp_path):
    out = tmp_path / "img.png"
    proc = run_cli_inprocess("generate", str(tiny_dir), "--prompt", PROMPT, "--size", "64x64", "--steps", "2",
                             "--device", "cpu", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["size"] == [64, 64] and info["ar_tokens"] == 261
    assert Image.open(out).size == (64, 64)
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--prompt", "x", "--size", "64x64",
                                        "--device", "cpu", "--out", str(out)), "already exists")
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--prompt", "x", "--size", "60x64",
                                        "--device", "cpu", "--out", str(tmp_path / "b.png")), "multiples of 32")
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--prompt", "x", "--image", str(tmp_path / "no.png"),
                                        "--device", "cpu", "--size", "64x64", "--out", str(tmp_path / "c.png")),
                      "cannot read image")
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_glmq_load_accepts_a_gguf_export(tiny_dir, tmp_path, pipe):
    from glmq.export.gguf_export import export_gguf
    from glmq.quant.metrics import psnr

    export_gguf(tiny_dir, tmp_path / "gguf", progress=False)
    gpipe = glmq.load(tmp_path / "gguf", device="cpu")
    prior, latents = _fixed_inputs(pipe, seed=2)
    kwargs = dict(height=64, width=64, num_inference_steps=4, prior_token_ids=prior, latents=latents,
                  output_type="pt")
    value = float(psnr(pipe(PROMPT, **kwargs), gpipe(PROMPT, **kwargs)))
    print("GGUF (DiT Q8_0) image PSNR vs bf16", value)
    assert value > 40  # Q8_0 DiT: tiny perturbation of the image
