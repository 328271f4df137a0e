"""Per-layer output SQNR on calibration activations (glmq.quant.calibrate, glmq.quant.dit_calibrate)."""

from __future__ import annotations

import math

import pytest
import torch

from glmq.io.layout import BY_NAME
from glmq.io.reader import PipelineReader
from glmq.evaluate.quantize import quantize
from glmq.quant import convert
from glmq.quant.calibrate import ArCalibrator, LayerCalibration
from glmq.quant.dit_calibrate import DitCalibrator
from glmq.quant.formats.linear import QuantLinear
from glmq.quant.metrics import sqnr_db
from glmq.quant.recipe import available_recipes, load_recipe


def _plans(reader, comp, recipe):
    plans, _, _ = convert.plan_component(BY_NAME[comp], reader.component(comp), load_recipe(recipe))
    return plans


def assert_every_layer_has_an_output_sqnr(report: dict) -> None:
    """Every quantized layer of ``report`` has a finite output SQNR (and RTN's, when not RTN itself)."""
    layers = report["layers"]
    assert len(layers) == sum(c["quantized_layers"] for c in report["components"].values()) > 0
    for name, st in layers.items():
        print(report["recipe"]["name"], name, st["algorithm"], st["weight_sqnr_db"], st["output_sqnr_db"],
              st.get("rtn_output_sqnr_db"))
        assert st["output_sqnr_db"] is not None and math.isfinite(st["output_sqnr_db"]), name
        if st["algorithm"] != "rtn":
            assert math.isfinite(st["rtn_output_sqnr_db"]), name
        if st["algorithm"] != "gptq":  # data-free on Gaussian weights: output SQNR tracks weight SQNR
            assert abs(st["output_sqnr_db"] - st["weight_sqnr_db"]) < 6, name
    assert set(report["layer_outputs"]) == {c for c, v in report["components"].items() if v["quantized_layers"]}


def test_every_layer_of_the_fast_and_tier16_recipes_has_an_output_sqnr(tiny_dir, tmp_path):
    """The other shipped recipes are checked where tests/test_quantize.py runs them."""
    from glmq.evaluate.report import layer_summary, report_markdown

    assert {"default", "fast", "ampere", "quality", "tier16"} == set(available_recipes())
    for recipe in ("fast", "tier16"):
        report = quantize(tiny_dir, tmp_path / recipe, recipe=recipe, progress=False, evaluate=False)
        assert_every_layer_has_an_output_sqnr(report)
    md = report_markdown(report)
    assert "Per-layer SQNR" in md and "transformer:transformer_blocks.1.ff.net.2" in md
    assert "vision_language_encoder:model.visual.blocks.0.mlp.fc1" in md and "synthetic 256x256 images" in md
    for row in layer_summary(report):
        assert row["output_sqnr_min"] is not None and row["output_sqnr_median"] is not None, row


def test_no_layer_outputs_leaves_them_out(tiny_dir, tmp_path):
    from glmq.evaluate.report import report_markdown

    report = quantize(tiny_dir, tmp_path / "q", recipe="fast", progress=False, evaluate=False,
                              layer_outputs=False)
    assert report["layer_outputs"] is None
    assert all(st["output_sqnr_db"] is None for st in report["layers"].values())
    assert "--no-layer-outputs" in report_markdown(report)


@pytest.mark.parametrize("comp, recipe, name", [
    ("vision_language_encoder", "default", "model.language_model.layers.1.mlp.down_proj"),  # HQQ int4
    ("vision_language_encoder", "tier16", "lm_head"),
    ("transformer", "default", "transformer_blocks.1.attn1.to_out.0"),  # fp8
])
def test_output_sqnr_equals_a_direct_computation_and_drops_when_the_weight_is_corrupted(tiny_dir, comp, recipe,
                                                                                          name):
    reader = PipelineReader(tiny_dir)
    plans = _plans(reader, comp, recipe)
    cls = ArCalibrator if comp == "vision_language_encoder" else DitCalibrator
    calib = cls(reader, plans).result(name)
    x = calib.inputs
    assert x.dtype == torch.float32 and x.shape[1] == plans[name].shape[1] and 0 < x.shape[0] <= 256
    w = reader.component(comp).get(f"{name}.weight")
    plan = plans[name]
    out = convert._quantize_layer(plan, w, calib, "cpu")
    stats = out.pop("__stats__")
    linear = torch.nn.Linear(plan.shape[1], plan.shape[0], bias=False)
    # The runtime's module on its GPU path, computed by the kernel's reference (W8A8: activations per token).
    mode = "reference" if plan.mode == "auto" else plan.mode
    direct = sqnr_db(x @ w.float().T, QuantLinear.from_linear(linear, plan.fmt, out, mode=mode)(x))
    print(name, "reported", stats["output_sqnr_db"], "direct", direct)
    assert abs(stats["output_sqnr_db"] - direct) < 1e-3
    if plan.algo.name != "rtn":
        from glmq.quant.algorithms import get_algorithm

        rq = get_algorithm("rtn").quantize_weight(plan.fmt, w)
        rtn = sqnr_db(x @ w.float().T, QuantLinear.from_linear(linear, plan.fmt, rq, mode=mode)(x))
        assert abs(stats["rtn_output_sqnr_db"] - rtn) < 1e-3

    # Corrupt the stored layer: a quarter of the rows get their scales doubled.
    bad = {k: v.clone() for k, v in out.items()}
    scale = bad["weight_scale"]
    scale[: max(1, scale.shape[0] // 4)] *= 2
    worse = convert._quantize_layer(plan, w, LayerCalibration(tensors=bad, inputs=x), "cpu")["__stats__"]
    print(name, "corrupted", worse["output_sqnr_db"])
    assert worse["output_sqnr_db"] < stats["output_sqnr_db"] - 6


def test_dit_calibrator_blocks_see_the_inputs_of_a_full_forward(tiny_dir):
    from glmq.evaluate.fidelity import load_dequantized

    reader = PipelineReader(tiny_dir)
    plans = _plans(reader, "transformer", "default")
    cal = DitCalibrator(reader, plans)
    model = load_dequantized(reader.component("transformer"))  # fp32, every block materialized

    def recorder(store):
        return lambda mod, args, kwargs: store.append([t.detach().clone() for t in args[:2]])

    seen, full = [], []
    for block in cal.meta.transformer_blocks:
        block.register_forward_pre_hook(recorder(seen), with_kwargs=True)
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(recorder(full), with_kwargs=True)
    for name in plans:
        cal.result(name)
    with torch.no_grad():
        model(**cal.forward_inputs(), return_dict=False)
    assert len(seen) == len(full) == model.config.num_layers
    for i, ((h, e), (h_ref, e_ref)) in enumerate(zip(seen, full)):
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in ((h, h_ref), (e, e_ref)))
        print("block", i, "max relative difference", err)
        assert err < 1e-5
    assert all(not p.is_meta for p in model.parameters()) and all(p.is_meta for p in cal.meta.parameters())
