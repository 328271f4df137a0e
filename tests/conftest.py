"""Shared fixtures: one tiny GLM-Image folder per test session (written by glmq make-tiny)."""

from __future__ import annotations

import os

# Triton kernels run in the interpreter on machines without a GPU (CI). It must be set before any test
# module imports a kernel, whichever test file is collected first.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# quantize()'s outlier evaluation draws layers at the released shapes (about a minute per recipe on 2 cores);
# tests use the tiny shapes, and tests/quant/test_outlier_eval.py checks the released shapes themselves.
os.environ.setdefault("GLMQ_OUTLIER_EVAL_SIZE", "tiny")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models gain nothing from threads, and on a loaded 2-core runner OpenMP spin-waits make every op ~30x
    slower (measured while writing tests/runtime/test_ar_engine.py)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight GLM-Image pipeline folder (seed 0). Tests must not modify it: copy first."""
    from glmq.maketiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "glm-image-tiny", progress=False)


# The `default` recipe's model-level figures on the tiny model above (glmq make-tiny, seed 0), as
# glmq.evaluate.fidelity reports them (quantized layers as the runtime computes them), measured by
# benchmarks/tiny_fidelity.py (benchmarks/results/tiny_fidelity_cpu2/). The figures are deterministic in the
# seed; the checks allow LOW dB below (new library versions move the upstream forwards' rounding) and HIGH dB
# above: running the W8A8 layers weight-only raises the velocity SQNR by 3.2 dB and comparing a model with
# itself gives infinity, and both must fail. Breaking any part of the model (tests/evaluate/
# test_tiny_sensitivity.py) lands at least FAULT_GAP dB below the lowest accepted figure.
TINY_DEFAULT = {
    "ar_logits_sqnr_db": {"measured": 13.10, "low": 1.5, "high": 1.5, "fault_gap": 4.0},
    "dit_velocity_sqnr_db_min": {"measured": 35.32, "low": 3.0, "high": 1.5, "fault_gap": 6.0},
    "image_psnr_db": {"measured": 52.52, "low": 3.0, "high": 1.5, "fault_gap": 6.0},
}


@pytest.fixture(scope="session")
def tiny_default_fidelity() -> dict:
    """``{figure: (lowest accepted, highest accepted, highest a broken model may reach)}`` (see TINY_DEFAULT)."""
    return {k: (v["measured"] - v["low"], v["measured"] + v["high"], v["measured"] - v["low"] - v["fault_gap"])
            for k, v in TINY_DEFAULT.items()}
