"""``glmq bench --gpus 2``: a latency row and a throughput row on two GPUs beside each recipe's one-GPU rows,
in the same run (same card, same weights, same prompt and seeds).

Each row starts a two-GPU pipeline (:mod:`glmq.runtime.parallel`) whose workers build the recipe's model on
their own GPU, as the one-GPU rows built it (:func:`parallel_pipeline`: the same random weights from the same
seed, or the same folder).

- latency: one warm-up image (compilation, graph capture), then ``--images`` timed images with seeds
  ``seed + i``, as a one-GPU row; the last is compared with the one-GPU row's last image of the same seed.
- throughput: one warm-up image, then one timed call of ``throughput_images`` prompts (seeds ``seed + i``): the
  row's seconds per image are the call's wall time over its images (the stages of different images overlap),
  its images per hour ``3600 / that``; ``vs_one_gpu`` divides by the one-GPU row's images per hour
  (``3600 / its median seconds``, one image after another).
"""

from __future__ import annotations

import time


def check_two_gpus(cfg, device) -> None:
    """Refuse a two-GPU bench that cannot run, before any work."""
    from glmq.errors import GlmqError

    if cfg.gpus != 2:
        raise GlmqError(f"--gpus {cfg.gpus}: bench runs 1 or 2 GPUs")
    if device.type == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            raise GlmqError(f"--gpus 2 needs two CUDA GPUs; this machine has {torch.cuda.device_count()}")
        if device.index not in (None, 0):
            raise GlmqError("--gpus 2 runs the one-GPU rows on cuda:0 and the two-GPU rows on cuda:0 and cuda:1; "
                            "use --device cuda")
    if cfg.throughput_images < 2:
        raise GlmqError("the throughput row needs at least 2 images")


def parallel_pipeline(device: str, *, path: str | None, model: str, recipe: str, seed: int, compile: bool,
                      attention: str, cuda_graph: bool, attention_precision: str | None):
    """What each worker of a two-GPU row builds (``glmq.runtime.parallel.from_builder``): the components of the
    one-GPU rows (the folder, or random weights from ``seed`` built on ``device``), quantized in place with
    ``recipe``, as a one-GPU pipeline on ``device``."""
    from pathlib import Path

    import torch

    from glmq.bench.run import BenchConfig, _load_or_build, _offline_pieces
    from glmq.quant.inplace import quantize_modules
    from glmq.runtime.load import from_modules

    dev = torch.device(device)
    comps = _load_or_build(BenchConfig(path=Path(path) if path else None, model=model, seed=seed), dev, None)
    if recipe != "bf16":
        quantize_modules({k: comps[k] for k in ("vision_language_encoder", "transformer")}, recipe)
    processor, tokenizer, sched = _offline_pieces()
    return from_modules(comps, processor=processor, tokenizer=tokenizer, scheduler_config=sched, device=device,
                        compile=compile, attention=attention, cuda_graph=cuda_graph,
                        attention_precision=attention_precision)


def _compare(checks: dict, out, prior, one_gpu: dict | None) -> None:
    """Same seed as the one-GPU row's last image: the share of equal AR tokens and the largest pixel gap."""
    if one_gpu is None:
        return
    checks["vs_one_gpu_prior_tokens_equal"] = round(float((prior.cpu() == one_gpu["prior"]).float().mean()), 4)
    checks["vs_one_gpu_image_max_abs_diff"] = round(float((out.float().cpu() - one_gpu["last"].float()).abs().max()), 5)


def two_gpu_rows(cfg, size, recipe: str, device, one_gpu: dict | None) -> list[dict]:
    """The latency and throughput rows of ``recipe`` at ``size`` (a row that fails says why, as a tier that
    does not fit does)."""
    import torch

    from glmq.bench.run import _log, _summary, _warm_then_timed, ran_dict, stage_dict
    from glmq.errors import GlmqError
    from glmq.runtime.parallel.pipeline import from_builder

    w, h = size
    args = {"path": str(cfg.path) if cfg.path else None, "model": cfg.model, "recipe": recipe, "seed": cfg.seed,
            "compile": cfg.compile, "attention": cfg.attention, "cuda_graph": cfg.cuda_graph,
            "attention_precision": cfg.attention_precision}
    one_s = one_gpu["row"]["seconds_per_image"]["median"] if one_gpu else None
    warm_steps = min(cfg.steps, cfg.warmup_steps or cfg.steps) if cfg.warmup else None
    rows = []
    for parallel in ("latency", "throughput"):
        row = {"provider": "glmq", "recipe": recipe, "tier_gib": None, "size": f"{w}x{h}", "steps": cfg.steps,
               "task": "t2i", "gpus": 2, "parallel": parallel}
        pipe = None
        try:
            _log(f"{recipe} on 2 GPUs, {parallel}: starting the workers (each builds the model)")
            t0 = time.perf_counter()
            pipe = from_builder("glmq.bench.two_gpus:parallel_pipeline", args, device=device.type, parallel=parallel)
            start_s = time.perf_counter() - t0
            if parallel == "latency":
                seconds, stages, checks, last = _warm_then_timed(pipe, cfg, size, device, prompt=cfg.prompt,
                                                                 warm_steps=warm_steps)
                _compare(checks, last, pipe.last_prior_token_ids, one_gpu)
                row.update(images=cfg.images, seconds_per_image=_summary(seconds), stages=stage_dict(stages[-1]),
                           ran=ran_dict(stages[-1]))
                two = {"vs_one_gpu": round(one_s / _summary(seconds)["median"], 3) if one_s else None}
            else:
                checks = {}
                if warm_steps:
                    t0 = time.perf_counter()
                    pipe(cfg.prompt, height=h, width=w, num_inference_steps=warm_steps, guidance_scale=cfg.guidance,
                         generator=torch.Generator().manual_seed(cfg.seed), output_type="pt")
                    checks["warmup_s"] = round(time.perf_counter() - t0, 3)
                n = cfg.throughput_images
                outs = pipe([cfg.prompt] * n, height=h, width=w, num_inference_steps=cfg.steps,
                            guidance_scale=cfg.guidance, output_type="pt",
                            generator=[torch.Generator().manual_seed(cfg.seed + i) for i in range(n)])
                call = pipe.last_call
                k = cfg.images - 1  # the image whose seed the one-GPU row's last image used
                if k < n:
                    _compare(checks, outs[k:k + 1], call["prior_token_ids"][k], one_gpu)
                per_image = call["wall_s"] / n
                row.update(images=n, seconds_per_image=_summary([per_image]), stages=stage_dict(pipe.last_times),
                           ran=ran_dict(pipe.last_times))
                one_rate = 3600 / one_s if one_s else None
                two = {"images_per_hour": round(call["images_per_hour"], 1), "wall_s": round(call["wall_s"], 3),
                       "one_gpu_images_per_hour": round(one_rate, 1) if one_rate else None,
                       "vs_one_gpu": round(call["images_per_hour"] / one_rate, 3) if one_rate else None,
                       "ar_s": [round(x, 3) for x in call["ar_s"]],
                       "dit_side_s": [round(x, 3) for x in call["total_s"]], "timeline": call["timeline"]}
            two.update(start_s=round(start_s, 1), peak_reserved_gib=pipe.last_call.get("peak_reserved_gib"),
                       workers=pipe.worker_info)
            row.update(fit=True, mode=f"{pipe.mode}, 2 GPUs {parallel}", dit_attention=pipe.attention_precision,
                       checks=checks, two_gpus=two)
            peaks = [v for v in (pipe.last_call.get("peak_reserved_gib") or {}).values() if v is not None]
            row["peak_reserved_gib"] = max(peaks) if peaks else None
            _log(f"{recipe} on 2 GPUs, {parallel}: {row['seconds_per_image']} s per image; {two.get('vs_one_gpu')}x "
                 "one GPU")
        except GlmqError as e:
            row.update(fit=False, mode=f"2 GPUs {parallel}", reason=str(e))
            _log(f"{recipe} on 2 GPUs, {parallel}: failed: {e}")
        finally:
            if pipe is not None:
                pipe.close()
        rows.append(row)
    return rows
