"""The report's outlier-layer section: one row per (rule, released shape), finite, seeded, and GPTQ beats
RTN on outlier activations. Scored at the tiny architecture's shapes to stay fast; the shape table of the
full architecture is checked on the meta device (no weights)."""

from __future__ import annotations

import math

import pytest

from glmq.evaluate import outlier_eval
from glmq.evaluate.outlier_eval import evaluate_outliers, released_shapes
from glmq.quant.recipe import load_recipe
from glmq.evaluate.report import outlier_markdown, outlier_summary


@pytest.fixture(scope="module")
def quality():
    # Small row/column caps so the row-subset and column-slice paths run at tiny shapes too.
    return evaluate_outliers(load_recipe("quality"), size="tiny", max_rows=48, max_gptq_cols=64)


def test_released_shapes_are_the_full_architecture():
    got = {(e["component"], tuple(e["shape"]), e["layers"]) for e in released_shapes(load_recipe("default"))}
    print(sorted(got))
    assert got == {
        ("vision_language_encoder", (4096, 4096), 80),  # q_proj and o_proj
        ("vision_language_encoder", (256, 4096), 80),  # k_proj and v_proj: 2 KV heads x 128
        ("vision_language_encoder", (27392, 4096), 40),  # fused gate_up_proj
        ("vision_language_encoder", (4096, 13696), 40),  # down_proj
        ("transformer", (4096, 4096), 120),
        ("transformer", (16384, 4096), 30),
        ("transformer", (4096, 16384), 30),
        ("transformer", (49152, 512), 30),  # AdaLN norm1.linear
    }


def test_section_structure_and_finite_numbers(quality):
    oe = quality
    assert oe["architecture"] == "tiny" and oe["generator"].endswith("make_outlier_layer")
    assert set(oe["generator_params"]) == {"n_outlier_channels", "outlier_scale", "rank", "tail"}
    rules = {(r["rule"], tuple(r["shape"])) for r in oe["rows"]}
    assert rules == {(e["rule"], tuple(e["shape"])) for e in released_shapes(load_recipe("quality"), "tiny")}
    for r in oe["rows"]:
        print(r["component"], r["shape"], r["format"], r["algorithm"], r["evaluated"]["selection"],
              r["weight_sqnr_db"], r["output_sqnr_db"], r["rtn_full"])
        assert set(r["weight_sqnr_db"]) == set(r["output_sqnr_db"]) == {r["algorithm"], "rtn"}
        values = [*r["weight_sqnr_db"].values(), *r["output_sqnr_db"].values(), *r["rtn_full"].values()]
        assert all(v is not None and math.isfinite(v) for v in values)
        assert r["evaluated"]["rows"] <= max(48, r["shape"][0] if r["algorithm"] == "rtn" else 48)
    sliced = [r for r in oe["rows"] if r["algorithm"] == "gptq" and r["evaluated"]["cols"] < r["shape"][1]]
    assert sliced and all(r["evaluated"]["cols"] == 64 for r in sliced)
    assert oe["worst"]["output_sqnr_db"] == min(r["output_sqnr_db"][r["algorithm"]] for r in oe["rows"])


def test_gptq_beats_rtn_on_outlier_activations(quality):
    gptq = [r for r in quality["rows"] if r["algorithm"] == "gptq"]
    assert gptq
    for r in gptq:
        gain = r["output_sqnr_db"]["gptq"] - r["output_sqnr_db"]["rtn"]
        print(f"{r['shape']}: GPTQ {r['output_sqnr_db']['gptq']:.2f} dB, RTN {r['output_sqnr_db']['rtn']:.2f} dB, "
              f"gain {gain:+.2f} dB")
        assert gain >= 0.0  # held-out tokens: calibration must not make the output worse


def test_deterministic_by_seed(quality):
    outlier_eval._MEMO.clear()  # recompute, not the memoized result
    again = evaluate_outliers(load_recipe("quality"), size="tiny", max_rows=48, max_gptq_cols=64)
    strip = lambda oe: [{k: v for k, v in r.items() if k != "seconds"} for r in oe["rows"]]  # noqa: E731
    assert strip(again) == strip(quality)
    other = evaluate_outliers(load_recipe("quality"), size="tiny", max_rows=48, max_gptq_cols=64, seed=1)
    assert strip(other) != strip(quality)


def test_markdown_and_summary(quality):
    md = "\n".join(outlier_markdown(quality))
    assert "## Outlier layers at tiny-size shapes" in md and "make_outlier_layer" in md
    assert md.count("| vision_language_encoder |") == sum(r["component"] == "vision_language_encoder"
                                                           for r in quality["rows"])
    line = outlier_summary(quality)
    print(line)
    assert line.startswith(f"output SQNR {quality['worst']['output_sqnr_db']:.2f} dB")
    assert outlier_markdown(None) == [] and outlier_summary(None) is None


def test_quantize_writes_the_section(tiny_dir, tmp_path, monkeypatch):
    from glmq.evaluate.quantize import quantize

    monkeypatch.setenv("GLMQ_OUTLIER_EVAL_SIZE", "tiny")  # the default is the released shapes (about a minute)
    report = quantize(tiny_dir, tmp_path / "q", recipe="fast", progress=False)
    oe = report["outlier_eval"]
    assert oe["architecture"] == "tiny" and oe["rows"]
    assert "## Outlier layers at tiny-size shapes" in (tmp_path / "q" / "quantization_report.md").read_text()
    assert quantize(tiny_dir, tmp_path / "n", recipe="fast", progress=False, evaluate=False).get("outlier_eval") is None


@pytest.mark.parametrize("recipe, fmt", [("default", "fp8_e4m3"), ("ampere", "int8")])
def test_w8a8_rows_are_scored_with_quantized_activations(recipe, fmt):
    """W8A8 rules quantize the outlier activations per token, as their kernels do: their output SQNR is the
    runtime's (QuantLinear on the kernels' reference path), below what a weight-only reading would show; the
    weight-only AdaLN rule stays weight-only."""
    import torch

    from glmq.evaluate.outliers import make_outlier_layer
    from glmq.quant.formats import get_format
    from glmq.quant.formats.linear import QuantLinear
    from glmq.quant.metrics import sqnr_db

    oe = evaluate_outliers(load_recipe(recipe), size="tiny")
    rows = [r for r in oe["rows"] if r["component"] == "transformer"]
    w8a8 = [r for r in rows if r["activations_quantized"]]
    assert w8a8 and all(r["format"] == fmt and r["runtime_mode"] == "reference" for r in w8a8)
    assert all(r["runtime_mode"] == "weight_only" for r in rows if "norm1" in r["example"])
    for r in w8a8:
        n, k = r["shape"]
        layer = make_outlier_layer(n, k, n_tokens=oe["calib_tokens"] + oe["eval_tokens"], seed=oe["seed"],
                                   **oe["generator_params"])
        x = layer.activations[oe["calib_tokens"]:]
        q = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), get_format(fmt),
                                    get_format(fmt).quantize(layer.weight), mode="weight_only")
        ref = x @ layer.weight.T
        weight_only = sqnr_db(ref, q(x))
        q.mode = "reference"
        as_run = sqnr_db(ref, q(x))
        print(f"{r['example']} {r['shape']}: report {r['output_sqnr_db']['rtn']:.2f} dB, as run {as_run:.2f}, "
              f"weight-only {weight_only:.2f}")
        assert abs(r["rtn_full"]["output_sqnr_db"] - as_run) < 0.01
        assert weight_only - as_run > 0.5
