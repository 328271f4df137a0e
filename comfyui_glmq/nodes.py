"""The two nodes: GLM-Image Loader (glmq) and GLM-Image Generate (glmq)."""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

from .folders import find_checkpoints
from .images import from_pipeline, to_pil
from .memory import MODES, GlmqModel

FOLDER = "glm_image"  # models/glm_image/<checkpoint folder>; models/diffusers is searched as well
PIPELINE_TYPE = "GLMQ_PIPELINE"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
SIZE_STEP = 32  # GLM-Image's AR works on a 1/32 grid: both sides must be multiples of 32
REFERENCE_INPUTS = ("image_1", "image_2", "image_3")


def checkpoints():
    roots = folder_paths.get_folder_paths(FOLDER) + folder_paths.get_folder_paths("diffusers")
    return find_checkpoints(roots)


class GlmImageLoader:
    """Picks a GLM-Image checkpoint folder; the pipeline itself loads on first use and unloads when ComfyUI
    frees models."""

    DESCRIPTION = ("Loads GLM-Image with glmq: a glmq-quantized folder, a glmq GGUF folder or the bf16 release, "
                   "from models/glm_image or models/diffusers. memory_mode 'auto' picks resident, staged or "
                   "offload from the memory ComfyUI has free.")
    CATEGORY = "glmq"
    RETURN_TYPES = (PIPELINE_TYPE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (sorted(checkpoints()), {"tooltip": "a GLM-Image folder under models/glm_image or models/diffusers"}),
            "memory_mode": (list(MODES), {"default": "auto",
                                          "tooltip": "resident: all on the GPU; staged: one stage at a time; "
                                                     "offload: DiT blocks streamed; auto: from free memory"}),
        }}

    def load(self, model: str, memory_mode: str):
        found = checkpoints()
        if model not in found:
            raise FileNotFoundError(f"GLM-Image folder {model!r} not found under models/{FOLDER} or models/diffusers")
        handle = GlmqModel(found[model], memory_mode)
        handle.pipeline()  # load now: a broken folder fails on this node, not on the generator
        return (handle,)


class _Progress:
    """One ComfyUI progress bar per stage (AR tokens, glyph, DiT steps, VAE); the same callback checks for
    ComfyUI's cancel, which raises out of glmq's loops at the next token or step."""

    def __init__(self, node_id, image_index: int, batch: int):
        self.node_id, self.image_index, self.batch = node_id, image_index, batch
        self.stage = None
        self.bar = None
        self.shown = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        if stage != self.stage:
            self.stage, self.bar, self.shown = stage, comfy.utils.ProgressBar(total, node_id=self.node_id), -1
        # The AR reports every token (1281 at 1024x1024): send at most ~100 updates per stage to the browser.
        if done == total or done * 100 // max(total, 1) > self.shown:
            self.shown = done * 100 // max(total, 1)
            self.bar.update_absolute(done, total)


class GlmImageGenerate:
    """Text-to-image, or image-to-image with up to three reference inputs (each may be a batch)."""

    DESCRIPTION = ("GLM-Image text-to-image with glmq. Connect reference images to edit (one) or combine "
                   "subjects (several). Each image of a batch uses seed + its index.")
    CATEGORY = "glmq"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": SIZE_STEP, "max": 4096, "step": SIZE_STEP}
        optional = {name: ("IMAGE", {"tooltip": "reference image(s) for editing or multi-subject generation"})
                    for name in REFERENCE_INPUTS}
        return {
            "required": {
                "pipeline": (PIPELINE_TYPE,),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "text in quotes is drawn as written"}),
                "width": ("INT", dict(size)),
                "height": ("INT", dict(size)),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "guidance": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 20.0, "step": 0.1,
                                       "tooltip": "classifier-free guidance of the DiT; <= 1 skips the unconditional pass"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": optional,
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        # Checked when the prompt is queued, so a wrong size is a node error before anything runs.
        if width % SIZE_STEP or height % SIZE_STEP:
            return f"GLM-Image needs width and height in multiples of {SIZE_STEP}, got {width}x{height}"
        return True

    def generate(self, pipeline: GlmqModel, prompt: str, width: int, height: int, steps: int, guidance: float,
                 seed: int, batch_size: int, unique_id=None, **references):
        refs = []
        for name in REFERENCE_INPUTS:
            if references.get(name) is not None:
                refs.extend(to_pil(references[name]))
        pipe = pipeline.pipeline()
        out = []
        for i in range(batch_size):
            generator = torch.Generator().manual_seed((seed + i) % (MAX_SEED + 1))
            image = pipe(prompt, image=refs or None, height=height, width=width, num_inference_steps=steps,
                         guidance_scale=guidance, generator=generator, output_type="pt",
                         callback=_Progress(unique_id, i, batch_size))
            out.append(from_pipeline(image))
        return (torch.cat(out),)


NODE_CLASS_MAPPINGS = {
    "GlmqImageLoader": GlmImageLoader,
    "GlmqImageGenerate": GlmImageGenerate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GlmqImageLoader": "GLM-Image Loader (glmq)",
    "GlmqImageGenerate": "GLM-Image Generate (glmq)",
}
