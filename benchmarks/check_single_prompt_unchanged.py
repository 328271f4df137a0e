"""Does a single-prompt call make exactly the image it made before batching? This tree against a base tree.

Each tree runs the same calls in a process of its own (the tiny model, or a folder given with ``--model``,
the same seeds) and saves what came out: the AR's tokens and the image or latents. The outputs must be
bit-identical: a batched pipeline has to leave one-image calls as they were.

    python benchmarks/check_single_prompt_unchanged.py --base-tree /tmp/base \
        --out benchmarks/results/single_prompt_unchanged_cpu2.json

``--base-tree``: a checkout of the commit to compare against, e.g. ``git worktree add /tmp/base main`` (or
``git archive main | tar -x -C /tmp/base``) with ``glmq/kernels`` linked to its ``kernels/`` (the script
makes the link when it is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a shop sign that says 'glmq' over a door"


def cases(device: str):
    """(name, call kwargs) of the single-prompt calls compared; references are built in the child."""
    size = dict(height=64, width=64) if device == "cpu" else dict(height=1024, width=1024)
    steps = 3 if device == "cpu" else 8
    return [
        ("t2i_seed0", dict(**size, num_inference_steps=steps, seed=0)),
        ("t2i_seed7", dict(**size, num_inference_steps=steps, seed=7)),
        ("t2i_wide", dict(height=size["height"], width=size["width"] * 3 // 2, num_inference_steps=steps, seed=1)),
        ("t2i_no_guidance", dict(**size, num_inference_steps=steps, seed=2, guidance_scale=1.0)),
        ("t2i_latent", dict(**size, num_inference_steps=steps, seed=3, output_type="latent")),
        ("i2i_one_ref", dict(**size, num_inference_steps=steps, seed=4, refs=1)),
        ("i2i_two_refs", dict(**size, num_inference_steps=steps, seed=5, refs=2)),
    ]


def child(model_dir: str, device: str, out: str) -> None:
    import torch
    from PIL import Image

    import glmq

    torch.set_num_threads(1)
    pipe = glmq.load(model_dir, device=device)
    g = torch.Generator().manual_seed(123)
    ref = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    wide = Image.fromarray((torch.rand(48, 80, 3, generator=g) * 255).byte().numpy())
    saved = {"glmq_file": glmq.__file__}
    for name, kw in cases(device):
        kw = dict(kw)
        seed, refs = kw.pop("seed"), kw.pop("refs", 0)
        output_type = kw.pop("output_type", "pt")
        image = [ref, wide][:refs] or None
        result = pipe(PROMPT, image=image, generator=torch.Generator().manual_seed(seed), output_type=output_type,
                      **kw)
        saved[name] = {"out": result.float().cpu(), "tokens": pipe.last_prior_token_ids.clone()}
    torch.save(saved, out)


def run_tree(tree: Path, model_dir: Path, device: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--device", device, "--child-out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: child failed:\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-tree", type=Path)
    ap.add_argument("--base-commit", default=None, help="the commit the base tree holds (recorded; default: its git)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, default=None, help="a GLM-Image folder (default: a fresh tiny model)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", default=None)
    ap.add_argument("--child-out", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.child_out)
        return 0
    import torch

    from glmq.bench.provenance import provenance

    base = args.base_tree.resolve()
    if not (base / "glmq" / "kernels").exists():
        (base / "glmq" / "kernels").symlink_to(base / "kernels")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from glmq.maketiny import make_tiny

            model = make_tiny(tmp / "tiny", progress=False)
        run_tree(base, model, args.device, tmp / "base.pt")
        run_tree(REPO, model, args.device, tmp / "this.pt")
        before = torch.load(tmp / "base.pt", weights_only=True)
        after = torch.load(tmp / "this.pt", weights_only=True)
    assert Path(before["glmq_file"]).resolve().is_relative_to(base), before["glmq_file"]
    assert Path(after["glmq_file"]).resolve().is_relative_to(REPO), after["glmq_file"]
    rows = []
    for name, _ in cases(args.device):
        a, b = before[name], after[name]
        rows.append({"case": name, "tokens_identical": bool(torch.equal(a["tokens"], b["tokens"])),
                     "output_identical": bool(torch.equal(a["out"], b["out"])),
                     "output_max_abs_diff": float((a["out"] - b["out"]).abs().max()),
                     "output_shape": list(b["out"].shape)})
    base_commit = args.base_commit or subprocess.run(["git", "-C", str(base), "rev-parse", "HEAD"],
                                                     capture_output=True, text=True, check=False).stdout.strip() or None
    result = {"benchmark": "single_prompt_unchanged", "provenance": provenance(), "base_tree": str(base),
              "base_commit": base_commit, "device": args.device, "torch": torch.__version__,
              "model": str(args.model) if args.model else "tiny (glmq make-tiny, seed 0)",
              "all_identical": all(r["tokens_identical"] and r["output_identical"] for r in rows), "rows": rows}
    print(f"{'case':<18} {'tokens':>8} {'output':>8} {'max |diff|':>12}")
    for r in rows:
        print(f"{r['case']:<18} {str(r['tokens_identical']):>8} {str(r['output_identical']):>8} "
              f"{r['output_max_abs_diff']:>12.3g}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
