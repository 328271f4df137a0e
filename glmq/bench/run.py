"""``glmq bench``: seconds per image and peak VRAM per hardware tier, beside stock diffusers.

For each recipe and each tier (a GPU memory budget in GiB) the runtime picks its memory mode as it would on
such a card, the process's CUDA allocator is capped to that budget (``set_per_process_memory_fraction``),
and one warm-up plus N images are generated. A tier whose estimated peak exceeds the budget, or that runs
out of memory under the cap, is reported as "does not fit". ``--baseline`` runs stock
``diffusers.GlmImagePipeline`` in bf16 on the same card, prompt, size and steps in the same run.

``--model full-random`` builds the released architecture with random weights directly on the GPU (no disk,
no download); on a machine without a GPU the tiny model runs on the CPU so the command works everywhere.
Random weights make the AR's logits nearly uniform, so both pipelines get the same guard: ids the DiT
codebook cannot embed (and EOS) are masked while the grid fills (stock diffusers crashes on them
otherwise, GLM_IMAGE.md). It costs one masked fill per token.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmq.errors import GlmqError

BENCH_MODELS = ("tiny", "full-random")  # without a PATH: the tiny model, or the released sizes built on the GPU

DEFAULT_PROMPT = "A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm"


@dataclass
class BenchConfig:
    path: Path | None = None
    model: str = "tiny"  # one of BENCH_MODELS
    recipes: tuple[str, ...] = ("default",)
    # GiB budgets; None: 80,32,24,16,12,8 on a GPU, one uncapped row on a CPU. Tiers given on a CPU are only
    # checked against the memory plan's estimates (nothing caps CPU memory), then run uncapped.
    tiers: tuple[float, ...] | None = None
    sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)
    steps: int = 50
    guidance: float = 1.5
    images: int = 1
    baseline: bool = False
    profile: bool = False
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    device: str | None = None
    warmup: bool = True
    # Denoising steps of the warm-up image (None: all). The warm-up pays for compilation and graph capture,
    # which happen on the first step; the AR always generates its whole grid.
    warmup_steps: int | None = None
    compile: bool = True  # torch.compile the DiT blocks on CUDA (the warm-up image pays for it)
    # Image-to-image rows after each tier's text-to-image, in the same process: edits of the last image with
    # one reference, then with two (the last image and a 3:4 resize of it).
    edits: tuple[int, ...] = (1, 2)
    cuda_graph: bool = True
    attention: str = "auto"
    attention_precision: str | None = None  # DiT attention precision; None: each recipe's choice
    # Batch sizes (glmq.bench.batch): rows of B images per call instead of the one-image and edit rows.
    batch: tuple[int, ...] = ()
    # Cold/cached/warm first image per recipe and tier, each in fresh processes (glmq.bench.batch); without
    # ``batch`` it replaces the in-process rows.
    first_image: bool = False
    # 2: after each recipe's one-GPU rows, a latency row and a throughput row on two GPUs (glmq.bench.two_gpus)
    gpus: int = 1
    throughput_images: int = 4  # images in the throughput row's timed call
    extra: dict = field(default_factory=dict)


def environment(device) -> dict:
    import diffusers
    import torch
    import transformers

    import glmq

    from glmq.bench.provenance import provenance

    env = {
        **provenance(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "glmq": glmq.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, card_memory_gib=round(props.total_memory / 1024**3, 1),
                   cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            import triton

            env["triton"] = triton.__version__
    else:
        env.update(card=f"CPU ({platform.processor() or platform.machine()})")
    return env


class _MaskedHead:
    """Wraps an lm_head so ids >= ``limit`` get -inf logits (the guard described in the module docstring)."""

    def __init__(self, head, limit: int):
        import torch

        self.head, self.limit = head, limit
        self.torch = torch

    def install(self, model):
        from torch import nn

        head, limit = self.head, self.limit

        class Masked(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = head

            @property
            def weight(self):
                return self.inner.weight

            def forward(self, x):
                out = self.inner(x)
                out[..., limit:] = float("-inf")
                return out

        model.lm_head = Masked()
        return model

    def remove(self, model):
        model.lm_head = self.head


def _random_components(model: str, device, seed: int):
    """bf16 components of ``model`` size with random weights, built on ``device``."""
    import torch

    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    size = "full" if model == "full-random" else "tiny"
    torch.manual_seed(seed)
    comps = {}
    for name in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        dtype = torch.float32 if name == "text_encoder" else torch.bfloat16
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            comps[name] = build_model(BY_NAME[name], component_config(name, size), device=str(device)).eval()
        finally:
            torch.set_default_dtype(previous)
        comps[name].requires_grad_(False)
    return comps


def random_pipeline(model: str, recipe: str, device, **pipeline_kwargs):
    """A pipeline over ``model``-size random components (fp32 on the CPU), quantized in place with ``recipe``
    unless it is "bf16": what the benchmark scripts build. ``pipeline_kwargs`` go to ``from_modules``."""
    import torch

    from glmq.runtime.load import from_modules

    comps = _random_components(model, device, seed=0)
    if torch.device(device).type == "cpu":
        for m in comps.values():
            m.to(torch.float32)
    if recipe != "bf16":
        from glmq.quant.inplace import quantize_modules

        quantize_modules({k: comps[k] for k in ("vision_language_encoder", "transformer")}, recipe)
    processor, tokenizer, sched = _offline_pieces()
    return from_modules(comps, processor=processor, tokenizer=tokenizer, scheduler_config=sched,
                        device=str(device), **pipeline_kwargs)


def _offline_pieces():
    from glmq.models.build import build_glyph_tokenizer, build_processor, build_scheduler

    return build_processor(), build_glyph_tokenizer(), dict(build_scheduler().config)


def _peak(device) -> tuple[float | None, float | None]:
    import torch

    if device.type != "cuda":
        return None, None
    return (round(torch.cuda.max_memory_allocated(device) / 1024**3, 3),
            round(torch.cuda.max_memory_reserved(device) / 1024**3, 3))


def _reset(device, tier_gib: float | None):
    """Free cached blocks, reset the peaks and cap the allocator at the tier minus the CUDA context: a card of
    that size holds the context beside what the allocator reserves (glmq.runtime.memory)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        from glmq.runtime.memory import GiB, cuda_context_bytes

        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = 1.0 if tier_gib is None else (tier_gib * GiB - cuda_context_bytes(device)) / total
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, fraction)), index)
        torch.cuda.reset_peak_memory_stats(index)


def _device_peak(device, tier_gib: float | None) -> dict:
    """Peak bytes a card must hold for what ran since the last reset: allocator peak reserved + CUDA context."""
    import torch

    if device.type != "cuda":
        return {}
    from glmq.runtime.memory import GiB, cuda_context_bytes

    torch.cuda.synchronize(device)
    context = cuda_context_bytes(device)
    peak = torch.cuda.max_memory_reserved(device) + context
    out = {"context_gib": round(context / GiB, 3), "peak_device_gib": round(peak / GiB, 3)}
    if tier_gib is not None:
        out["within_tier"] = peak <= tier_gib * GiB
    return out


def _summary(seconds: list[float]) -> dict:
    return {"median": round(statistics.median(seconds), 3), "min": round(min(seconds), 3),
            "max": round(max(seconds), 3)}


def _run_baseline(comps, pieces, cfg: BenchConfig, size, device, valid_vocab) -> dict:
    """Stock diffusers GlmImagePipeline in bf16, all on the GPU, timed per stage."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    processor, tokenizer, sched = pieces
    for m in comps.values():
        m.to(device)
    # Stock diffusers loaded with torch_dtype=X runs every component in X, the glyph encoder too (bf16 on
    # the GPU; the CPU run keeps fp32).
    comps["text_encoder"].to(comps["transformer"].dtype)
    _reset(device, None)
    ar = comps["vision_language_encoder"]
    guard = _MaskedHead(ar.lm_head, valid_vocab)
    guard.install(ar)
    pipe = GlmImagePipeline(tokenizer=tokenizer, processor=processor, text_encoder=comps["text_encoder"],
                            vision_language_encoder=ar, vae=comps["vae"], transformer=comps["transformer"],
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(sched))
    pipe.set_progress_bar_config(disable=True)
    marks = {}
    original = pipe.generate_prior_tokens

    def timed_prior(*a, **k):
        t0 = _now(device)
        out = original(*a, **k)
        marks["ar"] = _now(device) - t0
        marks["dit_start"] = _now(device)
        return out

    pipe.generate_prior_tokens = timed_prior

    def on_step(p, i, t, kw):
        marks["dit_end"] = _now(device)
        marks["steps"] = marks.get("steps", 0) + 1
        return kw

    w, h = size
    times = []
    try:
        for i in range(cfg.images):
            t0 = _now(device)
            marks["steps"] = 0
            pipe(cfg.prompt, height=h, width=w, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                 generator=torch.Generator(device="cpu").manual_seed(cfg.seed + i), callback_on_step_end=on_step)
            times.append(_now(device) - t0)
    finally:
        guard.remove(ar)
    tokens = (h // 32) * (w // 32) + int((h / w) ** 0.5 * 16) * int((w / h) ** 0.5 * 16) + 1
    alloc, reserved = _peak(device)
    dit = marks.get("dit_end", 0) - marks.get("dit_start", 0)
    return {
        "provider": "stock diffusers bf16", "recipe": "bf16", "tier_gib": None, "mode": "resident",
        "size": f"{w}x{h}", "steps": cfg.steps, "images": cfg.images, "fit": True,
        "seconds_per_image": _summary(times),
        "stages": {"ar_s": round(marks.get("ar", 0), 3), "ar_ms_per_token": round(1000 * marks.get("ar", 0) / tokens, 2),
                   "dit_s": round(dit, 3), "dit_ms_per_step": round(1000 * dit / cfg.steps, 2),
                   "glyph_and_vae_s": round(times[-1] - marks.get("ar", 0) - dit, 3)},
        "peak_allocated_gib": alloc, "peak_reserved_gib": reserved,
        # What ran, read from the run: the steps the callback counted, the guidance the pipeline used.
        "ran": {"steps": marks.get("steps", 0), "guidance": float(getattr(pipe, "guidance_scale", float("nan"))),
                "size": f"{w}x{h}"},
    }


def _log(msg: str) -> None:
    """Progress of a long benchmark on stderr (the results themselves go to files and stdout)."""
    import sys

    print(f"[glmq bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _now(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _warm_then_timed(pipe, cfg: BenchConfig, size, device, *, prompt: str, image=None, warm_steps: int | None,
                     reset_after_warmup: bool = True):
    """An untimed call with ``cfg.seed`` (``warm_steps`` steps; None: no warm-up), which pays for compilation,
    graph capture and autotuning; then ``cfg.images`` timed calls with seeds ``cfg.seed + i``. The first timed
    call must reproduce the warm-up: its AR tokens, and its pixels when the warm-up ran the same steps.
    Peak memory is reset after the warm-up unless ``reset_after_warmup`` is False.

    Returns ``(seconds, stage times, checks, last image)``."""
    import torch

    w, h = size

    def call(steps: int, seed: int):
        return pipe(prompt, image=image, height=h, width=w, num_inference_steps=steps, guidance_scale=cfg.guidance,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    checks: dict = {}
    warm = warm_prior = None
    if warm_steps:
        t0 = time.perf_counter()
        warm = call(warm_steps, cfg.seed)
        checks["warmup_s"] = round(time.perf_counter() - t0, 3)  # compilation, graph capture, autotuning
        checks["warmup_mode"] = pipe.last_times.extra.get("mode")
        warm_prior = pipe.last_prior_token_ids
        if warm_steps != cfg.steps:
            warm = None  # a shorter warm-up makes a different image: nothing to compare
        if reset_after_warmup:
            _reset_peaks(device)
    seconds, stages, out = [], [], None
    for i in range(cfg.images):
        out = call(cfg.steps, cfg.seed + i)
        seconds.append(pipe.last_times.total_s)
        stages.append(pipe.last_times)
        if i == 0 and warm_prior is not None:
            # The warm-up used the same seed: a deterministic pipeline reproduces its tokens and pixels.
            prior = pipe.last_prior_token_ids
            checks["same_seed_prior_tokens_equal"] = round(float((prior == warm_prior).float().mean()), 4)
            if warm is not None:
                checks["same_seed_image_max_abs_diff"] = round(float((out.float() - warm.float()).abs().max()), 5)
    return seconds, stages, checks, out


EDIT_PROMPT = "Make the poster say 'glmq' in bold red letters, keep everything else"


def _run_edit(pipe, cfg: BenchConfig, size, device, tier, recipe: str, n_refs: int, last) -> dict:
    """One image-to-image row after the tier's text-to-image, in the same process and pipeline: an untimed
    edit (it pays for the image-to-image shapes' compilation and graph capture), then ``cfg.images`` timed
    edits with the same seed; the first timed one must reproduce the untimed one. ``last``: the tier's last
    text-to-image output ``[1, 3, H, W]`` in [0, 1]; the references are it and, for two, a 3:4 resize of it."""
    import torch
    from PIL import Image

    w, h = size
    arr = (last[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    base = Image.fromarray(arr)
    refs = [base, base.resize((w * 3 // 4, h))][:n_refs]
    row = {"provider": "glmq", "recipe": recipe, "tier_gib": tier, "size": f"{w}x{h}", "steps": cfg.steps,
           "images": cfg.images, "task": f"edit, {n_refs} reference{'s' if n_refs > 1 else ''}"}
    try:
        _reset_peaks(device)  # an edit row's peak includes its untimed first call, as measured on the H200
        seconds, stages, checks, _ = _warm_then_timed(pipe, cfg, size, device, prompt=EDIT_PROMPT, image=refs,
                                                      warm_steps=cfg.steps, reset_after_warmup=False)
        alloc, reserved = _peak(device)
        row.update(fit=True, mode=stages[-1].extra.get("mode", pipe.mode), checks=checks,
                   seconds_per_image=_summary(seconds), stages=stage_dict(stages[-1]), ran=ran_dict(stages[-1]),
                   peak_allocated_gib=alloc, peak_reserved_gib=reserved,
                   stage_peaks_reserved_gib=stages[-1].extra.get("peak_reserved_gib_after"),
                   plan_stage_peaks_gib=stages[-1].extra.get("plan_peaks_gib"),
                   **_device_peak(device, tier))
    except GlmqError as e:
        row.update(fit=False, reason=str(e))
    except torch.OutOfMemoryError as e:
        row.update(fit=False, reason=f"out of memory under the {tier} GiB cap: {str(e).splitlines()[0][:160]}",
                   **_device_peak(device, tier))
    _log(f"{recipe} tier {tier}: {row['task']}: {row.get('seconds_per_image', row.get('reason'))}")
    return row


def _reset_peaks(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def ran_dict(t) -> dict:
    """What a glmq call ran, as the pipeline recorded it (:class:`~glmq.runtime.pipeline.StageTimes`)."""
    return {"steps": t.dit_steps, "guidance": t.extra.get("guidance_scale"), "size": t.extra.get("size"),
            "mode": t.extra.get("mode"), "ar_tokens": t.ar_tokens, "dit_attention": t.extra.get("dit_attention"),
            "int4_kernel": t.extra.get("int4_kernel"), "ar_step": t.extra.get("ar_step")}


def stage_dict(t) -> dict:
    """A :class:`~glmq.runtime.pipeline.StageTimes` as the seconds and per-token/per-step figures bench reports."""
    return {"ar_s": round(t.ar_s, 3), "ar_ms_per_token": round(1000 * t.ar_s / max(t.ar_tokens, 1), 3),
            "glyph_s": round(t.glyph_s, 3), "dit_s": round(t.dit_s, 3),
            "dit_ms_per_step": round(1000 * t.dit_s / max(t.dit_steps, 1), 2), "vae_s": round(t.vae_s, 3)}


def _profile(pipe, cfg, size, device) -> dict[str, list[dict]]:
    """Top kernels (or CPU ops, without a GPU) of each stage, from torch.profiler on a short generation."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    w, h = size
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def top(prof) -> list[dict]:
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0) or 0, reverse=True)
        return [{"kernel": ev.key[:120], "calls": ev.count, "ms": round((getattr(ev, key, 0) or 0) / 1000, 3)}
                for ev in events[:10]]

    stages = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    with profile(activities=acts) as prof:
        prior, *_ = pipe.generate_prior_tokens(cfg.prompt, h, w, generator=gen)
    stages["ar"] = top(prof)
    with profile(activities=acts) as prof:
        latents = pipe(cfg.prompt, height=h, width=w, num_inference_steps=min(cfg.steps, 4), prior_token_ids=prior,
                       generator=gen, output_type="latent")
    stages["glyph+dit"] = top(prof)
    with profile(activities=acts) as prof:
        pipe.decode_latents(latents)
    stages["vae"] = top(prof)
    return stages


def run_bench(cfg: BenchConfig, out: Path) -> dict:
    """Run the benchmark described by ``cfg``; write bench.json, bench.md and bench.png into ``out``."""
    import torch

    from glmq.bench.report import write_outputs
    from glmq.quant.inplace import quantize_modules
    from glmq.runtime.memory import GiB
    from glmq.runtime.load import from_modules

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlmqError("--device cuda requested but no CUDA GPU is available")
    if device.type != "cuda" and cfg.model == "full-random":
        raise GlmqError("--model full-random needs a CUDA GPU (17.7 B random parameters); use --model tiny")
    if out.exists() and not out.is_dir():
        raise GlmqError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    total_gib = torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda" else None
    if device.type == "cuda":
        # An "80 GB" card reports about 79 GiB: keep tiers up to the card's size, rounded generously.
        tiers = [t for t in (cfg.tiers or (80, 32, 24, 16, 12, 8)) if t <= total_gib * 1.1]
    else:
        tiers = list(cfg.tiers) if cfg.tiers else [None]
    rows: list[dict] = []
    if cfg.gpus == 2:
        from glmq.bench.two_gpus import check_two_gpus

        check_two_gpus(cfg, device)
    first_image: list[dict] = []
    pieces = _offline_pieces()
    tmp = None
    in_process = cfg.batch or not cfg.first_image
    try:
        for size in cfg.sizes if in_process else ():
            if cfg.baseline:
                _log(f"baseline {size}: building bf16 components")
                comps = _load_or_build(cfg, device, pieces)
                _log("baseline: running stock diffusers")
                valid = _valid_vocab(comps)
                rows.append(_run_baseline(comps, pieces, cfg, size, device, valid))
                write_outputs(_result(env, cfg, tiers, rows), out)  # a later timeout keeps finished rows
                del comps
                _reset(device, None)
            for recipe in cfg.recipes:
                # Built and quantized once per recipe; each tier re-plans placement over the same modules.
                _log(f"{recipe} {size}: building components")
                comps = _load_or_build(cfg, device, pieces)
                if recipe != "bf16":
                    _log(f"{recipe}: quantizing in place")
                    quantize_modules({k: comps[k] for k in ("vision_language_encoder", "transformer")}, recipe)
                one_gpu = None  # the first fitting text-to-image row: what the two-GPU rows are compared with
                for tier in tiers:
                    row = {"provider": "glmq", "recipe": recipe, "tier_gib": tier, "size": f"{size[0]}x{size[1]}",
                           "steps": cfg.steps, "images": cfg.images}
                    pipe = None
                    try:
                        if device.type == "cuda":
                            for m in comps.values():
                                m.to("cpu")
                            _reset(device, tier)
                        processor, tokenizer, sched = pieces
                        if device.type != "cuda" and tier is not None:
                            from glmq.runtime.embedding import split_embedding
                            from glmq.runtime.memory import choose_mode
                            from glmq.runtime.sizes import stage_sizes_from_modules

                            split_embedding(comps["vision_language_encoder"])  # as from_modules will
                            w, h = size
                            row["estimated_mode"] = choose_mode(stage_sizes_from_modules(comps, h, w), int(tier * GiB))
                        pipe = from_modules(comps, processor=processor, tokenizer=tokenizer, scheduler_config=sched,
                                            device=str(device), vram_budget_gb=tier, compile=cfg.compile,
                                            attention=cfg.attention, cuda_graph=cfg.cuda_graph,
                                            attention_precision=cfg.attention_precision)
                        row["mode"] = pipe.mode
                        row["dit_attention"] = pipe.attention_precision
                        _log(f"{recipe} tier {tier}: mode {pipe.mode}, generating")
                        if cfg.batch:
                            from glmq.bench.batch import run_batches

                            rows.extend(run_batches(pipe, cfg, size, device, tier, recipe))
                            write_outputs(_result(env, cfg, tiers, rows), out)
                            row = None
                            continue
                        warm_steps = min(cfg.steps, cfg.warmup_steps or cfg.steps) if cfg.warmup else None
                        seconds, stages, checks, last = _warm_then_timed(pipe, cfg, size, device, prompt=cfg.prompt,
                                                                         warm_steps=warm_steps)
                        row["checks"] = checks
                        _log(f"{recipe} tier {tier}: {seconds} s")
                        alloc, reserved = _peak(device)
                        row.update(fit=True, seconds_per_image=_summary(seconds), stages=stage_dict(stages[-1]),
                                   ran=ran_dict(stages[-1]),
                                   peak_allocated_gib=alloc, peak_reserved_gib=reserved, task="t2i",
                                   stage_peaks_reserved_gib=stages[-1].extra.get("peak_reserved_gib_after"),
                                   plan_stage_peaks_gib=stages[-1].extra.get("plan_peaks_gib"),
                                   **_device_peak(device, tier))
                        if cfg.profile:
                            row["profile"] = _profile(pipe, cfg, size, device)
                        if one_gpu is None:
                            one_gpu = {"row": row, "last": last.cpu(), "prior": pipe.last_prior_token_ids}
                        rows.append(row)
                        write_outputs(_result(env, cfg, tiers, rows), out)
                        row = None
                        for n_refs in cfg.edits:
                            rows.append(_run_edit(pipe, cfg, size, device, tier, recipe, n_refs, last))
                            write_outputs(_result(env, cfg, tiers, rows), out)
                    except GlmqError as e:
                        row.update(fit=False, reason=str(e))
                    except torch.OutOfMemoryError as e:
                        row.update(fit=False, reason=f"out of memory under the {tier} GiB cap: {str(e).splitlines()[0][:160]}")
                    finally:
                        if pipe is not None:
                            pipe.release()
                        pipe = None
                        _reset(device, None)
                    if row is not None:
                        rows.append(row)
                        write_outputs(_result(env, cfg, tiers, rows), out)
                del comps
                _reset(device, None)
                if cfg.gpus == 2:
                    from glmq.bench.two_gpus import two_gpu_rows

                    for row in two_gpu_rows(cfg, size, recipe, device, one_gpu):
                        rows.append(row)
                        write_outputs(_result(env, cfg, tiers, rows), out)
        if cfg.first_image:
            from glmq.bench.batch import first_image_rows

            for size in cfg.sizes:
                first_image.extend(first_image_rows(cfg, tiers, size, device))
                write_outputs(_result(env, cfg, tiers, rows, first_image), out)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = _result(env, cfg, tiers, rows, first_image)
    write_outputs(result, out)
    return result


def _result(env: dict, cfg: BenchConfig, tiers, rows: list[dict], first_image: list[dict] | None = None) -> dict:
    from glmq.bench.report import add_speedups, check_consistency

    add_speedups(rows)
    result = {"environment": env, "config": {"model": cfg.model if cfg.path is None else str(cfg.path),
                                           "recipes": list(cfg.recipes), "tiers": tiers,
                                           "sizes": [f"{w}x{h}" for w, h in cfg.sizes], "steps": cfg.steps,
                                           "guidance": cfg.guidance,
                                           "warmup_steps": cfg.warmup_steps or cfg.steps, "images": cfg.images,
                                           "prompt": cfg.prompt, "seed": cfg.seed, "batch": list(cfg.batch),
                                           "compile": cfg.compile, "gpus": cfg.gpus},
            "rows": rows}
    if first_image:
        result["first_image"] = first_image
    result["consistency_problems"] = check_consistency(result)
    return result


def _valid_vocab(comps) -> int:
    ar = comps["vision_language_encoder"]
    return min(ar.config.vq_config.num_embeddings, ar.config.text_config.vision_vocab_size)


def _load_or_build(cfg: BenchConfig, device, pieces):
    """Fresh bf16 components (rebuilt per configuration so each recipe starts from the same weights)."""
    if cfg.path is not None:
        import torch

        from glmq.io.reader import PipelineReader
        from glmq.runtime.loader import load_component

        reader = PipelineReader(cfg.path)
        comps = {}
        for name in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
            dtype = torch.float32 if name == "text_encoder" or device.type != "cuda" else torch.bfloat16
            comps[name] = load_component(reader.component(name), device="cpu", dtype=dtype)
        return comps
    comps = _random_components(cfg.model, device, cfg.seed)
    if device.type != "cuda":
        import torch

        for name, m in comps.items():
            m.to(torch.float32)
    return comps


def default_out_dir() -> Path:
    return Path(tempfile.gettempdir()) / "glmq-bench"
