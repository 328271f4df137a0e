"""End-to-end image error of 8-bit DiT attention against bf16 attention.

One pipeline (by default the ``default`` recipe on full-size random weights, built on the GPU), one set of AR
prior tokens and one initial noise; only the DiT attention precision changes between images, so the PSNR
measures the attention kernels alone. Writes ``attention_e2e.json`` and a side-by-side PNG into ``--out``.

    python benchmarks/bench_attention_e2e.py --model full-random --out $OUT/attn_e2e        # GPU
    python benchmarks/bench_attention_e2e.py --model tiny --size 64 --steps 4 --precisions bf16 --out /tmp/a  # CPU

(On the CPU the pipeline runs in fp32, which the 8-bit kernels do not take: the smoke run keeps bf16.)

CUDA graphs and torch.compile are off so each precision runs the same eager code; the DiT ms/step figures
are therefore eager timings, not the runtime's best.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPT = "A street poster that says 'GLM-Image on every GPU', photographed at dusk, 35mm"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "full-random"), default="full-random")
    ap.add_argument("--recipe", default="default", help="recipe quantized in place first ('bf16' for none)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--precisions", default="bf16,fp8,int8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    from PIL import Image

    from glmq.bench.report import image_strip
    from glmq.bench.run import environment, random_pipeline
    from glmq.quant.metrics import psnr
    from glmq.runtime.attention import install_dit_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = random_pipeline(args.model, args.recipe, device, attention="glmq", cuda_graph=False, compile=False)
    size = args.size
    # Random valid prior ids instead of running the AR: the same ids for every precision is what matters.
    cfg = pipe.transformer.config
    tokens = (size // 8 // cfg.patch_size) ** 2
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, tokens),
                          generator=torch.Generator().manual_seed(0)).to(device)
    rows, images = {}, {}
    for precision in args.precisions.split(","):
        install_dit_attention(pipe.transformer, precision=precision)
        t0 = time.perf_counter()
        img = pipe(PROMPT, height=size, width=size, num_inference_steps=args.steps, prior_token_ids=prior,
                   generator=torch.Generator().manual_seed(1), output_type="pt")
        if device.type == "cuda":
            torch.cuda.synchronize()
        images[precision] = img.float().clamp(0, 1).cpu()
        t = pipe.last_times
        rows[precision] = {"seconds": round(time.perf_counter() - t0, 3),
                           "dit_ms_per_step_eager": round(1000 * t.dit_s / max(t.dit_steps, 1), 2)}
        print(f"{precision}: {rows[precision]}", file=sys.stderr, flush=True)
    ref = images.get("bf16")
    for precision, img in images.items():
        if ref is not None and precision != "bf16":
            rows[precision]["psnr_db_vs_bf16_attention"] = round(float(psnr(ref, img)), 3)
            rows[precision]["max_abs_pixel_diff"] = round(float((ref - img).abs().max()), 4)
    result = {"environment": environment(device),
              "config": {"model": args.model, "recipe": args.recipe, "size": size, "steps": args.steps,
                         "prompt": PROMPT, "prior_seed": 0, "noise_seed": 1, "cuda_graph": False, "compile": False},
              "rows": rows}
    (out / "attention_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    image_strip({name: Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
                 for name, img in images.items()}, out / "attention_e2e.png")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
