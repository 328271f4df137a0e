"""Benchmark outputs: JSON, a Markdown table, a PNG chart, and README's hardware-tier table."""

from __future__ import annotations

import json
from pathlib import Path

README_START = "<!-- glmq-bench:start -->"
README_END = "<!-- glmq-bench:end -->"


def _cell(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for r in result["rows"]:
        tier = "-" if r.get("tier_gib") is None else f"{r['tier_gib']:g} GiB"
        task = r.get("task", "t2i")
        if not r.get("fit"):
            rows.append([r["provider"], r["recipe"], tier, task, r["size"], r.get("mode", "-"), "does not fit", "-",
                         "-", "-", "-", _cell(r.get("peak_device_gib")), "-", r.get("reason", "")[:80]])
            continue
        s = r["seconds_per_image"]
        st = r.get("stages", {})
        device = _cell(r.get("peak_device_gib"))
        if r.get("within_tier") is False:
            device += " (over the tier)"
        plan = r.get("plan_stage_peaks_gib")
        if plan and r.get("peak_device_gib") is not None:  # the memory plan's estimate beside the measurement
            device += f" (plan {max(plan.values()):.2f})"
        rows.append([
            r["provider"], r["recipe"], tier, task, r["size"], r.get("mode", "-"),
            f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})",
            _cell(st.get("ar_ms_per_token")), _cell(st.get("dit_ms_per_step"), "{:.1f}"),
            _cell(r.get("peak_allocated_gib")), _cell(r.get("peak_reserved_gib")), device,
            _cell(r.get("speedup_vs_stock"), "{:.1f}x"),
            "; ".join(filter(None, [_two_gpus_note(r.get("two_gpus")), _checks_note(r.get("checks") or {})])),
        ])
    return rows


def _two_gpus_note(two: dict | None) -> str:
    """A two-GPU row's comparison with the one-GPU row of its recipe (glmq.bench.two_gpus)."""
    if not two or two.get("vs_one_gpu") is None:
        return ""
    if "images_per_hour" in two:
        return (f"{two['images_per_hour']:.0f} images/hour, {two['vs_one_gpu']:.2f}x one GPU's "
                f"{two['one_gpu_images_per_hour']:.0f}")
    return f"{two['vs_one_gpu']:.2f}x one GPU's speed"


def _checks_note(checks: dict) -> str:
    """The warm-up time and the same-seed comparison of a glmq row, in a few words."""
    parts = []
    if "warmup_s" in checks:
        parts.append(f"warm-up image {checks['warmup_s']:.0f} s")
    if "vs_one_gpu_prior_tokens_equal" in checks:
        parts.append(f"vs one GPU, same seed: {100 * checks['vs_one_gpu_prior_tokens_equal']:.1f}% of AR tokens equal, "
                     f"max pixel diff {checks['vs_one_gpu_image_max_abs_diff']:.3g}")
    if "same_seed_prior_tokens_equal" in checks:
        same = f"same seed: {100 * checks['same_seed_prior_tokens_equal']:.1f}% of AR tokens equal"
        if "same_seed_image_max_abs_diff" in checks:
            same += f", max pixel diff {checks['same_seed_image_max_abs_diff']:.3g}"
        parts.append(same)
    return "; ".join(parts)


HEADER = ["provider", "recipe", "tier", "task", "size", "mode", "s/image median (min-max)", "AR ms/token",
          "DiT ms/step", "peak alloc GiB", "peak reserved GiB", "peak on card GiB", "vs stock", "note"]


def ran_line(result: dict) -> str:
    """Steps and guidance as the rows' runs recorded them (``ran``), not as configured: one value each when
    every row agrees, else every value seen."""
    ran = [r["ran"] for r in result["rows"] if r.get("fit") and r.get("ran")]
    if not ran:
        return "nothing ran"
    steps = sorted({r.get("steps") for r in ran}, key=str)
    guidance = sorted({r.get("guidance") for r in ran}, key=str)
    return (f"ran {', '.join(map(str, steps))} steps, guidance {', '.join(f'{g:g}' if g is not None else '?' for g in guidance)}"
            " (read from each run)")


def markdown(result: dict) -> str:
    env = result["environment"]
    cfg = result["config"]
    lines = [f"# glmq bench: {env.get('card')}", "",
             f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, diffusers {env['diffusers']}, "
             f"glmq {env['glmq']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""), "",
             f"Model: {cfg['model']}; {ran_line(result)}, {cfg['images']} image(s) per row after "
             "one warm-up (stock: no warm-up); prompt: \"" + cfg["prompt"] + "\"", ""]
    problems = result.get("consistency_problems") or []
    if problems:
        lines += ["**These figures disagree with each other; do not trust them:**", ""]
        lines += [f"- {p}" for p in problems] + [""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in table_rows(result):
        lines.append("| " + " | ".join(row) + " |")
    from glmq.bench.batch import markdown_sections

    lines += markdown_sections(result)
    profiles = [r for r in result["rows"] if r.get("profile")]
    for r in profiles:
        for stage, rows in r["profile"].items():
            lines += ["", f"## Top kernels, {stage}: {r['recipe']} at {r.get('tier_gib')} GiB", "",
                      "| kernel | calls | ms |", "|---|---|---|"]
            lines += [f"| `{p['kernel']}` | {p['calls']} | {p['ms']} |" for p in rows]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """Two horizontal bar charts side by side: seconds per image and peak allocated GiB, per row."""
    from PIL import Image, ImageDraw

    rows = [r for r in result["rows"]]
    labels = []
    secs, mems, fits = [], [], []
    for r in rows:
        tier = "" if r.get("tier_gib") is None else f" @{r['tier_gib']:g}G"
        name = "stock" if r["provider"].startswith("stock") else "glmq"
        labels.append(f"{name} {r['recipe']}{tier} {r['size']}")
        fits.append(bool(r.get("fit")))
        secs.append(r["seconds_per_image"]["median"] if r.get("fit") else None)
        mems.append(r.get("peak_allocated_gib") if r.get("fit") else None)
    bar_h, gap, left, width = 22, 8, 300, 330
    height = 60 + len(rows) * (bar_h + gap)
    img = Image.new("RGB", (left + 2 * width + 80, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"glmq bench on {result['environment'].get('card')}", fill="black")
    panels = [("seconds per image (median)", secs, (52, 120, 200)), ("peak allocated GiB", mems, (220, 120, 40))]
    for p, (title, values, color) in enumerate(panels):
        x0 = left + p * (width + 40)
        d.text((x0, 30), title, fill="black")
        top = max([v for v in values if v is not None], default=1) or 1
        for i, v in enumerate(values):
            y = 50 + i * (bar_h + gap)
            if p == 0:
                d.text((10, y + 5), labels[i][:46], fill="black")
            if v is None:
                note, ink = ("does not fit", (180, 0, 0)) if not fits[i] else ("n/a (no GPU)", (90, 90, 90))
                d.text((x0 + 4, y + 5), note, fill=ink)
                continue
            w = max(2, int((width - 60) * v / top))
            d.rectangle([x0, y, x0 + w, y + bar_h], fill=color)
            d.text((x0 + w + 4, y + 5), f"{v:.2f}", fill="black")
    img.save(path)


def image_strip(images: dict, path: Path, tile: int = 256) -> None:
    """PIL images side by side, each scaled to ``tile`` x ``tile`` and labelled with its key: for a look."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (tile * len(images), tile))
    for i, (name, img) in enumerate(images.items()):
        cell = img.convert("RGB").resize((tile, tile))
        ImageDraw.Draw(cell).text((6, 6), name, fill=(255, 255, 255))
        strip.paste(cell, (tile * i, 0))
    strip.save(path)


def write_outputs(result: dict, out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    chart(result, out / "bench.png")


def readme_table(result: dict) -> str:
    env = result["environment"]
    lines = [README_START,
             f"Measured by `glmq bench` on {env.get('card')} ({env['date'][:10]}; torch {env['torch']}, "
             f"diffusers {env['diffusers']}), {result['config']['model']}, {result['config']['steps']} steps:", "",
             "| " + " | ".join(HEADER[:-1]) + " |", "|" + "---|" * (len(HEADER) - 1)]
    for row in table_rows(result):
        lines.append("| " + " | ".join(row[:-1]) + " |")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(result: dict, readme: Path) -> None:
    """Replace the table between README's bench markers with one generated from ``result``."""
    from glmq.errors import GlmqError

    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise GlmqError(f"{readme}: no '{README_START}' ... '{README_END}' markers to update")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + readme_table(result) + tail, encoding="utf-8")


def check_consistency(result: dict, rel_tol: float = 0.02) -> list[str]:
    """Problems in a result's own figures (empty when none): per-unit figures that do not multiply back to
    their stage's seconds, stages that add up to more than the image, rows that did not run what the
    configuration asked (steps, guidance, size), and stock rows that ran other steps or guidance than the glmq
    rows they are compared with. A result whose figures disagree cannot be trusted, whatever they say."""
    problems = []
    cfg = result.get("config", {})
    want_steps, want_guidance = cfg.get("steps"), cfg.get("guidance")

    def close(a, b):
        return abs(a - b) <= rel_tol * max(abs(a), abs(b)) + 1e-3

    for i, r in enumerate(result.get("rows", [])):
        if not r.get("fit"):
            continue
        name = f"row {i} ({r['provider']}, {r.get('tier_gib')} GiB, {r.get('task', 't2i')}, {r['size']})"
        st, ran = r.get("stages", {}), r.get("ran")
        if ran is None:
            problems.append(f"{name}: records nothing of what ran")
            continue
        tokens = ran.get("ar_tokens")
        if tokens and not close(st["ar_s"], tokens * st["ar_ms_per_token"] / 1000):
            problems.append(f"{name}: AR {st['ar_s']} s is not {tokens} tokens x {st['ar_ms_per_token']} ms")
        if not close(st["dit_s"], ran["steps"] * st["dit_ms_per_step"] / 1000):
            problems.append(f"{name}: DiT {st['dit_s']} s is not {ran['steps']} steps x {st['dit_ms_per_step']} ms")
        staged = st["ar_s"] + st["dit_s"] + st.get("glyph_s", 0) + st.get("vae_s", 0)
        whole = r.get("seconds_per_call", r["seconds_per_image"])["max"]  # a batch row's stages serve the call
        # A two-GPU throughput row's seconds are its call's wall time per image: its images' stages overlap.
        if r.get("parallel") != "throughput" and staged > whole * (1 + rel_tol) + 1e-3:
            problems.append(f"{name}: its stages add up to {staged:.3f} s, more than the "
                            f"{'call' if 'seconds_per_call' in r else 'image'}'s {whole} s")
        if want_steps is not None and ran["steps"] != want_steps:
            problems.append(f"{name}: ran {ran['steps']} steps, the configuration asked for {want_steps}")
        if want_guidance is not None and ran.get("guidance") != want_guidance:
            problems.append(f"{name}: ran guidance {ran.get('guidance')}, the configuration asked for {want_guidance}")
        if ran.get("size") not in (None, r["size"]):
            problems.append(f"{name}: ran {ran['size']}, the row says {r['size']}")
        if cfg.get("compile") and "failed compile" in (ran.get("ar_step") or ""):
            problems.append(f"{name}: the AR decode step ran {ran['ar_step']}, the configuration asked for compiled")
    return problems


def add_speedups(rows: list[dict]) -> list[dict]:
    """Set each fitting glmq row's ``speedup_vs_stock`` against the stock row of its own size (dropping any
    older figure, and leaving rows of a size with no stock row without one); returns ``rows``."""
    stock = {row["size"]: row for row in rows if row["provider"].startswith("stock")}
    for row in rows:
        row.pop("speedup_vs_stock", None)
        base = stock.get(row["size"])
        if base is not None and row is not base and row.get("fit") and row.get("task", "t2i") == "t2i":
            row["speedup_vs_stock"] = round(base["seconds_per_image"]["median"] / row["seconds_per_image"]["median"], 2)
    return rows


def merge_results(results: list[dict]) -> dict:
    """One result from several saved runs on the same card (e.g. stock and glmq run as separate processes).

    Speedups are recomputed against the stock row of the same size; runs on different cards are refused.
    """
    from glmq.errors import GlmqError

    if not results:
        raise GlmqError("no benchmark results to merge")
    cards = {r["environment"].get("card") for r in results}
    if len(cards) != 1:
        raise GlmqError(f"results come from different cards ({', '.join(map(str, cards))}); compare like with like")
    rows = add_speedups([dict(row) for r in results for row in r["rows"]])
    env = dict(results[0]["environment"])
    env["date"] = max(r["environment"]["date"] for r in results)
    env["merged_from"] = [r["environment"]["date"] for r in results]
    cfg = dict(results[0]["config"])
    cfg["steps"] = sorted({r["config"]["steps"] for r in results})[0] if len({r["config"]["steps"] for r in results}) == 1 else "mixed"
    return {"environment": env, "config": cfg, "rows": rows}
