"""glmq bench on the CPU: every field, a valid PNG chart, and 'does not fit' instead of a crash."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from glmq.testing import run_cli_inprocess

ROW_FIELDS = {"provider", "recipe", "tier_gib", "size", "steps", "images", "mode", "fit", "seconds_per_image",
              "stages", "peak_allocated_gib", "peak_reserved_gib"}
STAGE_FIELDS = {"ar_s", "ar_ms_per_token", "glyph_s", "dit_s", "dit_ms_per_step", "vae_s"}


def test_bench_on_cpu_writes_json_markdown_and_png(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    # Guidance 2.5, not the default 1.5: a label that says 1.5 whatever ran cannot pass.
    proc = run_cli_inprocess("bench", str(tiny_dir), "--out", str(out), "--size", "64x64", "--steps", "2",
                             "--recipe", "default", "--baseline", "--tiers", "0.5,80", "--guidance", "2.5", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    assert json.loads(proc.stdout) == result
    env = result["environment"]
    assert {"date", "card", "torch", "transformers", "diffusers", "glmq"} <= set(env)
    stock, tiny_tier, big_tier, edit1, edit2 = result["rows"]
    assert stock["provider"] == "stock diffusers bf16" and stock["fit"]
    assert not tiny_tier["fit"] and "does not fit" in tiny_tier["reason"]  # 0.5 GiB holds no mode
    assert big_tier["fit"] and ROW_FIELDS <= set(big_tier) and STAGE_FIELDS == set(big_tier["stages"])
    assert big_tier["seconds_per_image"]["min"] <= big_tier["seconds_per_image"]["median"] <= big_tier["seconds_per_image"]["max"]
    assert big_tier["stages"]["ar_ms_per_token"] > 0 and big_tier["speedup_vs_stock"] > 0
    # The warm-up image used the same seed and step count; on the CPU the pipeline is deterministic.
    checks = big_tier["checks"]
    assert checks["warmup_s"] > 0
    assert checks["same_seed_prior_tokens_equal"] == 1.0 and checks["same_seed_image_max_abs_diff"] == 0.0
    # Image-to-image rows follow the tier's text-to-image in the same process and reproduce their warm-up.
    assert big_tier["task"] == "t2i"
    for row, task in ((edit1, "edit, 1 reference"), (edit2, "edit, 2 references")):
        assert row["task"] == task and row["fit"] and row["tier_gib"] == 80, row
        assert STAGE_FIELDS == set(row["stages"]) and row["stages"]["ar_ms_per_token"] > 0
        assert row["checks"]["same_seed_prior_tokens_equal"] == 1.0
        assert row["checks"]["same_seed_image_max_abs_diff"] == 0.0
        assert "speedup_vs_stock" not in row  # stock diffusers ran no edit to compare with
    # What ran, read from the run, and figures that agree with each other.
    assert result["consistency_problems"] == [], result["consistency_problems"]
    for row in (stock, big_tier, edit1, edit2):
        assert row["ran"]["steps"] == 2 and row["ran"]["guidance"] == 2.5 and row["ran"]["size"] == "64x64", row
    assert big_tier["ran"]["ar_tokens"] == 261 and edit1["ran"]["ar_tokens"] < 261  # an edit fills only the target
    assert big_tier["ran"]["dit_attention"] == "sdpa" and big_tier["ran"]["mode"] == "resident"  # CPU: upstream SDPA
    # Beside what a GPU run measures per stage, what the memory plan expected of each (an edit: its references).
    assert set(big_tier["plan_stage_peaks_gib"]) == {"ar", "encode", "dit", "vae"}
    plans = [row["plan_stage_peaks_gib"]["dit"] for row in (big_tier, edit1, edit2)]
    assert plans == sorted(plans) and plans[0] > 0  # references only add (the tiny model's K/V: below 1 MiB)
    # Where it came from: commit and command.
    assert env["command"] == f"glmq bench {tiny_dir} --out {out} --size 64x64 --steps 2 --recipe default " \
                             "--baseline --tiers 0.5,80 --guidance 2.5 --json"
    assert "git_commit" in env and "git_dirty" in env
    with Image.open(out / "bench.png") as img:
        img.verify()
    md = (out / "bench.md").read_text()
    assert "does not fit" in md and "stock diffusers bf16" in md and "edit, 2 references" in md
    assert "ran 2 steps, guidance 2.5 (read from each run)" in md
    assert "same seed: 100.0% of AR tokens equal, max pixel diff 0" in md


def test_bench_profile_lists_top_kernels_per_stage(tiny_dir, tmp_path):
    proc = run_cli_inprocess("bench", str(tiny_dir), "--out", str(tmp_path / "b"), "--size", "64x64", "--steps", "2",
                             "--recipe", "bf16", "--profile")
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert set(row["profile"]) == {"ar", "glyph+dit", "vae"}
    for stage, top in row["profile"].items():
        assert 0 < len(top) <= 10 and all(t["ms"] >= 0 and t["calls"] > 0 for t in top), stage
    assert "Top kernels, ar" in (tmp_path / "b" / "bench.md").read_text()


def _row(provider, size, seconds, fit=True):
    return {"provider": provider, "size": size, "fit": fit, "seconds_per_image": {"median": seconds}}


def test_speedups_are_against_the_stock_row_of_the_same_size():
    from glmq.bench.report import add_speedups

    rows = add_speedups([_row("stock diffusers bf16", "1024x1024", 120.0), _row("glmq", "1024x1024", 15.0),
                         _row("stock diffusers bf16", "2048x2048", 400.0), _row("glmq", "2048x2048", 80.0),
                         _row("glmq", "2048x2048", None, fit=False), _row("glmq", "512x512", 5.0)])
    assert [r.get("speedup_vs_stock") for r in rows] == [None, 8.0, None, 5.0, None, None]


def test_merged_results_recompute_speedups_and_refuse_mixed_cards():
    from glmq.bench.report import merge_results
    from glmq.errors import GlmqError

    def result(card, date, rows):
        return {"environment": {"card": card, "date": date}, "config": {"steps": 50}, "rows": rows}

    stale = dict(_row("glmq", "2048x2048", 80.0), speedup_vs_stock=99.0)  # from a run with another stock row
    merged = merge_results([result("H100", "2026-01-01", [_row("stock diffusers bf16", "2048x2048", 400.0)]),
                            result("H100", "2026-01-02", [stale])])
    assert merged["rows"][1]["speedup_vs_stock"] == 5.0 and stale["speedup_vs_stock"] == 99.0
    assert merged["environment"]["date"] == "2026-01-02"
    with pytest.raises(GlmqError, match="different cards"):
        merge_results([result("H100", "d", []), result("H200", "d", [])])


def _consistent_result():
    def row(provider, task="t2i"):
        return {"provider": provider, "tier_gib": None, "task": task, "size": "1024x1024", "fit": True,
                "seconds_per_image": {"median": 20.0, "min": 20.0, "max": 20.0},
                "stages": {"ar_s": 6.4, "ar_ms_per_token": 5.0, "glyph_s": 0.1, "dit_s": 8.5, "dit_ms_per_step": 170.0,
                           "vae_s": 0.2},
                "ran": {"steps": 50, "guidance": 1.5, "size": "1024x1024", "ar_tokens": 1280,
                        "ar_step": "compiled, CUDA graph"}}
    return {"config": {"steps": 50, "guidance": 1.5}, "rows": [row("stock diffusers bf16"), row("glmq")]}


@pytest.mark.parametrize("fault, needle", [
    (lambda r: r["rows"][1]["stages"].update(ar_ms_per_token=50.0), "tokens x"),    # ms/token off by 10x
    (lambda r: r["rows"][1]["stages"].update(dit_ms_per_step=17.0), "steps x"),
    (lambda r: r["rows"][0]["ran"].update(steps=25), "ran 25 steps"),             # stock with half the steps
    (lambda r: r["rows"][0]["ran"].update(guidance=1.0), "guidance 1.0"),         # stock without guidance
    (lambda r: r["rows"][1]["stages"].update(dit_s=85.0, dit_ms_per_step=1700.0), "add up to"),
    (lambda r: r["rows"][1].pop("ran"), "records nothing"),
    # a compiled run whose AR step fell back to eager (Inductor refused the sampler on the GPU once)
    (lambda r: (r["config"].update(compile=True),
                r["rows"][1]["ran"].update(ar_step="eager after a failed compile, CUDA graph")), "asked for compiled"),
])
def test_consistency_check_catches_figures_that_disagree(fault, needle):
    from glmq.bench.report import check_consistency

    result = _consistent_result()
    assert check_consistency(result) == []
    fault(result)
    problems = check_consistency(result)
    print(problems)
    assert any(needle in p for p in problems), problems


def test_markdown_says_what_ran_and_flags_figures_that_disagree():
    """The steps and guidance in bench.md are the runs' own (not the configuration's label), and a result
    whose figures disagree says so above its table."""
    from glmq.bench.report import check_consistency, markdown

    result = _consistent_result()
    result["config"].update(model="full-random", images=1, prompt="p", guidance=1.5, steps=50)
    result["environment"] = {"card": "test card", "date": "today", "torch": "t", "transformers": "t",
                             "diffusers": "d", "glmq": "g"}
    for r in result["rows"]:
        r.update(recipe="default", mode="resident", peak_allocated_gib=1.0, peak_reserved_gib=1.0)
    result["consistency_problems"] = check_consistency(result)
    md = markdown(result)
    assert "ran 50 steps, guidance 1.5 (read from each run)" in md and "disagree" not in md
    result["rows"][0]["ran"].update(steps=25, guidance=1.0)  # a stock row with half the steps and no guidance
    result["consistency_problems"] = check_consistency(result)
    md = markdown(result)
    print(md)
    assert "ran 25, 50 steps, guidance 1, 1.5" in md and "do not trust them" in md and "ran 25 steps" in md
    # A GPU row's peak on the card, with the memory plan's largest stage beside it.
    result["rows"][1].update(peak_device_gib=9.43, plan_stage_peaks_gib={"ar": 7.1, "dit": 9.73, "vae": 7.2})
    assert "9.43 (plan 9.73)" in markdown(result)
