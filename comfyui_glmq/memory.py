"""A glmq pipeline under ComfyUI's memory management.

ComfyUI keeps a list of loaded models (``comfy.model_management.current_loaded_models``) and unloads from it
when a node needs memory for another model, when the user presses "Unload models" (``POST /free``) and before
a ``--lowvram`` run. Entries wrap a ``ModelPatcher``; glmq places and streams its own weights (resident, staged
or offload), so :class:`GlmqModel` is not a ModelPatcher but answers the few calls that list makes of one: its
size, its device, and ``detach`` (unload), which here drops the whole pipeline. The next generation loads it
again, so a freed model costs a reload, never an error. Written against ComfyUI 0.3.64's model_management.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path

import torch

import comfy.model_management as mm

from .folders import weight_bytes

GiB = 1024**3
MODES = ("auto", "resident", "staged", "offload")
log = logging.getLogger("glmq.comfyui")


class GlmImagePipelineLoaded:
    """Stands for one load of the pipeline in ComfyUI's list (ComfyUI logs this class name).

    ComfyUI holds a weak reference to ``.model`` with a finalizer that prunes its list when the object dies.
    If that object were the pipeline, dropping the pipeline inside ``detach`` would run the finalizer in the
    middle of ComfyUI's own unloading loop, which then pops the same entry twice (IndexError in ComfyUI's
    prompt worker, measured with 0.3.64). This token lives until the next load or until the node's output is
    dropped, so the pipeline can be freed at once.
    """


class GlmqModel:
    """One GLM-Image checkpoint as ComfyUI sees it: loaded on first use, dropped when ComfyUI unloads it."""

    def __init__(self, path: Path, memory_mode: str = "auto"):
        if memory_mode not in MODES:
            raise ValueError(f"unknown memory mode {memory_mode!r}; valid: {', '.join(MODES)}")
        self.path = Path(path)
        self.memory_mode = memory_mode
        self.load_device = mm.get_torch_device()
        self.offload_device = torch.device("cpu")
        self.parent = None  # ComfyUI follows parents of cloned patchers; there are none here
        self._pipe = None
        self._token = None  # a GlmImagePipelineLoaded per load; see there
        self._bytes = 0  # device memory the loaded pipeline holds (measured), or its weight bytes on CPU
        self._lock = threading.Lock()

    # -- what the nodes use -----------------------------------------------------------------------------
    def pipeline(self):
        """The loaded glmq pipeline, loading it (and registering it with ComfyUI) when needed."""
        with self._lock:
            if self._pipe is None:
                self._load()
            return self._pipe

    @property
    def model(self):
        # ComfyUI keeps a weak reference to ``.model`` and forgets entries whose model is gone.
        return self._token

    def _mode_and_budget(self, needed: int) -> tuple[str | None, float | None]:
        dev = self.load_device
        if dev.type != "cuda":
            return None, None
        if self.memory_mode != "auto":
            return self.memory_mode, None
        if mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM):
            return "offload", None  # the user started ComfyUI with --lowvram / --novram
        if mm.vram_state == mm.VRAMState.HIGH_VRAM:
            return "resident", None  # --highvram / --gpu-only: keep everything on the card
        # Make room the way ComfyUI's own loaders do: unload other models until the checkpoint fits (or
        # nothing is left to unload), then let glmq pick the fastest mode whose peak fits what is free.
        mm.free_memory(needed + mm.minimum_inference_memory(), dev)
        free = mm.get_free_memory(dev) - mm.extra_reserved_memory()
        return None, max(free, 0) / GiB

    def _load(self) -> None:
        import glmq

        dev = self.load_device
        mode, budget = self._mode_and_budget(int(weight_bytes(self.path) * 1.1))
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        log.info("glmq: loading %s on %s (mode %s, budget %s GiB)", self.path, dev, mode or "auto",
                 "-" if budget is None else f"{budget:.1f}")
        pipe = glmq.load(self.path, device=str(dev), vram_budget_gb=budget, mode=mode)
        self._bytes = (torch.cuda.memory_allocated(dev) - before) if dev.type == "cuda" else weight_bytes(self.path)
        self._pipe = pipe
        self._token = GlmImagePipelineLoaded()
        log.info("glmq: loaded %s in %s mode", self.path.name, pipe.mode)
        # Registers this model in ComfyUI's loaded-model list (its size is already resident, so nothing else
        # is unloaded for it); from then on ComfyUI may unload it through detach().
        mm.load_models_gpu([self])

    def unload(self) -> None:
        """Drop the pipeline and give its memory back (ComfyUI calls this through :meth:`detach`)."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        pipe.release()
        del pipe
        self._bytes = 0
        gc.collect()
        mm.soft_empty_cache()
        log.info("glmq: unloaded %s", self.path.name)

    # -- the part of ModelPatcher's interface that comfy.model_management calls --------------------------
    def model_size(self) -> int:
        return self._bytes

    def loaded_size(self) -> int:
        return self._bytes if self._pipe is not None else 0

    def current_loaded_device(self):
        return self.load_device if self._pipe is not None else self.offload_device

    def model_dtype(self):
        return self._pipe.dtype if self._pipe is not None else torch.float32

    def model_patches_to(self, device) -> None:
        pass  # no patches (LoRAs, hooks) to move

    def model_patches_models(self) -> list:
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def partially_load(self, device, extra_memory=0, force_patch_weights=False) -> int:
        return 0  # glmq's memory mode already decided what lives on the card

    def partially_unload(self, device_to, memory_to_free=0) -> int:
        return 0  # all or nothing: ComfyUI then calls detach()

    def detach(self, unpatch_all=True) -> None:
        self.unload()

    def is_clone(self, other) -> bool:
        return other is self

    def __repr__(self) -> str:
        return f"GlmqModel({self.path.name!r}, mode={self.memory_mode!r}, loaded={self._pipe is not None})"
