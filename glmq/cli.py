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


def _finite_float(*, positive: bool = False, nonnegative: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        if nonnegative and value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
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

    from glmq.io.images import check_image_out, parse_size, read_image, save_image

    if args.prompts is not None:
        return _generate_prompts_file(args)
    width, height = parse_size(args.size)
    out = Path(args.out)
    image_format = check_image_out(out, force=args.force)
    images = [read_image(ref) for ref in args.image or []]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    pipe = _load_pipeline(args, device)
    try:
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        result = pipe(args.prompt, image=images or None, height=height, width=width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                      progress=not args.json)
        save_image(result[0], out, image_format)
    finally:
        _close(pipe)
    t = pipe.last_times
    summary = {"out": str(out), "size": [width, height], "steps": args.steps, "seed": args.seed,
               "device": device, "memory_mode": pipe.mode, "dit_attention": pipe.attention_precision,
               "compiled": pipe.compile,
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


def _close(pipe) -> None:
    """Stop a two-GPU pipeline's workers (a one-GPU pipeline has nothing to stop)."""
    close = getattr(pipe, "close", None)
    if close is not None:
        close()


def _load_pipeline(args: argparse.Namespace, device: str):
    """``glmq.load`` with the command's flags (generate and serve); ``--gpus 2`` gives the two-GPU pipeline."""
    import glmq
    from glmq.errors import GlmqError

    two = getattr(args, "gpus", 1) != 1 or getattr(args, "parallel", None) is not None
    if two and (args.vram_budget_gb is not None or args.memory_mode is not None):
        raise GlmqError("--vram-budget-gb and --memory-mode apply to one GPU; with --gpus 2 each GPU keeps its "
                        "part resident")
    if two and getattr(args, "image", None):
        raise GlmqError("--image (image-to-image) runs on one GPU; --gpus 2 takes text-to-image prompts")
    kwargs = {"gpus": args.gpus, "parallel": args.parallel} if two else {}
    return glmq.load(args.path, device=device, vram_budget_gb=args.vram_budget_gb, mode=args.memory_mode,
                     attention=args.attention, attention_precision=args.attention_precision,
                     compile=_compile_choice(args, device), cache_dir=args.cache_dir, **kwargs)


def _compile_choice(args: argparse.Namespace, device: str) -> bool:
    """``--compile``: on, off, or auto (on when the cache holds a completed compiled run of this model on this
    card with these versions: compiling then costs little; glmq.runtime.compile_cache)."""
    if args.compile != "auto" or not device.startswith("cuda"):
        return args.compile == "on"
    from glmq.runtime.compile_cache import activate, was_compiled

    return was_compiled(activate(args.cache_dir), args.path, device)


def _generate_prompts_file(args: argparse.Namespace) -> int:
    """``glmq generate PATH --prompts FILE --out DIR``: everything is checked (every line of the file, every
    reference image, the output folder) before the model loads or anything is written."""
    import time

    import torch

    from glmq.errors import GlmqError
    from glmq.generate_file import check_out_dir, generate_file, jobs_for, read_references
    from glmq.io.images import parse_size
    from glmq.io.lock import OutputLock
    from glmq.io.prompts import read_prompts

    if args.image:
        raise GlmqError("--image goes with --prompt; in a prompts file each .jsonl line names its own \"image\"")
    lines = read_prompts(args.prompts, size=parse_size(args.size), seed=args.seed, steps=args.steps,
                         guidance=args.guidance, n=args.num_images)
    out = Path(args.out)
    check_out_dir(out)
    references = read_references(lines, args.prompts)
    if args.gpus != 1 and any(line.images for line in lines):
        raise GlmqError("--gpus 2 takes text-to-image prompts; a .jsonl line with \"image\" runs on one GPU")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    lock = OutputLock(out)
    try:
        pipe, load_s = None, 0.0
        if jobs_for(lines, out, force=args.force)[0]:  # a finished run resumes without loading the model
            t0 = time.perf_counter()
            pipe = _load_pipeline(args, device)
            load_s = time.perf_counter() - t0
        summary = generate_file(pipe, lines, out, references, batch=args.batch, force=args.force,
                                progress=not args.json)
    finally:
        lock.release()
        _close(pipe)
    summary.update(prompts_file=str(args.prompts), device=device, load_s=round(load_s, 3),
                   memory_mode=str(pipe.mode) if pipe is not None else None,
                   compiled=pipe.compile if pipe is not None else None)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        rate = f", {summary['images_per_hour']} images/hour" if summary["images_per_hour"] else ""
        print(f"wrote {summary['written']} image(s) to {out} in {summary['seconds']:.2f} s after a {load_s:.2f} s load"
              f"{rate}; {summary['skipped']} already there")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from glmq.errors import GlmqError
    from glmq.io.images import parse_size
    from glmq.serve.api import Limits
    from glmq.serve.server import GlmqServer, ServeOptions, bind

    default_size = parse_size(args.default_size, "--default-size")
    if args.max_side % 32:
        raise GlmqError(f"--max-side must be a multiple of 32, got {args.max_side}")
    if max(default_size) > args.max_side or args.default_steps > args.max_steps:
        raise GlmqError("--default-size and --default-steps must be within --max-side and --max-steps")
    if args.default_guidance > Limits.max_guidance:
        raise GlmqError(f"--default-guidance must be at most {Limits.max_guidance:g}")
    limits = Limits(max_n=args.max_n, max_side=args.max_side, max_steps=args.max_steps,
                    max_prompt_chars=args.max_prompt_chars, max_references=args.max_references,
                    max_upload_bytes=int(args.max_upload_mb * 2**20), default_size=default_size,
                    default_steps=args.default_steps, default_guidance=args.default_guidance)
    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                           batch_window_s=args.batch_window_ms / 1000, shutdown_timeout_s=args.shutdown_timeout,
                           log_level=args.log_level, model=args.model_name, limits=limits)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    sock = bind(args.host, args.port)  # a port in use fails now, not after minutes of loading
    try:
        pipe = _load_pipeline(args, device)
        server = GlmqServer(pipe, options, sock=sock,
                            info={"device": device, "memory_mode": str(pipe.mode)})
    except BaseException:
        sock.close()
        raise
    batching = (f"batches of up to {server.batcher.max_batch} images" if server.batcher.batched
                else "one image per pipeline call")
    print(f"glmq serve: listening on {server.url} ({args.path}, {pipe.mode} on {device}, {batching})", flush=True)
    try:
        server.run()
    finally:
        _close(pipe)
    print("glmq serve: stopped", flush=True)
    return 0


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


def _parse_batch(text: str | None) -> tuple[int, ...]:
    from glmq.errors import GlmqError

    if text is None:
        return ()
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(not 1 <= b <= 64 for b in sizes):
        raise GlmqError(f"--batch takes batch sizes from 1 to 64 separated by commas (e.g. 1,4,8); got {text!r}")
    return sizes


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
                      batch=_parse_batch(args.batch), first_image=args.first_image, gpus=args.gpus,
                      throughput_images=args.throughput_images)
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


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    """``--compile`` and ``--cache-dir``, the same for generate and serve."""
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the AR step and DiT blocks (CUDA): faster images, a slow first compilation "
                        "that the cache folder keeps for later processes; auto (default): on once a compiled run of "
                        "this model finished on this card")
    p.add_argument("--cache-dir", default=None,
                   help="folder for compilation and autotuning caches (default $GLMQ_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/glmq, else ~/.cache/glmq)")


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
                       help="many images: a .txt file (one prompt per line) or .jsonl (per line: prompt, and "
                            "optionally size, seed, image, steps, guidance, n); --out is then a folder")
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
                   help="2: run on two GPUs (--device cuda) or two CPU processes (--device cpu), text-to-image only "
                        "(default 1)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="with --gpus 2: latency (default; tensor-parallel AR, one guidance pass per GPU) or "
                        "throughput (the AR of one image beside the DiT of the previous one)")
    _add_compile_options(p)
    p.add_argument("--num-images", type=_int_at_least(1, 64), default=1,
                   help="with --prompts: images per prompt (seeds SEED, SEED+1, ...; a .jsonl line's n wins)")
    p.add_argument("--batch", type=_int_at_least(1, 64), default=8,
                   help="with --prompts: images per pipeline call (default 8); the memory plan may split a call's "
                        "denoising into smaller chunks")
    p.add_argument("--out", required=True, help="output image path (with --prompts: the folder for the images)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (with --prompts: make images again whose files exist; without it "
                        "they are skipped, which resumes an interrupted run)")
    p.add_argument("--json", action="store_true", help="print timings (with --prompts: the run's summary) as JSON")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-style HTTP server: /v1/images/generations and /v1/images/edits",
                       description="Serve a GLM-Image folder over HTTP with OpenAI's image API (generations and "
                                   "edits, b64_json), plus /health and /metrics. One GPU worker runs the pipeline; "
                                   "requests queue and concurrent ones are batched. SIGTERM or Ctrl-C finishes the "
                                   "requests in flight, then exits.")
    p.add_argument("path", help="GLM-Image pipeline folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=_int_at_least(0, 65535), default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=_int_at_least(1, 64), default=8,
                   help="images per pipeline call when the pipeline batches (default 8)")
    p.add_argument("--max-queue", type=_int_at_least(1), default=32,
                   help="requests that may wait for the GPU; one more is answered 429 (default 32)")
    p.add_argument("--batch-window-ms", type=_finite_float(nonnegative=True), default=100.0,
                   help="how long the oldest request waits for others to batch with (default 100)")
    p.add_argument("--max-n", type=_int_at_least(1), default=10, help="most images per request (default 10)")
    p.add_argument("--max-side", type=_int_at_least(32), default=2048, help="largest width or height (default 2048)")
    p.add_argument("--max-steps", type=_int_at_least(1), default=100, help="most denoising steps (default 100)")
    p.add_argument("--max-prompt-chars", type=_int_at_least(1), default=4000, help="longest prompt (default 4000)")
    p.add_argument("--max-references", type=_int_at_least(1), default=4,
                   help="most reference images per edit (default 4)")
    p.add_argument("--max-upload-mb", type=_finite_float(positive=True), default=20.0,
                   help="largest reference image file in MiB (default 20)")
    p.add_argument("--default-size", default="1024x1024", help="size when a request gives none (default 1024x1024)")
    p.add_argument("--default-steps", type=_int_at_least(1), default=50, help="steps when a request gives none (default 50)")
    p.add_argument("--default-guidance", type=_finite_float(nonnegative=True), default=1.5,
                   help="guidance when a request gives none (default 1.5)")
    p.add_argument("--shutdown-timeout", type=_finite_float(nonnegative=True), default=60.0,
                   help="seconds SIGTERM waits for requests in flight before answering them 503 (default 60)")
    p.add_argument("--model-name", default="glm-image", help="the model id /v1/models reports (default glm-image)")
    p.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--vram-budget-gb", type=_finite_float(positive=True), default=None,
                   help="plan memory for this many GiB")
    p.add_argument("--memory-mode", choices=[m.value for m in MemoryMode], default=None,
                   help="force a memory mode (default: chosen from the budget)")
    _add_compile_options(p)
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="attention kernels: glmq's Triton kernels (auto on CUDA) or PyTorch SDPA")
    p.add_argument("--attention-precision", choices=ATTENTION_PRECISIONS, default=None,
                   help="DiT attention precision of glmq's kernels (default: what the checkpoint's recipe chose)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="server log level on stderr (default info)")
    p.add_argument("--gpus", type=int, choices=(1, 2), default=1,
                   help="2: serve from two GPUs (text-to-image only; see --parallel) (default 1)")
    p.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                   help="with --gpus 2: latency (default) or throughput (pays off for batches of several images)")
    p.set_defaults(func=_cmd_serve)

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
    p.add_argument("--tiers", default=None, help="GPU memory tiers in GiB, comma-separated (default 80,32,24,16,12,8)")
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
    p.add_argument("--batch", default=None, metavar="B,B,...",
                   help="rows of B images per call (e.g. 1,4,8): images per hour per batch size and tier, instead of "
                        "the one-image and edit rows")
    p.add_argument("--first-image", action="store_true",
                   help="cold (empty compile cache), cached and warm first-image times per tier, each in fresh "
                        "processes (without --batch: instead of the in-process rows)")
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
