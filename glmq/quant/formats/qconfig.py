"""The ``quantization_config`` a glmq-quantized component carries, and what it implies on disk.

Written into the component's ``config.json``::

    "quantization_config": {
      "quant_method": "glmq", "version": 1,
      "recipe": {"name": "default", "version": 1, "description": "..."},
      "formats": {"q0": {<format config: name, version, bits, group size, symmetry, packing, dtypes>}},
      "layers": {"<linear module name>": {"format": "q0", "algorithm": {...}, "activations": "weight_only"}},
      "not_quantized": ["<linear module names kept in their original dtype>"]
    }

Every quantized layer is listed by name with a full description of its format, so a loader never infers a
format from a file or tensor name.
"""

from __future__ import annotations

from typing import Any

from glmq.errors import CheckpointError

QUANT_METHOD = "glmq"
CONFIG_VERSION = 1


def make_quantization_config(recipe_summary: dict, layers: dict[str, tuple[Any, Any, str]],
                             not_quantized: list[str]) -> dict:
    """``layers``: module name -> (format, algorithm, activations)."""
    formats: dict[str, dict] = {}
    keys: dict[str, str] = {}
    entries = {}
    for name, (fmt, algo, acts) in layers.items():
        cfg = fmt.config()
        sig = repr(sorted(cfg.items()))
        if sig not in keys:
            keys[sig] = f"q{len(keys)}"
            formats[keys[sig]] = cfg
        entries[name] = {"format": keys[sig], "algorithm": algo.config(), "activations": acts}
    return {
        "quant_method": QUANT_METHOD,
        "version": CONFIG_VERSION,
        "recipe": recipe_summary,
        "formats": formats,
        "layers": entries,
        "not_quantized": sorted(not_quantized),
    }


def layer_formats(qcfg: dict) -> dict[str, tuple[Any, str]]:
    """Module name -> (format object, activations mode), validated."""
    from glmq.quant.formats import format_from_config

    if qcfg.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"not a glmq quantization_config (quant_method={qcfg.get('quant_method')!r})")
    if qcfg.get("version") != CONFIG_VERSION:
        raise CheckpointError(f"glmq quantization_config version {qcfg.get('version')!r} is not supported")
    formats = {k: format_from_config(v) for k, v in qcfg.get("formats", {}).items()}
    out = {}
    for name, entry in qcfg.get("layers", {}).items():
        if entry.get("format") not in formats:
            raise CheckpointError(f"quantization_config: layer {name!r} names unknown format {entry.get('format')!r}")
        out[name] = (formats[entry["format"]], entry.get("activations", "weight_only"))
    return out


def expected_quantized_tensors(expected: dict[str, tuple[int, ...]], qcfg: dict) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """Name -> (shape, dtype or None) of a quantized component, from its unquantized expectation."""
    out: dict[str, tuple[tuple[int, ...], str | None]] = {n: (s, None) for n, s in expected.items()}
    for prefix, (fmt, _) in layer_formats(qcfg).items():
        wname = f"{prefix}.weight"
        if wname not in out:
            raise CheckpointError(f"quantization_config lists layer {prefix!r}, which the model does not have")
        shape = out.pop(wname)[0]
        for name, (qshape, qdtype) in fmt.expected_tensors(prefix, shape).items():
            out[name] = (tuple(qshape), str(qdtype).removeprefix("torch."))
    return out
