"""``glmq quantize`` (and ``glmq.quantize``): the streaming conversion of :mod:`glmq.quant.convert` with its
fidelity evaluation and the report's documents.

The conversion claims the output folder and converts; this layer adds, through its hooks, the outlier
evaluation at the released shapes (before the conversion: on the CPU, before a GPU is first used), the
model-level evaluation of the converted folder against its source (before the commit, so that a kill leaves
no committed folder without its report), and ``quantization_report.md`` and the model card ``README.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

from glmq.io.writer import DEFAULT_MAX_SHARD_BYTES


def quantize(src: str | Path, out: str | Path, *, recipe: str | Path = "default", device: str = "cpu",
             calib_prompts: str | Path | None = None, force: bool = False, progress: bool = True,
             evaluate: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             layer_outputs: bool = True) -> dict:
    """Quantize the GLM-Image folder ``src`` into ``out`` by ``recipe``; returns the fidelity report dict
    written to ``quantization_report.json``, plus ``"timings"`` (seconds; kept out of the written files so
    that they are byte-identical across runs).

    With ``evaluate`` the report includes the outlier evaluation and model-level fidelity
    (:mod:`glmq.evaluate.fidelity`), computed on ``device``; the latter is skipped, and says so, for
    full-size models on the CPU. ``layer_outputs``: see :func:`glmq.quant.convert.convert`.
    """
    from glmq.evaluate.report import model_card, report_markdown
    from glmq.quant.convert import convert

    outliers: dict = {}

    def prepare(rec, timings: dict) -> None:
        if evaluate:
            from glmq.evaluate.outlier_eval import evaluate_outliers

            # Synthetic outlier layers at the released shapes, on the CPU (2.0 GB peak RSS for `default`,
            # benchmarks/results/outlier_eval_rss_cpu2.json): run before the GPU is first used, so that this
            # peak does not add to the host memory the CUDA libraries hold once loaded (~1-1.5 GB).
            outliers["eval"] = evaluate_outliers(rec)
            timings.update(_pop_outlier_timings(outliers["eval"]))

    def finish(report: dict, partial: Path, timings: dict) -> dict[str, str]:
        if evaluate:
            from glmq.evaluate.fidelity import evaluate as evaluate_model

            report["outlier_eval"] = outliers["eval"]
            t0 = time.perf_counter()
            report["model_level"] = evaluate_model(Path(src), partial, device=device)
            timings["model_level_s"] = round(time.perf_counter() - t0, 3)
        return {"quantization_report.md": report_markdown(report), "README.md": model_card(report)}

    return convert(src, out, recipe=recipe, device=device, calib_prompts=calib_prompts, force=force,
                   progress=progress, max_shard_bytes=max_shard_bytes, layer_outputs=layer_outputs,
                   prepare=prepare, finish=finish)


def _pop_outlier_timings(oe: dict) -> dict:
    """Move the outlier evaluation's wall-clock seconds out of its report section (which must not vary
    between runs) into the timings."""
    return {"outlier_eval_s": oe.pop("seconds", None),
            "outlier_eval_rows_s": [{"rule": r["rule"], "shape": r["shape"], "seconds": r.pop("seconds", None)}
                                    for r in oe.get("rows", [])]}
