"""``glmq bench --batch 1,4,8`` and ``--first-image``: images per hour per batch size, and the first image of a
fresh process.

Batch rows: for each batch size B, one untimed call of B images (it pays for the compilation and graph capture
of B's shapes; full steps, since the DiT's tables are shaped by the step count), then ``images`` timed calls of
the same B images (seeds ``seed .. seed + B - 1``, the same prompt). A row reports the call's seconds, seconds
per image, images per hour, the AR's decode step (B sequences) and tokens per second, the DiT's chunks, the
peak on the card, and two checks: the timed call reproduced the untimed one's AR tokens, and its image 0 against
batch 1's image (same seed) when batch 1 ran first.

First-image rows (``--first-image``): each tier's pipeline is built in a fresh process twice over one
new cache folder (:mod:`glmq.runtime.compile_cache`): "cold" (empty cache) and "cached" (what the cold process
left), each timing its first image (compilation, graph capture and autotuning included) and, in the cached
process, a second, "warm" image. The child is :mod:`glmq.bench.first_image`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time

from glmq.errors import GlmqError


def run_batches(pipe, cfg, size, device, tier, recipe: str) -> list[dict]:
    """The batch rows of one pipeline (one recipe and tier)."""
    import torch

    from glmq.bench.run import _device_peak, _log, _peak, _reset_peaks, _summary, ran_dict, stage_dict

    w, h = size
    rows, alone = [], None
    for b in cfg.batch:
        row = {"provider": "glmq", "recipe": recipe, "tier_gib": tier, "size": f"{w}x{h}", "steps": cfg.steps,
               "images": cfg.images, "task": f"t2i x{b}", "batch": b}

        def call(steps: int):
            gens = [torch.Generator().manual_seed(cfg.seed + k) for k in range(b)]
            return pipe([cfg.prompt] * b, height=h, width=w, num_inference_steps=steps, guidance_scale=cfg.guidance,
                        generator=gens, output_type="pt")

        try:
            _reset_peaks(device)
            t0 = time.perf_counter()
            call(cfg.warmup_steps or cfg.steps)
            checks = {"warmup_s": round(time.perf_counter() - t0, 3)}
            warm_tokens = pipe.last_prior_token_ids
            _reset_peaks(device)
            seconds = []
            for _ in range(cfg.images):
                out = call(cfg.steps)
                seconds.append(pipe.last_times.total_s)
            t, tokens = pipe.last_times, pipe.last_prior_token_ids
            checks["same_seed_prior_tokens_equal"] = round(float((tokens == warm_tokens).float().mean()), 4)
            if b == 1:
                alone = (out[0].float(), tokens[0])
            elif alone is not None:
                checks["vs_batch_1_prior_tokens_equal"] = round(float((tokens[0] == alone[1]).float().mean()), 4)
                checks["vs_batch_1_max_abs_diff"] = round(float((out[0].float() - alone[0]).abs().max()), 5)
            alloc, reserved = _peak(device)
            median = statistics.median(seconds)
            row.update(fit=True, mode=t.extra.get("mode"), checks=checks, seconds_per_call=_summary(seconds),
                       seconds_per_image=_summary([s / b for s in seconds]),
                       images_per_hour=round(3600 * b / median, 1), stages=stage_dict(t), ran=ran_dict(t),
                       ar_batch=t.extra.get("ar_batch", 1), dit_batch=t.extra.get("dit_batch", 1),
                       ar_tokens_per_s=round(b * t.ar_tokens / t.ar_s, 1) if t.ar_s else None,
                       peak_allocated_gib=alloc, peak_reserved_gib=reserved,
                       stage_peaks_reserved_gib=t.extra.get("peak_reserved_gib_after"),
                       plan_stage_peaks_gib=t.extra.get("plan_peaks_gib"), **_device_peak(device, tier))
        except GlmqError as e:
            row.update(fit=False, reason=str(e))
        except torch.OutOfMemoryError as e:
            row.update(fit=False, reason=f"out of memory under the {tier} GiB cap: {str(e).splitlines()[0][:160]}",
                       **_device_peak(device, tier))
        _log(f"{recipe} tier {tier}: batch {b}: {row.get('images_per_hour', row.get('reason'))} images/hour")
        rows.append(row)
    base = next((r for r in rows if r.get("batch") == 1 and r.get("fit")), None)
    for r in rows:
        if base is not None and r.get("fit"):
            r["vs_batch_1"] = round(r["images_per_hour"] / base["images_per_hour"], 2)
    return rows


def first_image_rows(cfg, tiers, size, device) -> list[dict]:
    """Cold, cached and warm first-image times per recipe and tier, each process a fresh one."""
    from glmq.bench.run import _log

    rows = []
    for recipe in cfg.recipes:
        for tier in tiers:
            row = {"recipe": recipe, "tier_gib": tier, "size": f"{size[0]}x{size[1]}", "steps": cfg.steps,
                   "compile": cfg.compile}
            with tempfile.TemporaryDirectory(prefix="glmq-cache-") as cache:
                for kind in ("cold", "cached"):
                    _log(f"first image, {recipe} tier {tier}: {kind} process")
                    row[kind] = _first_image_child(cfg, recipe, tier, size, device, cache, second=kind == "cached")
            ok = all(row[k].get("ok") for k in ("cold", "cached"))
            row["fit"] = ok
            if ok:
                row["compile"] = row["cold"]["compiled"]  # what ran (a CPU pipeline never compiles)
                row.update(cold_first_s=row["cold"]["first_s"], cached_first_s=row["cached"]["first_s"],
                           warm_s=row["cached"]["second_s"], cold_process_s=row["cold"]["process_s"],
                           cached_process_s=row["cached"]["process_s"])
            rows.append(row)
    return rows


def _first_image_child(cfg, recipe, tier, size, device, cache: str, *, second: bool) -> dict:
    args = [sys.executable, "-m", "glmq.bench.first_image", "--recipe", recipe, "--size", f"{size[0]}x{size[1]}",
            "--steps", str(cfg.steps), "--guidance", str(cfg.guidance), "--seed", str(cfg.seed), "--device",
            str(device), "--cache-dir", cache, "--prompt", cfg.prompt]
    args += ["--path", str(cfg.path)] if cfg.path is not None else ["--model", cfg.model]
    args += ["--tier", str(tier)] if tier is not None else []
    args += [] if cfg.compile else ["--no-compile"]
    args += ["--second"] if second else []
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = round(time.perf_counter() - t0, 3)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "returncode": proc.returncode, "process_s": wall, "reason": tail[:300]}
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "process_s": wall, **out}


def markdown_sections(result: dict) -> list[str]:
    """The bench report's batch and first-image tables (empty when the run had neither)."""
    lines = []
    batch = [r for r in result.get("rows", []) if r.get("batch")]
    if batch:
        lines += ["", "## Batches", "",
                  "| recipe | tier | size | batch | mode | s/call | s/image | images/hour | vs batch 1 | AR ms/step "
                  "(B sequences) | AR tokens/s | DiT images per forward | peak on card GiB | checks |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in batch:
            tier = "-" if r.get("tier_gib") is None else f"{r['tier_gib']:g} GiB"
            if not r.get("fit"):
                lines.append(f"| {r['recipe']} | {tier} | {r['size']} | {r['batch']} | - | does not fit | - | - | - "
                             f"| - | - | - | {r.get('peak_device_gib', '-')} | {r.get('reason', '')[:80]} |")
                continue
            c = r.get("checks", {})
            note = f"same seed: {100 * c.get('same_seed_prior_tokens_equal', 0):.1f}% tokens"
            if "vs_batch_1_max_abs_diff" in c:
                note += (f"; image 0 vs batch 1: {100 * c['vs_batch_1_prior_tokens_equal']:.1f}% tokens, "
                         f"max pixel diff {c['vs_batch_1_max_abs_diff']:.3g}")
            st = r["stages"]
            lines.append(f"| {r['recipe']} | {tier} | {r['size']} | {r['batch']} | {r['mode']} | "
                         f"{r['seconds_per_call']['median']:.2f} | {r['seconds_per_image']['median']:.2f} | "
                         f"{r['images_per_hour']:.0f} | {r.get('vs_batch_1', '-')} | {st['ar_ms_per_token']:.2f} | "
                         f"{r.get('ar_tokens_per_s') or '-'} | {r['dit_batch']} | {r.get('peak_device_gib', '-')} | "
                         f"{note} |")
    first = result.get("first_image") or []
    if first:
        lines += ["", "## First image in a fresh process", "",
                  "Seconds of the first call (compilation, graph capture and autotuning included) in a process with "
                  "an empty cache folder (cold) and in a second process over what the first left (cached); warm: the "
                  "cached process's second image. Process: the whole process's wall time, model build included.", "",
                  "| recipe | tier | size | compile | cold first s | cached first s | warm s | cold process s | "
                  "cached process s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in first:
            tier = "-" if r.get("tier_gib") is None else f"{r['tier_gib']:g} GiB"
            if not r.get("fit"):
                why = r["cold"].get("reason") or r["cached"].get("reason") or "failed"
                lines.append(f"| {r['recipe']} | {tier} | {r['size']} | {r['compile']} | failed: {why[:80]} | - | - "
                             "| - | - |")
                continue
            lines.append(f"| {r['recipe']} | {tier} | {r['size']} | {r['compile']} | {r['cold_first_s']:.2f} | "
                         f"{r['cached_first_s']:.2f} | {r['warm_s']:.2f} | {r['cold_process_s']:.1f} | "
                         f"{r['cached_process_s']:.1f} |")
    return lines
