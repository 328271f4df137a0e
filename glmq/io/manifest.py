"""Verify a folder against its ``glmq-manifest.json`` (sha256 and size of every file)."""

from __future__ import annotations

from pathlib import Path

from glmq.io.layout import MANIFEST_NAME
from glmq.io.safetensors_io import sha256_file


def verify_manifest(root: str | Path, manifest: dict, *, hashes: bool = True) -> list[str]:
    """Problems found (empty when the folder matches): missing, resized, changed or unlisted files.

    With ``hashes=False`` only presence and sizes are checked (fast on a 30 GB folder).
    """
    root = Path(root)
    where = root / MANIFEST_NAME
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{where}: malformed manifest (no file list)"]
    for rel, entry in sorted(files.items()):
        shown = rel[:80]
        if (not isinstance(entry, dict) or type(entry.get("bytes")) is not int
                or not isinstance(entry.get("sha256"), str)):
            problems.append(f"{where}: malformed entry for {shown!r} (needs bytes and sha256)")
            continue
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or any(ord(c) < 32 for c in rel) or any(p in ("", ".", "..") for p in parts):
            problems.append(f"{where}: entry {shown!r} points outside the folder")
            continue
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
            continue
        if p.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: size {p.stat().st_size} differs from the manifest's {entry['bytes']}")
        elif hashes and sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupt)")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and rel not in files:
            problems.append(f"{rel}: not listed in the manifest")
    return problems
