"""Verify a folder against its ``glmq-manifest.json`` (sha256 and size of every file).

Manifest paths are confined like everything else read from a folder (:mod:`glmq.io.confine`): a listed
path that is absolute, holds ``..`` or resolves through a link outside the folder is a problem, and is
neither opened nor hashed. Only regular files are hashed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from glmq.io.confine import allowed_roots, rel_problem, show, within
from glmq.io.layout import MANIFEST_NAME
from glmq.io.safetensors_io import sha256_file


def verify_manifest(root: str | Path, manifest: dict, *, hashes: bool = True) -> list[str]:
    """Problems found (empty when the folder matches): missing, resized, changed or unlisted files, and
    listed paths that leave the folder.

    With ``hashes=False`` only presence and sizes are checked (fast on a 30 GB folder).
    """
    root = Path(root)
    where = root / MANIFEST_NAME
    roots = allowed_roots(root)
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{where}: malformed manifest (no file list)"]
    for rel, entry in sorted(files.items()):
        problem = rel_problem(rel)
        if problem is None and rel == MANIFEST_NAME:
            problem = "the manifest itself"
        if problem:
            problems.append(f"{show(rel)}: manifest path is {problem}; not checked")
            continue
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str)):
            problems.append(f"{show(rel)}: malformed manifest entry (needs bytes and sha256)")
            continue
        p = root / rel
        if not within(p.resolve(), roots):
            problems.append(f"{show(rel)}: resolves outside the folder (a link); not checked")
            continue
        try:
            st = os.stat(p)
        except OSError:
            problems.append(f"{show(rel)}: listed in the manifest but missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{show(rel)}: not a regular file; not checked")
        elif st.st_size != entry["bytes"]:
            problems.append(f"{show(rel)}: size {st.st_size} differs from the manifest's {entry['bytes']}")
        elif hashes and sha256_file(p) != entry["sha256"]:
            problems.append(f"{show(rel)}: sha256 differs from the manifest (file changed or corrupt)")
    unlisted = []
    for dirpath, _, filenames in os.walk(root):  # linked folders are not entered
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME and rel not in files:
                unlisted.append(f"{show(rel)}: not listed in the manifest")
    return problems + sorted(unlisted)
