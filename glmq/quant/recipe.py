"""Recipes: versioned data files that map module-name patterns to quantization formats.

A recipe is a TOML file (``glmq/recipes/NAME.toml`` ships inside the package; any path works too)::

    name = "default"
    version = 1
    description = "..."

    [[rules]]
    component = "vision_language_encoder"          # model_index key
    modules = ["model.language_model.layers.*.self_attn.*_proj"]   # fnmatch patterns on module names
    format = "int4"                                 # a glmq.quant.formats name, or "none" (keep as is)
    params = { group_size = 128, symmetric = false }
    algorithm = "hqq"                               # a glmq.quant.algorithms name (default "rtn")
    algorithm_params = {}
    activations = "weight_only"                     # runtime hint for 8-bit: "dynamic_per_token" = W8A8

    [attention]                 # optional, before the rules; a runtime choice recorded with the DiT's config
    dit = "fp8"                 # DiT attention kernel precision: "bf16" (default), "fp8" or "int8"
    min_tokens = 8192           # use the 8-bit kernel only for joint sequences at least this long

Rules are tried in order and the first whose component and pattern match a linear layer decides it;
linear layers no rule matches keep their original dtype. Only ``nn.Linear`` weights are quantized; a
pattern that matches no linear layer at all is an error (it is almost certainly a typo).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmq.errors import GlmqError

RECIPE_VERSION = 1
ACTIVATION_MODES = ("weight_only", "dynamic_per_token")
# glmq.kernels.attention's precisions, listed here so that reading a recipe (or building the CLI) never
# imports the kernels; tests/runtime/test_attention_precision.py keeps the two lists equal.
ATTENTION_PRECISIONS = ("bf16", "fp8", "int8")
ATTENTION_KERNELS = ("auto", "glmq", "sdpa")  # glmq's Triton kernels (auto: on CUDA) or PyTorch SDPA


def recipes_dir() -> Path:
    """Where the shipped recipes live: ``glmq/recipes/``, package data, so a wheel install has them too."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    if not here.is_dir():
        raise GlmqError(f"glmq's recipes folder is missing from this installation ({here})")
    return here


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


@dataclass(frozen=True)
class Rule:
    component: str
    modules: tuple[str, ...]
    format: str
    params: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "rtn"
    algorithm_params: dict[str, Any] = field(default_factory=dict)
    activations: str = "weight_only"

    def matches(self, component: str, module: str) -> bool:
        return component == self.component and any(fnmatch.fnmatchcase(module, p) for p in self.modules)


@dataclass(frozen=True)
class AttentionPolicy:
    """Which DiT attention kernel the runtime uses for a checkpoint made by this recipe."""

    dit: str = "bf16"
    min_tokens: int = 0  # below this joint sequence length the bf16 kernel runs even when ``dit`` is 8-bit

    def config(self) -> dict[str, Any]:
        return {"dit": self.dit, "min_tokens": self.min_tokens}


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    description: str
    rules: tuple[Rule, ...]
    source: str  # file it was read from
    attention: AttentionPolicy = AttentionPolicy()

    def rule_for(self, component: str, module: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(component, module):
                return rule
        return None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "attention": self.attention.config()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "attention": self.attention.config(),
            "rules": [
                {
                    "component": r.component,
                    "modules": list(r.modules),
                    "format": r.format,
                    "params": r.params,
                    "algorithm": r.algorithm,
                    "algorithm_params": r.algorithm_params,
                    "activations": r.activations,
                }
                for r in self.rules
            ],
        }


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``default``, ``ampere``, ``quality``, ``tier16``) or a TOML file by path."""
    from glmq.io.layout import BY_NAME
    from glmq.quant.algorithms import ALGORITHMS
    from glmq.quant.formats import FORMATS

    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        path = p
        if not path.is_file():
            raise GlmqError(f"{path}: recipe file not found")
    else:
        path = recipes_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise GlmqError(
                f"unknown recipe {str(name_or_path)!r}; valid recipes: {', '.join(available_recipes())} "
                "(or a path to a .toml file)"
            )
    from glmq.io.safe_read import read_toml

    data = read_toml(path, "recipe")  # regular file, size cap, bounded nesting; one-line errors
    where = str(path)
    version = data.get("version")
    if version != RECIPE_VERSION:
        raise GlmqError(f"{where}: recipe version {version!r} is not supported (this glmq reads version {RECIPE_VERSION})")
    rules = []
    for i, raw in enumerate(data.get("rules", [])):
        ctx = f"{where}: rule {i + 1}"
        unknown = set(raw) - {"component", "modules", "format", "params", "algorithm", "algorithm_params", "activations"}
        if unknown:
            raise GlmqError(f"{ctx}: unknown key {sorted(unknown)[0]!r}")
        comp = raw.get("component")
        if comp not in BY_NAME or not BY_NAME[comp].has_weights:
            valid = ", ".join(c for c, v in BY_NAME.items() if v.has_weights)
            raise GlmqError(f"{ctx}: unknown component {comp!r}; valid components: {valid}")
        modules = raw.get("modules")
        if isinstance(modules, str):
            modules = [modules]
        if not modules or not all(isinstance(m, str) for m in modules):
            raise GlmqError(f"{ctx}: 'modules' must be a non-empty list of patterns")
        fmt = raw.get("format")
        if fmt != "none" and fmt not in FORMATS:
            raise GlmqError(f"{ctx}: unknown format {fmt!r}; valid formats: none, {', '.join(FORMATS)}")
        algo = raw.get("algorithm", "rtn")
        if algo not in ALGORITHMS:
            raise GlmqError(f"{ctx}: unknown algorithm {algo!r}; valid algorithms: {', '.join(ALGORITHMS)}")
        acts = raw.get("activations", "weight_only")
        if acts not in ACTIVATION_MODES:
            raise GlmqError(f"{ctx}: unknown activations mode {acts!r}; valid: {', '.join(ACTIVATION_MODES)}")
        rules.append(Rule(comp, tuple(modules), fmt, dict(raw.get("params", {})), algo,
                          dict(raw.get("algorithm_params", {})), acts))
    if not rules:
        raise GlmqError(f"{where}: recipe has no rules")
    return Recipe(str(data.get("name", path.stem)), version, str(data.get("description", "")), tuple(rules), where,
                  _attention_policy(data.get("attention", {}), where))


def _attention_policy(raw, where: str) -> AttentionPolicy:
    if not isinstance(raw, dict):
        raise GlmqError(f"{where}: [attention] must be a table")
    unknown = set(raw) - {"dit", "min_tokens"}
    if unknown:
        raise GlmqError(f"{where}: [attention]: unknown key {sorted(unknown)[0]!r}; valid: dit, min_tokens")
    dit = raw.get("dit", "bf16")
    if dit not in ATTENTION_PRECISIONS:
        raise GlmqError(f"{where}: [attention]: unknown dit precision {dit!r}; valid: {', '.join(ATTENTION_PRECISIONS)}")
    min_tokens = raw.get("min_tokens", 0)
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise GlmqError(f"{where}: [attention]: min_tokens must be a non-negative integer, got {min_tokens!r}")
    return AttentionPolicy(dit, min_tokens)
