"""Batched calls on the tiny model (CPU): pipe([prompts], num_images_per_prompt=N, generator=[...]).

The claim under test: an image made in a batch with its own generator is the image made alone with that
generator: the same AR tokens bit for bit, and pixels within PIXEL_TOL (below). The batched decode step's logits
differ from the one-row step's by fp32 rounding (bounded in tests/runtime/test_ar_batch.py); the draw runs in
vocabulary order so that this rounding cannot swap two near-tied tokens, which once made the fourth image of
test_batched_images_equal_the_images_made_alone sample other tokens (tests/runtime/test_ar_engine.py::
test_a_draw_does_not_follow_rounding_across_a_near_tie).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import glmq
from glmq.errors import GlmqError
from glmq.runtime.memory import CallPlan

PROMPTS = ["a shop sign that says 'glmq' over a door", "a red fox in the snow", "a poster: \"hello\" at dusk"]
KW = dict(height=64, width=64, num_inference_steps=3)


# Pixels (0..1) of a batched image against the same image made alone. On the fan-in tiny model (#16) the
# DiT's activations are of order one, and a matmul over more rows blocks its fp32 sums differently, so a
# batched pixel may move by a few fp32 ulps; half an 8-bit level (what a saved PNG can show) bounds it, while
# a wrong seed, prompt or prior moves pixels by tenths. The AR tokens stay equal bit for bit.
PIXEL_TOL = 0.5 / 255


def _same_pixels(a, b) -> bool:
    diff = (a.float() - b.float()).abs().max().item()
    print(f"max pixel difference batched vs alone: {diff:.2e}")
    return a.shape == b.shape and diff <= PIXEL_TOL


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return glmq.load(tiny_dir, device="cpu")


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _ref(seed, w=64, h=64):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def _alone(pipe, prompt, seed, image=None, **kw):
    out = pipe(prompt, image=image, generator=torch.Generator().manual_seed(seed), output_type="pt", **{**KW, **kw})
    return out, pipe.last_prior_token_ids.clone()


def _assert_each_equals_alone(pipe, batch, tokens, jobs, **kw):
    for i, (prompt, seed, image) in enumerate(jobs):
        alone, alone_tokens = _alone(pipe, prompt, seed, image, **kw)
        diff = float((alone[0] - batch[i]).abs().max())
        same_tokens = int((alone_tokens[0] == tokens[i]).sum())
        print(f"image {i}: {same_tokens}/{tokens.shape[1]} prior ids equal, max |pixel diff| {diff}")
        assert torch.equal(alone_tokens[0], tokens[i])
        assert _same_pixels(alone[0], batch[i])


def test_batched_images_equal_the_images_made_alone(pipe):
    """Three prompts (different glyph lengths) x two images, one generator per image."""
    seeds = [11, 12, 13, 14, 15, 16]
    batch = pipe(PROMPTS, num_images_per_prompt=2, generator=_gens(seeds), output_type="pt", **KW)
    tokens = pipe.last_prior_token_ids.clone()
    assert batch.shape == (6, 3, 64, 64) and tokens.shape[0] == 6
    extra = pipe.last_times.extra
    # No budget on the CPU: one DiT chunk; the AR decodes the six in a step of 8 rows (a power of two).
    assert extra["images"] == 6 and extra["ar_batch"] == 8 and extra["dit_batch"] == 6
    assert pipe.last_times.ar_tokens == 261  # one decode loop for all six sequences
    _assert_each_equals_alone(pipe, batch, tokens, [(PROMPTS[i // 2], s, None) for i, s in enumerate(seeds)])


def test_image_to_image_per_prompt_and_mixed_with_text_to_image(pipe):
    """References per prompt: a text-to-image prompt, one with one reference, one with two of another shape;
    their AR sequences (different prompt lengths and grids) decode together."""
    refs = [None, _ref(1), [_ref(2), _ref(3, w=80, h=48)]]
    seeds = [21, 22, 23]
    batch = pipe(PROMPTS, image=refs, generator=_gens(seeds), output_type="pt", **KW)
    tokens = pipe.last_prior_token_ids.clone()
    assert pipe.last_times.ar_tokens == 261  # the longest row: text-to-image's preview grid + target grid + EOS
    _assert_each_equals_alone(pipe, batch, tokens, list(zip(PROMPTS, seeds, refs)))


def test_chunked_dit_and_ar_rounds_change_nothing(pipe, monkeypatch):
    """A plan that allows 2 images per DiT forward and 3 sequences per AR decode (as a tight budget would):
    the same images, in 3 chunks and 2 rounds."""
    seeds = [31, 32, 33, 34, 35]
    prompts = PROMPTS[:1] * 2 + PROMPTS[1:2] * 3
    whole = pipe(prompts, generator=_gens(seeds), output_type="pt", **KW)
    monkeypatch.setattr(type(pipe), "plan_for", lambda self, requests: CallPlan(self.mode, 2, 3))
    chunks, seen = [], []
    original = pipe._runner_for().denoise

    def counting(latents, **kw):
        chunks.append(latents.shape[0])
        return original(latents, **kw)

    monkeypatch.setattr(pipe._runner_for(), "denoise", counting)
    chunked = pipe(prompts, generator=_gens(seeds), output_type="pt",
                   callback=lambda stage, done, total: seen.append((stage, done, total)), **KW)
    assert chunks == [2, 2, 1]
    assert _same_pixels(whole, chunked)
    assert pipe.last_times.ar_tokens == 2 * 261  # two decode rounds
    dit = [(d, t) for s, d, t in seen if s == "DiT"]
    assert dit[0] == (0, 9) and dit[-1] == (9, 9) and len(dit) == 10  # progress over all chunks


def test_one_generator_for_a_batch_draws_every_image_from_it(pipe):
    """diffusers' convention: one generator serves the whole call; images differ, the call reproduces."""
    a = pipe(PROMPTS[0], num_images_per_prompt=3, generator=torch.Generator().manual_seed(5), output_type="pt", **KW)
    b = pipe(PROMPTS[0], num_images_per_prompt=3, generator=torch.Generator().manual_seed(5), output_type="pt", **KW)
    assert _same_pixels(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])


def test_output_types_and_the_list_output(pipe):
    out = pipe(PROMPTS[:2], generator=_gens([1, 2]), **KW)
    assert len(out) == 2 and len(out.images) == 2 and all(isinstance(im, Image.Image) for im in out)
    latents = pipe(PROMPTS[:2], generator=_gens([1, 2]), output_type="latent", **KW)
    assert latents.shape == (2, pipe.transformer.config.in_channels, 8, 8)
    pixels = pipe(PROMPTS[:2], generator=_gens([1, 2]), output_type="pt", **KW)
    assert pixels.shape == (2, 3, 64, 64)
    import numpy as np

    assert np.array_equal(np.asarray(out[1]), (pixels[1].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def test_given_prior_ids_and_latents_per_image(pipe):
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (2, 16), generator=g)
    latents = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    both = pipe(PROMPTS[:2], prior_token_ids=prior, latents=latents, output_type="pt", **KW)
    one = pipe(PROMPTS[1], prior_token_ids=prior[1:], latents=latents[1:], output_type="pt", **KW)
    assert _same_pixels(both[1], one[0])
    with pytest.raises(GlmqError, match="3 rows for 2 images"):
        pipe(PROMPTS[:2], prior_token_ids=torch.cat([prior, prior[:1]]), latents=latents, **KW)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(prompt=PROMPTS, generator=[torch.Generator()] * 2), "2 generators for 3 images"),
    (dict(prompt=PROMPTS, image=[None, None]), "a list of 3 entries"),
    (dict(prompt=[], generator=None), "non-empty list of strings"),
    (dict(prompt=PROMPTS[0], num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(prompt=PROMPTS[:2], prior_token_image_ids=torch.zeros(4, dtype=torch.long)), "one prompt"),
])
def test_mismatched_arguments_are_one_line_errors_before_any_work(pipe, kwargs, needle, monkeypatch):
    from glmq.testing import assert_one_line_error

    monkeypatch.setattr(pipe, "_engine_for", lambda: pytest.fail("work started"))
    with pytest.raises(GlmqError) as err:
        pipe(**kwargs, **KW)
    assert_one_line_error(err.value, needle)


def test_supports_batch_is_advertised(pipe):
    assert pipe.supports_batch is True


# ----------------------------------------------------------------------------------------------- the plan


def _sizes():
    from glmq.runtime.memory import GiB, StageSizes

    return StageSizes(ar_weights=6 * GiB, vision_weights=2 * GiB, glyph_weights=GiB, dit_weights=7 * GiB,
                      vae_weights=GiB, ar_activations=GiB // 2, dit_activations=2 * GiB, vae_activations=GiB,
                      largest_ar_block=GiB // 8, largest_dit_block=GiB // 4, dit_kv_bytes_per_token=2 * 30 * 4096 * 2,
                      ar_kv_bytes_per_token=2 * 40 * 2 * 128 * 2)


def test_the_plan_sizes_dit_chunks_and_ar_rounds_to_the_budget():
    from glmq.runtime.memory import MAX_AR_BATCH, Request, plan_call, stage_peaks

    s, req = _sizes(), Request(1024, 1024)
    three = stage_peaks(s, "staged", req, dit_batch=3)
    budget = max(three.values())
    assert three["dit"] == budget  # the DiT stage is what three images per forward make the largest
    plan = plan_call(s, budget, "staged", [req] * 8)
    print(plan, {k: round(v / 2**30, 2) for k, v in three.items()})
    assert plan.mode == "staged" and plan.dit_batch == 3
    assert max(stage_peaks(s, "staged", req, dit_batch=4).values()) > budget
    assert plan.ar_batch == 8 and stage_peaks(s, "staged", req, ar_batch=8)["ar"] <= budget  # all 8 in one decode
    # Each AR sequence costs its cache rows: about 79 MB at 1024x1024 for the released 40 layers.
    extra = stage_peaks(s, "staged", req, ar_batch=2)["ar"] - stage_peaks(s, "staged", req)["ar"]
    assert 70e6 < extra < 90e6
    # A roomy budget: every image in one forward, 16 sequences per decode step at most.
    roomy = plan_call(s, 200 * 2**30, "resident", [req] * 20)
    assert (roomy.dit_batch, roomy.ar_batch) == (20, MAX_AR_BATCH)


def test_a_batch_is_planned_like_its_most_demanding_image():
    from glmq.runtime.memory import Request, mode_for_request, peak_bytes, plan_call

    s = _sizes()
    t2i, edit = Request(1024, 1024), Request(1024, 1024, (4096, 4096))
    budget = peak_bytes(s, "staged", t2i)
    single = plan_call(s, budget, "staged", [t2i])
    assert (single.mode, single.dit_batch, single.ar_batch) == (mode_for_request(s, budget, "staged", t2i), 1, 1)
    assert plan_call(s, budget, "staged", [t2i, t2i, edit]).mode == "offload"  # as the edit alone would
    with pytest.raises(GlmqError, match=r"1024x1024 with 2 reference image\(s\)"):
        plan_call(s, peak_bytes(s, "resident", t2i), "resident", [t2i, edit])  # refused before any work
    # Without a budget of its own a GPU plans chunks against its size and refuses nothing.
    loose = plan_call(s, budget // 2, "resident", [t2i] * 4, refuse=False)
    assert (loose.mode, loose.dit_batch) == ("resident", 1)
