"""Quantize live modules by a recipe, in place (no checkpoint on disk).

``quantize_modules({"vision_language_encoder": ar, "transformer": dit}, "default")`` swaps every linear
layer the recipe selects for a :class:`~glmq.quant.formats.linear.QuantLinear` holding exactly the tensors
``glmq quantize`` would have written (same formats, same data-free algorithms). Used by ``glmq bench
--model full-random``, which builds the released architecture directly on the GPU; calibrated algorithms
(GPTQ) need ``glmq quantize`` and its calibration pass instead.
"""

from __future__ import annotations

from glmq.errors import GlmqError


def quantize_modules(components: dict, recipe: str = "default") -> dict[str, int]:
    """Quantize ``components`` (model_index name -> module) in place; returns layers swapped per component.

    Layers, formats, algorithms and runtime modes come from the planner (:mod:`glmq.quant.plan`), as in
    ``glmq quantize`` and the loader."""
    import torch

    from glmq.quant.plan import module_linears, plan_layers
    from glmq.quant.recipe import load_recipe
    from glmq.quant.formats.linear import QuantLinear

    rec = load_recipe(recipe)
    counts = {}
    for comp_name, model in components.items():
        plans, _ = plan_layers(rec, comp_name, module_linears(model), strict=False)
        for plan in plans.values():
            if plan.algo.needs_hessian:
                raise GlmqError(f"recipe {rec.name}: {plan.algo.name} needs calibration; use glmq quantize for it")
        for plan in plans.values():
            parent_name, _, child = plan.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            mod = getattr(parent, child)
            with torch.no_grad():
                tensors = plan.algo.quantize_weight(plan.fmt, mod.weight)
            new = QuantLinear.from_linear(mod, plan.fmt, tensors={k: v.to(mod.weight.device) for k, v in tensors.items()},
                                          mode=plan.mode)
            setattr(parent, child, new)
            del mod
        counts[comp_name] = len(plans)
        model.glmq_recipe = rec.summary()  # what glmq.runtime reads, as from a quantized folder's config
    return counts
