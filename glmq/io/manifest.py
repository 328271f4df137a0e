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
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{root / MANIFEST_NAME}: malformed manifest (no file list)"]
    for rel, entry in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
            continue
        if p.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel}: size {p.stat().st_size} differs from the manifest's {entry.get('bytes')}")
        elif hashes and sha256_file(p) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupt)")
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and rel not in files:
            problems.append(f"{rel}: not listed in the manifest")
    return problems
