"""Read a glmq GGUF export back as Hugging Face-named tensors.

:class:`GgufTensorSource` opens a ``glm-image-ar-*.gguf`` or ``glm-image-dit-*.gguf`` file written by
:mod:`glmq.export.gguf_export` (memory-mapped by gguf-py's ``GGUFReader``: opening costs the header only),
rebuilds the model config stored in its metadata and serves each tensor under its transformers/diffusers
name, dequantized by :mod:`glmq.quant.formats.gguf.blocks`. ``glmq.load`` uses it to accept GGUF files:

    src = GgufTensorSource("glm-image-ar-Q4_K_M.gguf")
    model = build_model(BY_NAME[src.component], src.config, device="cpu")
    for name in src.names():
        model.get_parameter(name).data.copy_(src.get(name))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from glmq.errors import CheckpointError, GlmqError
from glmq.quant.formats.gguf import names as gn
from glmq.quant.formats.gguf import blocks as gq

if TYPE_CHECKING:
    import torch

__all__ = ["GgufComponent", "GgufTensorSource", "read_metadata"]

T = GGMLQuantizationType
_COMPONENT = {gn.AR_ARCH: "vision_language_encoder", gn.DIT_ARCH: "transformer"}


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key/value of a GGUF file as Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # version and counts: file structure, not metadata
            continue
        value = field.contents()
        if field.types and field.types[0] != GGUFValueType.ARRAY and isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


MAX_DIM = 1 << 40  # a single dimension; the release's largest is 168064


def _check_layout(path: Path, reader: GGUFReader) -> None:
    """Every tensor's dimensions positive and bounded, its byte range inside the file, no two overlapping.

    gguf-py computes sizes with numpy integers (which wrap) and maps whatever range the file claims, so an
    overlapping or out-of-file offset would otherwise load another tensor's bytes without complaint.
    """
    size = path.stat().st_size
    spans = []
    for t in reader.tensors:
        dims = [int(d) for d in t.shape.tolist()]
        if not dims or len(dims) > 4 or any(not 1 <= d <= MAX_DIM for d in dims):
            raise CheckpointError(f"{path}: tensor {t.name[:80]!r} has invalid dimensions {dims[:8]}")
        numel = 1
        for d in dims:
            numel *= d
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if numel % block or dims[0] % block:
            raise CheckpointError(f"{path}: tensor {t.name[:80]!r} rows of {dims[0]} are not whole {t.tensor_type.name} blocks")
        nbytes = numel // block * type_size
        begin = int(t.data_offset)
        if begin < 0 or begin + nbytes > size:
            raise CheckpointError(f"{path}: tensor {t.name[:80]!r} byte range [{begin}, {begin + nbytes}) runs past "
                                  f"the end of the file ({size} bytes)")
        spans.append((begin, begin + nbytes, t.name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {name[:80]!r} and {other[:80]!r} overlap (corrupt GGUF file)")


class GgufTensorSource:
    """The tensors and config of one glmq GGUF export file.

    ``config``: the Hugging Face config dict (``GlmImageConfig.to_dict()`` for the AR, the diffusers config
    for the DiT); ``component``: the pipeline component it replaces (``vision_language_encoder`` or
    ``transformer``); ``metadata``: all GGUF keys.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        try:
            self._reader = GGUFReader(self.path)
        except Exception as e:  # gguf-py raises ValueError, struct.error, ... on malformed files
            # Only the class: gguf-py's messages quote what it read (the version field, tensor names), and a
            # linked file may be anything.
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e.__class__.__name__})") from None
        try:
            self.metadata = read_metadata(self._reader)
        except (UnicodeDecodeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{self.path}: unreadable GGUF metadata ({e.__class__.__name__})") from None
        self.architecture = self.metadata.get("general.architecture")
        try:
            self.config: dict[str, Any] = gn.hf_config_from_metadata(self.metadata)
        except GlmqError as e:  # a GGUF file of another model, or a config that is not JSON
            raise CheckpointError(f"{self.path}: {str(e).removeprefix('GGUF metadata: ')}") from None
        self.component = _COMPONENT[self.architecture]
        _check_layout(self.path, self._reader)
        to_hf = gn.ar_hf_name if self.architecture == gn.AR_ARCH else gn.dit_hf_name
        self._tensors = {}
        for t in self._reader.tensors:
            try:
                name = to_hf(t.name)
            except Exception:
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r} for {self.architecture}") from None
            self._tensors[name] = t

    def names(self) -> list[str]:
        """Hugging Face names of the stored tensors, in file order."""
        return list(self._tensors)

    def _tensor(self, name: str):
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        return t

    def qtype(self, name: str) -> GGMLQuantizationType:
        """The GGML type ``name`` is stored as."""
        return self._tensor(name).tensor_type

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's PyTorch shape (GGUF stores dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes, uint8 ``(rows, bytes per row)`` for block types (memory-mapped, read-only)."""
        data = self._tensor(name).data.view(np.uint8)
        return data.reshape(-1, data.shape[-1])

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as a fresh CPU tensor: F32 and BF16 as stored, block types dequantized to float32
        (then cast to ``dtype`` if given)."""
        import torch

        t = self._tensor(name)
        shape = self.shape(name)
        if t.tensor_type == T.F32:
            out = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(shape)
        elif t.tensor_type == T.BF16:
            raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
            out = torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(shape)
        elif t.tensor_type in gq.QUANT_TYPES:
            out = torch.from_numpy(gq.dequantize(self.raw(name), t.tensor_type)).reshape(shape)
        else:
            valid = ", ".join(["F32", "BF16"] + [q.name for q in gq.QUANT_TYPES])
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has GGML type {t.tensor_type.name}; glmq reads {valid}"
            )
        from glmq.io.finite import check_finite

        check_finite(out, f"{self.path}: tensor {name!r}")
        return out if dtype is None else out.to(dtype)

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None


class GgufComponent:
    """A component exported by ``glmq export gguf``: its config.json points at a GGUF file."""

    def __init__(self, folder: str | Path, comp):
        from glmq.io.layout import read_json

        self.folder = Path(folder)
        self.component = comp
        cfg = read_json(self.folder / "config.json", f"{comp.name} config.json")
        pointer = cfg.get("quantization_config")
        pointer = pointer if isinstance(pointer, dict) else cfg
        if not isinstance(pointer.get("gguf_file"), str):
            raise CheckpointError(f"{self.folder}/config.json: quantization_config names no GGUF file")
        from glmq.io.confine import resolve_inside

        try:  # relative to the pipeline folder, and staying inside it (also through links)
            file = resolve_inside(self.folder.parent, pointer["gguf_file"])
        except GlmqError as e:
            raise CheckpointError(f"{self.folder}/config.json: gguf_file: {e}") from None
        self.source = GgufTensorSource(file)
        self.config = self.source.config
        self.quantization_config = None

    def names(self) -> list[str]:
        return list(self.source.names())

    def get(self, name: str):
        return self.source.get(name)
