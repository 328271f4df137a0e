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
    lines += layer_outputs_note(report)
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
    lines += outlier_markdown(report.get("outlier_eval"))
    lines += per_layer_markdown(report)
    lines += ["", "Per-layer numbers: `quantization_report.json`.", ""]
    return "\n".join(lines)


def layer_outputs_note(report: dict) -> list[str]:
    """Which data each output SQNR comes from (``glmq.quant.calibrate``, ``glmq.quant.dit_calibrate``) and
    how the outputs are computed."""
    lo = report.get("layer_outputs")
    if not lo:
        return ["Output SQNR was not computed (`--no-layer-outputs`)."]
    lines = ["Output SQNR is 10 log10(||X W^T||^2 / ||Y - X W^T||^2) on calibration activations X, where Y is the "
             "layer's output as the runtime computes it: W8A8 layers (8-bit formats with `dynamic_per_token` "
             "activations) quantize X per token, as their GPU kernels do (the kernels' pure-torch reference); "
             "weight-only layers compute X W_q^T."]
    ar, dit = lo.get("vision_language_encoder"), lo.get("transformer")
    if ar:
        held = ar.get("held_out_sequences")
        lines.append(f"- AR: {ar['sequences']} sequence(s) of {ar['sequence']} (random, teacher-forced), inputs "
                     f"from the {ar['inputs']}; data-free layers on <= {ar['max_rows']} rows sampled from them"
                     + (f"; GPTQ layers, and RTN beside them, on <= {ar['max_rows']} rows of {held} held-out "
                        "sequence(s) (other prompts and grid tokens, never in the Hessians GPTQ fitted)"
                        if held else "")
                     + (f"; vision tower on {ar['vision_tower']}." if ar.get("vision_tower") else "."))
    if dit:
        lines.append(f"- DiT: {dit['samples']} samples of {dit['size_px']}x{dit['size_px']} px (random latents, "
                     f"prior tokens and {dit['glyph']}; half without prior), timesteps "
                     f"{', '.join(map(str, dit['timesteps']))}, inputs from the {dit['inputs']}, "
                     f"<= {dit['max_rows']} sampled rows per layer.")
    lines.append("RTN output SQNR is the same layer rounded to nearest, on the same activations.")
    return lines


def per_layer_markdown(report: dict) -> list[str]:
    """Every quantized layer's SQNR, folded (hundreds of rows at full size)."""
    if not report["layers"]:
        return []
    lines = ["", "<details><summary>Per-layer SQNR (dB)</summary>", "",
             "| layer | format | algorithm | bits/weight | weight SQNR | output SQNR | RTN output SQNR |",
             "|---|---|---|---|---|---|---|"]
    for name, st in report["layers"].items():
        lines.append(f"| {name} | {st['format']} | {st.get('algorithm', '-')} | {st['bits_per_weight']:.3f} | "
                     f"{_fmt(st['weight_sqnr_db'])} | {_fmt(st['output_sqnr_db'])} | "
                     f"{_fmt(st.get('rtn_output_sqnr_db'))} |")
    lines += ["", "</details>"]
    return lines


def outlier_markdown(oe: dict | None) -> list[str]:
    """The "Outlier layers" section (``glmq.evaluate.outlier_eval``); nothing when it was not evaluated."""
    if not oe:
        return []
    p = oe["generator_params"]
    lines = ["", f"## Outlier layers at {oe['architecture']}-size shapes (synthetic; SQNR in dB)", "",
             f"Each layer shape this recipe quantizes in the released architecture, drawn by `{oe['generator']}` "
             f"(seed {oe['seed']}, {p['n_outlier_channels']} outlier input channels x{p['outlier_scale']:g}, "
             f"activation rank {p['rank']}, weight tail {p['tail']}). Output SQNR is on {oe['eval_tokens']} "
             f"held-out tokens, for every algorithm and for RTN beside it; GPTQ's Hessian comes from "
             f"{oe['calib_tokens']} other tokens. Outputs are computed as the runtime does: W8A8 rows quantize "
             "the activations per token (the kernels' pure-torch reference). HQQ/GPTQ are "
             "scored on the rows (and, for GPTQ, the leading columns) listed, RTN on the same slice; "
             "\"RTN whole layer\" is the full shape.", "",
             "| component | shape | layers | format | algorithm | scored on | weight SQNR | RTN | output SQNR "
             "| RTN | RTN whole layer (weight / output) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in oe["rows"]:
        a = r["algorithm"]
        params = ", ".join(f"{k}={v}" for k, v in r["format_params"].items())
        fmt = f"{r['format']} ({params})" if params else r["format"]
        if r.get("activations_quantized"):
            fmt += ", W8A8"
        full = r["rtn_full"]
        lines.append(f"| {r['component']} | {r['shape'][0]}x{r['shape'][1]} | {r['layers']} | {fmt} | {a} | "
                     f"{r['evaluated']['selection']} | {_fmt(r['weight_sqnr_db'][a])} | "
                     f"{_fmt(r['weight_sqnr_db']['rtn'])} | {_fmt(r['output_sqnr_db'][a])} | "
                     f"{_fmt(r['output_sqnr_db']['rtn'])} | {_fmt(full['weight_sqnr_db'])} / "
                     f"{_fmt(full['output_sqnr_db'])} |")
    w = oe.get("worst")
    if w:
        # Seconds only when the section carries them: glmq quantize keeps timings out of the written report.
        took = f" Evaluated in {oe['seconds']} s." if oe.get("seconds") is not None else ""
        lines += ["", f"Worst: {outlier_summary(oe)}.{took}"]
    return lines


def outlier_summary(oe: dict | None) -> str | None:
    """One line on the lowest outlier-layer output SQNR, for the CLI summary; None when not evaluated."""
    w = (oe or {}).get("worst")
    if not w:
        return None
    return (f"output SQNR {w['output_sqnr_db']:.2f} dB ({w['component']} {w['shape'][0]}x{w['shape'][1]}, "
            f"{w['format']} {w['algorithm']}; RTN {_fmt(w['rtn_output_sqnr_db'])} dB)")


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


def summary_text(report: dict, out) -> str:
    """The few lines ``glmq quantize`` prints: sizes, per component/format the SQNR range, the model level
    and the worst synthetic outlier layer."""
    before = sum(c["bytes_before"] for c in report["components"].values())
    after = sum(c["bytes_after"] for c in report["components"].values())
    lines = [f"wrote {out}: recipe {report['recipe']['name']}, weights {before / 1e9:.3f} GB -> {after / 1e9:.3f} GB"]
    for r in layer_summary(report):
        outs = f", output SQNR min {r['output_sqnr_min']} dB" if r["output_sqnr_min"] is not None else ""
        lines.append(f"  {r['component']:<24} {r['format']:<9} {r['layers']:>4} layers, {r['bits_per_weight']:.2f} "
                     f"bits/weight, weight SQNR min {r['weight_sqnr_min']} dB, median {r['weight_sqnr_median']} dB{outs}")
    ml = report.get("model_level")
    if ml and "skipped" not in ml:
        lines.append(f"  model level: AR logits SQNR {ml['ar']['logits_sqnr_db']} dB (KL {ml['ar']['kl_mean']}), "
                     f"image PSNR {ml['image']['psnr_db']} dB vs bf16")
    elif ml:
        lines.append(f"  model level: skipped ({ml['skipped']})")
    worst = outlier_summary(report.get("outlier_eval"))
    if worst:
        lines.append(f"  outlier layers (synthetic, full-size shapes): worst {worst}")
    lines.append(f"report: {out}/quantization_report.md")
    return "\n".join(lines)
