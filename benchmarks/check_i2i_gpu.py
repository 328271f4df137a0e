"""Image-to-image at full size on the GPU: one and two reference images through glmq's runtime.

The ``default`` recipe on full-size random weights (built on the GPU, quantized in place), resident, CUDA
graphs on, torch.compile off (so no image pays a compilation; the timings are the uncompiled runtime's).
A text-to-image result becomes the first reference, a 768x1024 resize of it the second. Each image-to-image
configuration runs twice with the same seed: the first call captures its graphs, the second is timed and
must reproduce the first. Writes ``i2i.json`` and a strip of the images into ``--out``.

    python benchmarks/check_i2i_gpu.py --out $OUT/i2i                                  # GPU
    python benchmarks/check_i2i_gpu.py --model tiny --size 64 --steps 2 --out /tmp/i2i  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT = "Make the poster say 'glmq' in bold red letters, keep everything else"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "full-random"), default="full-random")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from glmq.bench.report import image_strip
    from glmq.bench.run import environment, random_pipeline, stage_dict

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = random_pipeline(args.model, args.recipe, device, compile=False)
    size, steps = args.size, args.steps
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731

    def peak_gib():
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None

    base = pipe("A street poster that says 'GLM-Image on every GPU'", height=size, width=size,
                num_inference_steps=steps, generator=seed())[0]
    second = base.resize((size * 3 // 4, size))
    images, rows = {"reference (t2i)": base}, {}
    for name, refs in (("one reference", [base]), ("two references", [base, second])):
        runs = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            img = pipe(PROMPT, image=refs, height=size, width=size, num_inference_steps=steps, generator=seed())[0]
            t = pipe.last_times
            runs.append((img, t, peak_gib(), pipe.last_prior_token_ids.clone()))
        (img1, _, _, prior1), (img2, t, peak, prior2) = runs
        a, b = np.asarray(img1, dtype=np.int16), np.asarray(img2, dtype=np.int16)
        rows[name] = {
            "seconds": round(t.total_s, 3), "ar_tokens": t.ar_tokens, **stage_dict(t),
            "peak_allocated_gib": peak, "image_size": list(img2.size), "pixel_std": round(float(b.std()), 2),
            "same_seed_prior_tokens_equal": round(float((prior1 == prior2).float().mean()), 4),
            "same_seed_max_pixel_diff": int(np.abs(a - b).max()),
        }
        images[name] = img2
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    result = {"environment": environment(device),
              "config": {"model": args.model, "recipe": args.recipe, "size": size, "steps": steps, "prompt": PROMPT,
                         "mode": pipe.mode, "cuda_graph": pipe.cuda_graph, "compile": False},
              "rows": rows}
    (out / "i2i.json").write_text(json.dumps(result, indent=2) + "\n")
    image_strip(images, out / "i2i.png")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
