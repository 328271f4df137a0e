"""Which of GLM-Image's sensitive layers can be quantized, and to what: the data behind each recipe's choice.

Question: for each layer group the recipes treat as sensitive (AR embed_tokens, lm_head, vision tower, VQ
codebook; DiT patch embedding, norm_out + proj_out, time/prior/glyph projections, AdaLN norm1.linear),
what does quantizing ONLY that group to each candidate format (int4 g128 / g64 asymmetric, int8, fp8
e4m3; round-to-nearest) cost, and what does it save?

Measured per (group, format):

- (a) weight SQNR on the real-shape tensors of the random-weight model (Gaussian init), and on a
  seeded outlier-injected version of each distinct shape (``glmq.evaluate.outliers.make_outlier_layer``:
  heavy-tailed weights; for linear layers also the output SQNR on the generator's outlier activations;
  at most ``OUTLIER_ROWS`` rows are drawn for the huge embedding tables);
- (b) model-level effect on a model with the released WIDTHS but ``LAYERS`` decoder/DiT/vision blocks
  (fits in about 6 GB; the released depth does not fit this machine): AR teacher-forced logits SQNR, KL
  and top-1 agreement over a 512x512 prompt's grids; vision-tower feature SQNR and reference-image VQ
  token agreement; DiT velocity SQNR at two timesteps (256x256 latents). Groups repeated per block
  (vision tower, AdaLN) are quantized in the ``LAYERS`` blocks present, so their model-level effect is
  per-``LAYERS``-blocks, not whole-model; the recipes' main quantized groups (decoder int4 g128, DiT
  blocks fp8) are measured the same way as a yardstick;
- (c) bytes saved over bf16 at the released size (every instance of the group in the full model).

Reading the numbers: the weights are random, so the model-level figures rank groups by how directly
they sit on the output path, not by what a trained checkpoint would lose. In the random DiT the blocks
barely move the velocity (all 2x6 block linears at fp8: ~60 dB), so its in/out path dominates.

Run: ``python benchmarks/bench_sensitivity.py`` (47 min at load 7 on 2 shared cores; peak RSS 9.7 GB).
Writes ``benchmarks/results/sensitivity_cpu2.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

LAYERS = 2
OUTLIER_ROWS = 16384
OUTLIER_ROWS_LOG = 4096  # rows drawn when completing rows read back from a log (--from-log)
SEED = 0
CHUNK = 16 * 1024 * 1024
CANDIDATES = {
    "int4_g128": ("int4", {"group_size": 128, "symmetric": False}),
    "int4_g64": ("int4", {"group_size": 64, "symmetric": False}),
    "int8": ("int8", {}),
    "fp8_e4m3": ("fp8_e4m3", {}),
}
# group -> (component, parameter-name patterns, kind of model-level metric)
GROUPS = {
    "ar.embed_tokens": ("vision_language_encoder", ["model.language_model.embed_tokens.weight"], "ar"),
    "ar.lm_head": ("vision_language_encoder", ["lm_head.weight"], "ar"),
    "ar.vision_tower": ("vision_language_encoder", ["model.visual.blocks.*.attn.*.weight",
                                                   "model.visual.blocks.*.mlp.*.weight"], "vision"),
    "ar.vq_codebook": ("vision_language_encoder", ["model.vqmodel.quantize.embedding.weight"], "vision"),
    "dit.patch_embed": ("transformer", ["image_projector.proj.weight"], "dit"),
    "dit.prior_token_embedding": ("transformer", ["prior_token_embedding.weight"], "dit"),
    "dit.norm_out_proj_out": ("transformer", ["norm_out.linear.weight", "proj_out.weight"], "dit"),
    "dit.time_prior_glyph_proj": ("transformer", ["time_condition_embed.*.weight", "prior_projector.*.weight",
                                                  "glyph_projector.*.weight"], "dit"),
    "dit.adaln_norm1": ("transformer", ["transformer_blocks.*.norm1.linear.weight"], "dit"),
    # yardsticks: what the recipes already quantize
    "ref.ar_decoder_linears": ("vision_language_encoder", ["model.language_model.layers.*.self_attn.*_proj.weight",
                                                          "model.language_model.layers.*.mlp.*.weight"], "ar"),
    "ref.dit_block_linears": ("transformer", ["transformer_blocks.*.attn1.to_*.weight",
                                              "transformer_blocks.*.ff.net.*.weight"], "dit"),
}
LINEAR_GROUP_KINDS = {"ar.embed_tokens": False, "ar.vq_codebook": False, "dit.prior_token_embedding": False}


def reduced_config(comp: str) -> dict:
    """The released config with ``LAYERS`` blocks (widths unchanged)."""
    from glmq.models.configs import component_config

    cfg = component_config(comp, "full")
    if comp == "vision_language_encoder":
        cfg.setdefault("text_config", {})["num_hidden_layers"] = LAYERS
        cfg.setdefault("vision_config", {})["depth"] = LAYERS
    else:
        cfg["num_layers"] = LAYERS
    return cfg


def group_names(model, patterns) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 2 and any(fnmatch.fnmatchcase(n, q) for q in patterns)]


def full_counts(comp: str, patterns) -> list[tuple[int, int]]:
    """Shapes of every tensor of the group in the released (full-depth) model, on the meta device."""
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    model = build_model(BY_NAME[comp], component_config(comp, "full"))
    return [tuple(model.get_parameter(n).shape) for n in group_names(model, patterns)]


@torch.no_grad()
def fake_quantize_(t: torch.Tensor, fmt) -> tuple[float, float]:
    """Replace ``t`` [N, K] in place by its RTN quantize-dequantize, in row blocks; returns (signal, noise)."""
    from glmq.quant.algorithms import get_algorithm

    rtn = get_algorithm("rtn")
    rows = max(1, CHUNK // t.shape[1])
    sig = noise = 0.0
    for r0 in range(0, t.shape[0], rows):
        ref = t[r0:r0 + rows].float()
        deq = fmt.dequantize(rtn.quantize_weight(fmt, ref), tuple(ref.shape))
        sig += float(ref.double().square().sum())
        noise += float((deq - ref).double().square().sum())
        t[r0:r0 + rows].copy_(deq)
    return sig, noise


def db(sig, noise):
    import math

    return round(10 * math.log10(sig / noise), 3) if noise > 0 and sig > 0 else None


def outlier_weight_stats(shape, fmt, linear: bool, rows: int = OUTLIER_ROWS) -> dict:
    from glmq.quant.metrics import sqnr_db
    from glmq.evaluate.outliers import make_outlier_layer

    n, k = shape
    rows = min(n, rows)
    lay = make_outlier_layer(rows, k, n_tokens=256, seed=SEED)
    w = lay.weight.clone()
    sig, noise = fake_quantize_(w, fmt)
    out = {"rows_drawn": rows, "weight_sqnr_db": db(sig, noise)}
    if linear:
        x = lay.activations
        out["output_sqnr_db"] = round(sqnr_db(x @ lay.weight.T, x @ w.T), 3)
    return out


def bf16_round_(model):
    """Round every float parameter to bf16 values (the release is bf16) so bf16 backups are exact."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.bfloat16().float())


def main() -> None:
    from glmq.bench.provenance import provenance
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model, build_processor
    from glmq.evaluate import fidelity
    from glmq.quant.formats import get_format

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sensitivity_cpu2"))
    ap.add_argument("--groups", default=None, help="comma list of groups")
    ap.add_argument("--formats", default=None, help="comma list of candidate formats (default: all)")
    ap.add_argument("--from-log", action="append", default=[],
                    help="take rows (weight SQNR on the model, model level) from an earlier run's stdout instead of "
                         "recomputing them (repeatable); outlier statistics (on OUTLIER_ROWS_LOG rows) and bytes "
                         "are recomputed")
    args = ap.parse_args()
    groups = {g: v for g, v in GROUPS.items() if not args.groups or g in args.groups.split(",")}
    candidates = {k: v for k, v in CANDIDATES.items() if not args.formats or k in args.formats.split(",")}
    t_start = time.perf_counter()
    rows = [r for log in args.from_log for r in rows_from_log(Path(log).read_text())]
    groups = {g: v for g, v in groups.items() if g not in {r["group"] for r in rows}}
    loads = [os.getloadavg()]

    for comp in ("vision_language_encoder", "transformer"):
        todo = {g: v for g, v in groups.items() if v[0] == comp}
        if not todo:
            continue
        torch.manual_seed(SEED)
        model = build_model(BY_NAME[comp], reduced_config(comp), device="cpu").eval()
        bf16_round_(model)
        print(f"{comp}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params at {LAYERS} blocks", flush=True)
        if comp == "vision_language_encoder":
            processor = build_processor()
            seq, prompt_len = fidelity.ar_grid_sequence(processor, model.config, SEED, px=512)
            pix, thw = reference_image(processor)

            def measure(kind):
                with torch.no_grad():
                    if kind == "ar":
                        return {"logits": fidelity.ar_grid_logits(model, seq, prompt_len)}
                    feats = model.model.get_image_features(pix, thw).pooler_output
                    return {"features": torch.cat([f.flatten() for f in feats]),
                            "tokens": model.model.get_image_tokens(feats, thw)}
        else:
            inputs = fidelity.dit_inputs(model.config, 256 // 8, SEED)

            def measure(kind):
                with torch.no_grad():
                    return {str(t): fidelity.dit_velocity(model, inputs, t) for t in (999, 500)}

        kinds = {v[2] for v in todo.values()}
        base = {kind: measure(kind) for kind in kinds}
        for g, (_, patterns, kind) in todo.items():
            names = group_names(model, patterns)
            shapes_full = full_counts(comp, patterns)
            backup = {n: model.get_parameter(n).detach().bfloat16().clone() for n in names}
            for label, (fname, params) in candidates.items():
                fmt = get_format(fname, **params)
                row = {"group": g, "component": comp, "format": label, "tensors_in_test_model": len(names),
                       "tensors_in_release": len(shapes_full)}
                try:
                    for n in names:
                        fmt.check(tuple(model.get_parameter(n).shape))
                except Exception as e:  # noqa: BLE001 - a format that cannot store a shape is a result
                    row["not_applicable"] = str(e).split(";")[0]
                    rows.append(row)
                    print(f"  {g:<28} {label:<9} n/a ({row['not_applicable']})", flush=True)
                    continue
                t0 = time.perf_counter()
                sig = noise = 0.0
                for n in names:
                    s, q = fake_quantize_(model.get_parameter(n).data, fmt)
                    sig, noise = sig + s, noise + q
                row["weight_sqnr_db_random"] = db(sig, noise)
                row["outlier"] = {f"{a}x{b}": outlier_weight_stats((a, b), fmt, LINEAR_GROUP_KINDS.get(g, True))
                                  for a, b in sorted(set(shapes_full))}
                got = measure(kind)
                row["model_level"] = compare(kind, base[kind], got)
                bf16 = sum(a * b * 2 for a, b in shapes_full)
                row["bytes_bf16_release"] = bf16
                row["bytes_saved_release"] = bf16 - sum(fmt.nbytes((a, b)) for a, b in shapes_full)
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(f"  {g:<28} {label:<9} wSQNR {row['weight_sqnr_db_random']} dB, model {row['model_level']}, "
                      f"saves {row['bytes_saved_release'] / 1e6:.0f} MB ({row['seconds']} s)", flush=True)
                with torch.no_grad():
                    for n in names:
                        model.get_parameter(n).copy_(backup[n].float())
            del backup
        loads.append(os.getloadavg())
        del model, base
        gc.collect()

    result = {
        "card": "CPU 2 cores (shared with other jobs: see loadavg)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "diffusers": __import__("diffusers").__version__, "glmq": __import__("glmq").__version__},
        "test_model": f"released widths, {LAYERS} AR decoder / vision / DiT blocks, random init rounded to bf16",
        "algorithm": "rtn",
        "seed": SEED,
        "loadavg_samples": loads + [os.getloadavg()],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "seconds": round(time.perf_counter() - t_start, 1),
        "method": __doc__.split("Measured per (group, format):", 1)[1].split("Run:")[0].strip(),
        "rows": rows,
        "provenance": provenance(),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def rows_from_log(text: str) -> list[dict]:
    """AR rows printed by an earlier run (``--ar-log``), completed with outlier statistics and bytes."""
    import ast

    from glmq.quant.formats import get_format

    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] not in GROUPS:
            continue
        g, label = parts[0], parts[1]
        comp, patterns, _ = GROUPS[g]
        fmt = get_format(CANDIDATES[label][0], **CANDIDATES[label][1])
        shapes_full = full_counts(comp, patterns)
        row = {"group": g, "component": comp, "format": label, "tensors_in_release": len(shapes_full),
               "from_log_of_first_run": True}
        if parts[2] == "n/a":
            row["not_applicable"] = line.split("n/a (", 1)[1].rstrip(")")
            rows.append(row)
            continue
        row["weight_sqnr_db_random"] = float(parts[3])
        row["outlier"] = {f"{a}x{b}": outlier_weight_stats((a, b), fmt, LINEAR_GROUP_KINDS.get(g, True),
                                                           rows=OUTLIER_ROWS_LOG)
                          for a, b in sorted(set(shapes_full))}
        row["model_level"] = ast.literal_eval(line.split("model ", 1)[1].rsplit(", saves", 1)[0])
        bf16 = sum(a * b * 2 for a, b in shapes_full)
        row["bytes_bf16_release"] = bf16
        row["bytes_saved_release"] = bf16 - sum(fmt.nbytes((a, b)) for a, b in shapes_full)
        rows.append(row)
    return rows


def reference_image(processor):
    """A seeded random 256x256 RGB reference image through the processor: (pixel_values, grid_thw)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SEED)
    img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    out = processor.image_processor(images=[img], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def compare(kind, ref, got) -> dict:
    from glmq.evaluate import fidelity

    if kind == "ar":
        return fidelity.compare_logits(ref["logits"], got["logits"])
    if kind == "vision":
        feat = fidelity.sqnr(ref["features"], got["features"])  # inf (identical) when only the codebook changed
        return {"vision_feature_sqnr_db": feat if math.isfinite(feat) else None,
                "vq_token_agreement": round(float((ref["tokens"] == got["tokens"]).float().mean()), 4)}
    return {f"velocity_sqnr_db_t{t}": fidelity.sqnr(ref[t], got[t]) for t in ref}


def markdown(res: dict) -> str:
    from glmq.bench.provenance import provenance_markdown

    lines = [f"# Sensitive-layer sweep, {res['card']}", "",
             provenance_markdown(res["provenance"]) if "provenance" in res else "Provenance: not recorded.",
             f"{res['date']}; torch {res['versions']['torch']}, transformers {res['versions']['transformers']}, "
             f"diffusers {res['versions']['diffusers']}, glmq {res['versions']['glmq']}. Test model: "
             f"{res['test_model']}; RTN; seed {res['seed']}; peak RSS {res['peak_rss_gb']} GB; "
             f"{res['seconds']} s; load averages {[round(x[0], 1) for x in res['loadavg_samples']]}.", "",
             "Model-level columns: AR = teacher-forced logits SQNR dB / mean KL / top-1 agreement; vision = "
             "feature SQNR dB / VQ token agreement on a reference image; DiT = velocity SQNR dB at t=999 / "
             "t=500. Outlier = weight SQNR (and output SQNR for linears) on synthetic heavy-tailed weights "
             "with outlier activations at the same shape (worst shape shown). Saved = bytes over bf16 in "
             "the released model.", "",
             "| group | format | weight SQNR (random) | outlier weight / output SQNR | model level | saved |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "not_applicable" in r:
            lines.append(f"| {r['group']} | {r['format']} | n/a: {r['not_applicable']} | | | |")
            continue
        ow = min(v["weight_sqnr_db"] for v in r["outlier"].values())
        oo = [v["output_sqnr_db"] for v in r["outlier"].values() if "output_sqnr_db" in v]
        ml = r["model_level"]
        if "kl_mean" in ml:
            m = f"{ml['logits_sqnr_db']} dB / KL {ml['kl_mean']} / top-1 {ml['top1_agreement']:.1%}"
        elif "vq_token_agreement" in ml:
            feat = "features unchanged" if ml["vision_feature_sqnr_db"] is None else f"{ml['vision_feature_sqnr_db']} dB"
            m = f"{feat} / tokens {ml['vq_token_agreement']:.1%}"
        else:
            m = " / ".join(f"{v} dB" for v in ml.values())
        lines.append(f"| {r['group']} | {r['format']} | {r['weight_sqnr_db_random']} | {ow}"
                     f"{' / ' + str(min(oo)) if oo else ''} | {m} | {r['bytes_saved_release'] / 1e6:.0f} MB |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
