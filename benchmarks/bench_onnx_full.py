"""Does ``glmq export onnx`` work at full size, and do its graphs load and run in ONNX Runtime (CPU)?

For each component (``ar`` as int4 MatMulNBits, ``dit`` as int8, ``vae``, ``glyph``) this script

1. runs ``glmq export onnx SRC --out WORK/<component> --component C --weights W`` under ``/usr/bin/time -v``
   (wall time, peak RSS) while sampling the child's ``/proc`` status every 0.2 s (peak anonymous memory:
   ``ru_maxrss`` also counts the pages of the memory-mapped checkpoint that the export touched);
2. records the files (sizes, external data) and the exporter's own result (it runs ``onnx.checker`` and
   describes the graph before it exits 0);
3. in a fresh process (no exporter state): ``onnx.checker.check_model(path)`` on the path (external data
   included), an ONNX Runtime CPU session (creation time), one call with small inputs (latency) and the
   process's peak RSS; for the fp32 graphs small enough to rebuild in torch (glyph encoder, VAE decoder) the
   output is compared with the upstream torch module loaded from the checkpoint. A check whose RSS passes
   ``--rss-limit-gb`` is killed and recorded as a measured failure with the RSS it reached;
4. deletes the component's output unless ``--keep`` (disk is short: the full-size graphs take 5-9 GB each).

    python benchmarks/bench_onnx_full.py --src .scratch/full --work .scratch/onnx_full --components ar,dit,vae,glyph

Results are merged into ``benchmarks/results/onnx_full_cpu2.json`` (one entry per component and weights mode,
so components can be run one at a time) and rendered to the ``.md`` next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "onnx_full_cpu2.json"
CARD = "CPU 2 cores (no GPU; onnxruntime-gpu not carried)"
GRAPH = {"ar": "ar_decoder", "dit": "dit", "vae": "vae_decoder", "glyph": "glyph_encoder"}
DEFAULT_WEIGHTS = {"ar": "int4", "dit": "int8", "vae": "fp32", "glyph": "fp32"}
GB = 1e9


# ---- process memory ------------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of ``pid`` in bytes ({} once it has exited)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    out = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return out
    for k in map(int, kids):
        out += [k, *_descendants(k)]
    return out


class Sampler:
    """Samples the memory of a process tree until it exits; kills it past ``limit`` bytes of RSS."""

    def __init__(self, proc: subprocess.Popen, limit: float | None = None, period: float = 0.2):
        self.proc, self.limit, self.period = proc, limit, period
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self.killed_at = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while self.proc.poll() is None:
            rss = anon = file = 0
            for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
                s = _status(pid)
                rss += s.get("VmRSS", 0)
                anon += s.get("RssAnon", 0)
                file += s.get("RssFile", 0)
            for k, v in (("rss", rss), ("anon", anon), ("file", file)):
                self.peak[k] = max(self.peak[k], v)
            if self.limit is not None and rss > self.limit and self.killed_at is None:
                self.killed_at = rss
                self.proc.kill()
            time.sleep(self.period)

    def join(self) -> dict:
        self._thread.join()
        out = {f"sampled_peak_{k}_gb": round(v / GB, 2) for k, v in self.peak.items()}
        if self.killed_at is not None:
            out["killed_at_rss_gb"] = round(self.killed_at / GB, 2)
        return out


# ---- 1-2: export ---------------------------------------------------------------------------------------


def _time_v(stderr: str) -> dict:
    def grab(label):
        m = re.search(rf"{re.escape(label)}: (.+)", stderr)
        return m.group(1).strip() if m else None

    out = {}
    rss = grab("Maximum resident set size (kbytes)")
    if rss:
        out["time_v_max_rss_gb"] = round(int(rss) * 1024 / GB, 2)
    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    if wall:
        secs = 0.0
        for part in wall.split(":"):
            secs = secs * 60 + float(part)
        out["time_v_wall_s"] = round(secs, 1)
    return out


def _disk_free_gb(path: Path) -> float:
    return round(shutil.disk_usage(path).free / GB, 1)


def export(src: Path, dst: Path, component: str, weights: str) -> dict:
    """``weights`` is a ``--weights`` mode, or ``int8:matmulnbits`` for the int8 layout that the CLI has no flag
    for yet (then the library function runs in the child instead of the CLI)."""
    mode, _, layout = weights.partition(":")
    glmq_cmd = ["export", "onnx", str(src), "--out", str(dst), "--component", component, "--weights", mode,
                "--force", "--json"]
    if layout:
        call = (f"import json; from glmq.export.onnx_export import export_onnx; print(json.dumps(export_onnx("
                f"{str(src)!r}, {str(dst)!r}, component={component!r}, weights={mode!r}, int8_layout={layout!r}, "
                f"force=True), default=str))")
        cmd = ["/usr/bin/time", "-v", sys.executable, "-c", call]
    else:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "glmq", *glmq_cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    shown = "glmq " + " ".join(glmq_cmd) + (f" (library call, int8_layout={layout!r})" if layout else "")
    rec = {"command": shown, "returncode": proc.returncode,
           "wall_s": round(wall, 1), **_time_v(stderr), **sampler.join()}
    if proc.returncode != 0:
        rec["stderr_tail"] = "\n".join(l for l in stderr.splitlines() if "\t" not in l)[-2000:]
        return rec
    summary = json.loads(stdout[stdout.index("{"):])
    info = summary["graphs"][GRAPH[component]]
    files = {p.name: p.stat().st_size for p in sorted((dst / GRAPH[component]).iterdir())}
    rec.update({
        "files_bytes": files,
        "total_gb": round(sum(files.values()) / GB, 3),
        "external_data": info.get("external_data"),
        "exporter_seconds": info.get("seconds"),
        "exporter_validation": "onnx.checker.check_model passed inside the export (it exits nonzero otherwise)",
        "ops": info.get("ops"),
        "dtype": info.get("dtype"),
    })
    q = info.get("quantization")
    if q:
        rec["quantization"] = {"format": q["format"], "num_layers": q["num_layers"],
                               "kept_float": len(q["kept_float"])}
    return rec


# ---- 3: load and run without the exporter ---------------------------------------------------------------


def _inputs(graph: str, meta: dict, pipeline: dict, case: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = np.float32
    if graph == "glyph_encoder":
        ids = rng.integers(3, 259, (1, case["glyph_tokens"])).astype(np.int64)
        ids[0, -1] = 1  # </s>
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if graph == "vae_decoder":
        c = pipeline["vae"]["latent_channels"]
        return {"latents": rng.standard_normal((1, c, case["latent"], case["latent"])).astype(f32)}
    if graph == "dit":
        d = pipeline["dit"]
        h = case["latent"]
        n = (h // d["patch_size"]) ** 2
        dt_ = np.float16 if meta["dtype"] == "float16" else f32
        return {
            "latents": rng.standard_normal((1, d["in_channels"], h, h)).astype(dt_),
            "glyph_embeds": (0.1 * rng.standard_normal((1, case["glyph_tokens"], d["text_embed_dim"]))).astype(dt_),
            "prior_token_ids": rng.integers(0, d["prior_codebook_size"], (1, n)).astype(np.int64),
            "prior_token_drop": np.zeros((1, n), dtype=bool),
            "timestep": np.array([999.0], dtype=dt_),
            "target_size": np.array([[h * 8.0, h * 8.0]], dtype=dt_),
            "crop_coords": np.zeros((1, 2), dtype=dt_),
        }
    # ar_decoder: S new tokens after a short cache
    s, past = case["tokens"], case["past"]
    dt_ = np.float16 if meta["dtype"] == "float16" else f32
    feeds = {
        "input_ids": rng.integers(0, pipeline["ar"]["vision_vocab_size"] or 16384, (1, s)).astype(np.int64),
        "attention_mask": np.ones((1, past + s), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + s), (3, 1, s)).astype(np.int64).copy(),
    }
    for i in range(meta["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (1, meta["num_key_value_heads"], past, meta["head_dim"])).astype(dt_)
    return feeds


CASES = {
    "glyph_encoder": {"glyph_tokens": 24},
    "vae_decoder": {"latent": 32},
    "dit": {"latent": 16, "glyph_tokens": 8},
    "ar_decoder": {"tokens": 4, "past": 16},
}


def check_child(folder: Path, graph: str, src: Path | None, session_config: dict) -> dict:
    """Runs in a fresh process: everything here reads the folder only."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    index = json.loads((folder / "glmq_onnx.json").read_text())
    meta = index["graphs"][graph]
    path = folder / meta["file"]
    rec = {"case": CASES[graph]}
    t0 = time.perf_counter()
    onnx.checker.check_model(str(path))
    rec["checker_s"] = round(time.perf_counter() - t0, 2)
    rec["checker"] = "passed"
    rec["rss_after_checker_gb"] = round(_status(os.getpid())["VmRSS"] / GB, 2)
    print(json.dumps(rec), flush=True)  # partial results survive a kill
    so = ort.SessionOptions()
    for k, v in session_config.items():
        so.add_session_config_entry(k, v)
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rec["session_create_s"] = round(time.perf_counter() - t0, 1)
    st = _status(os.getpid())
    rec["rss_after_session_gb"] = round(st["VmRSS"] / GB, 2)
    rec["anon_after_session_gb"] = round(st["RssAnon"] / GB, 2)
    print(json.dumps(rec), flush=True)
    feeds = _inputs(graph, meta, index["pipeline"], CASES[graph])
    lat = []
    for _ in range(2):
        t0 = time.perf_counter()
        outs = sess.run(None, feeds)
        lat.append(time.perf_counter() - t0)
    rec["first_call_s"] = round(lat[0], 3)
    rec["second_call_s"] = round(lat[1], 3)
    rec["output_shape"] = list(outs[0].shape)
    rec["output_finite"] = bool(np.isfinite(outs[0]).all())
    st = _status(os.getpid())
    rec["peak_rss_gb"] = round(st["VmHWM"] / GB, 2)
    rec["anon_after_run_gb"] = round(st["RssAnon"] / GB, 2)
    if src is not None:
        ort_out = outs[0].astype(np.float64)
        del sess, outs
        rec["torch_reference"] = _compare_torch(src, graph, feeds, ort_out)
        rec["peak_rss_with_torch_gb"] = round(_status(os.getpid())["VmHWM"] / GB, 2)
    return rec


def _compare_torch(src: Path, graph: str, feeds: dict, ort_out) -> dict:
    """ORT's output vs the upstream torch module with the checkpoint's weights, in fp32 and in float64 (the
    float64 run is the reference; torch fp32's own error sets the scale the ORT error is read against)."""
    import numpy as np
    import torch

    from glmq.export.onnx_export import reference_graph
    from glmq.io.reader import PipelineReader

    reader = PipelineReader(src)
    t0 = time.perf_counter()
    spec = reference_graph(reader, graph, weights="fp32")
    args = [torch.from_numpy(v) for v in feeds.values()]
    with torch.no_grad():
        ref32 = spec.module(*args).double().numpy()
        spec.module.double()
        ref64 = spec.module(*[a.double() if a.is_floating_point() else a for a in args]).numpy()
    scale = np.abs(ref64).max()

    def err(x):
        return float(np.abs(x - ref64).max() / scale)

    def sqnr(x):
        return float(10 * np.log10((ref64 ** 2).sum() / max(((x - ref64) ** 2).sum(), 1e-300)))

    return {"ort_max_rel_err_vs_f64": err(ort_out), "torch_fp32_max_rel_err_vs_f64": err(ref32),
            "ort_sqnr_db": round(sqnr(ort_out), 1), "torch_fp32_sqnr_db": round(sqnr(ref32), 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def check(folder: Path, graph: str, src: Path | None, limit_gb: float, session_config: dict) -> dict:
    """``check_child`` in a fresh process; ``src`` (the checkpoint) also compares against torch."""
    cmd = [sys.executable, __file__, "_check", str(folder), graph, json.dumps(session_config), str(src or "")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc, limit=limit_gb * GB)
    stdout, stderr = proc.communicate()
    mem = sampler.join()
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    rec = json.loads(lines[-1]) if lines else {}  # the last stage the child reached
    rec.update({"returncode": proc.returncode, **mem, "session_config": session_config})
    if proc.returncode != 0:
        rec["stderr_tail"] = stderr[-1500:]
        if "killed_at_rss_gb" in mem:
            rec["failure"] = f"killed by the benchmark at {mem['killed_at_rss_gb']} GB RSS (limit {limit_gb} GB)"
    return rec


# ---- reporting --------------------------------------------------------------------------------------------


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    import glmq

    v = {"python": platform.python_version(), "glmq": glmq.__version__, "torch": torch.__version__,
         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return v


def _markdown(res: dict) -> str:
    from glmq.bench.provenance import provenance_markdown

    lines = [f"# Full-size ONNX export, {res['card']}", "",
             f"{res['date']}; load average at start {res['loadavg']}; versions {res['versions']}", "",
             *[f"- {key}: " + (provenance_markdown(r["provenance"]) if "provenance" in r
                               else "Provenance: not recorded.") for key, r in res["components"].items()], "",
             "| component | weights | export wall s | export peak RSS GB (time -v / anon) | files GB | external data "
             "| checker s | session s | 1st / 2nd call s | session peak RSS GB | vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["components"].items():
        e, c = r["export"], r.get("check", {})
        ref = c.get("torch_reference")
        vs = (f"rel err {ref['ort_max_rel_err_vs_f64']:.1e} (torch fp32 {ref['torch_fp32_max_rel_err_vs_f64']:.1e})"
              if ref else "-")
        if c.get("failure") or (c and c.get("returncode")):
            sess = c.get("failure") or f"failed (rc {c.get('returncode')})"
            lines.append(f"| {r['component']} | {r['weights']} | {e.get('wall_s')} | {e.get('time_v_max_rss_gb')} / "
                         f"{e.get('sampled_peak_anon_gb')} | {e.get('total_gb')} | {e.get('external_data')} | "
                         f"{c.get('checker_s', '-')} | {sess} | - | {c.get('sampled_peak_rss_gb')} | - |")
            continue
        lines.append(f"| {r['component']} | {r['weights']} | {e.get('wall_s')} | {e.get('time_v_max_rss_gb')} / "
                     f"{e.get('sampled_peak_anon_gb')} | {e.get('total_gb')} | {e.get('external_data')} | "
                     f"{c.get('checker_s')} | {c.get('session_create_s')} | {c.get('first_call_s')} / "
                     f"{c.get('second_call_s')} | {c.get('peak_rss_gb')} | {vs} |")
    lines += ["", "Inputs of the one-call check: " + "; ".join(f"{g}: {c}" for g, c in CASES.items()), ""]
    lines += [f"- {n}" for n in res.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_check":
        folder, graph, config = Path(argv[1]), argv[2], json.loads(argv[3])
        src = Path(argv[4]) if len(argv) > 4 and argv[4] else None
        print(json.dumps(check_child(folder, graph, src, config)), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=REPO / ".scratch" / "full")
    ap.add_argument("--work", type=Path, default=REPO / ".scratch" / "onnx_full")
    ap.add_argument("--components", default="ar,dit,vae,glyph")
    ap.add_argument("--weights", action="append", default=[], metavar="COMPONENT=MODE",
                    help="override a component's weights mode, e.g. dit=int8:matmulnbits")
    ap.add_argument("--rss-limit-gb", type=float, default=11.0, help="kill a session check past this RSS")
    ap.add_argument("--skip-export", action="store_true", help="check an existing WORK/<component>")
    ap.add_argument("--keep", action="store_true", help="keep each component's output")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args(argv)
    from glmq.bench.provenance import provenance

    prov = provenance()  # this run's; each component records the run that measured it (runs merge)
    weights = dict(DEFAULT_WEIGHTS)
    weights.update(dict(w.split("=", 1) for w in args.weights))
    res = json.loads(args.results.read_text()) if args.results.exists() else {"components": {}, "notes": []}
    res.update({"benchmark": "onnx_full", "card": CARD, "date": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "loadavg": [round(x, 2) for x in os.getloadavg()], "versions": _versions(),
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)},
        "source": str(args.src), "provenance": prov})
    res["notes"] = list(dict.fromkeys(res.get("notes", []) + args.note))
    args.work.mkdir(parents=True, exist_ok=True)
    for comp in args.components.split(","):
        w = weights[comp]
        dst = args.work / f"{comp}_{w.replace(':', '_')}"
        graph = GRAPH[comp]
        rec = {"component": comp, "graph": graph, "weights": w, "disk_free_before_gb": _disk_free_gb(args.work),
               "loadavg_before": [round(x, 2) for x in os.getloadavg()], "provenance": prov}
        print(f"[{comp}] export --weights {w} (disk free {rec['disk_free_before_gb']} GB)", flush=True)
        rec["export"] = {"skipped": True} if args.skip_export else export(args.src, dst, comp, w)
        print(json.dumps(rec["export"], default=str)[:800], flush=True)
        if rec["export"].get("returncode", 0) == 0:
            # ONNX Runtime's default session options: what a user gets.
            rec["check"] = check(dst, graph, args.src if comp in ("vae", "glyph") else None, args.rss_limit_gb, {})
            print(json.dumps(rec["check"], default=str)[:1500], flush=True)
        res["components"][f"{comp}:{w}"] = rec
        args.results.write_text(json.dumps(res, indent=2) + "\n")
        args.results.with_suffix(".md").write_text(_markdown(res))
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
