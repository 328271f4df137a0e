"""``glmq inspect``: what a GLM-Image folder holds and whether it is intact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from glmq.io.layout import COMPONENTS, read_json
from glmq.checkpoint.validate import check_pipeline


def inspect_pipeline(path: str | Path, *, verify_hashes: bool = True, check_values: bool = True) -> dict:
    """A JSON-able report: components, classes, parameter counts, dtypes, bytes, quantization, manifest.

    Raises :class:`~glmq.errors.CheckpointError` for a folder that is not a sound GLM-Image pipeline,
    including weights holding NaN/Inf (``check_values``: every tensor read once, block by block). The checks
    are :func:`glmq.checkpoint.validate.check_pipeline`, the same ``glmq.load`` runs; a ``glmq export gguf`` folder
    is checked through its GGUF files and its manifest.
    """
    reader, checks, problems = check_pipeline(path, hashes=verify_hashes, values=check_values, gguf=True)
    report: dict = {"path": str(Path(path)), "pipeline": reader.model_index["_class_name"], "components": []}
    total_params = total_bytes = 0
    for comp in COMPONENTS:
        entry: dict = {"name": comp.name, "library": comp.library, "class": comp.class_name, "role": comp.role}
        declared = reader.model_index.get(comp.name)
        if isinstance(declared, list) and len(declared) == 2 and all(isinstance(x, str) for x in declared):
            entry["library"], entry["class"] = declared
        gguf = _gguf_component(reader.path, comp) if comp.has_weights else None
        if gguf is not None:  # ``glmq export gguf``: the weights are one GGUF file, verified by the manifest
            entry.update(gguf)
            total_bytes += gguf["bytes"]
        elif comp.has_weights:
            cr = reader.component(comp.name)
            check = checks[comp.name]
            dtypes: Counter = Counter()
            for info in cr.tensors.values():
                dtypes[info.dtype] += info.numel
            qcfg = cr.quantization_config
            entry.update(
                params=check.params,
                tensors=len(cr.tensors),
                shards=len(cr.files),
                bytes=cr.nbytes,
                dtypes=dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
                quantization=_quant_summary(qcfg),
                checked=check.checked,
                notes=check.notes,
            )
            total_params += check.params
            total_bytes += cr.nbytes
        else:
            folder = reader.path / comp.name
            entry["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
        report["components"].append(entry)
    report["total_params"] = total_params
    report["total_bytes"] = total_bytes
    manifest = reader.manifest
    if manifest is None:
        report["manifest"] = {"present": False, "verified": None, "problems": []}
    else:
        report["manifest"] = {
            "present": True,
            "verified": not problems,
            "hashes_checked": verify_hashes,
            "files": len(manifest["files"]) if isinstance(manifest.get("files"), dict) else 0,
            "problems": problems,
        }
    reader.close()
    return report


def _gguf_component(root: Path, comp) -> dict | None:
    """The report entry of a component whose ``config.json`` points at a GGUF file (None otherwise)."""
    from glmq.errors import CheckpointError, GlmqError
    from glmq.io.confine import resolve_inside

    qcfg = read_json(root / comp.name / "config.json", f"{comp.name} config.json").get("quantization_config")
    if not (isinstance(qcfg, dict) and qcfg.get("quant_method") == "gguf"):
        return None
    try:
        file = resolve_inside(root, qcfg.get("gguf_file"))
    except GlmqError as e:
        raise CheckpointError(f"{comp.name}/config.json: gguf_file: {e}") from None
    if not file.is_file():
        raise CheckpointError(f"{file}: missing GGUF file named by {comp.name}/config.json")
    return {"gguf_file": qcfg["gguf_file"], "bytes": file.stat().st_size, "dtypes": {},
            "quantization": {"quant_method": "gguf", "type": qcfg.get("type")}, "notes": []}


def _quant_summary(qcfg: dict | None) -> dict | None:
    if qcfg is None:
        return None
    if qcfg.get("quant_method") == "glmq":
        counts: Counter = Counter(e.get("format") for e in qcfg.get("layers", {}).values())
        formats = []
        for key, n in sorted(counts.items()):
            f = qcfg.get("formats", {}).get(key, {})
            detail = f.get("format", "?")
            if "group_size" in f:
                detail += f" g{f['group_size']} {'sym' if f.get('symmetric') else 'asym'}"
            formats.append(f"{detail} x{n}")
        return {"quant_method": "glmq", "recipe": qcfg.get("recipe", {}).get("name"), "layers": sum(counts.values()),
                "formats": formats}
    keys = ("quant_method", "format", "formats", "recipe", "bits", "group_size", "load_in_4bit", "load_in_8bit",
            "bnb_4bit_quant_type")
    return {k: qcfg[k] for k in keys if k in qcfg}


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.3g} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n} {unit}"


def format_report(report: dict) -> str:
    lines = [f"{report['path']}: {report['pipeline']}", ""]
    header = f"{'component':<25} {'class':<34} {'params':>9} {'size':>9} {'tensors':>7} {'shards':>6}  dtypes / quantization"
    lines += [header, "-" * len(header)]
    for c in report["components"]:
        if "gguf_file" in c:
            lines.append(f"{c['name']:<25} {c['class']:<34} {'-':>9} {_human(c['bytes']):>9} {'':>7} {1:>6}  "
                         f"GGUF {c['quantization']['type']} ({c['gguf_file']})")
        elif "params" in c:
            total = sum(c["dtypes"].values()) or 1
            dt = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in c["dtypes"].items())
            q = c["quantization"]
            qs = f"  [{', '.join(f'{k}={v}' for k, v in q.items())}]" if q else ""
            lines.append(
                f"{c['name']:<25} {c['class']:<34} {_human(c['params'], ''):>9} {_human(c['bytes']):>9} "
                f"{c['tensors']:>7} {c['shards']:>6}  {dt}{qs}"
            )
            for note in c.get("notes", []):
                lines.append(f"{'':<25} note: {note}")
        else:
            lines.append(f"{c['name']:<25} {c['class']:<34} {'-':>9} {'':>9} {'':>7} {'':>6}  {len(c['files'])} files")
    lines.append("")
    has_gguf = any("gguf_file" in c for c in report["components"])
    uncounted = " (GGUF components' parameters not counted)" if has_gguf else ""
    lines.append(f"total: {_human(report['total_params'], '')} parameters{uncounted}, "
                 f"{_human(report['total_bytes'])} of weights")
    m = report["manifest"]
    if not m["present"]:
        lines.append("manifest: none (folder not written by glmq)")
    elif m["verified"]:
        how = "sha256" if m["hashes_checked"] else "sizes only"
        lines.append(f"manifest: OK, {m['files']} files verified ({how})")
    else:
        lines.append(f"manifest: FAILED, {len(m['problems'])} problems:")
        lines += [f"  {p}" for p in m["problems"]]
    return "\n".join(lines)
