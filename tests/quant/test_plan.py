"""The planner (glmq.quant.plan): one mapping of recipe rules to layers and of recipe activations to
QuantLinear modes, shared by glmq quantize, in-memory quantization and the loader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glmq.errors import GlmqError
from glmq.io.layout import BY_NAME
from glmq.io.reader import PipelineReader
from glmq.quant import convert
from glmq.quant.formats.qconfig import make_quantization_config
from glmq.quant.plan import module_linears, plan_layers, runtime_mode
from glmq.quant.recipe import load_recipe
from glmq.testing import format_variants


@pytest.mark.parametrize("fmt", format_variants(), ids=str)
def test_runtime_mode_per_format_and_activations(fmt):
    # int4's kernel is weight-only (W4A16): it runs on "auto" whatever the recipe says about activations;
    # the 8-bit kernels are W8A8, so a weight-only rule must keep them off the kernel.
    w8a8 = fmt.name in ("fp8_e4m3", "int8")
    assert fmt.kernel_quantizes_activations is w8a8
    assert runtime_mode(fmt, "dynamic_per_token") == "auto"
    assert runtime_mode(fmt, "weight_only") == ("weight_only" if w8a8 else "auto")
    with pytest.raises(GlmqError, match="valid: weight_only, dynamic_per_token"):
        runtime_mode(fmt, "static")


def test_plan_layers_first_rule_wins_and_unused_rules_are_errors(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'name = "r"\nversion = 1\n'
        '[[rules]]\ncomponent = "transformer"\nmodules = ["a.*"]\nformat = "none"\n'
        '[[rules]]\ncomponent = "transformer"\nmodules = ["*"]\nformat = "int8"\nactivations = "weight_only"\n'
        '[[rules]]\ncomponent = "transformer"\nmodules = ["zzz"]\nformat = "fp8_e4m3"\n'
    )
    rec = load_recipe(recipe)
    linears = [("a.q", (64, 128)), ("b.q", (32, 128))]
    with pytest.raises(GlmqError, match="rule 3 \\(zzz\\) matches no linear layer of transformer"):
        plan_layers(rec, "transformer", linears)
    plans, kept = plan_layers(rec, "transformer", linears, strict=False)
    assert kept == ["a.q"] and list(plans) == ["b.q"]
    p = plans["b.q"]
    assert (p.fmt.name, p.shape, p.rule, p.activations, p.mode, p.algo.name) == \
        ("int8", (32, 128), 1, "weight_only", "weight_only", "rtn")
    assert plan_layers(rec, "vision_language_encoder", linears) == ({}, ["a.q", "b.q"])  # other component
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\nversion = 1\n[[rules]]\ncomponent = "transformer"\nmodules = ["*"]\n'
                   'format = "int4"\nparams = { group_size = 128 }\n')
    with pytest.raises(GlmqError, match="cannot quantize transformer layer a.q: .*K_in divisible by 128"):
        plan_layers(load_recipe(bad), "transformer", [("a.q", (64, 96))])


def test_convert_inplace_and_loader_plan_alike(tiny_dir):
    """glmq quantize's plan, the layers in-memory quantization swaps (formats, modes, tensors) and the
    loader's swap plan from the quantization_config convert writes: the same, layer for layer."""
    from glmq.quant.inplace import quantize_modules
    from glmq.runtime.loader import load_component, open_component, quant_plan
    from glmq.quant.formats.linear import QuantLinear

    rec = load_recipe("fast")
    reader = PipelineReader(tiny_dir)
    checked_modes = set()
    for comp in ("vision_language_encoder", "transformer"):
        plans, kept, _ = convert.plan_component(BY_NAME[comp], reader.component(comp), rec)
        assert plans, comp
        model = load_component(open_component(tiny_dir, comp))
        before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in plans}
        assert sorted(n for n, _ in module_linears(model)) == sorted([*plans, *kept])
        assert quantize_modules({comp: model}, "fast") == {comp: len(plans)}
        swapped = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert sorted(swapped) == sorted(plans)
        for name, plan in plans.items():
            q = swapped[name]
            assert q.format == plan.fmt and q.mode == plan.mode, name
            checked_modes.add(q.mode)
        name = next(iter(plans))  # RTN: the tensors are the format's own quantization of the weight
        want = plans[name].fmt.quantize(before[name])
        assert all(torch.equal(swapped[name].stored_tensors()[k].view(torch.uint8), v.view(torch.uint8))
                   for k, v in want.items())

        qcfg = make_quantization_config(rec.summary(), {p.name: (p.fmt, p.algo, p.activations)
                                                        for p in plans.values()}, kept)
        loaded = quant_plan(SimpleNamespace(quantization_config=qcfg, folder=tiny_dir / comp))
        assert loaded == {n: {"format": p.fmt, "mode": p.mode} for n, p in plans.items()}
    reader.close()
    assert checked_modes == {"auto", "weight_only"}  # fast: int4 and fp8 on auto, AdaLN int8 weight-only
