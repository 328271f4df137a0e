"""Every results file records the commit and the command that produced it (glmq.bench.provenance), and the
results saved before that are indexed in benchmarks/results/PROVENANCE.md."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import glmq.bench.provenance as prov_module
from glmq.bench.provenance import provenance, provenance_markdown

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
SOURCE = Path(prov_module.__file__)


def _git(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def git_repo(tmp_path) -> Path:
    """A one-commit git repository with a tracked Python file and an ignored folder."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("/.venv/\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")
    return repo


# ---- in this checkout ------------------------------------------------------------------------------------


def test_this_checkout_records_head_and_the_command_as_typed(tmp_path):
    script = tmp_path / "write_result.py"
    script.write_text("import json\nfrom glmq.bench.provenance import provenance\nprint(json.dumps(provenance()))\n")
    out = subprocess.run([sys.executable, "-X", "faulthandler", str(script), "--out", "a b", "--n=3"],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    got = json.loads(out)
    head = _git(REPO, "rev-parse", "HEAD")
    print(got, head)
    assert got["git_commit"] == head
    assert got["git_from"] == "git"
    assert isinstance(got["git_dirty"], bool)
    # Interpreter by name, its options, the script path as typed, arguments shell-quoted.
    assert got["command"] == f"{Path(sys.executable).name} -X faulthandler {script} --out 'a b' --n=3"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", got["date"])


def test_command_of_a_console_script_and_of_python_m(tmp_path, monkeypatch):
    entry = tmp_path / "bin" / "glmq"
    entry.parent.mkdir()
    entry.write_text("#!/usr/bin/env python\n")
    monkeypatch.setattr(sys, "orig_argv", [str(tmp_path / "bin" / "python3"), str(entry), "bench", "--out", "x y"])
    monkeypatch.setattr(sys, "argv", [str(entry), "bench", "--out", "x y"])
    assert provenance()["command"] == "glmq bench --out 'x y'"
    main = str(REPO / "glmq" / "__main__.py")
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "-m", "glmq", "bench", "--steps", "2"])
    monkeypatch.setattr(sys, "argv", [main, "bench", "--steps", "2"])
    assert provenance()["command"] == "python3 -m glmq bench --steps 2"
    assert provenance(["glmq", "quantize", "a b"])["command"] == "glmq quantize 'a b'"


# ---- outside a git checkout ------------------------------------------------------------------------------


def test_outside_a_checkout_commit_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv(prov_module.COMMIT_ENV, raising=False)
    got = provenance(repo=tmp_path)
    print(got)
    assert (got["git_commit"], got["git_dirty"], got["git_from"]) == (None, None, None)
    assert got["command"]


def _installed_copy(site: Path) -> Path:
    """glmq/bench/provenance.py copied as an installed package would hold it."""
    dst = site / "glmq" / "bench" / "provenance.py"
    dst.parent.mkdir(parents=True)
    shutil.copy(SOURCE, dst)
    return dst


def _run_copy(path: Path) -> dict:
    code = ("import importlib.util, json, sys; s = importlib.util.spec_from_file_location('p', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(json.dumps(m.provenance()))")
    env = {k: v for k, v in os.environ.items() if k != prov_module.COMMIT_ENV}
    return json.loads(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                                     check=True, env=env, cwd=path.parent).stdout)


def test_an_installed_copy_records_no_commit(tmp_path):
    got = _run_copy(_installed_copy(tmp_path / "site-packages"))
    print(got)
    assert got["git_commit"] is None and got["git_dirty"] is None


def test_an_installed_copy_inside_another_checkout_does_not_take_its_head(git_repo):
    # `pip install .` into a .venv/ inside a clone: site-packages is in that clone's work tree (ignored). Its HEAD
    # says nothing about the copy that runs.
    got = _run_copy(_installed_copy(git_repo / ".venv" / "lib" / "site-packages"))
    print(got)
    assert got["git_commit"] is None


# ---- dirty flag --------------------------------------------------------------------------------------------


def test_dirty_reflects_uncommitted_code(git_repo):
    head = _git(git_repo, "rev-parse", "HEAD")
    got = provenance(repo=git_repo)
    assert (got["git_commit"], got["git_dirty"], got["git_from"]) == (head, False, "git")

    (git_repo / "result.json").write_text("{}")  # a new result is not a code change
    assert provenance(repo=git_repo)["git_dirty"] is False
    (git_repo / "new_bench.py").write_text("print(1)\n")  # an untracked script that may be what ran
    assert provenance(repo=git_repo)["git_dirty"] is True
    (git_repo / "new_bench.py").unlink()
    (git_repo / "code.py").write_text("x = 2\n")
    assert provenance(repo=git_repo)["git_dirty"] is True
    _git(git_repo, "commit", "-qam", "second")
    got = provenance(repo=git_repo)
    assert got["git_commit"] == _git(git_repo, "rev-parse", "HEAD") != head
    assert got["git_dirty"] is False


def test_git_environment_of_a_hook_does_not_redirect_it(git_repo, tmp_path, monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(git_repo, other)
    (other / "code.py").write_text("x = 3\n")
    _git(other, "commit", "-qam", "other")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    assert provenance(repo=git_repo)["git_commit"] == _git(git_repo, "rev-parse", "HEAD")


def test_a_declared_commit_wins_over_git(git_repo, tmp_path, monkeypatch):
    monkeypatch.setenv(prov_module.COMMIT_ENV, "0123abc")
    monkeypatch.setenv(prov_module.DIRTY_ENV, "1")
    copy = tmp_path / "copy_without_git"
    copy.mkdir()
    got = provenance(repo=copy)
    assert (got["git_commit"], got["git_dirty"], got["git_from"]) == ("0123abc", True, "GLMQ_GIT_COMMIT")
    monkeypatch.delenv(prov_module.DIRTY_ENV)
    assert provenance(repo=copy)["git_dirty"] is None
    # A copy whose .git is stale (the GPU machine's named the session's first commit): the launcher knows better.
    got = provenance(repo=git_repo)
    assert (got["git_commit"], got["git_from"]) == ("0123abc", "GLMQ_GIT_COMMIT")
    monkeypatch.delenv(prov_module.COMMIT_ENV)
    got = provenance(repo=git_repo)
    assert (got["git_commit"], got["git_from"]) == (_git(git_repo, "rev-parse", "HEAD"), "git")


def test_environment_variables_that_change_a_run_are_recorded(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("GLMQ_PIN_MEMORY", "0")
    monkeypatch.setenv("GLMQ_HUB_TOKEN", "do-not-record")
    monkeypatch.setenv("UNRELATED_SETTING", "1")
    env = provenance()["env"]
    print(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and env["GLMQ_PIN_MEMORY"] == "0"
    assert "GLMQ_HUB_TOKEN" not in env and "UNRELATED_SETTING" not in env


def test_markdown_line():
    base = {"git_commit": "abc123", "git_dirty": False, "git_from": "git", "command": "python b.py --out x",
            "date": "2026-12-02T05:00:00+00:00"}
    line = provenance_markdown(base)
    print(line)
    assert line == "Provenance: commit `abc123`; command `python b.py --out x`; 2026-12-02T05:00:00+00:00."
    assert "with uncommitted changes" in provenance_markdown({**base, "git_dirty": True})
    assert "commit not recorded" in provenance_markdown({**base, "git_commit": None, "git_dirty": None})
    assert "(declared by GLMQ_GIT_COMMIT)" in provenance_markdown({**base, "git_from": "GLMQ_GIT_COMMIT"})
    assert "command ``echo `x```" in provenance_markdown({**base, "command": "echo `x`"})
    assert provenance_markdown(base, "Merged by").startswith("Merged by: commit")
    with_env = provenance_markdown({**base, "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}})
    assert "command `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python b.py --out x`" in with_env


# ---- the benchmark scripts -------------------------------------------------------------------------------

# Scripts that write a file under benchmarks/results/ without a provenance record, and why.
EXEMPT = {"provenance_index.py": "writes the index of older results; its content follows from git history alone "
                                 "(a date in it would make --check fail every time)"}


def _writes_and_records(source: str) -> tuple[bool, bool]:
    """(writes a file, calls provenance() or environment()) for one script's source."""
    writes = records = False
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in ("write_text", "write_bytes", "to_csv") or (
                name == "dump" and isinstance(node.func, ast.Attribute)
                and getattr(node.func.value, "id", "") == "json"):
            writes = True
        elif name == "open":
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax"):
                writes = True
        elif name in ("provenance", "environment"):
            records = True
    return writes, records


def test_the_static_check_tells_writers_apart():
    assert _writes_and_records("import json\nopen('r.json', 'w').write(json.dumps({}))") == (True, False)
    assert _writes_and_records("from pathlib import Path\nPath('r.md').write_text('x')") == (True, False)
    assert _writes_and_records("import json\njson.dump({}, f)\nprovenance()") == (True, True)
    assert _writes_and_records("import json\nprint(json.dumps({}))\nopen('x').read()") == (False, False)
    assert _writes_and_records("r = {'environment': environment(d)}\np.write_text(str(r))") == (True, True)
    assert _writes_and_records("# provenance( in a comment\np.write_text('x')") == (True, False)


def test_every_benchmark_that_writes_results_records_provenance():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert len(scripts) > 10
    missing, writers = [], []
    for script in scripts:
        writes, records = _writes_and_records(script.read_text())
        if writes:
            writers.append(script.name)
        if writes and not records and script.name not in EXEMPT:
            missing.append(script.name)
    print("scripts that write files:", writers)
    assert not missing, ("these benchmark scripts write a results file but never call provenance() (glmq.bench."
                         "provenance) or environment() (glmq.bench.run): " + ", ".join(missing))
    assert set(EXEMPT) <= set(writers), "an exemption names a script that no longer writes files"


def test_a_benchmark_records_provenance_in_json_and_markdown(tmp_path):
    """bench_dit_step.py --report (the CPU part of that GPU benchmark) merges saved runs: the merged JSON and
    the Markdown carry this run's commit and command; a saved run without a record says "not recorded"."""
    runs = json.loads((RESULTS / "dit_step_h100.json").read_text())["runs"]
    assert all("provenance" not in r for r in runs)
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    to = tmp_path / "merged"
    cmd = [sys.executable, str(BENCHMARKS / "bench_dit_step.py"), "--report", *map(str, paths), "--out", str(to)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    merged = json.loads(to.with_suffix(".json").read_text())
    md = to.with_suffix(".md").read_text()
    print(merged["provenance"])
    assert merged["provenance"]["git_commit"] == _git(REPO, "rev-parse", "HEAD")
    assert merged["provenance"]["command"] == " ".join([Path(sys.executable).name, *cmd[1:]])
    assert f"Merged by: commit `{merged['provenance']['git_commit']}`" in md
    assert md.count("Provenance: not recorded.") == len(runs)


# ---- the index of older results --------------------------------------------------------------------------


def _index_paths(text: str) -> set[str]:
    """The paths named in the first column of PROVENANCE.md's table."""
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {p for row in rows for p in re.findall(r"`([^`]+)`", row.split(" | ")[0])}


def _records(path: Path) -> bool:
    """A JSON holding a ``provenance`` key, or glmq bench's ``environment`` with the provenance fields: the
    same rule the index script applies."""
    try:
        return path.suffix == ".json" and _load_index_script()._has_provenance(json.loads(path.read_text()))
    except ValueError:
        return False


def test_every_result_is_indexed_or_records_its_provenance():
    index = RESULTS / "PROVENANCE.md"
    text = index.read_text()
    assert "benchmarks/provenance_index.py" in text.split("|")[0], "PROVENANCE.md must name its generator"
    listed = _index_paths(text)
    assert listed, "no rows in PROVENANCE.md"
    for p in listed:
        assert (RESULTS / p).exists(), f"PROVENANCE.md lists {p}, which is not under benchmarks/results/"
    unlisted = []
    for f in sorted(RESULTS.rglob("*")):
        if not f.is_file() or f == index:
            continue
        rel = f.relative_to(RESULTS)
        covered = rel.as_posix() in listed or any(f"{a.as_posix()}/" in listed for a in rel.parents)
        # Written since provenance existed: the file, or a JSON beside it in its run folder, holds the record.
        speaks = _records(f) or any(_records(j) for j in f.parent.glob("*.json"))
        if not (covered or speaks):
            unlisted.append(rel.as_posix())
    assert not unlisted, ("results with no provenance key and no row in benchmarks/results/PROVENANCE.md "
                          "(run python benchmarks/provenance_index.py): " + ", ".join(unlisted))


def _load_index_script():
    spec = importlib.util.spec_from_file_location("provenance_index", BENCHMARKS / "provenance_index.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_index_lists_what_the_script_finds():
    module = _load_index_script()
    generated = _index_paths(module.build())
    assert generated == _index_paths((RESULTS / "PROVENANCE.md").read_text()), \
        "benchmarks/results/PROVENANCE.md is stale: run python benchmarks/provenance_index.py"


def test_gpu_e2e_commands_are_read_from_the_script_as_of_a_commit():
    module = _load_index_script()
    # At f980db0 two cases wrote glmq2048.log with different commands; both must be found, in file order.
    hits = module.e2e_commands("f980db0", "glmq2048.log")
    print(hits)
    assert [case for case, _ in hits] == ["glmq2048", "checks2048"]
    assert "--recipe bf16" in hits[0][1] and "--recipe bf16" not in hits[1][1]
    assert all(cmd.startswith("timeout ") and '"$OUT/glmq2048"' in cmd and ">" not in cmd for _, cmd in hits)
    assert module.e2e_commands("f980db0", "no_such.log") == []
