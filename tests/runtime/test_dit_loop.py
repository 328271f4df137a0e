"""DitRunner against the stock GlmImagePipeline denoising loop (tiny random DiT, CPU, fp32).

Tolerances: everything runs in fp32 and computes the same per-token math as the stock loop; the only
differences are summation orders (a (steps, 512) GEMM for the modulations instead of one row per step,
batch-2 instead of batch-1 GEMMs), a few fp32 ulps per op. Fifty steps amplify that to ~1e-6 relative;
the brief's bound of 1e-4 leaves two orders of margin, and a real mistake (shifted timesteps fed to the
DiT, a padded glyph token attended to) moves the result by > 1e-2 (checked below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glmq.io.layout import BY_NAME
from glmq.models.build import build_glyph_tokenizer, build_model, build_scheduler
from glmq.models.configs import component_config
from glmq.runtime.dit_loop import DitRunner, GroupedAttnProcessor, RowGroup

HEIGHT, WIDTH = 96, 64  # non-square; latents 12 x 8, 24 image tokens (6 x 4 after the 2x2 patch)
PARITY_RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import GlmImagePipeline

    torch.manual_seed(0)
    # eval(): built modules start in training mode, and the glyph encoder (T5) has dropout.
    comps = {n: build_model(BY_NAME[n], component_config(n, "tiny"), device="cpu").eval()
             for n in ("transformer", "vae", "text_encoder")}
    # The AR and its processor are not needed: the tests hand the pipeline its prior tokens.
    p = GlmImagePipeline(tokenizer=build_glyph_tokenizer(), processor=None, vision_language_encoder=None,
                         scheduler=build_scheduler(), **comps)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def inputs(pipe):
    g = torch.Generator().manual_seed(1)
    cfg = pipe.transformer.config
    latents = torch.randn((1, cfg.in_channels, HEIGHT // 8, WIDTH // 8), generator=g)
    prompt_embeds = torch.randn((1, 7, cfg.text_embed_dim), generator=g)  # 7 glyph tokens (odd on purpose)
    # The pipeline's own encoding of "" (1 token): what it uses for the unconditional pass.
    _, negative = pipe.encode_prompt(None, True, prompt_embeds=prompt_embeds, device=torch.device("cpu"),
                                     dtype=torch.float32)
    assert negative.shape[1] != prompt_embeds.shape[1]
    n_tokens = (HEIGHT // 16) * (WIDTH // 16)
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, n_tokens), generator=g)
    return {"latents": latents, "prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative,
            "prior_token_ids": prior}


def stock(pipe, inputs, steps, **extra):
    out = pipe(prompt_embeds=inputs["prompt_embeds"], prior_token_ids=inputs["prior_token_ids"],
               latents=inputs["latents"].clone(), height=HEIGHT, width=WIDTH, num_inference_steps=steps,
               output_type="latent", **extra).images
    return out


def run(pipe, inputs, steps, *, kv_caches=None, **runner_kw):
    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32, **runner_kw)
    try:
        return runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                              negative_prompt_embeds=inputs["negative_prompt_embeds"],
                              prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH,
                              num_inference_steps=steps, kv_caches=kv_caches)
    finally:
        runner.remove()


def test_t2i_matches_stock_pipeline(pipe, inputs):
    ref = stock(pipe, inputs, 50)
    out = run(pipe, inputs, 50)
    err = rel_err(out, ref)
    print(f"t2i 50 steps: rel err {err:.3e}, |ref| {ref.abs().mean():.3f}, moved {rel_err(ref, inputs['latents']):.3f}")
    assert rel_err(ref, inputs["latents"]) > 0.1  # the DiT does something
    assert err < PARITY_RTOL


def test_batched_equals_separate_and_unprecomputed(pipe, inputs):
    steps = 6
    sep = run(pipe, inputs, steps, batch_cfg=False)
    bat = run(pipe, inputs, steps, batch_cfg=True)
    raw = run(pipe, inputs, steps, batch_cfg=True, precompute=False)
    ref = stock(pipe, inputs, steps)
    errs = {"batched/separate": rel_err(bat, sep), "unprecomputed/separate": rel_err(raw, sep),
            "separate/stock": rel_err(sep, ref)}
    print(errs)
    assert all(e < PARITY_RTOL for e in errs.values())


def test_equal_glyph_lengths_use_one_attention_call(pipe, inputs):
    """Same glyph length for both halves: the batched forward is one batch-2 call per attention."""
    same = dict(inputs, negative_prompt_embeds=torch.zeros_like(inputs["prompt_embeds"]))
    calls = []
    orig = GroupedAttnProcessor._call_inner

    def counting(self, attn, h, *args):
        calls.append(h.shape[0])
        return orig(self, attn, h, *args)

    GroupedAttnProcessor._call_inner = counting
    try:
        bat = run(pipe, same, 3, batch_cfg=True)
    finally:
        GroupedAttnProcessor._call_inner = orig
    sep = run(pipe, same, 3, batch_cfg=False)
    ref = pipe(prompt_embeds=same["prompt_embeds"], negative_prompt_embeds=same["negative_prompt_embeds"],
               prior_token_ids=same["prior_token_ids"], latents=same["latents"].clone(), height=HEIGHT,
               width=WIDTH, num_inference_steps=3, output_type="latent").images
    print("batched/separate", rel_err(bat, sep), "batched/stock", rel_err(bat, ref), "calls", set(calls))
    assert set(calls) == {2}
    assert rel_err(bat, sep) < PARITY_RTOL and rel_err(bat, ref) < PARITY_RTOL


def test_timestep_trap(pipe, inputs):
    """The DiT must see the unshifted timesteps minus one (999, 979, ...), the Euler step the shifted sigmas."""
    fed = []
    hook = pipe.transformer.time_condition_embed.register_forward_pre_hook(lambda m, args: fed.append(args[0]))
    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32)
    try:
        runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                       negative_prompt_embeds=inputs["negative_prompt_embeds"],
                       prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH,
                       num_inference_steps=50)
    finally:
        hook.remove()
        runner.remove()
    seen = torch.cat(fed).unique(sorted=True).flip(0)
    expected = torch.from_numpy(np.linspace(1000, 1, 51)[:-1].astype(np.int64).astype(np.float32)) - 1
    shifted = runner.scheduler.sigmas[:-1] * 1000 - 1
    print("fed", seen[:4].tolist(), "... shifted would be", shifted[:4].tolist())
    assert seen[0] == 999 and seen[1] == 979
    torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    assert (shifted - expected).abs().max() > 10  # the shift is real at this size: the two are not confusable


def test_shifted_timesteps_would_fail_parity(pipe, inputs):
    """Negative control: feeding the shifted timesteps moves the result far outside the parity bound."""
    ref = stock(pipe, inputs, 10)
    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32)
    orig_schedule = runner.schedule

    def schedule(*args):
        ts = orig_schedule(*args)
        runner._shifted = runner.scheduler.sigmas[:-1] * 1000
        return ts

    runner.schedule = schedule
    orig_prepare = runner._prepare

    def prepare(passes, lh, lw):
        runner._dit_t = runner._shifted - 1  # the bug
        orig_prepare(passes, lh, lw)

    runner._prepare = prepare
    try:
        bad = runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                             negative_prompt_embeds=inputs["negative_prompt_embeds"],
                             prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH,
                             num_inference_steps=10)
    finally:
        runner.remove()
    err = rel_err(bad, ref)
    print(f"shifted timesteps fed: rel err {err:.3e}")
    assert err > 10 * PARITY_RTOL


def test_upstream_mask_is_not_a_key_padding_mask(pipe):
    """Why GroupedAttnProcessor exists: the stock processor's (B, T) text mask is added to the scores as
    a 0/1 float, so a padded key still gets attention weight."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

    attn = pipe.transformer.transformer_blocks[0].attn1
    dim = attn.to_q.in_features
    g = torch.Generator().manual_seed(3)
    h, e = torch.randn((1, 24, dim), generator=g), torch.randn((1, 3, dim), generator=g)
    proc = GlmImageAttnProcessor()
    ref_h, _ = proc(attn, h, e)
    padded = torch.cat([torch.randn((1, 2, dim), generator=g), e], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    masked_h, _ = proc(attn, h, padded, attention_mask=mask)
    grouped = GroupedAttnProcessor(proc)
    grouped.groups = (RowGroup(0, 1, text_start=2),)
    grouped_h, _ = grouped(attn, h, padded)
    print("upstream mask err", rel_err(masked_h, ref_h), "grouped err", rel_err(grouped_h, ref_h))
    assert rel_err(masked_h, ref_h) > 1e-3
    torch.testing.assert_close(grouped_h, ref_h, rtol=1e-6, atol=1e-6)


def test_processor_set_after_runner_is_wrapped(pipe, inputs):
    """A processor installed after the runner was built (e.g. a Triton one) is wrapped at the next denoise."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32)
    try:
        for block in pipe.transformer.transformer_blocks:
            block.attn1.set_processor(GlmImageAttnProcessor())
        out = runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                             negative_prompt_embeds=inputs["negative_prompt_embeds"],
                             prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH,
                             num_inference_steps=4)
        assert all(isinstance(b.attn1.processor, GroupedAttnProcessor) for b in pipe.transformer.transformer_blocks)
    finally:
        runner.remove()
    names = set(pipe.transformer.state_dict())
    assert "transformer_blocks.0.norm1.linear.weight" in names  # remove() restored the upstream names
    assert not any(isinstance(b.attn1.processor, GroupedAttnProcessor) for b in pipe.transformer.transformer_blocks)
    assert rel_err(out, stock(pipe, inputs, 4)) < PARITY_RTOL


def test_guidance_off_matches_stock(pipe, inputs):
    ref = stock(pipe, inputs, 4, guidance_scale=1.0)
    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32)
    try:
        out = runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                             negative_prompt_embeds=None, prior_token_ids=inputs["prior_token_ids"],
                             height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=1.0)
    finally:
        runner.remove()
    assert rel_err(out, ref) < PARITY_RTOL


def test_i2i_matches_stock_pipeline(pipe, inputs):
    """Reference K/V cache: written once, read by the conditional half only, inside one batched forward.

    The stock pipeline's AR stage crashes on image inputs with current transformers, so it is handed the
    reference image's tokens directly (prior_token_image_ids, source_image_grid_thw).
    """
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    ref_h, ref_w = 64, 48  # reference image: latents 8 x 6, 12 DiT tokens in a 4 x 3 grid
    pixels = (torch.rand((ref_h, ref_w, 3), generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    grid = torch.tensor([[1, ref_h // 16, ref_w // 16]])
    ids = torch.randint(0, pipe.transformer.config.prior_vq_quantizer_codebook_size, (int(grid.prod()),), generator=g)
    steps = 8
    ref = stock(pipe, inputs, steps, image=[image], prior_token_image_ids=[ids], source_image_grid_thw=[grid])

    # The pipeline's own image preprocessing and VAE encoding (argmax), normalized by the latent statistics.
    vae = pipe.vae
    pixels_t = pipe.image_processor.preprocess(image, height=ref_h, width=ref_w)
    lat = vae.encode(pixels_t).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    lat = (lat - mean) / std

    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32)
    try:
        kv = runner.write_reference_kv([[lat]], [ids], [grid])
        common = dict(prompt_embeds=inputs["prompt_embeds"], negative_prompt_embeds=inputs["negative_prompt_embeds"],
                      prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH, num_inference_steps=steps)
        out = runner.denoise(inputs["latents"].clone(), kv_caches=kv, **common)
        runner.batch_cfg = False
        sep = runner.denoise(inputs["latents"].clone(), kv_caches=kv, **common)
    finally:
        runner.remove()
    t2i = stock(pipe, inputs, steps)
    errs = {"i2i/stock": rel_err(out, ref), "separate/stock": rel_err(sep, ref), "i2i vs t2i": rel_err(ref, t2i)}
    print(errs)
    assert errs["i2i vs t2i"] > 1e-2  # the reference image matters
    assert errs["i2i/stock"] < PARITY_RTOL and errs["separate/stock"] < PARITY_RTOL


@pytest.fixture
def compiled_runner(pipe, monkeypatch):
    """A runner whose blocks are compiled as on the GPU (``dynamic=False``, Dynamo's guards and limits) with the
    "eager" backend, which only skips code generation; Dynamo's state is reset before and after."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    runner = DitRunner(pipe.transformer, pipe.scheduler.config, device="cpu", dtype=torch.float32, compile=True)
    try:
        yield runner
    finally:
        runner.remove()
        torch._dynamo.reset()


def test_compiled_blocks_do_not_recompile_for_another_step_count(pipe, inputs, compiled_runner):
    """What the compiled blocks read must not carry the step count, or each new count recompiles all of them
    (and past Dynamo's limit of 8 a block runs eager). The result still matches stock."""
    import torch._dynamo

    def denoise(steps):
        return compiled_runner.denoise(inputs["latents"].clone(), prompt_embeds=inputs["prompt_embeds"],
                                       negative_prompt_embeds=inputs["negative_prompt_embeds"],
                                       prior_token_ids=inputs["prior_token_ids"], height=HEIGHT, width=WIDTH,
                                       num_inference_steps=steps)

    denoise(3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = denoise(5)
    assert rel_err(out, stock(pipe, inputs, 5)) < PARITY_RTOL


def test_compiled_blocks_stay_compiled_past_eight_shapes(pipe, inputs, compiled_runner):
    """Each image size is a shape of its own for the ``dynamic=False`` blocks. Dynamo's default keeps 8 graphs
    per function and runs it eager for every shape after; a long-lived process (a server, ComfyUI) meets more
    sizes than that, so the runner raises the limit. Ten sizes here: each must get a graph of its own."""
    from torch._dynamo.utils import counters

    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(5)
    sizes = [(64, 32 * k) for k in range(2, 12)]
    for h, w in sizes:
        prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, (h // 16) * (w // 16)), generator=g)
        compiled_runner.denoise(torch.randn((1, cfg.in_channels, h // 8, w // 8), generator=g),
                                prompt_embeds=inputs["prompt_embeds"],
                                negative_prompt_embeds=inputs["negative_prompt_embeds"], prior_token_ids=prior,
                                height=h, width=w, num_inference_steps=2)
    assert counters["stats"]["unique_graphs"] == len(sizes)
