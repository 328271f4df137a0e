"""Lazy, validated reading of GLM-Image pipeline folders.

:class:`PipelineReader` opens a folder, checks its layout and returns a :class:`ComponentReader` per
weight-bearing component. A component reader parses every shard's header up front (so truncated or corrupt
files fail before any work starts) and then serves tensors one at a time with plain file reads (no memory
map, whose touched pages would stay resident): reading the 33 GB release costs the tensor in hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from glmq.errors import CheckpointError
from glmq.io.layout import (
    BY_NAME,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    WEIGHT_COMPONENTS,
    Component,
    check_pipeline_folder,
    read_json,
)
from glmq.io.safe_read import MAX_INDEX_BYTES, want_str_map
from glmq.io.safetensors_io import TensorInfo, read_error, read_header, read_tensor

if TYPE_CHECKING:
    import torch


class ComponentReader:
    """The safetensors weights and config of one component folder."""

    def __init__(self, folder: str | Path, comp: Component):
        self.folder = Path(folder)
        self.component = comp
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: missing component folder")
        self.config = read_json(self.folder / "config.json", f"{comp.name} config.json")
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}
        for file in self.files:
            infos, metadata = read_header(file)
            self.file_metadata[file] = metadata
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} also stored in {self.tensors[name].file.name}")
                self.tensors[name] = info
        if self._index is not None:
            self._check_index()

    def _weight_files(self) -> list[Path]:
        comp = self.component
        index_path = self.folder / comp.index_name
        single = self.folder / f"{comp.weights_name}.safetensors"
        self._index = None
        if index_path.exists():
            self._index = read_json(index_path, "safetensors index", max_bytes=MAX_INDEX_BYTES)
            weight_map = self._index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: safetensors index has no weight_map")
            want_str_map(weight_map, str(index_path), "weight_map")
            names = sorted(set(weight_map.values()))
            files = []
            for n in names:
                if "/" in n or "\\" in n or "\0" in n or n.startswith(".") or not n:
                    raise CheckpointError(f"{index_path}: refusing shard path {n!r} outside the folder")
                f = self.folder / n
                if not f.is_file():
                    raise CheckpointError(f"{self.folder}: missing shard {n} listed in {index_path.name}")
                files.append(f)
            return files
        if single.is_file():
            return [single]
        found = sorted(self.folder.glob("*.safetensors"))
        if found:
            raise CheckpointError(
                f"{self.folder}: safetensors files present but neither {single.name} nor {index_path.name}"
            )
        pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.folder}: weights are pickle files ({pickles[0]}); glmq reads only safetensors "
                "(convert them with a trusted tool first)"
            )
        raise CheckpointError(f"{self.folder}: no safetensors weights for component {comp.name}")

    def _check_index(self) -> None:
        weight_map = self._index["weight_map"]
        for name, file in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(f"{self.folder}: index lists {name!r} in {file}, but that shard lacks it")
        extra = set(self.tensors) - set(weight_map)
        if extra:
            raise CheckpointError(f"{self.folder}: shard tensor {sorted(extra)[0]!r} is missing from the index")

    @property
    def quantization_config(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, *, check_finite: bool = True) -> torch.Tensor:
        """Load one tensor into a fresh CPU tensor (plain reads: memory stays at the tensor's size).

        Floating-point tensors holding NaN or Inf are refused (:mod:`glmq.io.finite`, block by block), so
        every consumer (inspect, quantize, the exporters, ``glmq.load``) is protected by this one check.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not found")
        try:
            tensor = read_tensor(info)
        except OSError as e:
            raise read_error(info, e) from None
        if check_finite:
            from glmq.io.finite import check_finite as _check

            _check(tensor, f"{info.file}: tensor {name!r}")
        return tensor

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in file order, one at a time."""
        for name in sorted(self.tensors, key=lambda n: (self.tensors[n].file.name, self.tensors[n].begin)):
            yield name, self.get(name)

    def close(self) -> None:
        """Nothing is held open between reads; kept for symmetry with file-like objects."""


class PipelineReader:
    """A validated GLM-Image pipeline folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.model_index = check_pipeline_folder(self.path)
        self._readers: dict[str, ComponentReader] = {}

    def component(self, name: str) -> ComponentReader:
        if name not in self._readers:
            comp = BY_NAME.get(name)
            if comp is None or not comp.has_weights:
                valid = ", ".join(c.name for c in WEIGHT_COMPONENTS)
                raise CheckpointError(f"{name!r} is not a weight-bearing component; valid: {valid}")
            self._readers[name] = ComponentReader(self.path / name, comp)
        return self._readers[name]

    def components(self) -> Iterator[ComponentReader]:
        for comp in WEIGHT_COMPONENTS:
            yield self.component(comp.name)

    @cached_property
    def manifest(self) -> dict | None:
        p = self.path / MANIFEST_NAME
        if not p.exists():
            return None
        return read_json(p, "glmq manifest", max_bytes=MAX_INDEX_BYTES)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

