"""The ``glmq`` command: thin argument parsing over the library's functions.

User errors (bad paths, corrupt files, existing outputs, bad flags) print one line on stderr and exit with
code 2, without a traceback. ``--json`` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

from glmq.interrupt import Interrupts, exit_interrupted

EXIT_USER_ERROR = 2
DEVICE_KINDS = ("cpu", "cuda")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit code 2), pointing at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite_float(*, positive: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; whether the device exists is checked by :func:`_check_device`."""
    kind, sep, index = text.partition(":")
    if kind not in DEVICE_KINDS or (sep and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: cpu, cuda, cuda:N")
    return text


def _check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have (one line instead of a CUDA traceback)."""
    from glmq.errors import GlmqError

    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise GlmqError(f"--device {device} was given but no CUDA GPU is available (use --device cpu)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise GlmqError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


SEED = _int_at_least(0, 2**64 - 1)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from glmq.maketiny import make_tiny

    out = make_tiny(args.out, size=args.size, seed=args.seed, force=args.force, progress=not args.json)
    if args.json:
        from glmq.inspect import inspect_pipeline

        print(json.dumps(inspect_pipeline(out, verify_hashes=False), indent=2))
    else:
        print(f"wrote {out} (GLM-Image pipeline, {args.size} size, random weights, seed {args.seed})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from glmq.errors import CheckpointError
    from glmq.inspect import format_report, inspect_pipeline

    report = inspect_pipeline(args.path, verify_hashes=not args.quick)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    manifest = report["manifest"]
    if manifest["present"] and not manifest["verified"]:
        raise CheckpointError(f"{args.path}: manifest verification failed: {manifest['problems'][0]}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from glmq.evaluate.quantize import quantize
    from glmq.evaluate.report import summary_text

    _check_device(args.device)
    report = quantize(args.src, args.out, recipe=args.recipe, device=args.device, calib_prompts=args.calib_prompts,
                      force=args.force, progress=not args.json, evaluate=not args.no_eval,
                      layer_outputs=not args.no_layer_outputs)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(summary_text(report, args.out))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import glmq
    from glmq.io.images import check_image_out, parse_size, read_image, save_image

    width, height = parse_size(args.size)
    out = Path(args.out)
    prompts = _read_prompts(args.prompts) if args.prompts else None
    outs = [out] if prompts is None else _numbered(out, len(prompts))
    image_format = None
    for path in outs:
        image_format = check_image_out(path, force=args.force)
    images = [read_image(ref) for ref in args.image or []]
    if prompts is not None and images:
        from glmq.errors import GlmqError

        raise GlmqError("--prompts makes text-to-image images; --image takes one --prompt")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    if args.gpus != 1 or args.parallel:
        return _generate_two_gpus(args, prompts or [args.prompt], outs, image_format, width, height, device)
    pipe = glmq.load(args.path, device=device, vram_budget_gb=args.vram_budget_gb, mode=args.memory_mode,
                     attention=args.attention, attention_precision=args.attention_precision)
    if prompts is not None:  # one image per prompt, image i with seed + i
        seconds = []
        for i, (prompt, path) in enumerate(zip(prompts, outs)):
            result = pipe(prompt, height=height, width=width, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed + i),
                          progress=not args.json)
            save_image(result[0], path, image_format)
            seconds.append(pipe.last_times.total_s)
        return _report_many(args, outs, width, height, device, sum(seconds), f"{pipe.mode} on {device}")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    result = pipe(args.prompt, image=images or None, height=height, width=width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                  progress=not args.json)
    save_image(result[0], out, image_format)
    t = pipe.last_times
    summary = {"out": str(out), "size": [width, height], "steps": args.steps, "seed": args.seed,
               "device": device, "memory_mode": pipe.mode, "dit_attention": pipe.attention_precision,
               "seconds": round(t.total_s, 3),
               "ar_s": round(t.ar_s, 3), "ar_tokens": t.ar_tokens, "glyph_s": round(t.glyph_s, 3),
               "dit_s": round(t.dit_s, 3), "vae_s": round(t.vae_s, 3)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {out} ({width}x{height}, {args.steps} steps, seed {args.seed}) in {t.total_s:.2f} s "
              f"[AR {t.ar_s:.2f} s / {t.ar_tokens} tokens, DiT {t.dit_s:.2f} s, VAE {t.vae_s:.2f} s; "
              f"{pipe.mode} on {device}]")
    return 0


def _read_prompts(path: str) -> list[str]:
    """``--prompts FILE``: one prompt per non-empty line (UTF-8, at most 1 MiB)."""
    from glmq.errors import GlmqError
    from glmq.io.safe_read import read_bytes

    try:
        text = read_bytes(path, "prompts file", 1 << 20).decode("utf-8")
    except UnicodeDecodeError:
        raise GlmqError(f"{path}: the prompts file is not UTF-8 text") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GlmqError(f"{path}: no prompts (one prompt per line)")
    return prompts


def _numbered(out: Path, n: int) -> list[Path]:
    """``--prompts``' image paths: ``OUT``'s name with ``-000``, ``-001``, ... before its suffix."""
    return [out.with_name(f"{out.stem}-{i:03d}{out.suffix}") for i in range(n)]


def _report_many(args, outs: list[Path], width: int, height: int, device: str, seconds: float, how: str,
                 extra: dict | None = None) -> int:
    summary = {"out": [str(p) for p in outs], "images": len(outs), "size": [width, height], "steps": args.steps,
               "seeds": [args.seed + i for i in range(len(outs))], "device": device, "seconds": round(seconds, 3),
               **(extra or {})}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {len(outs)} image(s) {outs[0]} .. {outs[-1]} ({width}x{height}, {args.steps} steps, seeds "
              f"{args.seed}..{args.seed + len(outs) - 1}) in {seconds:.2f} s [{how}]")
    return 0


def _generate_two_gpus(args, prompts: list[str], outs: list[Path], image_format, width: int, height: int,
                       device: str) -> int:
    """``generate --gpus 2``: every prompt's image from one two-GPU pipeline, image i with seed + i."""
    import torch

    import glmq
    from glmq.errors import GlmqError
    from glmq.io.images import save_image

    if args.image:
        raise GlmqError("--image (image-to-image) runs on one GPU; --gpus 2 takes text-to-image prompts")
    if args.vram_budget_gb is not None or args.memory_mode is not None:
        raise GlmqError("--vram-budget-gb and --memory-mode apply to one GPU; with --gpus 2 each GPU keeps its "
                        "part resident")
    with glmq.load(args.path, device=device, gpus=args.gpus, parallel=args.parallel, attention=args.attention,
                   attention_precision=args.attention_precision) as pipe:
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]
        result = pipe(prompts, height=height, width=width, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, generator=gens, progress=not args.json)
        for image, path in zip(result, outs):
            save_image(image, path, image_format)
        call = pipe.last_call
        how = f"{pipe.parallel} on 2 {'GPUs' if device == 'cuda' else 'CPU processes'}"
        return _report_many(args, outs, width, height, device, call["wall_s"], how,
                            {"gpus": args.gpus, "parallel": pipe.parallel,
                             "images_per_hour": round(call["images_per_hour"], 1)})


def _readme_to_update(arg: str | None) -> Path | None:
    """``--update-readme [README]``'s file, checked before anything runs: a README given by path (default
    ``./README.md``), never one found relative to glmq's own files (a wheel install's site-packages)."""
    if arg is None:
        return None
    from glmq.bench.report import README_END, README_START
    from glmq.errors import GlmqError

    readme = Path(arg)
    if readme.is_dir():
        raise GlmqError(f"{readme}: a folder; --update-readme takes the README file to rewrite (a model PATH "
                        "goes before --update-readme)")
    try:
        text = readme.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GlmqError(f"{readme}: not a UTF-8 text file; --update-readme takes the README to rewrite") from None
    if README_START not in text or README_END not in text:
        raise GlmqError(f"{readme}: no '{README_START}' ... '{README_END}' markers for --update-readme to "
                        "fill (give the README that has them: --update-readme PATH)")
    return readme


def _parse_edits(text: str) -> tuple[int, ...]:
    from glmq.errors import GlmqError

    if text.strip().lower() == "none":
        return ()
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(c not in (1, 2) for c in counts):
        raise GlmqError(f"--edits takes reference counts 1 and/or 2 separated by commas, or 'none'; got {text!r}")
    return counts


def _cmd_bench(args: argparse.Namespace) -> int:
    from glmq.bench.report import markdown, merge_results, update_readme, write_outputs
    from glmq.bench.run import BenchConfig, run_bench
    from glmq.errors import GlmqError

    readme = _readme_to_update(args.update_readme)
    if args.from_json:
        from glmq.io.layout import read_json

        result = merge_results([read_json(Path(p), "benchmark result") for p in args.from_json])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(result, out)
        if readme is not None:
            update_readme(result, readme)
        print(json.dumps(result, indent=2) if args.json else markdown(result))
        return 0

    try:
        tiers = tuple(float(t) for t in args.tiers.split(",")) if args.tiers else None
    except ValueError:
        raise GlmqError(f"--tiers must be comma-separated GiB numbers, got {args.tiers!r}") from None
    if tiers is not None and not all(math.isfinite(t) and t > 0 for t in tiers):
        raise GlmqError(f"--tiers must be positive GiB numbers, got {args.tiers!r}")
    if args.device is not None:
        _check_device(args.device)
    from glmq.io.images import parse_size

    sizes = tuple(parse_size(s) for s in (args.size or ["1024x1024"]))
    edits = _parse_edits(args.edits)
    cfg = BenchConfig(path=Path(args.path) if args.path else None, model=args.model,
                      recipes=tuple(args.recipe or ["default"]), tiers=tiers, sizes=sizes, steps=args.steps,
                      images=args.images, baseline=args.baseline, profile=args.profile, seed=args.seed,
                      device=args.device, compile=not args.no_compile, attention=args.attention,
                      cuda_graph=not args.no_cuda_graph, warmup_steps=args.warmup_steps,
                      attention_precision=args.attention_precision, edits=edits, guidance=args.guidance,
                      gpus=args.gpus, throughput_images=args.throughput_images)
    if args.baseline_only:
        cfg.baseline, cfg.recipes = True, ()
    if cfg.path is None and args.model == "tiny":
        import tempfile

        from glmq.maketiny import make_tiny

        tmp = tempfile.TemporaryDirectory(prefix="glmq-bench-")
        cfg.path = make_tiny(Path(tmp.name) / "tiny", progress=False)
    result = run_bench(cfg, Path(args.out))
    if readme is not None:
        update_readme(result, readme)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    progress = not args.json
    if args.format == "hf":
        from glmq.export.hf import export_hf

        summary = export_hf(args.src, args.out, ar=args.ar, dit=args.dit, force=args.force, progress=progress)
    elif args.format == "gguf":
        from glmq.export.gguf_export import export_gguf

        summary = export_gguf(args.src, args.out, ar_type=args.ar_type, dit_type=args.dit_type, force=args.force,
                              progress=progress)
    elif args.format == "compressed-tensors":
        from glmq.export.compressed_tensors import export_compressed_tensors

        summary = export_compressed_tensors(args.src, args.out, recipe=args.recipe, force=args.force,
                                            progress=progress)
    else:
        from glmq.export.onnx_export import export_onnx

        summary = export_onnx(args.src, args.out, component=args.component, weights=args.weights, force=args.force,
                              group_size=args.group_size, opset=args.opset, int8_layout=args.int8_layout,
                              progress=progress)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"wrote {args.out} ({args.format} export of {args.src})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from glmq import __version__
    from glmq.models.configs import SIZES
    from glmq.bench.run import BENCH_MODELS
    from glmq.quant.recipe import ATTENTION_KERNELS, ATTENTION_PRECISIONS, available_recipes
    from glmq.runtime.memory import MemoryMode
    from glmq.runtime.parallel import PARALLEL_MODES

    parser = _Parser(prog="glmq", description="Quantize, export and run GLM-Image on ordinary GPUs.")
    parser.add_argument("--version", action="version", version=f"glmq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("make-tiny", help="write a GLM-Image pipeline folder with random weights",
                       description="Write a complete diffusers GLM-Image pipeline folder with random weights: "
                                   "'tiny' runs on a CPU in seconds, 'full' is the released architecture "
                                   "(about 36 GB, streamed).")
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--size", choices=SIZES, default="tiny", help="tiny (default) or full (the released sizes)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the new folder's inspect report as JSON")
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("inspect", help="show a GLM-Image folder's components and verify its files",
                       description="Show components, classes, parameter counts, dtypes, sizes and quantization "
                                   "of a GLM-Image pipeline folder, check every tensor against the configs, and "
                                   "verify glmq's sha256 manifest when present.")
    p.add_argument("path", help="a GLM-Image pipeline folder (the release, make-tiny or glmq output)")
    p.add_argument("--quick", action="store_true", help="check manifest sizes only, skip sha256")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("quantize", help="write a 4-bit AR / 8-bit DiT checkpoint, with a fidelity report",
                       description="Quantize a GLM-Image pipeline folder by a recipe, streaming tensor by tensor. "
                                   "An interrupted run resumes when the same command is rerun.")
    p.add_argument("src", help="GLM-Image pipeline folder (the release or make-tiny output)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    p.add_argument("--recipe", default="default",
                   help=f"recipe name ({', '.join(available_recipes())}) or a path to a .toml recipe")
    p.add_argument("--device", type=_device, default="cpu",
                   help="where quantization math runs: cpu (default), cuda or cuda:N")
    p.add_argument("--calib-prompts", default=None, metavar="FILE",
                   help="text file, one prompt per line, for calibrated algorithms (GPTQ) and the per-layer "
                        "output SQNR")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the model-level fidelity evaluation (AR logits, DiT velocity, image PSNR)")
    p.add_argument("--no-layer-outputs", action="store_true",
                   help="skip the per-layer output SQNR on calibration activations (one layer-by-layer pass over "
                        "the AR and the DiT; about doubles a CPU conversion)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the fidelity report as JSON")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("generate", help="generate an image (text-to-image or image-to-image)",
                       description="Generate an image with a GLM-Image folder (bf16, make-tiny or glmq-quantized).")
    p.add_argument("path", help="GLM-Image pipeline folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the prompt; quoted text in it is rendered by the glyph encoder")
    which.add_argument("--prompts", metavar="FILE",
                       help="one prompt per line, one image each: written as OUT's name plus -000, -001, ...; "
                            "image i uses seed + i")
    p.add_argument("--image", action="append", metavar="REF", help="reference image (repeat for several)")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, multiples of 32 (default 1024x1024)")
    p.add_argument("--steps", type=_int_at_least(1), default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=_finite_float(), default=1.5, help="classifier-free guidance scale (default 1.5)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed (default 0)")
    p.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--vram-budget-gb", type=_finite_float(positive=True), default=None,
                   help="plan memory for this many GiB")
    p.add_argument("--memory-mode", choices=[m.value for m in MemoryMode], default=None,
                   help="force a memory mode (default: chosen from the budget)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="attention kernels: glmq's Triton kernels (auto on CUDA) or PyTorch SDPA")
    p.add_argument("--attention-precision", choices=ATTENTION_PRECISIONS, default=None,
                   help="DiT attention precision of glmq's kernels (default: what the checkpoint's recipe chose)")
    p.add_argument("--gpus", type=int, choices=(1, 2), default=1,
                   help="2: run on two GPUs (--device cuda) or two CPU processes (--device cpu) (default 1)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="with --gpus 2: latency (default; tensor-parallel AR, one guidance pass per GPU) or "
                        "throughput (the AR of one image beside the DiT of the previous one)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print timings as JSON")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="write formats other runtimes load: hf (bitsandbytes), gguf, onnx, compressed-tensors",
                       description="Export a bf16 GLM-Image folder for other runtimes, streaming, atomically.")
    ex = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=_Parser)
    ex.required = True
    # Valid names come from the exporters' registries, which report them on a bad value (importing them here
    # would pull gguf and bitsandbytes into every glmq command).
    q = ex.add_parser("hf", help="diffusers folder with bitsandbytes weights that stock diffusers loads")
    q.add_argument("src")
    q.add_argument("--out", required=True)
    q.add_argument("--ar", default="nf4", help="AR linears: nf4 (default) or int8")
    q.add_argument("--dit", default="int8", help="DiT linears: int8 (default) or nf4")
    q = ex.add_parser("gguf", help="GGUF files: AR in llama.cpp conventions, DiT in ComfyUI-GGUF conventions")
    q.add_argument("src")
    q.add_argument("--out", required=True)
    q.add_argument("--ar-type", default="Q4_K_M", help="AR quantization: Q4_K_M (default) or Q8_0")
    q.add_argument("--dit-type", default="Q8_0", help="DiT quantization: Q8_0 (default), Q6_K, Q5_K_S or Q4_K_S")
    q = ex.add_parser("onnx", help="ONNX graphs (DiT step, VAE decoder, glyph encoder, AR decoder step)")
    q.add_argument("src")
    q.add_argument("--out", required=True)
    q.add_argument("--component", default="all", help="all (default), dit, vae, glyph or ar")
    q.add_argument("--weights", default="fp16", help="fp16 (default), fp32, int8 or int4 (AR as MatMulNBits)")
    q.add_argument("--int8-layout", default="matmulnbits",
                   help="8-bit weights as ONNX Runtime MatMulNBits bits=8 (default: loads in bounded memory) or "
                        "standard QDQ DequantizeLinear (other runtimes)")
    q.add_argument("--group-size", type=_int_at_least(1), default=128, help="int4 group size (default 128)")
    q.add_argument("--opset", type=_int_at_least(1), default=18, help="ONNX opset, 18 to 21 (default 18)")
    q = ex.add_parser("compressed-tensors",
                      help="compressed-tensors folders (vLLM, SGLang, transformers): AR W4A16, DiT FP8/INT8",
                      description="Write the AR as compressed-tensors W4A16 and the DiT's 8-bit layers as FP8/INT8, "
                                  "from a glmq-quantized folder (repacked) or a bf16 one (quantized by --recipe).")
    q.add_argument("src", help="a glmq-quantized or bf16 GLM-Image folder")
    q.add_argument("--out", required=True)
    q.add_argument("--recipe", default=None,
                   help="for a bf16 source: recipe name or .toml path (default: default); not with a quantized source")
    for q in ex.choices.values():
        q.add_argument("--force", action="store_true", help="replace OUT if it exists")
        q.add_argument("--json", action="store_true", help="print a JSON summary")
        q.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="seconds per image and peak VRAM per hardware tier, beside stock diffusers",
                       description="Benchmark glmq per recipe and GPU-memory tier (the allocator is capped to each "
                                   "tier), optionally beside stock diffusers bf16. Without a GPU the tiny model runs "
                                   "on the CPU. Writes bench.json, bench.md and bench.png into --out.")
    p.add_argument("path", nargs="?", help="a GLM-Image folder (default: --model)")
    p.add_argument("--model", choices=BENCH_MODELS, default="tiny",
                   help="without PATH: tiny (default) or the full architecture with random weights built on the GPU")
    p.add_argument("--recipe", action="append", help="recipe to benchmark (repeatable; 'bf16' for none); default: default")
    p.add_argument("--tiers", default=None, help="GPU memory tiers in GiB, comma-separated (default 80,32,24,16,12)")
    p.add_argument("--size", action="append", help="WIDTHxHEIGHT (repeatable; default 1024x1024)")
    p.add_argument("--steps", type=_int_at_least(1), default=50, help="denoising steps (default 50)")
    p.add_argument("--images", type=_int_at_least(1), default=1, help="timed images per configuration (default 1)")
    p.add_argument("--warmup-steps", type=_int_at_least(1), default=None,
                   help="denoising steps of the untimed warm-up image (default: --steps; fewer can leave "
                        "compilation for the full schedule to the timed image)")
    p.add_argument("--baseline", action="store_true", help="also run stock diffusers GlmImagePipeline in bf16")
    p.add_argument("--guidance", type=_finite_float(), default=1.5,
                   help="classifier-free guidance scale, for glmq and stock diffusers alike (default 1.5)")
    p.add_argument("--edits", default="1,2",
                   help="image-to-image rows after each tier's text-to-image, in the same process: comma-separated "
                        "reference counts (1 or 2; default 1,2), or 'none'")
    p.add_argument("--profile", action="store_true", help="add the top kernels of one short run per configuration")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not torch.compile the DiT blocks and the AR decode step")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the AR and DiT steps without CUDA graphs")
    p.add_argument("--baseline-only", action="store_true", help="run only stock diffusers (implies --baseline)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="attention kernels: glmq's Triton kernels (auto on CUDA) or PyTorch SDPA")
    p.add_argument("--attention-precision", choices=ATTENTION_PRECISIONS, default=None,
                   help="DiT attention precision of glmq's kernels (default: each recipe's choice)")
    p.add_argument("--gpus", type=int, choices=(1, 2), default=1,
                   help="2: after each recipe's one-GPU rows, a latency row and a throughput row on two GPUs "
                        "(two CPU processes with --device cpu)")
    p.add_argument("--throughput-images", type=_int_at_least(2), default=4,
                   help="images in the two-GPU throughput row's timed call (default 4)")
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md and bench.png")
    p.add_argument("--update-readme", nargs="?", const="README.md", default=None, metavar="README",
                   help="regenerate the hardware-tier table between README's glmq-bench markers (default: "
                        "README.md in the current directory; refused if the file lacks the markers)")
    p.add_argument("--from-json", nargs="+", metavar="BENCH_JSON",
                   help="do not run: merge saved bench.json files (same card) into --out and the README table")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``glmq ARGV``; returns the exit code. User errors and Ctrl-C print one line (exit code 2).

    Run as the program (``argv`` None: the console script, ``python -m glmq``), an interrupted run ends the
    process here with exit code 2: Python would otherwise turn the exit status of a process in which a
    KeyboardInterrupt crossed code run by ``exec`` (dataclasses, for one) into a death by SIGINT, whatever
    ``sys.exit`` was given.
    """
    code = _main(argv)
    if argv is None and code == EXIT_USER_ERROR and Interrupts.last_interrupted:
        exit_interrupted()
    return code


def _main(argv: list[str] | None) -> int:
    interrupts = Interrupts()
    try:
        interrupts.install()  # first: a Ctrl-C while the model libraries import is an interruption too
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            from glmq.bench.provenance import set_command

            set_command(["glmq", *(sys.argv[1:] if argv is None else argv)])  # the command results files record
            code = args.func(args)
        except SystemExit:  # argparse: --help, --version, usage errors (already printed)
            if interrupts.count:
                interrupts.report()
                return EXIT_USER_ERROR
            raise
        except BaseException as e:
            if interrupts.count or isinstance(e, KeyboardInterrupt):
                # Whatever an interrupted import or computation turned into, the cause is the Ctrl-C.
                interrupts.report()
                return EXIT_USER_ERROR
            message = _user_error(e)
            if message is None:
                raise  # a bug in glmq: keep the traceback
            print(f"glmq: error: {message}".replace("\n", " "), file=sys.stderr)
            return EXIT_USER_ERROR
        if interrupts.count:
            interrupts.report()
            return EXIT_USER_ERROR
        return code
    except KeyboardInterrupt:  # a Ctrl-C while reporting
        interrupts.report()
        return EXIT_USER_ERROR
    finally:
        interrupts.uninstall()
        from glmq.bench.provenance import set_command

        set_command(None)  # an in-process caller's later results must not inherit this command


def _user_error(e: BaseException) -> str | None:
    """The one line for an exception that is the user's or the environment's business, else None."""
    from glmq.errors import GlmqError

    if isinstance(e, GlmqError):
        return str(e)
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, ImportError):  # a broken or partial installation, not the user's checkpoint
        return f"a library failed to import ({e.__class__.__name__}: {e}); check the installation"
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return f"no space left on the device ({e.filename or 'writing output'})"
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
