"""Opening a source checkpoint for a converter (quantize, export): checks shared by every converter."""

from __future__ import annotations

from pathlib import Path

from glmq.errors import GlmqError
from glmq.io.layout import COMPONENTS, read_json
from glmq.io.reader import PipelineReader


def source_fingerprint(path: Path) -> list:
    """(relative path, size, mtime) of every file of a source folder: a resumed export must read the same."""
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            files.append([p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
    return files


def open_unquantized_source(src: Path, out: Path, *, action: str = "export from") -> PipelineReader:
    """Open ``src`` as an unquantized GLM-Image folder, every weight component checked against its config.

    Raises :class:`GlmqError` when ``out`` and ``src`` overlap, when a component already carries a
    ``quantization_config`` (glmq, bitsandbytes, GGUF, ...) or when a component is malformed.
    """
    from glmq.checkpoint.validate import check_component

    reader = PipelineReader(src)
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise GlmqError(f"output {out} must not be the input folder or inside it (or contain it)")
    for comp in COMPONENTS:
        if not comp.has_weights:
            continue
        config = read_json(src / comp.name / "config.json", f"{comp.name} config.json")
        qcfg = config.get("quantization_config")
        if qcfg is not None:
            method = qcfg.get("quant_method", "unknown") if isinstance(qcfg, dict) else "unknown"
            raise GlmqError(
                f"{src}: already quantized ({comp.name} carries a {method} quantization_config); "
                f"{action} the original bf16 checkpoint instead"
            )
        check_component(reader.component(comp.name))
    return reader
