"""Fidelity report and model card of a quantized checkpoint (Markdown renderings of the report dict)."""

from __future__ import annotations

import statistics


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def layer_summary(report: dict) -> list[dict]:
    """Per (component, format): layer count, min/median weight SQNR, min/median output SQNR."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for st in report["layers"].values():
        groups.setdefault((st["component"], st["format"]), []).append(st)
    rows = []
    for (comp, fmt), items in sorted(groups.items()):
        w = [s["weight_sqnr_db"] for s in items if s["weight_sqnr_db"] is not None]
        o = [s["output_sqnr_db"] for s in items if s["output_sqnr_db"] is not None]
        r = [s["rtn_output_sqnr_db"] for s in items if s.get("rtn_output_sqnr_db") is not None]
        rows.append({
            "component": comp,
            "format": fmt,
            "layers": len(items),
            "bits_per_weight": round(statistics.mean(s["bits_per_weight"] for s in items), 3),
            "weight_sqnr_min": min(w) if w else None,
            "weight_sqnr_median": round(statistics.median(w), 2) if w else None,
            "output_sqnr_min": min(o) if o else None,
            "output_sqnr_median": round(statistics.median(o), 2) if o else None,
            "rtn_output_sqnr_median": round(statistics.median(r), 2) if r else None,
        })
    return rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def report_markdown(report: dict) -> str:
    rec = report["recipe"]
    lines = [f"# Quantization report: recipe `{rec['name']}` (v{rec['version']})", "", rec["description"], ""]
    lines += ["## Sizes", "", "| component | before | after | bits/weight | quantized layers | linears kept |",
              "|---|---|---|---|---|---|"]
    for name, c in report["components"].items():
        lines.append(f"| {name} | {_gb(c['bytes_before'])} | {_gb(c['bytes_after'])} | {c['bits_per_weight']} | "
                     f"{c['quantized_layers']} | {c['kept_linears']} |")
    lines += ["", "## Layers (SQNR in dB; higher is better)", "",
              "| component | format | layers | bits/weight | weight SQNR min | median | output SQNR min | median "
              "| RTN output SQNR median |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in layer_summary(report):
        lines.append(f"| {r['component']} | {r['format']} | {r['layers']} | {r['bits_per_weight']} | "
                     f"{_fmt(r['weight_sqnr_min'])} | {_fmt(r['weight_sqnr_median'])} | "
                     f"{_fmt(r['output_sqnr_min'])} | {_fmt(r['output_sqnr_median'])} | "
                     f"{_fmt(r['rtn_output_sqnr_median'])} |")
    lines.append("")
    if not report["calibrated"]:
        lines.append("Output SQNR needs calibration activations; this recipe is data-free, so only weight SQNR "
                     "is reported per layer.")
    ml = report.get("model_level")
    lines += ["", "## Model level (quantized vs bf16 source)", ""]
    if ml is None:
        lines.append("Not evaluated (`--no-eval`).")
    elif "skipped" in ml:
        lines.append(f"Skipped: {ml['skipped']}.")
    else:
        ar = ml["ar"]
        lines.append(f"- AR, teacher-forced over {ar['tokens']} grid tokens: logits SQNR {ar['logits_sqnr_db']} dB, "
                     f"mean KL {ar['kl_mean']}, top-1 agreement {ar['top1_agreement']:.1%}")
        vel = ", ".join(f"t={t}: {v} dB" for t, v in ml["dit"]["velocity_sqnr_db"].items())
        lines.append(f"- DiT velocity SQNR (conditional pass): {vel}")
        im = ml["image"]
        lines.append(f"- Image PSNR vs the bf16 pipeline, same AR tokens and noise ({im['size']}x{im['size']}, "
                     f"{im['steps']} steps): {im['psnr_db']} dB")
        lines.append(f"- evaluated on {ml['device']}, seed {ml['seed']}")
    lines += ["", "Per-layer numbers: `quantization_report.json`.", ""]
    return "\n".join(lines)


def model_card(report: dict) -> str:
    rec = report["recipe"]
    before = sum(c["bytes_before"] for c in report["components"].values())
    after = sum(c["bytes_after"] for c in report["components"].values())
    lines = [
        "---",
        "base_model: zai-org/GLM-Image",
        "base_model_relation: quantized",
        "library_name: glmq",
        "pipeline_tag: text-to-image",
        "tags: [glmq, quantized, glm-image]",
        "---",
        "",
        f"# GLM-Image, quantized by glmq (recipe `{rec['name']}`)",
        "",
        f"{rec['description']}.",
        "",
        f"Weights: {_gb(before)} -> {_gb(after)}. Load with `glmq.load(path)` or `glmq generate path ...`;",
        "every quantized layer and its exact storage format are listed in each component's `config.json`",
        "under `quantization_config` (quant_method `glmq`). Stock diffusers cannot load this folder: use",
        "`glmq export hf` for a bitsandbytes folder that diffusers loads.",
        "",
        report_markdown(report).split("\n", 1)[1],
    ]
    return "\n".join(lines)
