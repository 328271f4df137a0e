"""Where the loader finds GLM-Image checkpoints: pipeline folders inside ComfyUI's model folders.

A checkpoint is a folder (the diffusers layout: ``model_index.json`` and one subfolder per component), not a
file, so ComfyUI's own file listing does not apply. This module only looks at the file system; the package's
``__init__`` gives it ComfyUI's folder lists. Kept free of ComfyUI imports so tests can run it anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

PIPELINE_CLASS = "GlmImagePipeline"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def is_glm_image_folder(path: Path) -> bool:
    """True when ``path`` holds a ``model_index.json`` naming GLM-Image's pipeline class (the bf16 release,
    ``glmq make-tiny``, ``glmq quantize`` and ``glmq export gguf`` folders all do)."""
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        return False  # unreadable or not a JSON object: not offered; glmq explains if it is picked anyway


def find_checkpoints(roots: list[str | Path], depth: int = 2) -> dict[str, Path]:
    """GLM-Image folders under ``roots``: display name (the path below its root, "/"-separated) -> folder.

    Looks ``depth`` levels down so that ``models/diffusers/zai-org/GLM-Image`` is found as well as
    ``models/glm_image/GLM-Image``. The first root wins when two hold the same name (ComfyUI's order).
    """
    found: dict[str, Path] = {}

    def walk(root: Path, folder: Path, level: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            if is_glm_image_folder(child):
                found.setdefault(child.relative_to(root).as_posix(), child)
            elif level < depth:
                walk(root, child, level + 1)

    for root in roots:
        root = Path(root)
        if root.is_dir():
            walk(root, root, 1)
    return found


def weight_bytes(path: Path) -> int:
    """Bytes of the weight files under a checkpoint folder (what its weights take, quantized or not)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
