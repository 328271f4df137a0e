"""Keeping glmq inside the folder it was given: paths, links and file types.

A checkpoint folder is data from someone else. Three rules keep it from reaching the rest of the machine:

- **Relative paths are confined.** A path read from a file (a manifest entry, a config's file pointer) must
  be relative, without ``..``, and must not resolve (through links) outside the folder.
- **Side files stay inside.** Tensor files (``*.safetensors``) may be links that resolve anywhere: Hugging
  Face caches link every file of a snapshot to ``../../blobs/<hash>``. Every other file glmq copies into
  an output (configs, tokenizer files, notes) must resolve inside the source folder, or inside the
  cache's ``blobs/`` when the folder is a cache snapshot. A link elsewhere (``notes.txt -> ~/.netrc``) is
  refused, naming the file: glmq never copies the target, and never copies the link itself either (a
  link in a published folder would point into the publisher's machine).
- **Only regular files are read.** A FIFO, socket or device (``/dev/zero``) is refused before it is read,
  and the check is repeated on the open descriptor, so a file swapped for a FIFO after the check cannot
  block or fill the disk.

Error messages name files, never their contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from glmq.errors import GlmqError

# Files that may resolve anywhere (content-addressed blobs of a cache); everything else is a side file.
TENSOR_SUFFIXES = (".safetensors",)


def show(rel: str) -> str:
    """``rel`` as it may appear in a one-line message: quoted when it holds control characters."""
    return rel if rel.isprintable() and rel.strip() == rel and rel else repr(rel)


def allowed_roots(root: str | Path) -> tuple[Path, ...]:
    """Real folders that files of ``root`` may resolve into: ``root`` itself, plus the cache's ``blobs/``
    when ``root`` is a Hugging Face cache snapshot (``<repo>/snapshots/<revision>``)."""
    real = Path(root).resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append((real.parent.parent / "blobs").resolve())
    return tuple(roots)


def within(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def rel_problem(rel: object) -> str | None:
    """Why ``rel`` is not an acceptable relative path inside a folder (None when it is)."""
    if not isinstance(rel, str) or not rel:
        return "not a file name"
    if "\\" in rel or "\x00" in rel:
        return "not a portable relative path"
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        return "an absolute path; manifests and configs hold paths relative to the folder"
    if any(part in ("..", ".") for part in rel.split("/")) or "" in rel.split("/"):
        return "not normalized or leaves the folder ('..', '.' or empty parts)"
    return None


def resolve_inside(root: str | Path, rel: str, roots: tuple[Path, ...] | None = None) -> Path:
    """``root/rel`` after checking ``rel`` (see :func:`rel_problem`) and that it does not resolve outside
    ``roots`` (default :func:`allowed_roots`). Raises :class:`GlmqError` naming ``rel``."""
    problem = rel_problem(rel)
    if problem:
        raise GlmqError(f"{Path(root)}: path {show(str(rel))} is {problem}")
    path = Path(root) / rel
    real = path.resolve()
    if not within(real, roots if roots is not None else allowed_roots(root)):
        raise GlmqError(f"{path}: resolves outside {Path(root)} (a link out of the folder); refused")
    return path


def is_tensor_file(name: str) -> bool:
    return name.endswith(TENSOR_SUFFIXES)


def check_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise GlmqError(f"{path}: is {kind}, not a regular file; glmq reads and copies regular files only")


def open_source_file(path: Path, roots: tuple[Path, ...]) -> int:
    """Open a file of a source folder for reading, as a raw descriptor, after the rules above.

    ``roots``: where a side file may resolve (:func:`allowed_roots` of the source folder).
    """
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise GlmqError(f"{path}: missing (a broken link?)") from None
    except (OSError, RuntimeError):  # a link loop
        raise GlmqError(f"{path}: cannot be resolved (a link loop?)") from None
    if not is_tensor_file(path.name) and not within(real, roots):
        raise GlmqError(f"{path}: is a link to a file outside the source folder; glmq does not copy files "
                        f"from outside a checkpoint (replace the link by the file itself)")
    check_regular(path, os.stat(real))
    # O_NONBLOCK: should the file have become a FIFO since the check, opening it must not wait for a writer.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        check_regular(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd
