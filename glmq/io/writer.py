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

One run at a time writes a given ``OUT`` (an exclusive lock, :mod:`glmq.io.lock`); glmq deletes only
folders it marked as its own when it made them; files copied from a source folder are confined to it
(:mod:`glmq.io.confine`).
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
from glmq.io.confine import allowed_roots, open_source_file, rel_problem
from glmq.io.layout import MANIFEST_NAME, Component
from glmq.io.lock import OutputLock
from glmq.io.safetensors_io import StreamingFileWriter, sha256_file

if TYPE_CHECKING:
    import torch

JOURNAL_NAME = ".glmq-journal.json"
PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".glmq-old"
# Marks a folder glmq created (``OUT.partial``, ``OUT.glmq-old``) and may therefore delete.
OWNED_MARKER = ".glmq-owned"
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _owned(path: Path) -> bool | None:
    """Whether ``path`` is a folder glmq created (it holds :data:`OWNED_MARKER`, or the journal of a glmq
    version that did not write the marker yet); None when it is an empty folder (nothing to lose)."""
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / OWNED_MARKER).is_file() or (path / JOURNAL_NAME).is_file():
        return True
    return None if not any(path.iterdir()) else False


def _make_owned_dir(path: Path) -> None:
    """Create ``path`` and mark it glmq's (a crash in between leaves an empty folder, which counts as free)."""
    path.mkdir()
    os.close(os.open(path / OWNED_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def _remove_owned(path: Path, what: str) -> None:
    """Delete ``path`` if glmq created it; refuse (one line) to touch anything else."""
    if not os.path.lexists(path):
        return
    owned = _owned(path)
    if owned is False:
        raise GlmqError(f"{path} exists and was not created by glmq; glmq will not delete it: move or remove "
                        f"it yourself ({what})")
    shutil.rmtree(path)


def check_output_path(out: Path, sources: tuple[Path, ...] = ()) -> None:
    """Refuse outputs whose replacement would delete something else: ``.``, ``/``, a folder that holds the
    current folder, or one that holds or lies inside a source folder."""
    if out.name in ("", ".", ".."):
        raise GlmqError(f"output {str(out)!r} must name a new folder (not '.', '..' or '/')")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        raise GlmqError(f"output {out} is the root folder; name a new folder")
    if real == cwd or real in cwd.parents:
        raise GlmqError(f"output {out} is or contains the current folder; name a new folder")
    for src in sources:
        s = Path(src).resolve()
        if real == s or s in real.parents or real in s.parents:
            raise GlmqError(f"output {out} must not be the input folder or inside it (or contain it)")


class OutputFolder:
    """An output folder built in ``OUT.partial`` and renamed to ``OUT`` by :meth:`commit`.

    ``job`` fingerprints what is being produced (command, options, source checksums): a partial folder
    left by the same job is resumed, one left by a different job is discarded. ``sources``: input folders
    that ``OUT`` must neither be, hold, nor lie inside.

    Safety: the whole run holds an exclusive lock on ``OUT`` (:mod:`glmq.io.lock`; a concurrent run on the
    same output fails at once). glmq deletes only folders it created: ``OUT.partial`` and ``OUT.glmq-old``
    carry a marker file from the moment they are made, and one without it (and not empty) is refused, not
    deleted. ``force`` replaces ``OUT`` and nothing else. :meth:`commit`, :meth:`discard` or :meth:`close`
    (also the end of a ``with`` block) give the lock back; an exception keeps ``OUT.partial`` for a resume.
    """

    def __init__(self, out: str | Path, *, job: dict, force: bool = False, sources: tuple[str | Path, ...] = ()):
        self.out = Path(out)
        self.force = force
        check_output_path(self.out, tuple(Path(s) for s in sources))
        if not self.out.parent.is_dir():
            raise GlmqError(f"{self.out.parent}: output's parent folder does not exist")
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.old = self.out.with_name(self.out.name + OLD_SUFFIX)
        self.job_hash = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
        self.journal_path = self.partial / JOURNAL_NAME
        if os.path.lexists(self.out) and not force:  # before the lock: no lock file for a refused run
            raise OutputExistsError(f"{self.out} already exists; pass --force to replace it")
        self.lock = OutputLock(self.out)
        try:
            if os.path.lexists(self.out):
                if not force:
                    raise OutputExistsError(f"{self.out} already exists; pass --force to replace it")
                if os.path.lexists(self.old) and _owned(self.old) is False:
                    raise GlmqError(f"{self.old} exists and was not created by glmq; --force replaces only "
                                    f"{self.out}: move or remove {self.old.name} yourself")
            self.journal = self._open_journal()
        except BaseException:
            self.lock.release()
            raise

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give the lock back, keeping ``OUT.partial`` (a rerun of the same job resumes it)."""
        self.lock.release()

    def _open_journal(self) -> dict:
        if os.path.lexists(self.partial):
            owned = _owned(self.partial)
            if owned is False:
                raise GlmqError(f"{self.partial} exists and was not created by glmq; glmq will not touch it: "
                                f"move or remove it yourself")
            if owned:
                try:
                    journal = json.loads(self.journal_path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    journal = None
                if isinstance(journal, dict) and journal.get("job") == self.job_hash:
                    self.resumed = True
                    if not (self.partial / OWNED_MARKER).exists():
                        _make_marker(self.partial)
                    return journal
            shutil.rmtree(self.partial)
        self.resumed = False
        _make_owned_dir(self.partial)
        journal = {"job": self.job_hash, "shards": {}}
        _atomic_write_text(self.journal_path, _dump_json(journal))
        return journal

    def path(self, rel: str) -> Path:
        """Where ``rel`` (a relative path inside ``OUT``) is written now; its parent folders are made."""
        problem = rel_problem(rel)
        if problem or rel.split("/")[0] == OWNED_MARKER:
            raise ValueError(f"output path {rel!r} is {problem or 'reserved'}")
        self.lock.check()
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

    def copy_in(self, root: str | Path, rel: str, dst: str | None = None) -> None:
        """Copy ``root/rel`` (a file, or a folder with everything under it) to ``dst`` (default ``rel``).

        ``root`` is the source checkpoint folder: side files must not resolve outside it, only regular
        files are copied, and a linked folder is refused (:mod:`glmq.io.confine`). Each file is streamed
        to ``*.tmp`` and renamed, so a resumed run finds whole files or none.
        """
        problem = rel_problem(rel)
        if problem:
            raise ValueError(f"source path {rel!r} is {problem}")
        root = Path(root)
        roots = allowed_roots(root)
        src = root / rel
        dst = dst or rel
        if src.is_symlink() and src.is_dir():
            raise GlmqError(f"{src}: is a link to a folder; glmq copies only the checkpoint's own folders "
                            f"(replace the link by the folder itself)")
        if not src.is_dir():
            self._copy_file(src, dst, roots)
            return
        self.path(dst).mkdir(exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(src):  # does not descend into linked folders
            here = Path(dirpath)
            sub = here.relative_to(src).as_posix()
            prefix = dst if sub == "." else f"{dst}/{sub}"
            for d in sorted(dirnames):
                if (here / d).is_symlink():
                    raise GlmqError(f"{here / d}: is a link to a folder; glmq copies only the checkpoint's own "
                                    f"folders (replace the link by the folder itself)")
                self.path(f"{prefix}/{d}").mkdir(exist_ok=True)
            for f in sorted(filenames):
                self._copy_file(here / f, f"{prefix}/{f}", roots)

    def copy_side_files(self, folder: str | Path, dst: str, *, skip: Callable[[str], bool]) -> None:
        """Copy the files directly inside a component ``folder`` to ``dst`` except those ``skip(name)``
        accepts (its config and weights); sub-folders are left out, anything else that is not a regular
        file is refused."""
        folder = Path(folder)
        roots = allowed_roots(folder.parent)
        for entry in sorted(folder.iterdir()):
            if skip(entry.name) or (entry.is_dir() and not entry.is_symlink()):
                continue
            self._copy_file(entry, f"{dst}/{entry.name}", roots)

    def _copy_file(self, src: Path, rel: str, roots: tuple[Path, ...]) -> None:
        fd = open_source_file(src, roots)
        final = self.path(rel)
        tmp = final.with_name(final.name + ".tmp")
        try:
            with os.fdopen(fd, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise disk_full_error(final, self.partial) from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)

    def shard_done(self, rel: str, plan_hash: str) -> bool:
        """Whether ``rel`` was finished by an earlier run of this job and is intact on disk."""
        entry = self.journal["shards"].get(rel)
        p = self.partial / rel
        if not entry or entry.get("plan") != plan_hash or p.is_symlink() or not p.is_file():
            return False
        return p.stat().st_size == entry["bytes"] and sha256_file(p) == entry["sha256"]

    def record_shard(self, rel: str, plan_hash: str, sha256: str) -> None:
        self.lock.check()
        size = (self.partial / rel).stat().st_size
        self.journal["shards"][rel] = {"plan": plan_hash, "sha256": sha256, "bytes": size}
        _atomic_write_text(self.journal_path, _dump_json(self.journal))

    def component_writer(self, comp: Component, specs: list[TensorSpec], *,
                         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                         metadata: dict[str, str] | None = None) -> ComponentWriter:
        return ComponentWriter(self, comp, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)

    def _files(self) -> list[tuple[str, Path]]:
        """Every file of ``OUT.partial`` but the marker, sorted; links and odd files are a bug, not output."""
        files = []
        for dirpath, dirnames, filenames in os.walk(self.partial):
            here = Path(dirpath)
            for name in dirnames + filenames:
                p = here / name
                if p.is_symlink() or not (p.is_dir() or p.is_file()):
                    raise RuntimeError(f"{p}: not a regular file or folder in glmq's own output")
            for name in filenames:
                rel = (here / name).relative_to(self.partial).as_posix()
                if rel not in (OWNED_MARKER, MANIFEST_NAME):
                    files.append((rel, here / name))
        return sorted(files)

    def commit(self, extra: dict | None = None) -> Path:
        """Write the manifest, then rename ``OUT.partial`` to ``OUT`` (replacing ``OUT`` if forced).

        The lock is given back once ``OUT`` is in place. With ``force``, the old ``OUT`` is first moved into
        a new ``OUT.glmq-old`` folder (marked as glmq's) and deleted after the rename.
        """
        self.lock.check()
        self.journal_path.unlink(missing_ok=True)
        for tmp in self.partial.rglob("*.tmp"):
            tmp.unlink()
        files = {}
        for rel, p in self._files():
            known = self.journal["shards"].get(rel)
            files[rel] = {"sha256": known["sha256"] if known else sha256_file(p), "bytes": p.stat().st_size}
        from glmq import __version__

        manifest = {"format": "glmq-manifest", "version": 1, "created_by": f"glmq {__version__}", "files": files}
        if extra:
            manifest.update(extra)
        self.write_json(MANIFEST_NAME, manifest)
        (self.partial / OWNED_MARKER).unlink(missing_ok=True)
        try:
            if os.path.lexists(self.out):
                if not self.force:  # appeared while we worked
                    raise OutputExistsError(f"{self.out} already exists; pass --force to replace it")
                _remove_owned(self.old, "left by an earlier --force")
                _make_owned_dir(self.old)
                os.rename(self.out, self.old / "replaced")
                os.rename(self.partial, self.out)
                _fsync_dir(self.out.parent)
                shutil.rmtree(self.old)
            else:
                try:
                    os.rename(self.partial, self.out)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        raise OutputExistsError(f"{self.out} already exists; pass --force to replace it") from None
                    raise
                _fsync_dir(self.out.parent)
        except BaseException:
            if self.partial.is_dir() and not (self.partial / OWNED_MARKER).exists():
                _make_marker(self.partial)
            raise
        finally:
            self.lock.release()
        return self.out

    def discard(self) -> None:
        """Delete ``OUT.partial`` and give the lock back."""
        if self.lock.held:
            shutil.rmtree(self.partial, ignore_errors=True)
        self.lock.release()


def _make_marker(folder: Path) -> None:
    with open(folder / OWNED_MARKER, "a"):
        pass


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
