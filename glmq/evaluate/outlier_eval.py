"""Recipe fidelity on LLM-like layers with outlier input channels, at the released layer shapes.

Random Gaussian weights (what ``glmq make-tiny --size full`` writes) have no outliers, so the per-layer
SQNR of a conversion says little about real checkpoints. :func:`evaluate_outliers` draws, for every
distinct layer shape a recipe rule quantizes in the *released* architecture (``glmq.models.configs``
"full", whatever the source folder's size), a seeded synthetic layer from
:func:`glmq.evaluate.outliers.make_outlier_layer` (heavy-tailed weights, correlated activations, a few
input channels 30x larger than the rest) and records, for the rule's algorithm and for round-to-nearest:

- weight SQNR ``||W||^2 / ||W_q - W||^2``;
- output SQNR ``||X W^T||^2 / ||Y - X W^T||^2`` on held-out generated activations ``X``, where ``Y`` is
  the layer's output as the runtime computes it (:func:`glmq.quant.formats.linear.runtime_output`: W8A8
  rules quantize ``X`` per token, as their kernels do; the outlier channels make this the larger error);
  GPTQ's Hessian ``X^T X / n`` is built from separate calibration tokens of the same draw, so the figure
  is not fitted to the tokens it is scored on, and RTN is scored on the same held-out tokens.

Bounded cost (about a minute for the shipped recipes on 2 CPU cores; ``seconds`` in the result):

- one generated layer per distinct shape, shared by every rule that quantizes that shape;
- RTN is scored on the whole full-size layer, in row blocks;
- HQQ and GPTQ are scored on a seeded random subset of at most ``max_rows`` output rows (rows are
  quantized independently by every format here; GPTQ shares only the Hessian across rows, so a row
  subset samples the same per-row errors), with RTN rescored on the same rows for the comparison;
- GPTQ on layers wider than ``max_gptq_cols`` input columns (``down_proj``'s 13696, whose fp64
  Cholesky alone takes minutes on a CPU) uses the first ``max_gptq_cols`` columns (a whole number of
  groups) and the matching activation columns; the row records the slice.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from glmq.quant.metrics import ratio_db

GENERATOR = "glmq.evaluate.outliers.make_outlier_layer"
# Generator parameters (its documented defaults, except the token count).
GENERATOR_PARAMS = {"n_outlier_channels": 4, "outlier_scale": 30.0, "rank": 16, "tail": 0.5}
CALIB_TOKENS = 512
EVAL_TOKENS = 256
MAX_ROWS = 512
MAX_GPTQ_COLS = 4096
_CHUNK_ELEMENTS = 16 * 1024 * 1024


def released_shapes(recipe, size: str = "full") -> list[dict[str, Any]]:
    """Distinct (rule, layer shape) pairs that ``recipe`` quantizes in the architecture of ``size``:
    ``[{"rule", "component", "shape", "layers": count, "example": a module name}]``, in rule order."""
    from torch import nn

    from glmq.io.layout import WEIGHT_COMPONENTS
    from glmq.models.build import build_model
    from glmq.models.configs import component_config

    found: dict[tuple[int, tuple[int, int]], dict[str, Any]] = {}
    for comp in WEIGHT_COMPONENTS:
        if not any(r.component == comp.name for r in recipe.rules):
            continue
        model = build_model(comp, component_config(comp.name, size))  # meta device: no memory
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            idx = next((i for i, r in enumerate(recipe.rules) if r.matches(comp.name, name)), None)
            if idx is None or recipe.rules[idx].format == "none":
                continue
            shape = (mod.out_features, mod.in_features)
            entry = found.setdefault((idx, shape), {"rule": idx, "component": comp.name, "shape": shape,
                                                    "layers": 0, "example": name})
            entry["layers"] += 1
    return sorted(found.values(), key=lambda e: (e["rule"], e["shape"]))


def evaluate_outliers(recipe, *, size: str = "full", seed: int = 0, max_rows: int = MAX_ROWS,
                      max_gptq_cols: int = MAX_GPTQ_COLS, calib_tokens: int = CALIB_TOKENS,
                      eval_tokens: int = EVAL_TOKENS) -> dict[str, Any]:
    """Score ``recipe`` (a :class:`~glmq.quant.recipe.Recipe`) on seeded outlier layers at every layer
    shape it quantizes in the released architecture (``size="tiny"`` for fast tests). See the module
    docstring; deterministic in ``seed``. Returns the report's ``outlier_eval`` section.

    Results are memoized per process (key: the recipe's rules and these arguments), so repeated
    conversions with one recipe, as in the test suite, pay once. The environment variable
    ``GLMQ_OUTLIER_EVAL_SIZE`` overrides the default ``size`` (e.g. ``tiny`` in CI); the section records
    the architecture it used."""
    import copy
    import json
    import os

    size = os.environ.get("GLMQ_OUTLIER_EVAL_SIZE", size) if size == "full" else size
    key = json.dumps([recipe.to_dict()["rules"], size, seed, max_rows, max_gptq_cols, calib_tokens, eval_tokens],
                     sort_keys=True)
    if key not in _MEMO:
        _MEMO[key] = _evaluate(recipe, size, seed, max_rows, max_gptq_cols, calib_tokens, eval_tokens)
    return copy.deepcopy(_MEMO[key])


_MEMO: dict[str, dict[str, Any]] = {}


def _evaluate(recipe, size, seed, max_rows, max_gptq_cols, calib_tokens, eval_tokens) -> dict[str, Any]:
    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.formats import get_format
    from glmq.evaluate.outliers import make_outlier_layer
    from glmq.quant.formats.linear import as_run_on_gpu
    from glmq.quant.plan import runtime_mode

    start = time.perf_counter()
    entries = released_shapes(recipe, size)
    rows_out = []
    by_shape: dict[tuple[int, int], list[dict]] = {}
    for e in entries:
        by_shape.setdefault(e["shape"], []).append(e)
    for shape, group in by_shape.items():  # one generated layer per shape
        n, k = shape
        layer = make_outlier_layer(n, k, n_tokens=calib_tokens + eval_tokens, seed=seed, **GENERATOR_PARAMS)
        w, x = layer.weight, layer.activations
        x_cal, x_eval = x[:calib_tokens], x[calib_tokens:]
        rtn = get_algorithm("rtn")
        for e in group:
            t0 = time.perf_counter()
            rule = recipe.rules[e["rule"]]
            fmt = get_format(rule.format, **rule.params)
            mode = runtime_mode(fmt, rule.activations)
            algo = get_algorithm(rule.algorithm, **rule.algorithm_params)
            row = {
                "component": e["component"],
                "rule": e["rule"],
                "modules": list(rule.modules),
                "example": e["example"],
                "layers": e["layers"],
                "shape": [n, k],
                "format": rule.format,
                "format_params": dict(rule.params),
                "algorithm": rule.algorithm,
                "runtime_mode": as_run_on_gpu(mode),
                "activations_quantized": bool(fmt.kernel_quantizes_activations and mode == "auto"),
                "outlier_channels": layer.outlier_channels.tolist(),
            }
            full = _score(fmt, rtn, w, None, x_eval, mode)
            row["rtn_full"] = full
            if algo.name == "rtn":
                row["evaluated"] = {"rows": n, "cols": k, "selection": "whole layer"}
                row["weight_sqnr_db"] = {"rtn": full["weight_sqnr_db"]}
                row["output_sqnr_db"] = {"rtn": full["output_sqnr_db"]}
            else:
                sel, cols, how = _subset(n, k, fmt, algo, max_rows, max_gptq_cols, seed)
                ws, xc, xe = w[sel][:, :cols], x_cal[:, :cols], x_eval[:, :cols]
                h = (xc.double().T @ xc.double() / xc.shape[0]).float() if algo.needs_hessian else None
                got = _score(fmt, algo, ws, h, xe, mode)
                base = _score(fmt, rtn, ws, None, xe, mode)
                row["evaluated"] = {"rows": int(ws.shape[0]), "cols": cols, "selection": how,
                                    "outlier_channels_in_slice": int((layer.outlier_channels < cols).sum())}
                row["weight_sqnr_db"] = {algo.name: got["weight_sqnr_db"], "rtn": base["weight_sqnr_db"]}
                row["output_sqnr_db"] = {algo.name: got["output_sqnr_db"], "rtn": base["output_sqnr_db"]}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows_out.append(row)
        del layer, w, x
    rows_out.sort(key=lambda r: (r["rule"], r["shape"]))
    return {
        "generator": GENERATOR,
        "generator_params": dict(GENERATOR_PARAMS),
        "seed": seed,
        "architecture": size,
        "calib_tokens": calib_tokens,
        "eval_tokens": eval_tokens,
        "max_rows": max_rows,
        "max_gptq_cols": max_gptq_cols,
        "rows": rows_out,
        "worst": worst_row(rows_out),
        "seconds": round(time.perf_counter() - start, 1),
    }


def worst_row(rows: list[dict]) -> dict[str, Any] | None:
    """The row whose recipe-algorithm output SQNR is lowest: ``{component, shape, format, algorithm,
    output_sqnr_db, rtn_output_sqnr_db}``; None when nothing was scored."""
    best = None
    for r in rows:
        v = r["output_sqnr_db"].get(r["algorithm"])
        if v is not None and (best is None or v < best["output_sqnr_db"]):
            best = {"component": r["component"], "example": r["example"], "shape": r["shape"],
                    "format": r["format"], "algorithm": r["algorithm"], "output_sqnr_db": v,
                    "rtn_output_sqnr_db": r["output_sqnr_db"].get("rtn")}
    return best


def _subset(n, k, fmt, algo, max_rows, max_cols, seed):
    """Rows (a seeded random subset) and leading columns that the slow algorithms are scored on."""
    rows = torch.arange(n) if n <= max_rows else \
        torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:max_rows].sort().values
    cols = k
    if algo.needs_hessian and k > max_cols:
        g = fmt.group_size_for(k)
        cols = max(g, max_cols // g * g) if g < k else k
    how = "whole layer" if n <= max_rows else f"{len(rows)} seeded random rows"
    if cols < k:
        how += f", first {cols} of {k} columns"
    return rows, cols, how


@torch.no_grad()
def _score(fmt, algo, w, h, x_eval, mode) -> dict[str, float | None]:
    """Weight and output SQNR (dB) of ``algo`` into ``fmt`` on ``w``, in row blocks (GPTQ: one block,
    so that its Hessian factorization runs once); outputs as the runtime computes them in ``mode``."""
    from glmq.quant.formats.linear import runtime_output

    n, k = w.shape
    step = n if algo.needs_hessian else max(1, _CHUNK_ELEMENTS // k)
    ws = wn = os_ = on = 0.0
    xe = x_eval.float()
    for r0 in range(0, n, step):
        ref = w[r0:r0 + step].float()
        tensors = algo.quantize_weight(fmt, ref, hessian=h)
        err = fmt.dequantize(tensors, tuple(ref.shape)).sub_(ref)
        y = xe @ ref.T
        ws += float(ref.double().square().sum())
        wn += float(err.double().square().sum())
        os_ += float(y.double().square().sum())
        on += float((runtime_output(fmt, tensors, xe, mode).double() - y.double()).square().sum())
    return {"weight_sqnr_db": ratio_db(ws, wn), "output_sqnr_db": ratio_db(os_, on)}
