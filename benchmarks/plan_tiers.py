"""The memory plan's arithmetic for the released shapes, per recipe and tier: which mode ``glmq.load`` picks
under each budget, and each stage's estimated peak on the card, for text-to-image and edits at 1024x1024 and
2048x2048. No GPU and no weights: the components are built on the meta device at the released sizes, each
linear layer a recipe quantizes is counted at its format's bytes, everything else at its runtime dtype (bf16;
the glyph encoder fp32), and the AR's embedding with only the rows the runtime keeps on the GPU
(glmq.runtime.embedding). These are estimates (glmq.runtime.memory), not measurements: the bench runs on the
GPU are what the README's tables quote; this script says what the plan expects of a tier before one runs.

    python benchmarks/plan_tiers.py --out benchmarks/results/plan_tiers_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

REQUESTS = {  # label -> (height, width, reference token counts: a 1024x1024 reference is 64x64 upsampled ids)
    "t2i 1024": (1024, 1024, ()),
    "edit 1024, 1 reference": (1024, 1024, (4096,)),
    "edit 1024, 2 references": (1024, 1024, (4096, 3072)),
    "t2i 2048": (2048, 2048, ()),
}


def component_bytes(name: str, recipe) -> list[tuple[str, int]]:
    """(tensor name, bytes on the GPU) of a released-size component under ``recipe`` (None: bf16)."""
    from glmq.io.layout import component
    from glmq.models.build import build_component
    from glmq.quant.plan import module_linears, plan_layers

    comp = component(name)
    model = build_component(comp, "full")
    plans = {}
    if recipe is not None:
        plans, _ = plan_layers(recipe, name, module_linears(model), strict=False)
    width = 4 if name == "text_encoder" else 2
    out = []
    for mod_name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            plan = plans.get(mod_name)
            if plan is not None and pname == "weight":
                out.append((full, int(round(plan.fmt.bytes_per_weight(plan.shape) * t.numel()))))
            else:
                out.append((full, t.numel() * width))
    return out


def sizes_for(recipe_name: str):
    from transformers import GlmImageConfig

    from glmq.models.configs import component_config
    from glmq.quant.recipe import load_recipe
    from glmq.runtime.embedding import EMBEDDING, host_only_bytes
    from glmq.runtime.sizes import _stage_sizes

    recipe = None if recipe_name == "bf16" else load_recipe(recipe_name)
    named = {n: component_bytes(n, recipe) for n in ("vision_language_encoder", "transformer", "text_encoder", "vae")}
    ar_config = component_config("vision_language_encoder", "full")
    text = GlmImageConfig(**ar_config).text_config
    assert any(n == EMBEDDING for n, _ in named["vision_language_encoder"])
    # the runtime's own rule for the rows that stay on the host (glmq.runtime.sizes.stage_sizes uses it too)
    host_only = host_only_bytes({EMBEDDING: SimpleNamespace(shape=(text.vocab_size, text.hidden_size))}, ar_config, 2)
    return _stage_sizes(named, 1024, 1024, component_config("transformer", "full"), ar_config, host_only=host_only)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="default,tier16,bf16")
    ap.add_argument("--tiers", default="80,24,16,12,8,6")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from glmq.bench.provenance import provenance
    from glmq.errors import GlmqError
    from glmq.runtime.memory import (GiB, MemoryMode, Request, choose_mode, mode_for_request, plan_call,
                                     stage_peaks)

    tiers = [float(t) for t in args.tiers.split(",")]
    rows, weights, batches = [], {}, []
    for recipe in args.recipes.split(","):
        s = sizes_for(recipe)
        weights[recipe] = {k: round(getattr(s, k) / GiB, 3) for k in
                           ("ar_weights", "vision_weights", "glyph_weights", "dit_weights", "vae_weights")}
        for tier in tiers:
            budget = int(tier * GiB)
            try:
                base = choose_mode(s, budget)
            except GlmqError:
                base = None
            for label, (h, w, refs) in REQUESTS.items():
                req = Request(h, w, refs)
                row = {"recipe": recipe, "tier_gib": tier, "request": label, "pipeline_mode": str(base) if base else None}
                if base is None:
                    row.update(mode=None, fits=False,
                               offload_peak_gib=round(max(stage_peaks(s, MemoryMode.OFFLOAD, req).values()) / GiB, 2))
                else:
                    try:
                        mode = mode_for_request(s, budget, base, req)
                        peaks = stage_peaks(s, mode, req)
                        row.update(mode=str(mode), fits=True,
                                   peaks_gib={k: round(v / GiB, 2) for k, v in peaks.items()},
                                   largest_stage=max(peaks, key=peaks.get))
                    except GlmqError:
                        row.update(mode=None, fits=False,
                                   offload_peak_gib=round(max(stage_peaks(s, MemoryMode.OFFLOAD, req).values()) / GiB, 2))
                rows.append(row)
        for tier in tiers:  # a call of 8 text-to-image images at 1024x1024: how the plan splits it
            budget = int(tier * GiB)
            try:
                plan = plan_call(s, budget, choose_mode(s, budget), [Request(1024, 1024)] * 8)
                batches.append({"recipe": recipe, "tier_gib": tier, "images": 8, "mode": str(plan.mode),
                                "dit_batch": plan.dit_batch, "ar_batch": plan.ar_batch})
            except GlmqError as e:
                batches.append({"recipe": recipe, "tier_gib": tier, "images": 8, "mode": None, "reason": str(e)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"provenance": provenance(), "weights_gib_on_gpu": weights, "rows": rows, "batch_of_8": batches,
              "note": "estimates of glmq.runtime.memory for the released shapes; no GPU ran"}
    (out / "plan_tiers.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The memory plan for the released shapes (estimates, no GPU)", "",
             "Weights on the GPU (GiB): " + "; ".join(f"{r}: " + ", ".join(f"{k} {v}" for k, v in w.items())
                                                      for r, w in weights.items()), "",
             "| recipe | tier GiB | request | mode | largest stage | its peak on the card GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["fits"]:
            lines.append(f"| {r['recipe']} | {r['tier_gib']:g} | {r['request']} | {r['mode']} | {r['largest_stage']} | "
                         f"{r['peaks_gib'][r['largest_stage']]} |")
        else:
            lines.append(f"| {r['recipe']} | {r['tier_gib']:g} | {r['request']} | does not fit | | "
                         f"{r.get('offload_peak_gib', '')} (offload) |")
    lines += ["", "A call of 8 text-to-image images at 1024x1024: images per DiT forward and sequences per AR step",
              "", "| recipe | tier GiB | mode | DiT batch | AR batch |", "|---|---|---|---|---|"]
    lines += [f"| {b['recipe']} | {b['tier_gib']:g} | {b['mode'] or 'does not fit'} | {b.get('dit_batch', '')} | "
              f"{b.get('ar_batch', '')} |" for b in batches]
    (out / "plan_tiers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
