"""Check a component's stored tensors against what its ``config.json`` says it must hold.

For an unquantized component the expected tensors are those of the upstream class built from the config
on the meta device: every name present, no extra names, exact shapes, floating-point dtypes. A component
with a ``quantization_config`` is checked by the quantization method that wrote it (glmq's own format
describes every quantized layer precisely); formats glmq does not own are reported, not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from glmq.errors import CheckpointError
from glmq.io.reader import ComponentReader

FLOAT_DTYPES = {"float32", "bfloat16", "float16", "float64"}


@dataclass
class ComponentCheck:
    params: int  # logical parameter count (of the unquantized model)
    checked: bool  # whether tensors were checked against the config
    notes: list[str] = field(default_factory=list)


def _first(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return problems[0] + more


def _param_count(expected: dict) -> int:
    """Values in all the tensors of ``{name: shape}``."""
    return sum(math.prod(shape) for shape in expected.values())


def check_component(reader: ComponentReader) -> ComponentCheck:
    """Raise :class:`CheckpointError` naming the first problem; return counts when the component is sound."""
    from glmq.models.build import expected_specs

    comp = reader.component
    expected = expected_specs(comp, reader.config)
    params = _param_count(expected)
    qcfg = reader.quantization_config
    if qcfg is not None:
        where = f"{reader.folder}/config.json"
        check_quantization_config(qcfg, where)
        method = qcfg.get("quant_method")
        if method == "glmq":
            from glmq.errors import GlmqError
            from glmq.quant.formats.qconfig import expected_quantized_tensors

            try:
                expected_q = expected_quantized_tensors(expected, qcfg)
            except GlmqError as e:
                raise CheckpointError(f"{where}: {e}") from None
            except (TypeError, ValueError, KeyError) as e:  # a format description the format classes reject
                raise CheckpointError(f"{where}: malformed quantization_config ({e.__class__.__name__})") from None
            _compare(reader, {n: s for n, (s, _) in expected_q.items()}, {n: d for n, (_, d) in expected_q.items()})
            return ComponentCheck(params, True)
        return ComponentCheck(params, False, [f"quantized by {method!r}: tensors not checked by glmq"])
    _compare(reader, expected, None)
    return ComponentCheck(params, True)


def check_quantization_config(qcfg, where: str) -> None:
    """Types of the ``quantization_config`` fields glmq reads (before any of them is used)."""
    from glmq.io.safe_read import want_bool, want_dict, want_int, want_list, want_str

    want_dict(qcfg, where, "quantization_config")
    want_str(qcfg.get("quant_method"), where, "quantization_config.quant_method", max_len=64)
    if qcfg["quant_method"] != "glmq":
        return
    for key in ("recipe", "formats", "layers"):
        if key in qcfg:
            want_dict(qcfg[key], where, f"quantization_config.{key}")
    for key, fmt in qcfg.get("formats", {}).items():
        field = f"quantization_config.formats[{key[:40]!r}]"
        want_dict(fmt, where, field)
        want_str(fmt.get("format"), where, f"{field}.format", max_len=64)
        for k, v in fmt.items():
            if k in ("group_size", "bits", "version"):
                want_int(v, where, f"{field}.{k}", lo=1, hi=1 << 20)
            elif k == "symmetric":
                want_bool(v, where, f"{field}.{k}")
    for name, entry in qcfg.get("layers", {}).items():
        field = f"quantization_config.layers[{name[:80]!r}]"
        want_dict(entry, where, field)
        want_str(entry.get("format"), where, f"{field}.format", max_len=64)
        if "activations" in entry:
            want_str(entry["activations"], where, f"{field}.activations", max_len=64)
    for i, name in enumerate(want_list(qcfg.get("not_quantized", []), where, "quantization_config.not_quantized")):
        want_str(name, where, f"quantization_config.not_quantized[{i}]")


def _compare(reader: ComponentReader, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str | None] | None) -> None:
    where = reader.folder
    stored = reader.tensors
    problems = []
    missing = [n for n in shapes if n not in stored]
    if missing:
        problems.append(f"{where}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = [n for n in stored if n not in shapes]
    if unexpected:
        problems.append(f"{where}: unexpected tensor {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, shape in shapes.items():
        info = stored.get(name)
        if info is None:
            continue
        if tuple(info.shape) != tuple(shape):
            problems.append(f"{where}: tensor {name!r} has shape {list(info.shape)}, config implies {list(shape)}")
        want = dtypes.get(name) if dtypes else None
        if want is not None and info.dtype != want:
            problems.append(f"{where}: tensor {name!r} has dtype {info.dtype}, expected {want}")
        elif want is None and info.dtype not in FLOAT_DTYPES:
            problems.append(f"{where}: tensor {name!r} has dtype {info.dtype}, expected a floating-point dtype")
    if problems:
        raise CheckpointError(_first(problems))


def check_pipeline(path, *, hashes: bool = False, values: bool = False, gguf: bool = False):
    """Validate a whole pipeline folder the one way ``inspect`` and ``glmq.load`` share.

    Checks the layout, every weight component's config (types and sizes, before anything is built) and its
    tensors against that config (names, shapes, dtypes), and the manifest when there is one (sizes; sha256
    too with ``hashes``). With ``values`` every floating-point tensor is read once, block by block, and
    NaN/Inf refused. With ``gguf`` components exported by ``glmq export gguf`` are accepted and checked
    (config, tensor names and shapes, byte layout). Returns ``(reader, {component: ComponentCheck},
    manifest problems)``; raises :class:`CheckpointError` for the first structural problem.
    """
    from glmq.io.layout import COMPONENTS, WEIGHT_COMPONENTS, read_json
    from glmq.io.manifest import verify_manifest
    from glmq.io.reader import PipelineReader

    reader = PipelineReader(path)
    checks: dict[str, ComponentCheck] = {}
    for comp in WEIGHT_COMPONENTS:
        if gguf:
            cfg = read_json(reader.path / comp.name / "config.json", f"{comp.name} config.json")
            qcfg = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else cfg
            if qcfg.get("quant_method") == "gguf":
                checks[comp.name] = _check_gguf_component(reader.path / comp.name, comp, values=values)
                continue
        cr = reader.component(comp.name)
        checks[comp.name] = check_component(cr)
        if values:
            for name in cr.names():
                cr.get(name)  # refuses NaN/Inf (glmq.io.finite), one tensor at a time
    for comp in COMPONENTS:
        if not comp.has_weights:
            check_side_files(reader.path / comp.name)
    manifest = reader.manifest
    problems = [] if manifest is None else verify_manifest(reader.path, manifest, hashes=hashes)
    return reader, checks, problems


MAX_SIDE_FILES = 1000


def check_side_files(folder) -> None:
    """The processor, tokenizer and scheduler folders, which the model libraries read: regular files only,
    size-capped, and every ``*.json`` well-formed with bounded nesting (see :mod:`glmq.io.safe_read`)."""
    from glmq.io.safe_read import MAX_INDEX_BYTES, loads_json, read_bytes

    entries = sorted(folder.iterdir())
    if len(entries) > MAX_SIDE_FILES:
        raise CheckpointError(f"{folder}: {len(entries)} entries, more than the {MAX_SIDE_FILES} glmq accepts")
    for p in entries:
        data = read_bytes(p, "file", MAX_INDEX_BYTES)
        if p.suffix == ".json":
            loads_json(data, p, "JSON file")


def _check_gguf_component(folder, comp, *, values: bool) -> ComponentCheck:
    from glmq.models.build import expected_specs
    from glmq.quant.formats.gguf.reader import GgufComponent

    src = GgufComponent(folder, comp)
    if src.component is not comp or src.source.component != comp.name:
        raise CheckpointError(f"{folder}: its GGUF file holds the {src.source.component}, not the {comp.name}")
    expected = expected_specs(comp, src.config)
    stored = {n: src.source.shape(n) for n in src.names()}
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise CheckpointError(f"{src.source.path}: missing tensor {missing[0]!r}")
    for name, shape in stored.items():
        if name not in expected:
            raise CheckpointError(f"{src.source.path}: unexpected tensor {name!r}")
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{src.source.path}: tensor {name!r} has shape {list(shape)}, "
                                  f"config implies {list(expected[name])}")
    if values:
        for name in stored:
            src.get(name)
    params = _param_count(expected)
    return ComponentCheck(params, True)
