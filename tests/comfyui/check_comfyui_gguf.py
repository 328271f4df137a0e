"""Does ComfyUI-GGUF load glmq's DiT GGUF when ``glm_image`` is added to its image-architecture list?

Not a test (it needs a ComfyUI-GGUF checkout): run with the ComfyUI virtualenv's python, e.g.

    PY tests/comfyui/check_comfyui_gguf.py COMFYUI_DIR COMFYUI_GGUF_DIR GLMQ_GGUF_FOLDER

where COMFYUI_GGUF_DIR is a copy of ComfyUI-GGUF under an importable name (``ComfyUI_GGUF``) and
GLMQ_GGUF_FOLDER is a ``glmq export gguf`` output. Result on 2026-12-02 (ComfyUI 0.3.64,
ComfyUI-GGUF 795e451, tiny model): stock ComfyUI-GGUF refuses the file ("Unexpected architecture type in
GGUF file: 'glm_image'"); with the one name added it reads all tensors; then ComfyUI's
``load_diffusion_model_state_dict`` returns None because ComfyUI has no GLM-Image model, so ComfyUI-GGUF's
UnetLoaderGGUF stops with "ERROR UNSUPPORTED UNET". Use the glmq loader node for GGUF folders instead.
"""

import importlib
import sys
from pathlib import Path

comfy_dir, gguf_dir, folder = map(Path, sys.argv[1:4])
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [str(comfy_dir), str(gguf_dir.parent)]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()  # so that --cpu reaches ComfyUI's model management
import comfy.sd  # noqa: E402

loader = importlib.import_module(f"{gguf_dir.name}.loader")
path = next(folder.glob("glm-image-dit-*.gguf"))
try:
    loader.gguf_sd_loader(str(path))
    print("stock ComfyUI-GGUF: loaded")
except ValueError as e:
    print(f"stock ComfyUI-GGUF: {e}")
loader.IMG_ARCH_LIST.add("glm_image")
sd = loader.gguf_sd_loader(str(path))
print(f"with 'glm_image' in IMG_ARCH_LIST: {len(sd)} tensors read")
print(f"comfy.sd.load_diffusion_model_state_dict -> {comfy.sd.load_diffusion_model_state_dict(sd)}")
