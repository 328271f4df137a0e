"""``glmq export gguf``: a bf16 GLM-Image folder in, a folder with the AR and the DiT as GGUF files out.

``OUT/`` (built in ``OUT.partial`` and renamed when complete, with a sha256 manifest):

- ``glm-image-ar-<TYPE>.gguf``: the AR, llama.cpp tensor names and metadata (:mod:`glmq.quant.formats.gguf.names`,
  including the full Hugging Face config as JSON), types by plan (``Q4_K_M``: llama.cpp's mix,
  :func:`glmq.quant.formats.gguf.blocks.q4_k_m_plan`).
- ``glm-image-dit-<TYPE>.gguf``: the DiT, ComfyUI-GGUF conventions (diffusers tensor names), types by
  :func:`glmq.quant.formats.gguf.blocks.dit_plan`.
- the other components as in the source (glyph encoder and VAE safetensors, tokenizer, processor,
  scheduler), ``model_index.json``, and ``vision_language_encoder/`` / ``transformer/`` holding only their
  ``config.json`` (plus ``generation_config.json``) with a ``quantization_config`` naming the GGUF file:
  ``{"quant_method": "gguf", "gguf_file": "<file name, relative to the pipeline folder>", "type": ...}``,
  so a loader learns the format from the config, never from a file name.

Bounded memory: gguf-py's ``GGUFWriter.add_tensor`` keeps every tensor in memory until the file is
written, so the exporter declares the tensors first (``add_tensor_info``: names, types and byte shapes are
known from the plan), writes header, metadata and tensor infos, and then produces and writes one tensor at a
time (``write_tensor_data``). Quantization converts a tensor to float32 a slab of rows at a time, so the
peak is about one bf16 tensor plus its quantized bytes. Each GGUF file is written as ``*.tmp``, renamed and
journaled: a rerun after an interruption skips finished files (sha256-checked).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from glmq.errors import GlmqError
from glmq.quant.formats.gguf import names as gn
from glmq.quant.formats.gguf import blocks as gq
from glmq.export.hf import (
    check_choice,
    copy_component,
    copy_side_files,
)
from glmq.checkpoint.source import open_unquantized_source, source_fingerprint
from glmq.io.layout import BY_NAME, COMPONENTS
from glmq.io.safetensors_io import sha256_file
from glmq.io.writer import OutputFolder

if TYPE_CHECKING:
    import torch

__all__ = ["AR_TYPES", "DIT_TYPES", "GGML_MAX_DIMS", "export_gguf", "gguf_file_name"]

T = GGMLQuantizationType
AR = "vision_language_encoder"
DIT = "transformer"
GGML_MAX_DIMS = 4
_SLAB_VALUES = 1 << 22  # values converted to float32 at once while quantizing one tensor


def _ar_uniform(qtype: GGMLQuantizationType) -> Callable[[Mapping[str, Sequence[int]]], dict]:
    """A plan with Q4_K_M's structure (F32 norms and biases, BF16 image side) and ``qtype`` elsewhere;
    for 32-value block types, BF16 where a row is not a multiple of 32."""

    def plan(shapes):
        out = gq.q4_k_m_plan(shapes)
        for name, t in out.items():
            if t not in (T.F32, T.BF16):
                out[name] = qtype if shapes[name][-1] % gq.block_size(qtype) == 0 else T.BF16
        return out

    return plan


@dataclass(frozen=True)
class GgufType:
    """A named export type: the per-tensor type plan and the ``general.file_type`` it records."""

    plan: Callable[[Mapping[str, Sequence[int]]], dict[str, GGMLQuantizationType]]
    file_type: LlamaFileType


AR_TYPES: dict[str, GgufType] = {
    "Q4_K_M": GgufType(gq.q4_k_m_plan, LlamaFileType.MOSTLY_Q4_K_M),
    "Q8_0": GgufType(_ar_uniform(T.Q8_0), LlamaFileType.MOSTLY_Q8_0),
}
"""AR export types: llama.cpp's Q4_K_M mix, or Q8_0 wherever Q4_K_M quantizes."""

DIT_TYPES: dict[str, GgufType] = {
    "Q8_0": GgufType(lambda s: gq.dit_plan(s, T.Q8_0), LlamaFileType.MOSTLY_Q8_0),
    "Q6_K": GgufType(lambda s: gq.dit_plan(s, T.Q6_K), LlamaFileType.MOSTLY_Q6_K),
    "Q5_K_S": GgufType(lambda s: gq.dit_plan(s, T.Q5_K), LlamaFileType.MOSTLY_Q5_K_S),
    "Q4_K_S": GgufType(lambda s: gq.dit_plan(s, T.Q4_K), LlamaFileType.MOSTLY_Q4_K_S),
}
"""DiT export types (ComfyUI-GGUF's names): one block type for every quantized linear weight, the
conditioning embedders and output layer in BF16 (:func:`glmq.quant.formats.gguf.blocks.dit_plan`)."""


def gguf_file_name(component: str, type_name: str) -> str:
    """``glm-image-ar-Q4_K_M.gguf`` / ``glm-image-dit-Q8_0.gguf``."""
    return f"glm-image-{'ar' if component == AR else 'dit'}-{type_name}.gguf"


# ----------------------------------------------------------------------------------------------------------
# Tensor encoding


def _byte_shape(shape: Sequence[int], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Shape of the uint8 array gguf-py takes for a tensor of torch ``shape`` stored as ``qtype``."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if qtype in (T.F32, T.BF16):
        return (*shape[:-1], shape[-1] * nbytes) if shape else (nbytes,)
    rows = int(np.prod(shape[:-1]))
    return (rows, shape[-1] // block * nbytes)


def encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """A tensor's GGUF data: uint8 of :func:`_byte_shape` (F32 and BF16 are exact casts of the values)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if qtype == T.F32:
        return t.float().reshape(t.shape or (1,)).numpy().view(np.uint8)
    if qtype == T.BF16:
        return t.to(torch.bfloat16).reshape(t.shape or (1,)).view(torch.uint8).numpy()
    x = t.reshape(-1, t.shape[-1])
    out = np.empty(_byte_shape(tuple(t.shape), qtype), dtype=np.uint8)
    step = max(1, _SLAB_VALUES // x.shape[1])
    for r0 in range(0, x.shape[0], step):
        out[r0 : r0 + step] = gq.quantize(x[r0 : r0 + step].float().numpy(), qtype)
    return out


@dataclass(frozen=True)
class _Entry:
    gguf_name: str
    hf_name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return _byte_shape(self.shape, self.qtype)


def _entries(component: str, tensors: Mapping[str, Sequence[int]], kind: GgufType) -> list[_Entry]:
    to_gguf = gn.ar_gguf_name if component == AR else gn.dit_gguf_name
    names = {hf: to_gguf(hf) for hf in tensors}
    plan = kind.plan({names[hf]: shape for hf, shape in tensors.items()})
    entries = []
    for hf, shape in tensors.items():
        if len(shape) > GGML_MAX_DIMS:
            raise GlmqError(
                f"{component} tensor {hf!r} has {len(shape)} dimensions; GGUF holds at most {GGML_MAX_DIMS}"
            )
        entries.append(_Entry(names[hf], hf, plan[names[hf]], tuple(int(s) for s in shape)))
    return entries


def _write_gguf(path: Path, arch: str, metadata: list[gn.MetadataEntry], entries: list[_Entry],
                read: Callable[[str], torch.Tensor], on_tensor: Callable[[int], None]) -> None:
    """Write one GGUF file: header, metadata and tensor infos first, then each tensor's data in turn."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    gn.write_metadata(writer, metadata)
    for e in entries:
        nbytes = int(np.prod(e.byte_shape))
        writer.add_tensor_info(e.gguf_name, e.byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=e.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            t = read(e.hf_name)
            data = encode(t, e.qtype)
            writer.write_tensor_data(data)
            on_tensor(t.numel() * t.element_size())
            del t, data
        assert writer.fout is not None
        for f in writer.fout:
            f.flush()
            os.fsync(f.fileno())
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------------------
# The exporter


def export_gguf(src: str | Path, out: str | Path, *, ar_type: str = "Q4_K_M", dit_type: str = "Q8_0",
                force: bool = False, progress: bool = True) -> dict:
    """Write ``out``: the bf16 GLM-Image folder ``src`` with the AR and the DiT as GGUF files.

    ``ar_type``: a key of :data:`AR_TYPES`; ``dit_type``: a key of :data:`DIT_TYPES`. Returns a summary:
    per GGUF file its name, type, bytes, tensor count and tensors per GGML type.
    """
    from glmq import __version__
    from glmq.models.build import build_model, tensor_specs
    from glmq.progress import ByteProgress

    kinds = {AR: AR_TYPES[check_choice(ar_type, AR_TYPES, "GGUF type for the AR")],
             DIT: DIT_TYPES[check_choice(dit_type, DIT_TYPES, "GGUF type for the DiT")]}
    type_names = {AR: ar_type, DIT: dit_type}
    src, out = Path(src), Path(out)
    reader = open_unquantized_source(src, out)

    files = {}
    for name, kind in kinds.items():
        comp, cr = BY_NAME[name], reader.component(name)
        model = build_model(comp, cr.config)
        shapes = {n: tuple(cr.tensors[n].shape) for n, _, _ in tensor_specs(model, comp.dtype)}
        entries = _entries(name, shapes, kind)
        if name == AR:
            metadata = gn.ar_metadata(cr.config, name="GLM-Image AR", file_type=int(kind.file_type))
            arch = gn.AR_ARCH
        else:
            metadata = gn.dit_metadata(cr.config, file_type=int(kind.file_type))
            arch = gn.DIT_ARCH
        files[name] = (gguf_file_name(name, type_names[name]), arch, metadata, entries)

    job = {"command": "export-gguf", "glmq": __version__, "types": type_names, "source": source_fingerprint(src)}
    folder = OutputFolder(out, job=job, force=force, sources=(src,))
    folder.copy_in(src, "model_index.json")
    for comp in COMPONENTS:
        if comp.name not in kinds:
            copy_component(src, folder, comp.name)
    for name, (fname, _, _, _) in files.items():
        cr = reader.component(name)
        config = dict(cr.config)
        config["quantization_config"] = {"quant_method": "gguf", "gguf_file": fname, "type": type_names[name]}
        folder.write_json(f"{name}/config.json", config)
        copy_side_files(cr, folder)

    summary: dict[str, Any] = {"format": "gguf", "out": str(out), "files": {}}
    total = sum(reader.component(n).nbytes for n in files)
    with ByteProgress(total, "export gguf", enabled=progress) as bar:
        for name, (fname, arch, metadata, entries) in files.items():
            cr = reader.component(name)
            # What the file will hold, fixed before writing: a resumed run reuses only an identical file.
            described = [[e.key, str(e.value)] for e in metadata]
            described += [[e.gguf_name, e.qtype.name, list(e.shape)] for e in entries]
            plan_hash = hashlib.sha256(json.dumps(described).encode()).hexdigest()
            if folder.shard_done(fname, plan_hash):
                bar.update(cr.nbytes)
            else:
                final = folder.path(fname)
                tmp = final.with_name(final.name + ".tmp")
                try:
                    _write_gguf(tmp, arch, metadata, entries, cr.get, bar.update)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, final)
                folder.record_shard(fname, plan_hash, sha256_file(final))
            _check_gguf(folder.partial / fname, arch, entries)
            counts: dict[str, int] = {}
            for e in entries:
                counts[e.qtype.name] = counts.get(e.qtype.name, 0) + 1
            summary["files"][name] = {
                "file": fname,
                "type": type_names[name],
                "architecture": arch,
                "tensors": len(entries),
                "tensor_types": dict(sorted(counts.items())),
                "bytes_before": sum(i.nbytes for i in cr.tensors.values()),
                "bytes_after": (folder.partial / fname).stat().st_size,
            }
    folder.write_text("README.md", model_card(summary))
    folder.commit({"source": {"export-gguf": type_names}})
    reader.close()
    return summary


def _check_gguf(path: Path, arch: str, entries: list[_Entry]) -> None:
    """Re-read the file's header with gguf-py: the planned tensors, types and shapes, the architecture."""
    from gguf import GGUFReader

    from glmq.errors import CheckpointError

    try:
        r = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError and friends on a malformed file
        raise CheckpointError(f"{path}: written GGUF file does not parse ({e})") from None
    got = {t.name: (t.tensor_type, tuple(int(s) for s in reversed(t.shape.tolist()))) for t in r.tensors}
    want = {e.gguf_name: (e.qtype, e.shape or (1,)) for e in entries}
    if got != want:
        diff = sorted(set(got) ^ set(want)) or sorted(n for n in want if got.get(n) != want[n])
        raise CheckpointError(f"{path}: written tensors differ from the plan (first: {diff[0]})")
    field = r.fields.get("general.architecture")
    if field is None or field.contents() != arch:
        raise CheckpointError(f"{path}: general.architecture is not {arch!r}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def model_card(summary: dict) -> str:
    """README.md of an exported GGUF folder."""
    ar, dit = summary["files"][AR], summary["files"][DIT]
    lines = [
        "---",
        "base_model: zai-org/GLM-Image",
        "base_model_relation: quantized",
        "library_name: gguf",
        "pipeline_tag: text-to-image",
        "tags: [glm-image, gguf, quantized, glmq]",
        "---",
        "",
        f"# GLM-Image GGUF: AR {ar['type']}, DiT {dit['type']}",
        "",
        "| file | model | architecture | tensors by type | size before | size after |",
        "|---|---|---|---|---|---|",
    ]
    for role, f in (("AR (transformers `GlmImageForConditionalGeneration`)", ar),
                    ("DiT (diffusers `GlmImageTransformer2DModel`)", dit)):
        types = ", ".join(f"{k} {v}" for k, v in f["tensor_types"].items())
        lines.append(f"| `{f['file']}` | {role} | `{f['architecture']}` | {types} | {_size(f['bytes_before'])} "
                     f"| {_size(f['bytes_after'])} |")
    lines += [
        "",
        "The AR file uses llama.cpp's tensor names (GLM4 text decoder, `v.*` vision tower, `v.vq.*` VQ "
        "tokenizer) and carries the full Hugging Face config under `glm-image.hf_config`; no llama.cpp build "
        "runs this architecture yet. The DiT file follows ComfyUI-GGUF's conventions (diffusers tensor names) "
        "with the diffusers config under `glm_image.config`.",
        "",
        "The glyph encoder (`text_encoder`), VAE, tokenizer, processor and scheduler are the release's "
        "safetensors/config files, so the folder is a complete pipeline for `glmq`. Written by "
        "`glmq export gguf` from the bf16 release.",
        "",
    ]
    return "\n".join(lines)
