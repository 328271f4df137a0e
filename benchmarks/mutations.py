"""Mutation check: does the test suite catch the faults that fidelity and benchmark evidence must not hide?

Each fault of :data:`FAULTS` is a small edit of glmq's code (exact text replaced, each found exactly once) that
reproduces a mistake the suite once let through (issue #16) or a classic quantization bug. For each fault the
script copies the checkout (its tracked and untracked, not ignored, files) into a scratch folder, applies the
edit there, and runs the tests that should catch it with the scratch copy first on ``sys.path`` (the script
checks that the copy's ``glmq`` and ``glmq.kernels`` are the ones imported). pytest failing is a kill; passing
is a survivor; anything else (a collection error, a timeout) is an error, not a kill. The unmutated copy runs
the union of the selected tests first: a kill only counts if that baseline passes.

Writes ``mutations.json`` (provenance, each fault's edit, tests, outcome, first failing test and seconds) and
``mutations.md`` into ``--out``; exits 1 unless the baseline passes and every fault is killed.

    python benchmarks/mutations.py --out benchmarks/results/mutations_cpu2
    python benchmarks/mutations.py --out /tmp/m --only int4_pack_off_by_one   # one fault
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    name: str
    what: str  # the mistake, in the words where it names it
    edits: tuple[tuple[str, str, str], ...]  # (file, text, replacement); the text must occur exactly once
    tests: tuple[str, ...]  # pytest node ids expected to catch it


Q, P, B = "tests/test_quantize.py", "tests/runtime/test_pipeline.py", "tests/test_bench.py"
BAND = f"{Q}::test_model_level_fidelity_is_reported_within_its_measured_band"
PIPE = f"{P}::test_quantized_checkpoint_stays_within_its_recorded_fidelity"
AS_RUN = "tests/evaluate/test_report_as_run.py::test_runtime_layers_give_the_report_s_output_sqnr"
GPTQ = "tests/evaluate/test_report_as_run.py::test_gptq_is_scored_on_held_out_activations_beside_rtn"
BENCH = f"{B}::test_bench_on_cpu_writes_json_markdown_and_png"

FAULTS = (
    Fault("dit_blocks_zeroed", "inert DiT blocks: the quantized DiT blocks' attention and MLP weights written as zeros",
          (("glmq/quant/convert.py", "    out = {k: v.cpu() for k, v in tensors.items()}\n",
            "    out = {k: (torch.zeros_like(v.cpu()) if k == 'weight' and plan.name.startswith('transformer_blocks.')\n"
            "               and '.norm1.' not in plan.name else v.cpu()) for k, v in tensors.items()}\n"),),
          (BAND, PIPE)),
    Fault("dit_layers_zeroed_at_run_time", "quantized DiT layers zeroed at run time (glmq.load's pipeline)",
          (("glmq/runtime/load.py",
            "    precision = install_attention(components, device, attention, attention_precision, transformer_config)\n",
            "    [m.register_forward_hook(lambda mod, args, out: out * 0) for m in components['transformer'].modules()\n"
            "     if type(m).__name__ == 'QuantLinear']\n"
            "    precision = install_attention(components, device, attention, attention_precision, transformer_config)\n"),),
          (PIPE,)),
    Fault("report_compares_source_with_itself", "the report compares the source with itself",
          (("glmq/evaluate/quantize.py", "evaluate_model(Path(src), partial, device=device)",
            "evaluate_model(Path(src), Path(src), device=device)"),),
          (BAND, PIPE)),
    Fault("w8a8_reported_weight_only", "W8A8 layers reported weight-only (activations not quantized per token)",
          (("glmq/quant/formats/linear.py", '    return "reference" if mode == "auto" else mode\n',
            '    return "weight_only" if mode == "auto" else mode\n'),),
          (AS_RUN, BAND)),
    Fault("gptq_scored_on_calibration_data", "GPTQ scored on its own calibration data",
          (("glmq/quant/calibrate.py",
            "list(zip(self._hidden, self._pos))[:self.n_fit], list(zip(self._hidden, self._pos))[self.n_fit:]",
            "list(zip(self._hidden, self._pos))[:self.n_fit], list(zip(self._hidden, self._pos))[:self.n_fit]"),),
          (GPTQ,)),
    Fault("gptq_sqnr_inflated", "GPTQ's output SQNR inflated by 6 dB",
          (("glmq/quant/convert.py", '        stats["output_sqnr_db"] = ratio_db(out_signal, out_noise)\n',
            '        stats["output_sqnr_db"] = ratio_db(out_signal, out_noise) + (6.0 if plan.algo.name == "gptq" else 0)\n'),),
          (GPTQ,)),
    Fault("ar_ms_per_token_10x", "an AR ms/token off by 10x in the bench",
          (("glmq/bench/run.py", '"ar_ms_per_token": round(1000 * t.ar_s / max(t.ar_tokens, 1), 3)',
            '"ar_ms_per_token": round(10000 * t.ar_s / max(t.ar_tokens, 1), 3)'),),
          (BENCH,)),
    Fault("stock_half_steps_no_guidance", "a stock row run with half the steps and no guidance",
          (("glmq/bench/run.py",
            "            pipe(cfg.prompt, height=h, width=w, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,\n",
            "            pipe(cfg.prompt, height=h, width=w, num_inference_steps=max(1, cfg.steps // 2), guidance_scale=1.0,\n"),),
          (BENCH,)),
    Fault("guidance_label_hard_coded", "a hard-coded guidance label in the bench (1.5 whatever ran)",
          (("glmq/bench/run.py", '"guidance": t.extra.get("guidance_scale")', '"guidance": 1.5'),
           ("glmq/bench/run.py", '"guidance": float(getattr(pipe, "guidance_scale", float("nan")))', '"guidance": 1.5')),
          (BENCH,)),
    Fault("int4_dequantize_sign_flip", "a sign flip in a dequantizer (int4: (z - q) s for (q - z) s)",
          (("glmq/quant/formats/int4.py", "        return (q - z) * scale.float()\n",
            "        return (z - q) * scale.float()\n"),),
          ("tests/quant/test_quant_formats.py",)),
    Fault("w8_scale_dropped", "a dropped scale (fp8/int8 dequantize without the per-row scale)",
          (("glmq/quant/formats/base.py", '        return tensors["weight"].float() * tensors["weight_scale"]\n',
            '        return tensors["weight"].float()\n'),),
          ("tests/quant/test_quant_formats.py",)),
    Fault("int4_pack_off_by_one", "an off-by-one in int4 packing (high nibble shifted by 3)",
          (("glmq/quant/formats/int4.py", "    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()\n",
            "    return (c[..., 0::2] | (c[..., 1::2] << 3)).contiguous()\n"),),
          ("tests/quant/test_quant_formats.py",)),
    Fault("wrong_timestep", "a wrong timestep (the DiT fed t instead of t - 1)",
          (("glmq/runtime/dit_loop.py", "        self._dit_t = ts - 1\n", "        self._dit_t = ts\n"),),
          ("tests/runtime/test_dit_loop.py", f"{P}::test_matches_stock_diffusers_given_the_same_prior_tokens_and_noise")),
)


def checkout_files() -> list[str]:
    """The checkout's tracked and untracked (not ignored) files, as git lists them."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def make_copy(dest: Path, files: list[str]) -> None:
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)
    # Installed editable, glmq.kernels maps to kernels/; in the copy it must resolve inside the copy.
    (dest / "glmq" / "kernels").symlink_to(dest / "kernels", target_is_directory=True)


def apply(dest: Path, fault: Fault) -> None:
    for rel, text, new in fault.edits:
        path = dest / rel
        src = path.read_text()
        if src.count(text) != 1:
            raise SystemExit(f"mutations: fault {fault.name}: the text to replace occurs {src.count(text)} times in "
                             f"{rel} (the code changed: update the fault)")
        path.write_text(src.replace(text, new))


def run_tests(dest: Path, tests: tuple[str, ...], timeout: float, first_failure: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(dest) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    check = subprocess.run([sys.executable, "-c", "import glmq, glmq.kernels; print(glmq.__file__); "
                            "print(glmq.kernels.__file__)"], cwd=dest, env=env, capture_output=True, text=True)
    imported = check.stdout.split()
    if check.returncode or not all(Path(p).resolve().is_relative_to(dest.resolve()) for p in imported):
        raise SystemExit(f"mutations: the scratch copy is not what imports: {check.stdout} {check.stderr}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *(["-x"] if first_failure else []),
           *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = round(time.perf_counter() - t0, 1)
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)), None)
    return {"returncode": rc, "seconds": seconds, "failed": failed, "summary": summary,
            "tail": out.splitlines()[-15:] if rc not in (0, 1) else []}


def outcome(rc) -> str:
    return {0: "survived", 1: "killed"}.get(rc, "error")


def markdown(result: dict) -> str:
    from glmq.bench.provenance import provenance_markdown

    base = result["baseline"]
    lines = ["# Mutation check: faults the suite must catch", "", provenance_markdown(result["provenance"]), "",
             f"Baseline (the unmutated copy, every selected test): {base['summary']} in {base['seconds']} s.", "",
             "| fault | what | outcome | caught by | seconds |", "|---|---|---|---|---|"]
    for f in result["faults"]:
        by = ", ".join(f"`{t}`" for t in f["failed"]) or "-"
        lines.append(f"| `{f['name']}` | {f['what']} | **{f['outcome']}** | {by} | {f['seconds']} |")
    killed = sum(f["outcome"] == "killed" for f in result["faults"])
    lines += ["", f"{killed} of {len(result['faults'])} faults killed.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (mutations.json, mutations.md)")
    ap.add_argument("--only", default=None, help="comma-separated fault names (default: all)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    faults = FAULTS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {f.name for f in FAULTS})
        if unknown:
            print(f"mutations: unknown fault(s) {', '.join(unknown)}; valid: {', '.join(f.name for f in FAULTS)}",
                  file=sys.stderr)
            return 2
        faults = tuple(f for f in FAULTS if f.name in names)

    from glmq.bench.provenance import provenance

    started = time.perf_counter()
    files = checkout_files()
    union = tuple(dict.fromkeys(t for f in faults for t in f.tests))
    with tempfile.TemporaryDirectory(prefix="glmq-mutations-") as tmp:
        base_dir = Path(tmp) / "baseline"
        make_copy(base_dir, files)
        print(f"baseline: {len(union)} test selections", file=sys.stderr, flush=True)
        baseline = run_tests(base_dir, union, args.timeout, first_failure=False)
        print(f"baseline: {baseline['summary']}", file=sys.stderr, flush=True)
        rows = []
        for fault in faults:
            dest = Path(tmp) / fault.name
            make_copy(dest, files)
            apply(dest, fault)
            res = run_tests(dest, fault.tests, args.timeout, first_failure=True)
            rows.append({**asdict(fault), "outcome": outcome(res["returncode"]), **res})
            print(f"{fault.name}: {rows[-1]['outcome']} ({res['summary']}; {res['seconds']} s)", file=sys.stderr,
                  flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    result = {"provenance": provenance(), "python": sys.version.split()[0], "cores": os.cpu_count(),
              "baseline": {**baseline, "tests": list(union), "outcome": "passed" if baseline["returncode"] == 0
                           else "failed"},
              "faults": rows, "seconds": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutations.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "mutations.md").write_text(md)
    print(md)
    ok = baseline["returncode"] == 0 and all(r["outcome"] == "killed" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
