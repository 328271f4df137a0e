"""Atomic, resumable, streaming output folders.

Everything glmq writes goes into ``OUT.partial/`` and is renamed to ``OUT`` only when complete, with a
``glmq-manifest.json`` recording the sha256 and size of every file. An existing ``OUT`` is never touched
without ``force``.

Weights are written by :class:`ComponentWriter`: the full tensor list (names, dtypes, shapes) is known
before any data is produced, so shards are planned up front and each shard file is streamed tensor by
tensor (header first), never holding more than one tensor. A shard is written as ``*.tmp`` and renamed when
complete; its sha256 then goes into a journal. A rerun of the same job after a crash, SIGKILL or Ctrl-C
finds the journal, re-checks each finished shard's sha256 and skips it, so only unfinished shards are
produced again, and the result is byte-identical to an uninterrupted run (files contain no timestamps).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from glmq.errors import GlmqError, OutputExistsError
from glmq.io.layout import MANIFEST_NAME, Component
from glmq.io.safetensors_io import StreamingFileWriter, sha256_file

if TYPE_CHECKING:
    import torch

JOURNAL_NAME = ".glmq-journal.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

TensorSpec = tuple[str, str, tuple[int, ...]]  # (name, torch dtype name, shape)


def _dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def disk_full_error(path: Path, partial: Path) -> GlmqError:
    return GlmqError(
        f"no space left on the device writing {path}; free some space and rerun the same command "
        f"to resume from {partial}"
    )


class OutputFolder:
    """An output folder built in ``OUT.partial`` and renamed to ``OUT`` by :meth:`commit`.

    ``job`` fingerprints what is being produced (command, options, source checksums): a partial folder
    left by the same job is resumed, one left by a different job is discarded.
    """

    def __init__(self, out: str | Path, *, job: dict, force: bool = False):
        self.out = Path(out)
        self.force = force
        if self.out.exists() and not force:
            raise OutputExistsError(f"{self.out} already exists; pass --force to replace it")
        if not self.out.parent.is_dir():
            raise GlmqError(f"{self.out.parent}: output's parent folder does not exist")
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.job_hash = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
        self.journal_path = self.partial / JOURNAL_NAME
        self.journal = self._open_journal()

    def _open_journal(self) -> dict:
        if self.partial.exists():
            try:
                journal = json.loads(self.journal_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                journal = None
            if isinstance(journal, dict) and journal.get("job") == self.job_hash:
                self.resumed = True
                return journal
            shutil.rmtree(self.partial)
        self.resumed = False
        self.partial.mkdir(parents=True)
        journal = {"job": self.job_hash, "shards": {}}
        _atomic_write_text(self.journal_path, _dump_json(journal))
        return journal

    def path(self, rel: str) -> Path:
        p = self.partial / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, rel: str, obj: object) -> None:
        self.write_text(rel, _dump_json(obj))

    def write_text(self, rel: str, text: str) -> None:
        p = self.path(rel)
        try:
            _atomic_write_text(p, text)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full_error(p, self.partial) from None
            raise

    def shard_done(self, rel: str, plan_hash: str) -> bool:
        """Whether ``rel`` was finished by an earlier run of this job and is intact on disk."""
        entry = self.journal["shards"].get(rel)
        p = self.partial / rel
        if not entry or entry.get("plan") != plan_hash or not p.is_file():
            return False
        return p.stat().st_size == entry["bytes"] and sha256_file(p) == entry["sha256"]

    def record_shard(self, rel: str, plan_hash: str, sha256: str) -> None:
        size = (self.partial / rel).stat().st_size
        self.journal["shards"][rel] = {"plan": plan_hash, "sha256": sha256, "bytes": size}
        _atomic_write_text(self.journal_path, _dump_json(self.journal))

    def component_writer(self, comp: Component, specs: list[TensorSpec], *,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                         metadata: dict[str, str] | None = None) -> ComponentWriter:
        return ComponentWriter(self, comp, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)

    def commit(self, extra: dict | None = None) -> Path:
        """Write the manifest, then rename ``OUT.partial`` to ``OUT`` (replacing ``OUT`` if forced)."""
        self.journal_path.unlink(missing_ok=True)
        for tmp in self.partial.rglob("*.tmp"):
            tmp.unlink()
        files = {}
        for p in sorted(self.partial.rglob("*")):
            if p.is_file() and p.name != MANIFEST_NAME:
                rel = p.relative_to(self.partial).as_posix()
                known = self.journal["shards"].get(rel)
                files[rel] = {"sha256": known["sha256"] if known else sha256_file(p), "bytes": p.stat().st_size}
        from glmq import __version__

        manifest = {"format": "glmq-manifest", "version": 1, "created_by": f"glmq {__version__}", "files": files}
        if extra:
            manifest.update(extra)
        self.write_json(MANIFEST_NAME, manifest)
        if self.out.exists():
            if not self.force:  # appeared while we worked
                raise OutputExistsError(f"{self.out} already exists; pass --force to replace it")
            old = self.out.with_name(self.out.name + ".glmq-old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.partial, self.out)
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


class ComponentWriter:
    """Writes one component's weights as planned shards plus their ``*.safetensors.index.json``."""

    def __init__(self, folder: OutputFolder, comp: Component, specs: list[TensorSpec], *,
                 max_shard_bytes: int, metadata: dict[str, str] | None):
        from glmq.io.safetensors_io import DTYPES, TAG_OF_DTYPE

        if not specs:
            raise ValueError(f"{comp.name}: no tensors to write")
        self.folder = folder
        self.component = comp
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorSpec]] = [[]]
        sizes = [0]
        self.total_size = 0
        for spec in specs:
            name, dtype, shape = spec
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * DTYPES[TAG_OF_DTYPE[dtype]][1]
            if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
                shards.append([])
                sizes.append(0)
            shards[-1].append(spec)
            sizes[-1] += nbytes
            self.total_size += nbytes
        self.shards = shards
        n = len(shards)
        self.shard_files = [f"{comp.name}/{comp.shard_name(i, n)}" for i in range(n)]
        self.plan_hashes = [
            hashlib.sha256(json.dumps([self.metadata, [[s[0], s[1], list(s[2])] for s in shard]]).encode()).hexdigest()
            for shard in shards
        ]

    @property
    def num_tensors(self) -> int:
        return sum(len(s) for s in self.shards)

    def pending(self) -> list[int]:
        return [i for i, rel in enumerate(self.shard_files) if not self.folder.shard_done(rel, self.plan_hashes[i])]

    def write(self, produce: Callable[[str], torch.Tensor], on_tensor: Callable[[str, int], None] | None = None,
              on_shard: Callable[[int], None] | None = None) -> None:
        """Write every pending shard, calling ``produce(name)`` for each of its tensors in plan order.

        ``on_tensor(name, nbytes)`` is called after each tensor (progress bars), ``on_shard(i)`` once shard ``i``
        is on disk, just before it is journaled. Finished shards from an earlier run of the same job are
        skipped without calling ``produce``.
        """
        for i in self.pending():
            rel = self.shard_files[i]
            final = self.folder.path(rel)
            tmp = final.with_name(final.name + ".tmp")
            writer = StreamingFileWriter(tmp, self.shards[i], self.metadata)
            try:
                for name, _, _ in self.shards[i]:
                    t = produce(name)
                    writer.write(name, t)
                    if on_tensor is not None:
                        on_tensor(name, t.numel() * t.element_size())
                    del t
                sha = writer.close()
            except OSError as e:
                writer.abort()
                if e.errno == errno.ENOSPC:
                    raise disk_full_error(final, self.folder.partial) from None
                raise
            except BaseException:
                writer.abort()
                raise
            os.replace(tmp, final)
            if on_shard is not None:  # before journaling: a kill in between redoes the shard and its side files
                on_shard(i)
            self.folder.record_shard(rel, self.plan_hashes[i], sha)
        weight_map = {}
        for rel, shard in zip(self.shard_files, self.shards):
            for name, _, _ in shard:
                weight_map[name] = rel.split("/", 1)[1]
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        self.folder.write_json(f"{self.component.name}/{self.component.index_name}", index)
