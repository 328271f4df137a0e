"""The planner: which linear layer gets which format, algorithm and runtime mode, by recipe.

One place maps a recipe's rules to a component's linear layers (the first matching rule decides a layer;
``format = "none"`` keeps it) and a recipe's ``activations`` to the :class:`~glmq.quant.formats.linear.QuantLinear`
mode the runtime runs it in. ``glmq quantize`` (``glmq.quant.convert``), in-memory quantization
(``glmq.quant.inplace``) and the loader (``glmq.runtime.loader``, from a checkpoint's
``quantization_config``) all plan through this module, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmq.errors import GlmqError
from glmq.quant.recipe import ACTIVATION_MODES

if TYPE_CHECKING:
    from glmq.quant.formats.base import QuantFormat
    from glmq.quant.recipe import Recipe


def runtime_mode(fmt: QuantFormat, activations: str) -> str:
    """The ``QuantLinear`` mode for a layer stored in ``fmt`` whose recipe rule asks for ``activations``.

    ``"dynamic_per_token"``: ``"auto"``, the format's kernel where it runs (for 8-bit formats a W8A8 kernel
    that quantizes activations per token), else the weight-only fallback. ``"weight_only"``: formats whose
    kernel quantizes activations run ``"weight_only"`` (dequantize, then a float matmul); a weight-only
    kernel (int4's W4A16) keeps ``"auto"``, since it leaves activations in float anyway.
    """
    if activations not in ACTIVATION_MODES:
        raise GlmqError(f"unknown activations mode {activations!r}; valid: {', '.join(ACTIVATION_MODES)}")
    if activations == "weight_only" and fmt.kernel_quantizes_activations:
        return "weight_only"
    return "auto"


@dataclass(frozen=True)
class LayerPlan:
    """One quantized linear layer: module name, weight shape ``(N_out, K_in)``, format, algorithm, the
    recipe's activations hint and the index of the rule that chose it."""

    name: str
    shape: tuple[int, int]
    fmt: Any  # QuantFormat
    algo: Any  # QuantAlgorithm
    activations: str
    rule: int

    @property
    def mode(self) -> str:
        """The ``QuantLinear`` mode the runtime uses for this layer (:func:`runtime_mode`)."""
        return runtime_mode(self.fmt, self.activations)


def plan_layers(recipe: Recipe, component: str, linears: Iterable[tuple[str, tuple[int, int]]], *,
                strict: bool = True) -> tuple[dict[str, LayerPlan], list[str]]:
    """Plan the linear layers of one component.

    Args:
        recipe: a loaded recipe.
        component: the model_index name (``"vision_language_encoder"``, ``"transformer"``, ...).
        linears: ``(module name, (out_features, in_features))`` of every ``nn.Linear`` of the component.
        strict: raise if a rule of this component matches no layer (a typo in a pattern, almost surely).

    Returns:
        ``(plans, kept)``: a :class:`LayerPlan` per quantized layer (in ``linears`` order) and the names of
        the linears left as they are (no rule, or ``format = "none"``).
    """
    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.formats import get_format

    plans: dict[str, LayerPlan] = {}
    kept: list[str] = []
    used = [False] * len(recipe.rules)
    for name, shape in linears:
        idx = next((i for i, r in enumerate(recipe.rules) if r.matches(component, name)), None)
        if idx is None:
            kept.append(name)
            continue
        used[idx] = True
        rule = recipe.rules[idx]
        if rule.format == "none":
            kept.append(name)
            continue
        fmt = get_format(rule.format, **rule.params)
        shape = (int(shape[0]), int(shape[1]))
        try:
            fmt.check(shape)
        except GlmqError as e:
            raise GlmqError(f"recipe {recipe.name}: cannot quantize {component} layer {name}: {e}") from None
        plans[name] = LayerPlan(name, shape, fmt, get_algorithm(rule.algorithm, **rule.algorithm_params),
                                rule.activations, idx)
    if strict:
        for i, rule in enumerate(recipe.rules):
            if rule.component == component and not used[i]:
                raise GlmqError(
                    f"{recipe.source}: rule {i + 1} ({', '.join(rule.modules)}) matches no linear layer of {component}"
                )
    return plans, kept


def module_linears(model) -> list[tuple[str, tuple[int, int]]]:
    """``(name, (out_features, in_features))`` of every ``nn.Linear`` in ``model``, in module order."""
    from torch import nn

    return [(n, (m.out_features, m.in_features)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def plan_component(comp, cr, recipe: Recipe) -> tuple[dict[str, LayerPlan], list[str], Any]:
    """Which linear layers of ``comp`` get which format (:func:`plan_layers`); also the
    linears kept as they are, and the component's module (built on the meta device)."""
    from glmq.models.build import build_model

    model = build_model(comp, cr.config)
    plans, kept = plan_layers(recipe, comp.name, module_linears(model))
    return plans, kept, model
