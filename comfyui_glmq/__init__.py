"""glmq's ComfyUI nodes: GLM-Image Loader (glmq) and GLM-Image Generate (glmq).

Install: link or copy this folder into ``ComfyUI/custom_nodes/`` and ``pip install glmq`` into ComfyUI's Python
(see the "ComfyUI" section of glmq's README). Checkpoints go in ``ComfyUI/models/glm_image/<name>/`` (or
``models/diffusers``), one pipeline folder each. This package imports ComfyUI modules and is loaded by
ComfyUI only; ``import glmq`` never imports it.
"""

import os

import folder_paths

from .nodes import FOLDER, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# models/glm_image, beside ComfyUI's other model folders; extra_model_paths.yaml may add more under "glm_image".
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
