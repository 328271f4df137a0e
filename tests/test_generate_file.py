"""``glmq generate PATH --prompts FILE --out DIR`` on the tiny model (CPU): many images from one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glmq.testing import assert_user_error, run_cli_inprocess, tree_snapshot

COMMON = ("--size", "64x64", "--steps", "2", "--device", "cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(tiny_dir, prompts, out, *extra):
    proc = run_cli_inprocess("generate", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), *COMMON,
                             "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_txt_file_makes_every_image_once_and_resumes(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n  a sign that says 'glmq'  \na blue door\n")
    out = tmp_path / "imgs"
    summary = _run(tiny_dir, prompts, out, "--num-images", "2", "--batch", "4", "--seed", "10")
    assert summary["written"] == 6 and summary["skipped"] == 0
    assert [c["images"] for c in summary["calls"]] == [4, 2]  # one shape: calls of --batch images
    assert summary["calls"][0]["ar_batch"] == 4
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(e["file"] for e in summary["images"]) and len(files) == 6
    lines = [(e["line"], e["seed"]) for e in summary["images"]]
    assert lines == [(1, 10), (1, 11), (3, 11), (3, 12), (4, 12), (4, 13)]  # prompt k: seed + k, then + i
    assert summary["images"][2]["prompt"] == "a sign that says 'glmq'"
    # The third image is the one `glmq generate --prompt ... --seed 11` makes alone.
    single = tmp_path / "single.png"
    proc = run_cli_inprocess("generate", str(tiny_dir), "--prompt", "a sign that says 'glmq'", "--seed", "11",
                             "--out", str(single), *COMMON)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(single).tobytes() == Image.open(out / summary["images"][2]["file"]).tobytes()
    # A rerun finds every image and loads nothing; a lost image is made again, alone.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _run(tiny_dir, prompts, out, "--num-images", "2", "--batch", "4", "--seed", "10")
    assert (again["written"], again["skipped"], again["load_s"]) == (0, 6, 0.0)
    lost = out / summary["images"][4]["file"]
    lost.unlink()
    resumed = _run(tiny_dir, prompts, out, "--num-images", "2", "--batch", "4", "--seed", "10")
    assert (resumed["written"], resumed["skipped"]) == (1, 5)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    forced = _run(tiny_dir, prompts, out, "--num-images", "2", "--seed", "10", "--force")
    assert forced["written"] == 6 and not list(out.glob("*.partial"))


def test_a_jsonl_file_sets_size_seed_steps_guidance_n_and_references_per_line(tiny_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(tmp_path / "ref.png")
    rows = [{"prompt": "a wide street", "size": "96x64", "seed": 5},
            {"prompt": "make it blue", "image": "ref.png", "n": 2},
            {"prompt": "a tall tower", "size": "64x96", "steps": 1, "guidance": 1.0},
            {"prompt": "a cat"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = _run(tiny_dir, prompts, tmp_path / "o")
    by_line = {}
    for e in summary["images"]:
        by_line.setdefault(e["line"], []).append(e)
    assert [len(v) for v in by_line.values()] == [1, 2, 1, 1]
    assert by_line[1][0]["seed"] == 5 and by_line[2][0]["seed"] == 1 and by_line[4][0]["seed"] == 3
    assert Image.open(tmp_path / "o" / by_line[1][0]["file"]).size == (96, 64)
    assert Image.open(tmp_path / "o" / by_line[3][0]["file"]).size == (64, 96)
    assert by_line[2][0]["references"] == [str(tmp_path / "ref.png")]
    # Batched by shape, an edit with its own line's images: line 2 (two edits), line 4, 96x64, 64x96/1 step/1.0.
    shapes = sorted((c["size"], c["steps"], c["guidance"], c["images"]) for c in summary["calls"])
    assert shapes == [("64x64", 2, 1.5, 1), ("64x64", 2, 1.5, 2), ("64x96", 1, 1.0, 1), ("96x64", 2, 1.5, 1)]
    # The second edit (seed 2) is the image `glmq generate --prompt ... --image ref.png --seed 2` makes.
    single = tmp_path / "edit.png"
    proc = run_cli_inprocess("generate", str(tiny_dir), "--prompt", "make it blue", "--image",
                             str(tmp_path / "ref.png"), "--seed", "2", "--out", str(single), *COMMON)
    assert proc.returncode == 0, proc.stderr
    # a batched call: one 8-bit level at most (tests/runtime/test_batch.py PIXEL_TOL, after rounding)
    a = np.asarray(Image.open(single), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "o" / by_line[2][1]["file"]), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


@pytest.mark.parametrize(("content", "needle"), [
    ('{"prompt": "ok"}\n{"prompt": "bad", "size": "60x64"}\n', "line 2: size 60x64"),
    ('{"prompt": "ok"}\n\n{"prompt": "x", "seeds": 3}\n', "line 3: unknown key 'seeds'"),
    ('{"prompt": "ok"}\n{"prompt": 5}\n', "line 2: prompt must be a string"),
    ('{"size": "64x64"}\n', "line 1: no \"prompt\""),
    ('{"prompt": "ok"}\n{"prompt": "x"\n', "line 2: prompts line is not valid JSON"),
    ('{"prompt": "x", "n": 0}\n', "line 1: n = 0 is outside"),
    ('{"prompt": "x", "seed": -1}\n', "line 1: seed = -1 is outside"),
    ('{"prompt": "x", "steps": 1.5}\n', "line 1: steps must be an integer"),
    ('{"prompt": "x", "image": "missing.png"}\n', "p.jsonl line 1: "),
    ('["x"]\n', "line 1: expected a JSON object"),
    ("\n\n", "no prompts"),
])
def test_a_bad_line_is_one_error_naming_it_and_nothing_is_written(tiny_dir, tmp_path, content, needle):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    (tmp_path / "existing").mkdir()
    before = tree_snapshot(tmp_path)
    for out in (tmp_path / "new", tmp_path / "existing"):
        proc = run_cli_inprocess("generate", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), *COMMON)
        assert_user_error(proc, needle)
    assert tree_snapshot(tmp_path) == before


def test_flags_that_do_not_fit_the_prompts_form_are_refused(tiny_dir, tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a\n")
    (tmp_path / "p.csv").write_text("a\n")
    (tmp_path / "file").write_text("")
    cases = [
        (("--prompts", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")), ".txt (one prompt per line) or .jsonl"),
        (("--prompts", str(txt), "--out", str(tmp_path / "file")), "is not a folder"),
        (("--prompts", str(txt), "--out", str(tmp_path / "no" / "o")), "output folder does not exist"),
        (("--prompts", str(txt), "--image", str(txt), "--out", str(tmp_path / "o")), "--image goes with --prompt"),
        (("--prompts", str(txt), "--prompt", "x", "--out", str(tmp_path / "o")), "not allowed with argument"),
        (("--out", str(tmp_path / "o")), "one of the arguments --prompt --prompts is required"),
    ]
    for args, needle in cases:
        assert_user_error(run_cli_inprocess("generate", str(tiny_dir), *args, *COMMON), needle)
    assert not (tmp_path / "o").exists()
