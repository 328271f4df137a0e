"""Quantize live modules by a recipe, in place (no checkpoint on disk).

``quantize_modules({"vision_language_encoder": ar, "transformer": dit}, "default")`` swaps every linear
layer the recipe selects for a :class:`~glmq.runtime.qlinear.QuantLinear` holding exactly the tensors
``glmq quantize`` would have written (same formats, same data-free algorithms). Used by ``glmq bench
--model full-random``, which builds the released architecture directly on the GPU; calibrated algorithms
(GPTQ) need ``glmq quantize`` and its calibration pass instead.
"""

from __future__ import annotations

from glmq.errors import GlmqError


def quantize_modules(components: dict, recipe: str = "default") -> dict[str, int]:
    """Quantize ``components`` (model_index name -> module) in place; returns layers swapped per component."""
    import torch
    from torch import nn

    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.formats import get_format
    from glmq.quant.recipe import load_recipe
    from glmq.runtime.loader import _MODES
    from glmq.runtime.qlinear import QuantLinear

    rec = load_recipe(recipe)
    counts = {}
    for comp_name, model in components.items():
        swapped = 0
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, nn.Linear):
                continue
            rule = rec.rule_for(comp_name, name)
            if rule is None or rule.format == "none":
                continue
            algo = get_algorithm(rule.algorithm, **rule.algorithm_params)
            if algo.needs_hessian:
                raise GlmqError(f"recipe {rec.name}: {algo.name} needs calibration; use glmq quantize for it")
            fmt = get_format(rule.format, **rule.params)
            with torch.no_grad():
                tensors = algo.quantize_weight(fmt, mod.weight)
            params = {"mode": _MODES.get(rule.activations, "auto") if fmt.name != "int4" else "auto"}
            if fmt.name == "int4":
                params.update(group_size=fmt.group_size, symmetric=fmt.symmetric)
            new = QuantLinear.from_linear(mod, fmt.name, tensors={k: v.to(mod.weight.device) for k, v in tensors.items()},
                                          **params)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            swapped += 1
            del mod
        counts[comp_name] = swapped
        model.glmq_recipe = rec.summary()  # what glmq.runtime reads, as from a quantized folder's config
    return counts
