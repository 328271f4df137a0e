"""Stock diffusers loads a ``glmq export hf`` folder on a GPU and generates, in a process without glmq.

diffusers 0.42.1 refuses bitsandbytes models without a GPU, so the CPU test (tests/export/test_export_hf.py)
has to skip that check; this script is the same acceptance on a CUDA machine with nothing patched.
It imports only torch, diffusers and transformers (it checks that glmq never got imported).

    python benchmarks/check_hf_export_gpu.py EXPORTED_FOLDER RESULT.json
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import GlmImagePipeline
from torch import nn


def _provenance() -> dict:
    """glmq.bench.provenance, loaded from its file: it is standard library only, and importing it as part of the
    ``glmq`` package would defeat this script's point."""
    path = Path(__file__).resolve().parents[1] / "glmq" / "bench" / "provenance.py"
    spec = importlib.util.spec_from_file_location("_results_provenance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.provenance()


def main(folder: str, result_path: str) -> int:
    t0 = time.perf_counter()
    pipe = GlmImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    pipe.to("cuda")
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)

    def linear_types(model):
        types = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                types[type(m).__name__] = types.get(type(m).__name__, 0) + 1
        return types

    t0 = time.perf_counter()
    image = pipe("a tiny 'sign' on a wall", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    res = {
        "folder": folder,
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__,
        "load_s": round(load_s, 2),
        "generate_s": round(time.perf_counter() - t0, 2),
        "image": {"size": list(image.size), "mode": image.mode, "extrema": [list(e) for e in image.getextrema()]},
        "ar_linear_types": linear_types(pipe.vision_language_encoder),
        "dit_linear_types": linear_types(pipe.transformer),
        "ar_device": str(next(pipe.vision_language_encoder.parameters()).device),
        "dit_device": str(next(pipe.transformer.parameters()).device),
        "glmq_imported": any(m == "glmq" or m.startswith("glmq.") for m in sys.modules),
    }
    ok = (not res["glmq_imported"] and "Linear4bit" in res["ar_linear_types"]
          and "Linear8bitLt" in res["dit_linear_types"] and res["image"]["size"] == [64, 64])
    res["ok"] = ok
    res["provenance"] = _provenance()
    with open(result_path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
