"""Report and model card of ``glmq export compressed-tensors`` (:mod:`glmq.export.compressed_tensors`)."""

from __future__ import annotations

from pathlib import Path

AR = "vision_language_encoder"
REPORT = "compressed_tensors_report"
"""Base name of the per-layer report files (``.json``, ``.md``) beside the weights."""


def _db(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def report_markdown(report: dict) -> str:
    """The per-layer table of an export report (``compressed_tensors_report.md``)."""
    src = "the bf16 source weights" if report["source_kind"] == "bf16" else "glmq's fidelity report (bf16 source)"
    lines = [
        "# compressed-tensors export report",
        "",
        f"Weight SQNR per quantized layer, in dB, against {src}: glmq's layer, the exported layer, and the change. "
        "A layer is exact when compressed-tensors' decompression gives glmq's dequantized weight bit for bit; "
        "otherwise (non-integer int4 zero points, e.g. HQQ) its zero points were rounded to integers and its codes "
        "re-rounded, and `re-rounding` is the SQNR of the exported weight against glmq's."
        + (" Exported SQNRs marked `~` are estimates: glmq's recorded noise plus the re-rounding noise."
           if report["source_kind"] == "glmq" else ""),
        "",
        "| component | layer | glmq format | compressed-tensors | exact | glmq SQNR | exported SQNR | change | re-rounding |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in report["layers"].items():
        comp, layer = key.split(":", 1)
        after = ("~" if s.get("export_sqnr_estimated") else "") + _db(s["export_sqnr_db"])
        lines.append(f"| `{comp}` | `{layer}` | {s['glmq_format']} | {s['ct_format']} | {'yes' if s['exact'] else 'no'} "
                     f"| {_db(s['glmq_sqnr_db'])} | {after} | {_db(s['sqnr_change_db'])} | {_db(s['rerounding_sqnr_db'])} |")
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _ar_unloadable(report: dict) -> bool:
    """An asymmetric AR with several config groups: transformers 5.24 loads neither way (see _ar_snippet)."""
    groups = list(report["components"].get(AR, {}).get("config_groups", {}).values())
    return len(groups) > 1 and any(not g["weights"]["symmetric"] for g in groups)


def _ar_intro(report: dict) -> str:
    if _ar_unloadable(report):
        return ("transformers 5.24 (with compressed-tensors 0.20.1) cannot load this AR, as the snippet says; it is "
                "for engines that read compressed-tensors:")
    return "The AR loads with stock transformers (`compressed-tensors` installed):"


def _ar_snippet(report: dict) -> list[str]:
    """Python lines loading the AR. transformers 5.24 with compressed-tensors 0.20.1 builds unpacked zero points
    on its compressed path and rejects the packed ones the format stores, so asymmetric W4A16 loads dequantized."""
    groups = list(report["components"].get(AR, {}).get("config_groups", {}).values())
    asym = any(not g["weights"]["symmetric"] for g in groups)
    if not asym:
        return ["from transformers import GlmImageForConditionalGeneration", "",
                'ar = GlmImageForConditionalGeneration.from_pretrained("PATH/vision_language_encoder")']
    mixed = ["# NOT loadable by transformers 5.24: its dequantize path applies the first config group's scheme to",
             f"# every layer, and this AR has {len(groups)} groups (serve it with an engine instead)"] if len(groups) > 1 else []
    return ["from transformers import CompressedTensorsConfig, GlmImageForConditionalGeneration", "", *mixed,
            "# asymmetric W4A16: transformers 5.24 loads it dequantized (its compressed path rejects packed zero points)",
            'ar = GlmImageForConditionalGeneration.from_pretrained("PATH/vision_language_encoder",',
            "                                                      quantization_config=CompressedTensorsConfig(dequantize=True))"]


def model_card(report: dict, src: Path | None = None) -> str:
    """README.md of an exported folder: front matter, recipe, formats, fidelity."""
    rec = report.get("recipe") or {}
    lines = [
        "---",
        "base_model: zai-org/GLM-Image",
        "base_model_relation: quantized",
        "pipeline_tag: text-to-image",
        "tags: [glm-image, compressed-tensors, quantized, glmq]",
        "---",
        "",
        "# GLM-Image, compressed-tensors (AR W4A16, DiT 8-bit)",
        "",
        "A diffusers pipeline folder whose AR (`vision_language_encoder`) and DiT (`transformer`) are stored in "
        "the compressed-tensors format (llm-compressor's): each component's `config.json` carries a "
        "`quantization_config` with `quant_method: compressed-tensors`. Written by `glmq export compressed-tensors` "
        + ("from the bf16 release, quantized by the recipe below." if report["source_kind"] == "bf16"
           else "from a glmq-quantized folder, repacked without re-quantizing where the format holds glmq's values."),
        "",
        f"Recipe: `{rec.get('name', '?')}` (version {rec.get('version', '?')}): {rec.get('description', '')}",
        "",
        "| component | format | config groups | layers quantized (exact / re-rounded) | linears kept (`ignore`) "
        "| size before | size after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in report["components"].items():
        groups = "; ".join(f"{g}: {s['format']}, {s['weights']['num_bits']}-bit {s['weights']['type']} "
                           f"{s['weights']['strategy']}" + (f" {s['weights']['group_size']}" if s['weights']['group_size'] else "")
                           + ("" if s["weights"]["symmetric"] else " asymmetric")
                           + (f", activations {s['input_activations']['type']}{s['input_activations']['num_bits']} "
                              "dynamic per token" if s["input_activations"] else ", weight-only")
                           for g, s in c["config_groups"].items())
        lines.append(f"| `{name}` | {c['format']} | {groups} | {c['quantized_layers']} ({c['exact_layers']} / "
                     f"{c['rerounded_layers']}) | {c['ignored_linears']} | {_size(c['bytes_before'])} "
                     f"| {_size(c['bytes_after'])} |")
    changes = [s["sqnr_change_db"] for s in report["layers"].values() if not s["exact"]]
    known = [c for c in changes if c is not None]
    lines += [
        "",
        "## Fidelity",
        "",
        (f"{len(changes)} layers had non-integer zero points and were re-rounded; their weight SQNR changed by "
         f"{min(known):+.2f} to {max(known):+.2f} dB." if known else
         f"{len(changes)} layers were re-rounded." if changes else
         "Every layer was repacked exactly: compressed-tensors decompresses the same weights glmq dequantizes."),
        f"Per-layer figures are in `{REPORT}.md` / `.json`"
        + (", and glmq's fidelity report of the source (model-level AR logits, DiT velocity and image "
           "figures) in `quantization_report.md`." if src is not None and (src / "quantization_report.md").is_file()
           else "."),
        "",
        "## Use",
        "",
        _ar_intro(report),
        "",
        "```python",
        *_ar_snippet(report),
        "```",
        "",
        "The DiT's tensors decompress with the compressed-tensors library; diffusers has no compressed-tensors "
        "loader. The glyph encoder, VAE, tokenizer, processor and scheduler are the source's.",
        "",
    ]
    return "\n".join(lines)
