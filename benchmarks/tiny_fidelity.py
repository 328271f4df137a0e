"""How far each fidelity figure of the tiny model falls when one part of the model breaks.

The tests' fidelity thresholds (tests/conftest.py ``TINY_DEFAULT``) are set from the figures this script
records, and a threshold is only evidence if breaking any part of the model drops its figure well below it.
On a fresh tiny model (``glmq make-tiny``, seed 0) quantized by the ``default`` recipe, it records:

- the report's model-level figures (``glmq.evaluate.fidelity``): AR logits SQNR over a teacher-forced grid,
  DiT velocity SQNR at five timesteps, image PSNR (same prior tokens and noise, 20 steps), with quantized
  layers computed as the runtime computes them, and the same figures with W8A8 layers run weight-only;
- with each part of the model zeroed at run time (``glmq.evaluate.faults``): the DiT velocity SQNR of the
  bf16 model against itself intact (each block's attention and MLP, each block linear, glyph and prior
  projectors), the image PSNR of the quantized runtime pipeline (``glmq.load``, W8A8 layers on the kernels'
  reference path) against the bf16 pipeline, and the AR logits SQNR against the intact AR.

    python benchmarks/tiny_fidelity.py --out benchmarks/results/tiny_fidelity_cpu2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

TIMESTEPS = (999, 750, 500, 250, 0)
PROMPT = "A lighthouse on a cliff, 'GLM' painted on it"


def measure(src: Path, q: Path, report: dict) -> dict:
    import torch

    import glmq
    from glmq.evaluate.faults import ar_parts, dit_parts, zeroed
    from glmq.evaluate.fidelity import (ar_grid_logits, ar_grid_sequence, compare_logits, dit_inputs,
                                        dit_velocity, load_as_run, load_dequantized)
    from glmq.io.reader import PipelineReader
    from glmq.quant.formats.linear import QuantLinear, as_run_on_gpu
    from glmq.quant.metrics import psnr, sqnr_db
    from transformers import GlmImageProcessor

    torch.set_grad_enabled(False)
    src_r, q_r = PipelineReader(src), PipelineReader(q)
    out: dict = {"report_model_level": report["model_level"]}

    # DiT velocity: the bf16 DiT with one part zeroed, against itself intact.
    dit = load_dequantized(src_r.component("transformer"))
    inputs = dit_inputs(dit.config, 8, 0)
    ref = {t: dit_velocity(dit, inputs, t) for t in TIMESTEPS}

    def velocity(model) -> dict:
        v = [sqnr_db(ref[t], dit_velocity(model, inputs, t)) for t in TIMESTEPS]
        return {"min": round(min(v), 2), "max": round(max(v), 2)}

    out["dit_velocity_sqnr_db"] = {
        "quantized_as_run": velocity(load_as_run(q_r.component("transformer"))),
        "quantized_weight_only": velocity(load_dequantized(q_r.component("transformer"))),
    }
    faults = {}
    for name, mod in dit_parts(dit).items():
        with zeroed(mod):
            faults[name] = velocity(dit)
    out["dit_velocity_sqnr_db"]["bf16_with_part_zeroed"] = faults

    # Image: the quantized runtime pipeline (W8A8 on the kernels' reference path) against the bf16 one.
    pipe, qpipe = glmq.load(src, device="cpu"), glmq.load(q, device="cpu")
    for m in qpipe.transformer.modules():
        if isinstance(m, QuantLinear):
            m.mode = as_run_on_gpu(m.mode)
    kw = dict(height=64, width=64, num_inference_steps=20, prior_token_ids=inputs["prior_token_id"],
              latents=inputs["hidden_states"], output_type="pt")
    ref_img = pipe(PROMPT, **kw)
    image = {"quantized_as_run": round(float(psnr(ref_img, qpipe(PROMPT, **kw))), 2)}
    faults = {}
    parts = {n: m for n, m in dit_parts(qpipe.transformer).items() if isinstance(m, QuantLinear)}
    parts.update(glyph_projector=qpipe.transformer.glyph_projector, glyph_encoder=qpipe.text_encoder,
                 prior_projector=qpipe.transformer.prior_projector)
    for name, mod in parts.items():
        with zeroed(mod):
            faults[name] = round(float(psnr(ref_img, qpipe(PROMPT, **kw))), 2)
    image["quantized_with_part_zeroed"] = faults
    out["image_psnr_db"] = image

    # AR logits: the bf16 AR with one part zeroed, against itself intact.
    ar = load_dequantized(src_r.component("vision_language_encoder"))
    processor = GlmImageProcessor.from_pretrained(src / "processor")
    seq, prompt_len = ar_grid_sequence(processor, ar.config, 0)
    ref_logits = ar_grid_logits(ar, seq, prompt_len)
    faults = {}
    for name, mod in ar_parts(ar).items():
        with zeroed(mod):
            faults[name] = compare_logits(ref_logits, ar_grid_logits(ar, seq, prompt_len))
    out["ar_logits"] = {"quantized_as_run": report["model_level"]["ar"], "bf16_with_part_zeroed": faults}
    return out


def markdown(result: dict) -> str:
    from glmq.bench.provenance import provenance_markdown

    ml = result["figures"]["report_model_level"]
    f = result["figures"]
    lines = ["# Tiny model: fidelity figures and what breaking one part does to them", "",
             provenance_markdown(result["provenance"]), "",
             f"`default` recipe on `glmq make-tiny` (seed 0), CPU. Report (as run): AR logits SQNR "
             f"{ml['ar']['logits_sqnr_db']} dB, DiT velocity SQNR {ml['dit']['velocity_sqnr_db']} dB, image PSNR "
             f"{ml['image']['psnr_db']} dB. A break zeroes one part's output at run time; its figure is the "
             "statistic the tests bound (velocity: the minimum over the five timesteps).", "",
             "| figure | quantized (as run) | W8A8 run weight-only | highest figure of a break | that part |",
             "|---|---|---|---|---|"]
    v = f["dit_velocity_sqnr_db"]
    name, worst = max(v["bf16_with_part_zeroed"].items(), key=lambda kv: kv[1]["min"])
    lines.append(f"| DiT velocity SQNR, min over t (dB) | {v['quantized_as_run']['min']} | "
                 f"{v['quantized_weight_only']['min']} | {worst['min']} | {name} |")
    im = f["image_psnr_db"]
    name, worst = max(im["quantized_with_part_zeroed"].items(), key=lambda kv: kv[1])
    lines.append(f"| image PSNR (dB) | {im['quantized_as_run']} | - | {worst} | {name} |")
    a = f["ar_logits"]
    for label, keep in (("any attention or MLP output, or v/o/gate_up/down", lambda n: not n.endswith(("q_proj", "k_proj"))),
                        ("q_proj or k_proj (attention made uniform)", lambda n: n.endswith(("q_proj", "k_proj")))):
        name, worst = max(((n, x) for n, x in a["bf16_with_part_zeroed"].items() if keep(n)),
                          key=lambda kv: kv[1]["logits_sqnr_db"])
        lines.append(f"| AR logits SQNR (dB), break of {label} | {a['quantized_as_run']['logits_sqnr_db']} | - | "
                     f"{worst['logits_sqnr_db']} | {name} |")
    lines += ["", "Every part, one at a time: `tiny_fidelity.json`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (JSON and Markdown)")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLMQ_OUTLIER_EVAL_SIZE", "tiny")

    from importlib.metadata import version

    from glmq.bench.provenance import provenance
    from glmq.evaluate.quantize import quantize
    from glmq.maketiny import make_tiny

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src = make_tiny(Path(tmp) / "tiny", progress=False)
        report = quantize(src, Path(tmp) / "q", progress=False)
        figures = measure(src, Path(tmp) / "q", report)
    result = {
        "provenance": provenance(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": {n: version(n) for n in ("torch", "transformers", "diffusers")},
        "model": "glmq make-tiny, seed 0 (fan-in scaled init)",
        "recipe": "default",
        "seconds": round(time.perf_counter() - t0, 1),
        "figures": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiny_fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "tiny_fidelity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
