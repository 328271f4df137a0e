"""The VAE's working set for encoding a reference and decoding an image, measured on the CPU at the released
VAE config (random weights, fp32), to size the memory plan's ``encode`` stage, which assumed the encoder needs
what the decoder needs (glmq.runtime.memory.vae_decode_bytes, calibrated on the decoder only).

Each measurement runs in a fresh process: build the VAE, reset the kernel's peak-RSS counter
(``/proc/self/clear_refs``), run one forward under ``no_grad``, and read the peak (``VmHWM``) minus the
resident size before the forward. fp32 values are 4 bytes; the GPU runs bf16 (2), so the bf16 estimate is
half. The decoder row checks the method against the GPU: the H100 measured 4.76 GiB for a 1024x1024 decode
(benchmarks/results/vae_tiles_h100/). Activations grow with the pixels, so the sizes here (below 1024, to fit
a CPU's time) are scaled by area to 1024x1024.

    python benchmarks/vae_working_set_cpu.py --sizes 256,512 --out benchmarks/results/vae_working_set_cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(part: str, side: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from glmq.models.configs import component_config

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(component_config("vae", "full")).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    x = (torch.rand(1, 3, side, side) * 2 - 1 if part == "encode"
         else torch.randn(1, vae.config.latent_channels, side // factor, side // factor))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = vae.encode(x).latent_dist.mode() if part == "encode" else vae.decode(x).sample
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"part": part, "side": side, "out_shape": list(out.shape), "seconds": round(seconds, 1),
            "working_set_fp32_gib": round((peak - before) * 1024 / 1024**3, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("PART", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    from glmq.bench.provenance import provenance

    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        for part in ("encode", "decode"):
            proc = subprocess.run([sys.executable, __file__, "--child", part, str(side)], capture_output=True,
                                  text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            scale = (1024 * 1024) / (side * side)
            row["bf16_at_1024_gib"] = round(row["working_set_fp32_gib"] / 2 * scale, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"provenance": provenance(), "rows": rows,
              "gpu_reference": {"decode_1024_bf16_gib": 4.76, "source": "benchmarks/results/vae_tiles_h100/"}}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vae_working_set.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
