"""``glmq quantize``: a GLM-Image folder in, the same layout with quantized linear layers out.

Streaming: tensors are read one at a time from the source (plain file reads), quantized (on the CPU or a GPU)
and streamed into planned shards; nothing ever holds a whole component. Resumable: an interrupted run
(Ctrl-C, SIGKILL, full disk) leaves ``DST.partial`` and rerunning the same command skips its finished
shards (sha256-checked), ending byte-identical to an uninterrupted run. Each finished shard's per-layer
statistics are kept in a JSON side file (``DST.partial/.glmq-stats/COMPONENT/NNNNN.json``, written atomically
before the shard is journaled) until the folder is committed, so a resumed run's fidelity report is the
uninterrupted run's; a finished shard whose side file is missing or unreadable is written again.

Deterministic: two runs of the same command write the same bytes, reports and manifest included. Timings
(wall-clock seconds) are therefore not written to any file; :func:`quantize` returns them under
``"timings"`` (``glmq quantize --json`` prints them). The fidelity evaluation and the report's documents are
added by :mod:`glmq.evaluate.quantize`, the layer above.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from glmq.errors import GlmqError
from glmq.io.layout import COMPONENTS, WEIGHT_COMPONENTS, Component
from glmq.io.reader import ComponentReader
from glmq.checkpoint.source import open_unquantized_source, source_fingerprint
from glmq.io.writer import DEFAULT_MAX_SHARD_BYTES, OutputFolder
from glmq.progress import ByteProgress
from glmq.quant.formats.qconfig import make_quantization_config
from glmq.quant.plan import LayerPlan, plan_component
from glmq.quant.recipe import Recipe, load_recipe

STATS_DIR = ".glmq-stats"
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def convert(src: str | Path, out: str | Path, *, recipe: str | Path = "default", device: str = "cpu",
            calib_prompts: str | Path | None = None, force: bool = False, progress: bool = True,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, layer_outputs: bool = True,
            prepare: Callable[[Recipe, dict], None] | None = None,
            finish: Callable[[dict, Path, dict], dict[str, str]] | None = None) -> dict:
    """Quantize the GLM-Image folder ``src`` into ``out`` by ``recipe``; returns the report dict written to
    ``quantization_report.json``, plus ``"timings"`` (seconds; kept out of the written files so that they are
    byte-identical across runs). ``glmq.quantize`` (:func:`glmq.evaluate.quantize.quantize`) is this with the
    fidelity evaluation and the report's documents.

    With ``layer_outputs`` every quantized layer also gets its output SQNR on calibration activations
    (``glmq.quant.calibrate`` for the AR, ``glmq.quant.dit_calibrate`` for the DiT): one extra layer-by-layer
    pass over each network. The hooks belong to the layer above: ``prepare(recipe, timings)`` runs once the
    output folder is claimed and before any layer is converted; ``finish(report, partial_folder, timings)``
    runs before the commit, may add to the report, and returns further files to write (name -> text).
    """
    import torch

    from glmq import __version__
    from glmq.models.build import tensor_specs

    started = time.perf_counter()
    src, out = Path(src), Path(out)
    reader = open_unquantized_source(src, out, action="quantize")
    rec = load_recipe(recipe)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmqError("--device cuda was given but no CUDA GPU is available")

    components = {}
    for comp in WEIGHT_COMPONENTS:
        cr = reader.component(comp.name)
        plans, kept, model = plan_component(comp, cr, rec)
        components[comp.name] = (comp, cr, plans, kept, model)

    calibrators = _calibrators(reader, components, calib_prompts, device, layer_outputs)
    gptq = any(p.algo.needs_hessian for (_, _, plans, _, _) in components.values() for p in plans.values())

    calib_text = Path(calib_prompts).read_text(encoding="utf-8") if calib_prompts else None
    job = {
        "command": "quantize",
        "glmq": __version__,
        "recipe": rec.to_dict(),
        "source": source_fingerprint(src),
        "calib": calib_text,
        "shard": max_shard_bytes,
        "layer_outputs": layer_outputs,
        # Results depend on the device's arithmetic, so a resume must use the same kind of device.
        "device": device.split(":")[0],
    }
    folder = OutputFolder(out, job=job, force=force, sources=(src,))
    timings: dict = {}
    if prepare is not None:
        prepare(rec, timings)
    converting = time.perf_counter()

    # Weightless components and the pipeline index are copied as they are.
    folder.copy_in(src, "model_index.json")
    for comp in COMPONENTS:
        if not comp.has_weights:
            folder.copy_in(src, comp.name)

    writers = []
    for name, (comp, cr, plans, kept, model) in components.items():
        config = dict(cr.config)
        if plans:  # components the recipe leaves alone stay loadable by stock diffusers/transformers
            layers = {p.name: (p.fmt, p.algo, p.activations) for p in plans.values()}
            config["quantization_config"] = make_quantization_config(rec.summary(), layers, kept)
        folder.write_json(f"{comp.name}/config.json", config)
        folder.copy_side_files(cr.folder, comp.name,
                               skip=lambda n, comp=comp: n == "config.json" or n.startswith(comp.weights_name))
        by_weight = {f"{p.name}.weight": p for p in plans.values()}
        specs = []
        for tname, _, shape in tensor_specs(model, comp.dtype):
            info = cr.tensors[tname]
            if tname in by_weight:
                plan = by_weight[tname]
                for qname, (qshape, qdtype) in plan.fmt.expected_tensors(plan.name, plan.shape).items():
                    specs.append((qname, str(qdtype).removeprefix("torch."), tuple(qshape)))
            else:
                specs.append((tname, info.dtype, tuple(info.shape)))
        writer = folder.component_writer(comp, specs, max_shard_bytes=max_shard_bytes)
        writers.append((comp, cr, plans, by_weight, writer))

    total = sum(cr.nbytes for (_, cr, *_rest) in writers)
    stats_root = folder.partial / STATS_DIR
    layers: dict[str, dict] = {}
    with ByteProgress(total, f"quantize ({rec.name})", enabled=progress) as bar:
        for comp, cr, plans, by_weight, writer in writers:
            cache: dict[str, dict] = {}
            shard_stats: dict[str, dict] = {}
            prefix_of = {}
            for plan in plans.values():
                for qname in plan.fmt.expected_tensors(plan.name, plan.shape):
                    prefix_of[qname] = plan

            def produce(name, cr=cr, cache=cache, prefix_of=prefix_of, shard_stats=shard_stats, comp=comp):
                plan = prefix_of.get(name)
                if plan is None:
                    t = cr.get(name)
                    _check_finite(t, f"{cr.folder}: tensor {name!r}")
                    bar.update(t.numel() * t.element_size())
                    return t
                if plan.name not in cache:
                    cache.clear()
                    cal = calibrators.get(comp.name)
                    calib = cal.result(plan.name) if cal is not None else None  # before the weight: lower peak
                    w = cr.get(f"{plan.name}.weight")  # the format rejects NaN/Inf while quantizing
                    bar.update(w.numel() * w.element_size())
                    cache[plan.name] = _quantize_layer(plan, w, calib, device)
                    shard_stats[plan.name] = cache[plan.name].pop("__stats__")
                    shard_stats[plan.name].update(component=comp.name, rule=plan.rule)
                return cache[plan.name][name.removeprefix(plan.name + ".")]

            def on_shard(i, writer=writer, shard_stats=shard_stats, comp=comp):
                stats = {k: shard_stats.pop(k) for k in _layers_of_shard(writer, i, plans)}
                folder.write_text(_stats_rel(comp.name, i),
                                  json.dumps({"plan": writer.plan_hashes[i], "layers": stats}, sort_keys=True))

            for i, rel in enumerate(writer.shard_files):
                shard = folder.partial / rel
                if shard.is_file() and _read_shard_stats(folder, writer, i, plans) is None:
                    shard.unlink()  # its statistics were lost (e.g. a kill while they were removed): redo it

            pending = set(writer.pending())
            if comp.name in calibrators:  # after a resume, layers of finished shards need no activations
                todo = {n for i in pending for n, _, _ in writer.shards[i]}
                calibrators[comp.name].wanted = {p.name for p in plans.values()
                                                 if any(q in todo for q in p.fmt.expected_tensors(p.name, p.shape))}
            for i, shard in enumerate(writer.shards):
                if i not in pending:
                    bar.update(sum(cr.tensors[n].nbytes for n, _, _ in shard if n in cr.tensors)
                               + sum(cr.tensors[f"{p.name}.weight"].nbytes for p in plans.values()
                                     if any(n == f"{p.name}.weight" for n, _, _ in shard)))
            writer.write(produce, on_shard=on_shard)
            for i in range(len(writer.shards)):
                stats = _read_shard_stats(folder, writer, i, plans)
                if stats is None:  # written above or checked before: only a concurrent writer gets here
                    raise GlmqError(f"{stats_root / comp.name}: statistics of shard {i} vanished while writing")
                layers.update({f"{comp.name}:{k}": v for k, v in stats.items()})
    timings["quantize_s"] = round(time.perf_counter() - converting, 3)

    report = _build_report(rec, components, layers, calibrated=gptq,
                           layer_outputs={k: c.describe() for k, c in calibrators.items()} if layer_outputs else None)
    documents = finish(report, folder.partial, timings) if finish is not None else {}
    folder.write_json("quantization_report.json", report)
    for name, text in documents.items():
        folder.write_text(name, text)
    # The side files go just before the commit: a kill in between leaves finished shards without their
    # statistics, which the rerun then writes again (above) rather than reporting them empty.
    shutil.rmtree(stats_root, ignore_errors=True)
    folder.commit({"source": {"quantize": {"recipe": rec.name}}})
    reader.close()
    timings["total_s"] = round(time.perf_counter() - started, 3)
    return {**report, "timings": timings}


def _stats_rel(component: str, shard: int) -> str:
    return f"{STATS_DIR}/{component}/{shard:05d}.json"


def _layers_of_shard(writer, i: int, plans: dict[str, LayerPlan]) -> list[str]:
    """Quantized layers whose statistics belong to shard ``i``: those whose ``.weight`` it stores."""
    names = {n for n, _, _ in writer.shards[i]}
    return sorted(p.name for p in plans.values() if f"{p.name}.weight" in names)


def _read_shard_stats(folder: OutputFolder, writer, i: int, plans: dict[str, LayerPlan]) -> dict | None:
    """Shard ``i``'s per-layer statistics from its side file, or None when it is missing, unreadable, or
    belongs to another shard plan or layer set."""
    p = folder.partial / _stats_rel(writer.component.name, i)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("plan") != writer.plan_hashes[i]:
        return None
    if not isinstance(data.get("layers"), dict) or sorted(data["layers"]) != _layers_of_shard(writer, i, plans):
        return None
    return data["layers"]


def _check_finite(t, what: str) -> None:
    """Refuse NaN/Inf, checking row blocks so that no tensor-sized temporary is allocated."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
    bad = sum(int((~torch.isfinite(rows[i:i + step])).sum()) for i in range(0, rows.shape[0], step))
    if bad:
        raise GlmqError(f"{what} holds {bad} NaN/Inf values; refusing to write a broken checkpoint")


# Layers are quantized in blocks of output rows of about this many weights: every format and algorithm
# here treats rows independently (GPTQ shares only the Hessian across rows), so the result is the same as
# one call, while the fp32 temporaries stay at ~64 MB whatever the layer's size.
_CHUNK_ELEMENTS = 16 * 1024 * 1024


def _calibrators(reader, components: dict, calib_prompts, device: str, layer_outputs: bool) -> dict:
    """Calibrators by component: GPTQ Hessians (AR text decoder) and, with ``layer_outputs``, sampled
    layer inputs for the output SQNR of every other quantized layer (AR and DiT)."""
    from glmq.quant.calibrate import ArCalibrator, read_prompts

    for name, (_, _, plans, _, _) in components.items():
        for plan in plans.values():
            if plan.algo.needs_hessian and name != "vision_language_encoder":
                raise GlmqError(f"{plan.algo.name} calibration is implemented for the AR text decoder only, "
                                f"not for {name} layer {plan.name}")
    read_prompts(calib_prompts)  # a bad prompts file fails before any work starts
    out = {}
    ar_plans = components["vision_language_encoder"][2]
    if ar_plans and (layer_outputs or any(p.algo.needs_hessian for p in ar_plans.values())):
        out["vision_language_encoder"] = ArCalibrator(reader, ar_plans, prompts_file=calib_prompts, device=device,
                                                      capture=layer_outputs)
    if layer_outputs and components["transformer"][2]:
        from glmq.quant.dit_calibrate import DitCalibrator

        out["transformer"] = DitCalibrator(reader, components["transformer"][2], device=device)
    return out


def _quantize_layer(plan: LayerPlan, w, calib, device: str) -> dict:
    """Quantize one layer (or take the tensors a calibrator computed); returns stored tensors (CPU) plus
    ``__stats__``: weight SQNR, and output SQNR on the sampled inputs of ``calib`` (a
    :class:`~glmq.quant.calibrate.LayerCalibration` or None) when it has them. Layers not rounded to
    nearest also get the output SQNR RTN reaches on the same inputs (``rtn_output_sqnr_db``).

    Outputs are computed as the runtime computes them (:func:`~glmq.quant.formats.linear.runtime_output`):
    a W8A8 layer's activations are quantized per token, as its GPU kernel does. For calibrated (GPTQ)
    layers the inputs are held out: they never entered the Hessian the weights were fitted to."""
    import torch

    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.metrics import ratio_db

    tensors = calib.tensors if calib is not None else None
    hessian = calib.hessian if calib is not None else None
    x = calib.inputs.to(device) if calib is not None and calib.inputs is not None else None
    wd = w.to(device)
    rows = max(1, _CHUNK_ELEMENTS // plan.shape[1])
    if tensors is None:
        h = hessian.to(device) if hessian is not None else None
        parts = []
        try:
            for start in range(0, plan.shape[0], rows):
                parts.append(plan.algo.quantize_weight(plan.fmt, wd[start:start + rows], hessian=h))
        except GlmqError as e:
            raise GlmqError(f"tensor {plan.name + '.weight'!r}: {e}") from None
        # Joined where they were computed, copied to the host once (below): no parts plus whole on the host.
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        del parts
    stats = {
        "shape": list(plan.shape),
        "format": plan.fmt.name,
        "algorithm": plan.algo.name,
        "bits_per_weight": plan.fmt.nbytes(plan.shape) * 8 / (plan.shape[0] * plan.shape[1]),
        "weight_sqnr_db": None,
        "output_sqnr_db": None,
    }
    rtn = get_algorithm("rtn") if plan.algo.name != "rtn" else None
    # Over row blocks: sums of squares of the weight and its quantization error, and (with sampled inputs X)
    # of X W^T and of the runtime's output error, for the layer and (other algorithms) for RTN's.
    signal = noise = out_signal = out_noise = rtn_noise = 0.0
    for start in range(0, plan.shape[0], rows):
        part = {k: v[start:start + rows].to(device) for k, v in tensors.items()}
        ref = wd[start:start + rows].float()
        err = plan.fmt.dequantize(part, tuple(ref.shape)).sub_(ref)
        signal += float(ref.double().square().sum())
        noise += float(err.double().square().sum())
        if x is not None:
            y = x @ ref.T
            out_signal += float(y.double().square().sum())
            out_noise += float(_runtime_error(plan, part, x, y).square().sum())
            if rtn is not None:
                r = rtn.quantize_weight(plan.fmt, wd[start:start + rows])
                rtn_noise += float(_runtime_error(plan, r, x, y).square().sum())
    stats["weight_sqnr_db"] = ratio_db(signal, noise)
    if x is not None:
        stats["output_sqnr_db"] = ratio_db(out_signal, out_noise)
        if rtn is not None:
            stats["rtn_output_sqnr_db"] = ratio_db(out_signal, rtn_noise)
    out = {k: v.cpu() for k, v in tensors.items()}
    out["__stats__"] = stats
    return out


def _runtime_error(plan: LayerPlan, tensors: dict, x, y):
    """The runtime's output for inputs ``x`` minus the exact ``y = x W^T`` (float64)."""
    from glmq.quant.formats.linear import runtime_output

    return runtime_output(plan.fmt, tensors, x, plan.mode).double() - y.double()


def _build_report(rec: Recipe, components: dict, layers: dict[str, dict], *, calibrated: bool,
                  layer_outputs: dict | None = None) -> dict:
    comps = {}
    for name, (comp, cr, plans, kept, model) in components.items():
        before = sum(info.nbytes for info in cr.tensors.values())
        after = before
        qparams = 0
        for plan in plans.values():
            info = cr.tensors[f"{plan.name}.weight"]
            after += plan.fmt.nbytes(plan.shape) - info.nbytes
            qparams += plan.shape[0] * plan.shape[1]
        params = sum(info.numel for info in cr.tensors.values())
        comps[name] = {
            "bytes_before": before,
            "bytes_after": after,
            "params": params,
            "quantized_params": qparams,
            "bits_per_weight": round(after * 8 / params, 3) if params else None,
            "quantized_layers": len(plans),
            "kept_linears": len(kept),
        }
    return {
        "recipe": rec.to_dict(),
        "calibrated": calibrated,
        "layer_outputs": layer_outputs,
        "components": comps,
        "layers": dict(sorted(layers.items())),
        "model_level": None,
    }
