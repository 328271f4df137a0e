"""Check a component's stored tensors against what its ``config.json`` says it must hold.

For an unquantized component the expected tensors are those of the upstream class built from the config
on the meta device: every name present, no extra names, exact shapes, floating-point dtypes. A component
with a ``quantization_config`` is checked by the quantization method that wrote it (glmq's own format
describes every quantized layer precisely); formats glmq does not own are reported, not checked.
"""

from __future__ import annotations

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


def check_component(reader: ComponentReader) -> ComponentCheck:
    """Raise :class:`CheckpointError` naming the first problem; return counts when the component is sound."""
    from glmq.models.build import expected_specs

    comp = reader.component
    expected = expected_specs(comp, reader.config)
    params = 0
    for shape in expected.values():
        n = 1
        for d in shape:
            n *= d
        params += n
    qcfg = reader.quantization_config
    if qcfg is not None:
        method = qcfg.get("quant_method")
        if method == "glmq":
            from glmq.quant.checkpoint import expected_quantized_tensors

            expected_q = expected_quantized_tensors(expected, qcfg)
            _compare(reader, {n: s for n, (s, _) in expected_q.items()}, {n: d for n, (_, d) in expected_q.items()})
            return ComponentCheck(params, True)
        return ComponentCheck(params, False, [f"quantized by {method!r}: tensors not checked by glmq"])
    _compare(reader, expected, None)
    return ComponentCheck(params, True)


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
