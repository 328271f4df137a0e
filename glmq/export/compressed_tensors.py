"""``glmq export compressed-tensors``: GLM-Image with its AR and DiT in the compressed-tensors format.

compressed-tensors is llm-compressor's checkpoint format, which vLLM, SGLang and transformers read. The
folder written here is the source pipeline with two components rewritten:

- ``vision_language_encoder`` (the AR, transformers): int4 layers as pack-quantized W4A16, group 128 (or
  the recipe's group), symmetric or asymmetric as the recipe stored them;
- ``transformer`` (the DiT, diffusers): fp8 W8A8 layers as float-quantized FP8 with dynamic per-token
  activations, int8 W8A8 as int-quantized, 8-bit weight-only layers as W8A16;

each with a ``quantization_config`` (``quant_method: compressed-tensors``, ``format``, one config group
per glmq format, targets that name exactly the group's layers, every kept linear in ``ignore``). The
layouts are in :mod:`glmq.export.ct_layout`.

Sources: a glmq-quantized folder is repacked without re-quantizing. The one value the format cannot hold is
a non-integer int4 zero point (HQQ's): those layers are re-rounded, and the report gives each layer's
weight SQNR before and after. A bf16 folder is quantized by a recipe first (round-to-nearest and HQQ;
calibrated recipes need ``glmq quantize`` first), and then every SQNR is measured against the bf16 weight.

Streaming, atomic and resumable like every glmq converter: one layer at a time, shards in
``OUT.partial``, per-shard statistics in side files, renamed to ``OUT`` at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from glmq.errors import GlmqError
from glmq.export import ct_layout as ctl
from glmq.export.ct_report import REPORT, model_card, report_markdown
from glmq.export.hf import copy_component, copy_side_files
from glmq.io.layout import BY_NAME, COMPONENTS, WEIGHT_COMPONENTS, read_json
from glmq.io.reader import ComponentReader, PipelineReader
from glmq.checkpoint.source import open_unquantized_source, source_fingerprint
from glmq.io.writer import DEFAULT_MAX_SHARD_BYTES, OutputFolder

__all__ = ["EXPORTED", "export_compressed_tensors", "quantization_config"]

AR = "vision_language_encoder"
DIT = "transformer"
EXPORTED = (AR, DIT)
"""Components written in compressed-tensors form; the others are copied unchanged."""

STATS_DIR = ".glmq-ct-stats"


# ----------------------------------------------------------------------------------------------------------
# The quantization_config


def _pattern(name: str) -> str:
    """``re:`` target matching ``name`` with every block index generalized (``layers.\\d+.``)."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")]
    return "re:^" + r"\.".join(parts) + "$"


def _matches(target: str, name: str) -> bool:
    """compressed-tensors' ``match_name`` for name targets: ``re:`` is ``re.match``, else equality."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _targets(groups: dict[str, list[str]], linears: list[str]) -> dict[str, list[str]]:
    """Per group, targets matching its layers: block-generalized patterns when they match no layer of
    another group, else the exact names (a recipe may treat some blocks differently)."""
    owner = {n: g for g, names in groups.items() for n in names}
    out = {}
    for g, names in groups.items():
        pats = sorted({_pattern(n) for n in names})
        stray = [n for n in linears if owner.get(n, g) != g and any(_matches(p, n) for p in pats)]
        out[g] = pats if not stray else sorted(names)
    return out


def quantization_config(layers: dict[str, tuple[Any, str]], kept: list[str], linears: list[str]) -> dict:
    """compressed-tensors ``quantization_config`` for ``layers`` (module name -> (glmq format, activation
    mode)); ``kept`` linears go to ``ignore``; ``linears`` are all linear modules of the model."""
    schemes: dict[str, tuple[str, dict]] = {}
    groups: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for name, (fmt, acts) in layers.items():
        form, scheme = ctl.scheme_for(fmt, acts)
        sig = json.dumps(scheme, sort_keys=True)
        if sig not in keys:
            keys[sig] = f"group_{len(keys)}"
            schemes[keys[sig]] = (form, scheme)
        groups.setdefault(keys[sig], []).append(name)
    targets = _targets(groups, linears)
    formats = {form for form, _ in schemes.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {g: {"targets": targets[g], **scheme} for g, (_, scheme) in schemes.items()},
        "ignore": sorted(kept),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": ctl.CT_VERSION,
    }


# ----------------------------------------------------------------------------------------------------------
# Sources


def _open_source(src: Path, out: Path) -> tuple[PipelineReader, str]:
    """The source reader and its kind: ``"bf16"`` or ``"glmq"``; anything else is a user error."""
    from glmq.checkpoint.validate import check_component

    reader = PipelineReader(src)
    methods = {}
    for comp in WEIGHT_COMPONENTS:
        qcfg = read_json(src / comp.name / "config.json", f"{comp.name} config.json").get("quantization_config")
        if qcfg is not None:
            methods[comp.name] = qcfg.get("quant_method", "unknown") if isinstance(qcfg, dict) else "unknown"
    if not methods:
        return open_unquantized_source(src, out), "bf16"
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise GlmqError(f"output {out} must not be the input folder or inside it (or contain it)")
    for name, method in methods.items():
        if method != "glmq":
            raise GlmqError(f"{src}: {name} is quantized by {method!r}; compressed-tensors export reads glmq-"
                            "quantized or bf16 GLM-Image folders")
        if name not in EXPORTED:
            raise GlmqError(f"{src}: {name} is quantized; compressed-tensors export covers only the AR and DiT")
    for comp in WEIGHT_COMPONENTS:
        check_component(reader.component(comp.name))
    return reader, "glmq"


def _layer_sqnr_from_report(src: Path) -> dict[str, float | None]:
    """``component:layer`` -> weight SQNR (dB) the source's glmq fidelity report recorded, if it has one."""
    p = src / "quantization_report.json"
    if not p.is_file():
        return {}
    try:
        layers = json.loads(p.read_text(encoding="utf-8")).get("layers", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v.get("weight_sqnr_db") for k, v in layers.items() if isinstance(v, dict)}


def _plan(name: str, cr: ComponentReader, kind: str, recipe) -> dict[str, Any]:
    """Layers to convert (name -> (format, activations, algorithm or None, shape)), kept linears, specs."""
    from torch import nn

    from glmq.models.build import build_model, tensor_specs

    comp = BY_NAME[name]
    model = build_model(comp, cr.config)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers: dict[str, tuple] = {}
    if kind == "glmq":
        if cr.quantization_config is not None:
            from glmq.quant.formats.qconfig import layer_formats

            for lname, (fmt, acts) in layer_formats(cr.quantization_config).items():
                layers[lname] = (fmt, acts, None, shapes[lname])
    else:
        from glmq.quant.plan import plan_component

        plans, _, _ = plan_component(comp, cr, recipe)
        for p in plans.values():
            if p.algo.needs_hessian:
                raise GlmqError(f"recipe {recipe.name} calibrates {name} layer {p.name} ({p.algo.name}); run glmq "
                                "quantize with it first and export the quantized folder")
            layers[p.name] = (p.fmt, p.activations, p.algo, p.shape)
    for lname, (fmt, acts, _, _) in layers.items():
        ctl.scheme_for(fmt, acts)  # a format without an equivalent fails here, before anything is written
    kept = [n for n in linears if n not in layers]
    specs, owner = [], {}
    for tname, dtype, shape in tensor_specs(model, comp.dtype):
        prefix = tname.removesuffix(".weight")
        if tname.endswith(".weight") and prefix in layers:
            fmt, acts, _, lshape = layers[prefix]
            for spec in ctl.tensor_specs(fmt, acts, prefix, lshape):
                specs.append(spec)
                owner[spec[0]] = prefix
        else:
            info = cr.tensors[tname]
            specs.append((tname, info.dtype, tuple(info.shape)))
    return {"layers": layers, "kept": kept, "linears": linears, "specs": specs, "owner": owner}


# ----------------------------------------------------------------------------------------------------------
# One layer


CHUNK_ELEMENTS = 1 << 24
"""Weights converted at once: a layer is processed in blocks of rows (a multiple of 8, so that zero points
packed eight rows to an int32 concatenate), bounding the float32 temporaries to a few times 64 MB."""


def _convert(name: str, cr: ComponentReader, prefix: str, entry: tuple, glmq_sqnr: dict) -> tuple[dict, dict]:
    """compressed-tensors tensors of one layer and its statistics, a block of rows at a time."""
    import torch

    from glmq.quant.metrics import ratio_db

    fmt, acts, algo, shape = entry
    n, k = shape
    if algo is None:  # glmq source: its stored tensors
        stored = {q.removeprefix(prefix + "."): cr.get(q) for q in fmt.expected_tensors(prefix, shape)}
    else:
        source = cr.get(f"{prefix}.weight")
    rows = max(8, CHUNK_ELEMENTS // k // 8 * 8)
    parts, exact = [], True
    sums = {"glmq": 0.0, "extra": 0.0, "ref": 0.0, "glmq_err": 0.0, "ct_err": 0.0}
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ref = None
        if algo is None:
            tensors = {key: t[r0:r1] for key, t in stored.items()}
        else:
            ref = source[r0:r1]
            try:
                tensors = algo.quantize_weight(fmt, ref)
            except GlmqError as e:
                raise GlmqError(f"{name} tensor {prefix + '.weight'!r}: {e}") from None
            ref = ref.float()
        out, part_exact = ctl.convert_layer(fmt, acts, tensors, (r1 - r0, k), target=ref)
        parts.append(out)
        exact = exact and part_exact
        if part_exact and ref is None:
            continue  # a bit-exact repack: nothing to measure
        glmq_w = fmt.dequantize(tensors, (r1 - r0, k))
        ct_w = glmq_w if part_exact else ctl.dequantize_ct(fmt, acts, out, (r1 - r0, k))
        sums["glmq"] += float(glmq_w.square().sum())
        sums["extra"] += 0.0 if part_exact else float((ct_w - glmq_w).square().sum())
        if ref is not None:
            sums["ref"] += float(ref.square().sum())
            sums["glmq_err"] += float((glmq_w - ref).square().sum())
            sums["ct_err"] += float((ct_w - ref).square().sum())
    out = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key != "weight_shape"}
    if "weight_shape" in parts[0]:
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)

    form, _ = ctl.scheme_for(fmt, acts)
    stats: dict[str, Any] = {"shape": list(shape), "glmq_format": str(fmt), "ct_format": form, "exact": exact}
    stats["rerounding_sqnr_db"] = ratio_db(sums["glmq"], sums["extra"])  # None when exact
    if algo is not None:  # bf16 source: both measured against the source weight
        stats["glmq_sqnr_db"] = ratio_db(sums["ref"], sums["glmq_err"])
        stats["export_sqnr_db"] = ratio_db(sums["ref"], sums["ct_err"])
        stats["export_sqnr_estimated"] = False
    else:  # glmq source: its report's SQNR; the re-rounding noise added to glmq's noise estimates the result
        before = glmq_sqnr.get(f"{name}:{prefix}")
        stats["glmq_sqnr_db"] = before
        stats["export_sqnr_estimated"] = not exact
        if before is None or exact:
            stats["export_sqnr_db"] = before
        else:
            stats["export_sqnr_db"] = ratio_db(sums["glmq"], sums["glmq"] / 10 ** (before / 10) + sums["extra"])
    before, after = stats["glmq_sqnr_db"], stats["export_sqnr_db"]
    stats["sqnr_change_db"] = 0.0 if exact else (round(after - before, 3) if None not in (before, after) else None)
    return out, stats


# ----------------------------------------------------------------------------------------------------------
# The exporter


def export_compressed_tensors(src: str | Path, out: str | Path, *, recipe: str | Path | None = None,
                              force: bool = False, progress: bool = True,
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write ``out``: the GLM-Image folder ``src`` (glmq-quantized, or bf16 with ``recipe``, default
    ``"default"``) with the AR and the DiT in compressed-tensors form. Returns the export report: per
    component the format, config groups and sizes; per layer the formats, whether the repack is exact, and
    weight SQNR before and after (dB)."""
    from glmq import __version__
    from glmq.progress import ByteProgress
    from glmq.quant.recipe import load_recipe

    src, out = Path(src), Path(out)
    reader, kind = _open_source(src, out)
    if kind == "glmq" and recipe is not None:
        raise GlmqError(f"{src} is already quantized by glmq; --recipe applies only to a bf16 source")
    rec = load_recipe(recipe or "default") if kind == "bf16" else None
    if rec is not None:
        for comp in WEIGHT_COMPONENTS:
            if comp.name not in EXPORTED and any(r.component == comp.name and r.format != "none" for r in rec.rules):
                raise GlmqError(f"recipe {rec.name} quantizes {comp.name}; compressed-tensors export covers only "
                                "the AR and DiT")
    plans = {name: _plan(name, reader.component(name), kind, rec) for name in EXPORTED}
    plans = {name: p for name, p in plans.items() if p["layers"]}
    if not plans:
        raise GlmqError(f"{src}: nothing to export: neither the AR nor the DiT has quantized layers")
    glmq_sqnr = _layer_sqnr_from_report(src) if kind == "glmq" else {}

    job = {"command": "export-compressed-tensors", "glmq": __version__, "source": source_fingerprint(src),
           "recipe": rec.to_dict() if rec else None, "shard": max_shard_bytes, "layout": ctl.CT_VERSION}
    folder = OutputFolder(out, job=job, force=force)
    shutil.copy2(src / "model_index.json", folder.path("model_index.json"))
    for comp in COMPONENTS:
        if comp.name not in plans:
            copy_component(src, folder, comp.name)
    writers = []
    for name, plan in plans.items():
        cr = reader.component(name)
        config = dict(cr.config)
        layers = {n: (e[0], e[1]) for n, e in plan["layers"].items()}
        config["quantization_config"] = quantization_config(layers, plan["kept"], plan["linears"])
        folder.write_json(f"{name}/config.json", config)
        copy_side_files(cr, folder)
        writers.append((name, cr, plan, folder.component_writer(BY_NAME[name], plan["specs"],
                                                                max_shard_bytes=max_shard_bytes)))

    stats_root = folder.partial / STATS_DIR
    total = sum(cr.nbytes for _, cr, _, _ in writers)
    with ByteProgress(total, "export compressed-tensors", enabled=progress) as bar:
        for name, cr, plan, writer in writers:
            cache: dict[str, dict] = {}
            shard_stats: dict[str, dict] = {}

            def produce(tname, name=name, cr=cr, plan=plan, cache=cache, shard_stats=shard_stats):
                prefix = plan["owner"].get(tname)
                if prefix is None:
                    t = cr.get(tname)
                    bar.update(t.numel() * t.element_size())
                    return t
                if prefix not in cache:
                    cache.clear()
                    cache[prefix], shard_stats[prefix] = _convert(name, cr, prefix, plan["layers"][prefix], glmq_sqnr)
                    bar.update(sum(i.nbytes for n, i in cr.tensors.items() if n.startswith(prefix + ".weight")))
                return cache[prefix][tname.removeprefix(prefix + ".")]

            def on_shard(i, name=name, writer=writer, shard_stats=shard_stats):
                names = {n for n, _, _ in writer.shards[i]}
                done = {k: v for k, v in shard_stats.items() if any(n.startswith(k + ".") for n in names)}
                p = stats_root / name / f"{i:05d}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(done, sort_keys=True))
                for k in done:
                    shard_stats.pop(k, None)

            pending = set(writer.pending())
            for i, shard in enumerate(writer.shards):
                if i not in pending:
                    bar.update(sum(cr.tensors[n].nbytes for n, _, _ in shard if n in cr.tensors))
            writer.write(produce, on_shard=on_shard)

    report = _report(src, kind, rec, writers, stats_root, folder.partial)
    shutil.rmtree(stats_root, ignore_errors=True)
    for extra in ("quantization_report.json", "quantization_report.md"):  # the glmq fidelity report, as it was
        if kind == "glmq" and (src / extra).is_file():
            shutil.copy2(src / extra, folder.path(extra))
    folder.write_json(f"{REPORT}.json", report)
    folder.write_text(f"{REPORT}.md", report_markdown(report))
    folder.write_text("README.md", model_card(report, src))
    folder.commit({"source": {"export-compressed-tensors": {"kind": kind, "recipe": rec.name if rec else None}}})
    reader.close()
    return report


def _report(src: Path, kind: str, rec, writers: list, stats_root: Path, partial: Path) -> dict:
    layers: dict[str, dict] = {}
    for name, _, _, _ in writers:
        for p in sorted((stats_root / name).glob("*.json")):
            for lname, s in json.loads(p.read_text()).items():
                layers[f"{name}:{lname}"] = {"component": name, **s}
    comps = {}
    for name, cr, plan, _ in writers:
        qcfg = read_json(partial / name / "config.json", "config.json")["quantization_config"]
        mine = [v for k, v in layers.items() if v["component"] == name]
        comps[name] = {
            "format": qcfg["format"],
            "config_groups": {g: {"targets": s["targets"], "format": s["format"],
                                  "weights": s["weights"], "input_activations": s["input_activations"]}
                              for g, s in qcfg["config_groups"].items()},
            "quantized_layers": len(plan["layers"]),
            "ignored_linears": len(plan["kept"]),
            "exact_layers": sum(1 for v in mine if v["exact"]),
            "rerounded_layers": sum(1 for v in mine if not v["exact"]),
            "bytes_before": cr.nbytes,
            "bytes_after": sum(f.stat().st_size for f in (partial / name).glob("*.safetensors")),
        }
    recipe = rec.summary() if rec is not None else _source_recipe(src)
    return {"format": "compressed-tensors", "layout_version": ctl.CT_VERSION, "source_kind": kind,
            "recipe": recipe, "components": comps, "layers": layers}


def _source_recipe(src: Path) -> dict | None:
    """The recipe summary a glmq-quantized source's configs record."""
    for name in EXPORTED:
        qcfg = read_json(src / name / "config.json", "config.json").get("quantization_config")
        if isinstance(qcfg, dict) and isinstance(qcfg.get("recipe"), dict):
            return qcfg["recipe"]
    return None
