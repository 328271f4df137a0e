"""VAE decode of 1024x1024 and 2048x2048 latents on the GPU: in one piece vs glmq's tiles; time, peak, PSNR.

Full-size GLM-Image VAE (released config, random bf16 weights). Writes vae_tiles.json and vae_tiles.md into
the folder given as the first argument. The 32-pixel tiles diffusers derives from the release's
``sample_size`` are timed in the end-to-end run (benchmarks/results/e2e_h100/glmq2048_vae_tiles32/),
not here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import torch

from glmq.bench.provenance import provenance, provenance_markdown
from glmq.io.layout import BY_NAME
from glmq.models.build import build_model
from glmq.models.configs import component_config
from glmq.runtime.memory import vae_decode_bytes
from glmq.runtime.vae import decode_tiled

GiB = 1 << 30


def timed(fn, reps: int = 3):
    fn()  # warm-up: cuDNN algorithm choice, allocator growth
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base
    return out, sorted(times)[len(times) // 2], peak


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    img = lambda x: (x.float() / 2 + 0.5).clamp(0, 1)  # noqa: E731 - the pipeline's [0, 1] image
    mse = float(((img(a) - img(b)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@torch.no_grad()
def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    vae = build_model(BY_NAME["vae"], component_config("vae", "full"), device="cuda").eval()
    torch.set_default_dtype(torch.float32)
    rows = []
    for pixels in (1024, 2048):
        z = torch.randn(1, 16, pixels // 8, pixels // 8, device="cuda", dtype=torch.bfloat16,
                        generator=torch.Generator("cuda").manual_seed(pixels))
        whole, t_whole, peak_whole = timed(lambda: vae.decode(z, return_dict=False)[0])
        rows.append({"size": pixels, "how": "whole", "s": round(t_whole, 4), "peak_gib": round(peak_whole / GiB, 3),
                     "estimate_gib": round(vae_decode_bytes(pixels, pixels) / GiB, 3)})
        for tile in (512, 1024):
            if tile >= pixels:
                continue
            got, t, peak = timed(lambda: decode_tiled(vae, z, tile=tile))
            rows.append({"size": pixels, "how": f"tiles of {tile}", "s": round(t, 4), "peak_gib": round(peak / GiB, 3),
                         "psnr_vs_whole_db": round(psnr(got, whole), 2),
                         "max_abs_diff": round(float((got.float() - whole.float()).abs().max()), 4)})
        del whole
        torch.cuda.empty_cache()
    env = {"card": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    prov = provenance()
    (out / "vae_tiles.json").write_text(json.dumps({"environment": env, "provenance": prov, "rows": rows}, indent=2))
    lines = [f"# VAE decode, full-size GLM-Image VAE (random bf16 weights): {env['card']}", "",
             f"{env['date']}; torch {env['torch']}, CUDA {env['cuda']}, diffusers {env.get('diffusers')}. "
             "Median of 3 after a warm-up; peak = allocated above the latents and weights.",
             provenance_markdown(prov), "",
             "| size | decode | s | peak GiB | estimate GiB | PSNR vs whole (dB) | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['how']} | {r['s']} | {r['peak_gib']} | {r.get('estimate_gib', '-')} | "
                     f"{r.get('psnr_vs_whole_db', '-')} | {r.get('max_abs_diff', '-')} |")
    (out / "vae_tiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
