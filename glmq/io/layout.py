"""The on-disk layout of a GLM-Image pipeline folder, as released in zai-org/GLM-Image.

A diffusers pipeline folder: ``model_index.json`` names the pipeline class and, for every component, the
library and class that load it; each component lives in a subfolder of the same name. Weight-bearing
components hold ``config.json`` and safetensors weights, sharded with a ``*.safetensors.index.json``
(``model*`` names for transformers classes, ``diffusion_pytorch_model*`` for diffusers classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmq.errors import CheckpointError

PIPELINE_CLASS = "GlmImagePipeline"
MANIFEST_NAME = "glmq-manifest.json"
# Pickle-based weight files glmq refuses to read (loading them can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Component:
    """One entry of ``model_index.json``."""

    name: str  # subfolder and model_index key
    library: str  # "transformers" or "diffusers"
    class_name: str
    role: str  # what glmq calls it: ar, dit, glyph, vae, processor, tokenizer, scheduler
    dtype: str | None = None  # dtype of the released weights; None for weightless components

    @property
    def has_weights(self) -> bool:
        return self.dtype is not None

    @property
    def weights_name(self) -> str:
        """Stem of the weight files: ``model`` (transformers) or ``diffusion_pytorch_model`` (diffusers)."""
        return "model" if self.library == "transformers" else "diffusion_pytorch_model"

    @property
    def index_name(self) -> str:
        return f"{self.weights_name}.safetensors.index.json"

    def shard_name(self, i: int, n: int) -> str:
        return f"{self.weights_name}-{i + 1:05d}-of-{n:05d}.safetensors"


# In model_index.json order. The VAE dtype is bf16: an fp16 VAE overflows, bf16 does not (GLM_IMAGE.md).
COMPONENTS: tuple[Component, ...] = (
    Component("processor", "transformers", "GlmImageProcessor", "processor"),
    Component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", "scheduler"),
    Component("text_encoder", "transformers", "T5EncoderModel", "glyph", "float32"),
    Component("tokenizer", "transformers", "ByT5Tokenizer", "tokenizer"),
    Component("transformer", "diffusers", "GlmImageTransformer2DModel", "dit", "bfloat16"),
    Component("vae", "diffusers", "AutoencoderKL", "vae", "bfloat16"),
    Component("vision_language_encoder", "transformers", "GlmImageForConditionalGeneration", "ar", "bfloat16"),
)
BY_NAME = {c.name: c for c in COMPONENTS}
WEIGHT_COMPONENTS = tuple(c for c in COMPONENTS if c.has_weights)


def component(name: str) -> Component:
    if name not in BY_NAME:
        raise CheckpointError(f"unknown component {name!r}; valid components: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def model_index(diffusers_version: str) -> dict:
    index: dict[str, object] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers_version}
    for c in COMPONENTS:
        index[c.name] = [c.library, c.class_name]
    return index


def read_json(path: Path, what: str, *, max_bytes: int | None = None) -> dict:
    """A JSON object read through :mod:`glmq.io.safe_read` (regular file, size cap, bounded nesting)."""
    from glmq.io import safe_read

    return safe_read.read_json(path, what, max_bytes=max_bytes or safe_read.MAX_CONFIG_BYTES)


def check_pipeline_folder(path: str | Path) -> dict:
    """Check that ``path`` is a GLM-Image pipeline folder and return its ``model_index.json``.

    Checks the folder exists, ``model_index.json`` names ``GlmImagePipeline`` and every component has its
    subfolder. Weight files are checked by :mod:`glmq.io.reader`.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; expected a GLM-Image pipeline folder")
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: not a GLM-Image pipeline folder (no model_index.json)")
    from glmq.io.safe_read import MAX_SMALL_BYTES

    index = read_json(path / "model_index.json", "model_index.json", max_bytes=MAX_SMALL_BYTES)
    if index.get("_class_name") != PIPELINE_CLASS:
        raise CheckpointError(
            f"{path}: not a GLM-Image pipeline folder (model_index.json names {index.get('_class_name')!r}, "
            f"expected {PIPELINE_CLASS!r})"
        )
    for c in COMPONENTS:
        if c.name not in index:
            raise CheckpointError(f"{path}: model_index.json does not list the {c.name!r} component")
        if not (path / c.name).is_dir():
            raise CheckpointError(f"{path}: missing component folder {c.name}/")
    return index
