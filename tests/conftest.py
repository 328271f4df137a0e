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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random-weight GLM-Image pipeline folder (seed 0). Tests must not modify it: copy first."""
    from glmq.maketiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "glm-image-tiny", progress=False)
