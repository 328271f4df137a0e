"""glmq.load on the tiny model: parity with stock diffusers, quantized fidelity, image-to-image, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import glmq
from glmq.errors import GlmqError
from glmq.runtime.memory import GiB, Request, StageSizes, choose_mode, mode_for_request, stage_peaks
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
    from glmq.runtime.conditioning import reference_tokens

    ids, grids = reference_tokens(pipe.ar, pipe._ar_inputs("x", refs, 64, 64), len(refs), pipe.device)
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


def test_quantized_checkpoint_stays_within_its_recorded_fidelity(tiny_dir, tmp_path, pipe, tiny_default_fidelity):
    """glmq.load's image against the bf16 pipeline's, with the report's prior tokens and noise: on the kernels'
    reference path (W8A8 activations quantized per token, as on a GPU) it is the report's figure; as loaded
    on a CPU (W8A8 layers fall back to weight-only) it is at least as good. A broken quantized layer at run
    time drops either below the band measured on the tiny model (tests/conftest.py TINY_DEFAULT)."""
    from glmq.evaluate.fidelity import dit_inputs
    from glmq.evaluate.quantize import quantize
    from glmq.quant.formats.linear import QuantLinear, as_run_on_gpu
    from glmq.quant.metrics import psnr

    report = quantize(tiny_dir, tmp_path / "q", progress=False)
    qpipe = glmq.load(tmp_path / "q", device="cpu")
    inputs = dit_inputs(qpipe.transformer.config, 8, report["model_level"]["seed"])
    kwargs = dict(height=64, width=64, num_inference_steps=report["model_level"]["image"]["steps"],
                  prior_token_ids=inputs["prior_token_id"], latents=inputs["hidden_states"], output_type="pt")
    prompt = "A lighthouse on a cliff, 'GLM' painted on it"  # the report's (glmq.evaluate.fidelity)
    ref = pipe(prompt, **kwargs)
    as_loaded = float(psnr(ref, qpipe(prompt, **kwargs)))
    quantized = [m for m in qpipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert quantized and any(m.mode == "auto" for m in quantized)
    for m in quantized:
        m.mode = as_run_on_gpu(m.mode)
    as_run = float(psnr(ref, qpipe(prompt, **kwargs)))
    recorded = report["model_level"]["image"]["psnr_db"]
    low, high, _ = tiny_default_fidelity["image_psnr_db"]
    print("image PSNR through glmq.load: as run", as_run, "as loaded on the CPU", as_loaded, "recorded", recorded,
          "band", low, high)
    # The report runs stock diffusers' pipeline, glmq.load its own (equal to 1e-3 relative, test above).
    assert abs(as_run - recorded) < 0.5
    assert low <= as_run <= high
    assert as_loaded >= low


def _sizes(**kw):
    base = dict(ar_weights=6 * GiB, vision_weights=2 * GiB, glyph_weights=GiB, dit_weights=7 * GiB,
                vae_weights=GiB, ar_activations=GiB // 2, dit_activations=2 * GiB, vae_activations=GiB,
                largest_ar_block=GiB // 8, largest_dit_block=GiB // 4, dit_kv_bytes_per_token=2 * 30 * 4096 * 2)
    base.update(kw)
    return StageSizes(**base)


def test_memory_modes_follow_the_budget():
    s = _sizes()
    peaks = {m: max(stage_peaks(s, m).values()) for m in ("resident", "staged", "offload")}
    print({m: round(v / GiB, 2) for m, v in peaks.items()})
    assert peaks["resident"] > peaks["staged"] > peaks["offload"]
    assert choose_mode(s, None) == "resident"
    assert choose_mode(s, 80 * GiB) == "resident"
    assert choose_mode(s, peaks["resident"] - 1) == "staged"
    assert choose_mode(s, peaks["staged"]) == "staged"
    assert choose_mode(s, peaks["staged"] - 1) == "offload"
    with pytest.raises(GlmqError, match="does not fit"):
        choose_mode(s, 2 * GiB)


def test_staged_stages_hold_one_network_and_count_the_request():
    s = _sizes()
    t2i = stage_peaks(s, "staged", Request(1024, 1024))
    one = stage_peaks(s, "staged", Request(1024, 1024, (4096,)))
    two = stage_peaks(s, "staged", Request(1024, 1024, (4096, 4096)))
    # The AR stage never holds the DiT (and vice versa): each stage is below the sum of both networks' weights.
    assert t2i["ar"] < s.ar_weights + s.dit_weights and t2i["dit"] < s.ar_weights + s.dit_weights
    # References: the vision tower has a stage of its own (never beside the text decoder), the AR stage holds
    # the longer prompt; each reference adds its K/V cache to the DiT stage.
    assert "vision" not in t2i and s.vision_weights <= one["vision"] < s.vision_weights + s.ar_weights
    assert s.vision_weights > one["ar"] - t2i["ar"] > 0
    kv = 4096 * s.dit_kv_bytes_per_token
    assert one["dit"] - t2i["dit"] >= kv and two["dit"] - one["dit"] >= kv
    # A 2048x2048 image needs more DiT activations than a 1024x1024 one.
    assert stage_peaks(s, "staged", Request(2048, 2048))["dit"] > t2i["dit"]


def test_a_call_moves_to_a_leaner_mode_or_is_refused_before_any_work():
    s = _sizes()
    budget = max(stage_peaks(s, "staged", Request(1024, 1024)).values())
    assert mode_for_request(s, budget, "staged", Request(1024, 1024)) == "staged"
    # Two references do not fit the staged plan under this budget: the call streams the DiT instead.
    assert max(stage_peaks(s, "staged", Request(1024, 1024, (4096, 4096))).values()) > budget
    assert mode_for_request(s, budget, "staged", Request(1024, 1024, (4096, 4096))) == "offload"
    # A resident pipeline has no CPU copies to stream from: it refuses, naming the request and the budget.
    resident_budget = max(stage_peaks(s, "resident", Request(1024, 1024)).values())
    with pytest.raises(GlmqError, match=r"1024x1024 with 2 reference image\(s\).*budget"):
        mode_for_request(s, resident_budget, "resident", Request(1024, 1024, (4096, 4096)))
    with pytest.raises(GlmqError, match="2048x2048"):
        mode_for_request(s, 4 * GiB, "staged", Request(2048, 2048))


def test_staging_parks_the_previous_stage_before_the_next_arrives(tiny_dir, monkeypatch):
    """The GPU never holds two stages at once: moving the AR in while the DiT was still resident ran a 16 GiB
    budget out of memory on the H200 (benchmarks/results/memory_sequence_h200/). The "GPU" here is the meta
    device, and every tensor move is tallied."""
    from glmq.runtime import placement as pl

    p = glmq.load(tiny_dir, device="cpu")
    nets = {"ar": p.ar, "dit": p.transformer, "glyph": p.text_encoder, "vae": p.vae}
    monkeypatch.setattr(pl.Placement, "gpu", lambda self: True)
    place = pl.Placement.__new__(pl.Placement)
    place.nets, place.device, place.mode, place.streamers = nets, torch.device("meta"), pl.MemoryMode.STAGED, {}
    place._vision_keys = pl.slot_keys(p.ar.model.visual) | pl.slot_keys(p.ar.model.vqmodel)
    place.parked = {name: pl.Parked(m, place.device) for name, m in nets.items()}
    owner = {(id(mod), kind, n): name for name, pk in place.parked.items() for mod, kind, n, _ in pk.slots}
    size = {(id(mod), kind, n): cpu.numel() * cpu.element_size() for pk in place.parked.values()
            for mod, kind, n, cpu in pk.slots}
    on_device: dict = {}
    seen_together: dict = {}
    real_set = pl.Parked.set

    def tally(mod, kind, name, value):
        if value.device.type != "meta":  # a CPU parameter cannot point at meta data: only count those moves
            real_set(mod, kind, name, value)
        key = (id(mod), kind, name)
        on_device.pop(key, None)
        if value.device.type == "meta":
            on_device[key] = size[key]
        seen_together.setdefault(stage, set()).add(frozenset(owner[k] for k in on_device))

    monkeypatch.setattr(pl.Parked, "set", staticmethod(tally))
    for stage, i2i in (("ar", False), ("encode", False), ("dit", False), ("vae", False), ("vision", True),
                       ("ar", False), ("encode", True), ("dit", True)):
        place.stage(stage, i2i)
        held = {owner[k] for k in on_device}
        assert held == pl.STAGE_NETS[stage], (stage, held)
        if stage == "vision":  # an image-to-image call's vision tower and VQ, without the text decoder
            assert set(on_device) == place._vision_keys
    # At no moment of any move did the AR share the device with the DiT, the glyph encoder or the VAE.
    for stage, seen in seen_together.items():
        for nets_on in seen:
            assert not ("ar" in nets_on and ({"dit", "glyph", "vae"} & nets_on)), (stage, set(nets_on))
    # The vision tower comes along for the image-to-image AR stage only.
    vision_modules = {id(m) for m in p.ar.model.visual.modules()}
    place.stage("ar", False)
    assert not any(k[0] in vision_modules for k in on_device)
    place.stage("ar", True)
    assert any(k[0] in vision_modules for k in on_device)
    place.park_all()
    assert all(t.device.type == "cpu" for m in nets.values() for t in m.parameters())


def test_the_output_has_diffusers_images_and_indexes_like_a_list(pipe):
    out = pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    assert isinstance(out.images, list) and out.images[0] is out[0] and len(out) == 1
    assert isinstance(out[0], Image.Image)


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


def test_a_normal_generate_run_prints_no_foreign_warnings(tiny_dir, tmp_path):
    """diffusers warned on every run about "modules ... that should be kept in float32: []" (glmq's cast of the
    DiT); with the warning filters a user has, a normal run's stderr holds nothing."""
    from glmq.testing import run_cli

    proc = run_cli("generate", str(tiny_dir), "--prompt", PROMPT, "--size", "64x64", "--steps", "2", "--device", "cpu",
                   "--out", str(tmp_path / "img.png"), "--json")
    print("stderr:", proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_image_to_image_runs_the_vision_tower_once_and_decodes_what_the_engine_decodes_from_pixels(pipe,
                                                                                                   monkeypatch):
    """The vision tower runs in its own stage (never beside the text decoder): its ids fill the AR prompt and
    condition the DiT. The AR's tokens are those the decode engine makes when it fills the prompt itself from
    the pixels."""
    from glmq.runtime.ar_engine import ArRequest, prior_tokens_from_generated

    g = torch.Generator().manual_seed(4)
    ref = Image.fromarray((torch.rand(48, 80, 3, generator=g) * 255).byte().numpy())
    inner = pipe.ar.model
    calls = []
    real = inner.get_image_features
    monkeypatch.setattr(inner, "get_image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe(PROMPT, image=ref, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(9),
         output_type="pt")
    prior = pipe.last_prior_token_ids.clone()
    assert len(calls) == 1
    inputs = pipe._ar_inputs(PROMPT, [ref], 64, 64)
    request = ArRequest(inputs["input_ids"], inputs["image_grid_thw"], inputs.get("images_per_sample"),
                        inputs["pixel_values"], inputs.get("attention_mask"), torch.Generator().manual_seed(9))
    tokens, = pipe._engine_for().generate_batch([request])
    assert len(calls) == 2  # the engine's own vision pass
    assert torch.equal(prior_tokens_from_generated(tokens, inputs["image_grid_thw"], is_text_to_image=False), prior)


def test_a_call_records_the_plans_estimate_of_each_stage(pipe, monkeypatch):
    """Beside the peaks a GPU run measures (peak_reserved_gib_after), a call records what the plan expected of
    each stage, for the request and batch sizes it ran: every bench row then checks the plan."""
    from glmq.runtime.memory import CallPlan, MemoryMode

    ref = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    monkeypatch.setattr(type(pipe), "plan_for", lambda self, requests: CallPlan(MemoryMode.STAGED, 2, 2))
    pipe([PROMPT, PROMPT], image=[ref, ref], height=64, width=64, num_inference_steps=2, output_type="pt",
         generator=[torch.Generator().manual_seed(i) for i in range(2)])
    recorded = pipe.last_times.extra["plan_peaks_gib"]
    request = pipe.request_for(64, 64, pipe._ar_inputs(PROMPT, [ref], 64, 64)["image_grid_thw"][:1] * torch.tensor(
        [1, 2, 2]))
    expected = stage_peaks(pipe.sizes, "staged", request, ar_batch=2, dit_batch=2, images=2)
    assert set(recorded) == {"vision", "ar", "encode", "dit", "vae"}
    assert recorded == {k: round(v / GiB, 3) for k, v in expected.items()}
