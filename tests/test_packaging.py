"""Packaging: CI runs README's set-up commands in a fresh virtualenv, the dependencies cover what the exports
need, the wheel is complete and its CLI works from outside the clone, and ``--update-readme`` writes only
the README it is given."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from glmq.testing import assert_user_error, run_cli_inprocess

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# README's "Set up" commands are .ci/run's


def _readme_setup_commands() -> list[str]:
    """The command lines of the first ``bash`` block under README's "## Set up" heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def _ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_exactly_readmes_two_setup_commands_after_deleting_the_virtualenv():
    readme, ci = _readme_setup_commands(), _ci_commands()
    print("README:", readme, "\n.ci/run:", ci)
    assert len(readme) == 2
    assert ci[-2:] == readme  # the same two lines, last, so pytest's exit status is the script's
    venv = re.fullmatch(r"python3 -m venv (\S+) && \. \1/bin/activate && python -m pip install .+", readme[0])
    assert venv, readme[0]
    assert ci[-3] == f"rm -rf {venv.group(1)}"  # recreated on every run, never reused
    assert "set -euo pipefail" in ci  # a failed install stops the script before the tests
    assert f"/{venv.group(1)}/" in (REPO / ".gitignore").read_text().splitlines()


def _fake_python3(bin_dir: Path, log: Path) -> None:
    """A ``python3`` that only does ``-m venv DIR``: DIR gets an ``activate`` putting a fake ``python`` first on
    PATH, which logs its arguments and exits with $PIP_RC for ``-m pip`` and $PYTEST_RC for ``-m pytest``."""
    bin_dir.mkdir()
    python = (f'#!/bin/sh\necho "python $*" >> "{log}"\n'
              'case "$2" in pip) exit "$PIP_RC";; pytest) exit "$PYTEST_RC";; *) exit 99;; esac\n')
    python3 = (f'#!/bin/sh\necho "python3 $* ($(ls -A "$3" 2>/dev/null | tr "\\n" " "))" >> "{log}"\n'
               '[ "$1 $2" = "-m venv" ] || exit 99\n'
               'mkdir -p "$3/bin" && cp "$(dirname "$0")/python" "$3/bin/python"\n'
               'echo "PATH=\\"$PWD/$3/bin:\\$PATH\\"; export PATH" > "$3/bin/activate"\n')
    for name, text in (("python", python), ("python3", python3)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)


@pytest.mark.parametrize("pip_rc,pytest_rc", [(0, 0), (0, 1), (1, 0)])
def test_ci_script_starts_from_an_empty_virtualenv_and_exits_with_pytests_status(tmp_path, pip_rc, pytest_rc):
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy2(REPO / ".ci" / "run", clone / ".ci" / "run")
    (clone / ".venv").mkdir()
    (clone / ".venv" / "installed-by-hand").write_text("")
    log = tmp_path / "log"
    _fake_python3(tmp_path / "bin", log)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin", PIP_RC=str(pip_rc), PYTEST_RC=str(pytest_rc),
               CI="true")
    proc = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    calls = log.read_text().splitlines() if log.exists() else []
    print(proc.returncode, proc.stdout, proc.stderr, calls, sep="\n")
    assert calls[0] == "python3 -m venv .venv ()"  # the old .venv and what it held are gone
    assert calls[1] == 'python -m pip install torch==2.13.0 -e .[test]'
    if pip_rc:
        assert proc.returncode != 0 and len(calls) == 2  # no tests run on a broken install
    else:
        assert calls[2:] == ["python -m pytest -q"] and proc.returncode == pytest_rc


# ----------------------------------------------------------------------------------------------------------
# Dependencies: what the exports need to load


def _dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]


def test_hf_export_model_card_names_what_loading_needs():
    from importlib.metadata import version

    from glmq.export import hf

    # The card's floors are glmq's own: installing glmq is enough to load its exports.
    assert set(hf.LOAD_REQUIREMENTS) <= set(_dependencies())
    assert {re.split(r"[<>=]", r)[0] for r in hf.LOAD_REQUIREMENTS} == {"transformers", "diffusers", "bitsandbytes",
                                                                         "accelerate"}
    comp = {"mode": "nf4", "skip_modules": ["lm_head"], "converted_linears": 3, "kept_linears": 1,
            "bytes_before": 4_000_000, "bytes_after": 1_000_000}
    card = hf.model_card({"components": {hf.AR: comp, hf.DIT: dict(comp, mode="int8")}})
    print(card)
    assert 'pip install "transformers>=5.2" "diffusers>=0.42.1" "bitsandbytes>=0.48" "accelerate>=1.1"' in card
    assert all(f"{name} {version(name)}" in card for name in ("transformers", "diffusers", "bitsandbytes",
                                                              "accelerate"))


# ----------------------------------------------------------------------------------------------------------
# --update-readme writes the README it is given (default ./README.md), never one beside glmq's files

_README = "# a project\n\nintro\n\n<!-- glmq-bench:start -->\nold table\n<!-- glmq-bench:end -->\n\nafter\n"
_BENCH_JSON = REPO / "benchmarks" / "results" / "e2e_h100" / "compare1024" / "bench.json"


def test_update_readme_rewrites_only_the_given_readme_between_its_markers(tmp_path, monkeypatch):
    own = (REPO / "README.md").read_bytes()
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    readme.write_text(_README)
    proc = run_cli_inprocess("bench", "--from-json", str(_BENCH_JSON), "--out", str(tmp_path / "o1"),
                             "--update-readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    print(text)
    assert text.startswith("# a project\n\nintro\n\n<!-- glmq-bench:start -->\n") and "old table" not in text
    assert text.endswith("<!-- glmq-bench:end -->\n\nafter\n") and "| glmq | default | 80 GiB | t2i | 1024x1024 |" in text

    monkeypatch.chdir(tmp_path)  # no value: README.md in the current directory
    (tmp_path / "README.md").write_text(_README)
    proc = run_cli_inprocess("bench", "--from-json", str(_BENCH_JSON), "--out", str(tmp_path / "o2"),
                             "--update-readme")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "README.md").read_text() == text
    assert (REPO / "README.md").read_bytes() == own


def test_update_readme_refuses_a_file_without_markers_before_running_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = tmp_path / "README.md"
    plain.write_text("# no markers here\n")
    for args, needle in ((["--update-readme"], "README.md: no '<!-- glmq-bench:start -->'"),
                         (["--update-readme", "missing.md"], "missing.md"),
                         (["--update-readme", str(tmp_path)], "a folder")):
        out = tmp_path / "out"
        assert_user_error(run_cli_inprocess("bench", "--from-json", str(_BENCH_JSON), "--out", str(out), *args),
                          needle)
        assert not out.exists()  # refused before the bench (or the merge) wrote anything
    assert plain.read_text() == "# no markers here\n"


# ----------------------------------------------------------------------------------------------------------
# The wheel: complete, and its console script works from a scratch virtualenv outside the clone

_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                      "*.partial", ".whl", ".scratch")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel`` offline, on a copy of the clone (a build in the clone would leave build/ and egg-info
    there, and setuptools packs stale files it finds in build/)."""
    src = tmp_path_factory.mktemp("src") / "glmq"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCES)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(dist), "."], cwd=src, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    (whl,) = dist.glob("glmq-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_recipes(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"glmq/{p.relative_to(REPO / 'glmq').as_posix()}" for p in (REPO / "glmq").rglob("*")
               if p.is_file() and p.suffix in (".py", ".toml", ".typed") and "__pycache__" not in p.parts}
    sources |= {f"glmq/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")}
    assert {f"glmq/recipes/{n}.toml" for n in ("default", "fast", "ampere", "quality", "tier16")} <= sources
    assert sources <= names, sorted(sources - names)
    # Nothing besides glmq: a top-level `kernels` would shadow Hugging Face's, which diffusers imports.
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"glmq"}
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "Requires-Dist: accelerate>=1.1" in meta
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "glmq = glmq.cli:main" in entry_points


@pytest.fixture(scope="module")
def scratch_venv(wheel, tmp_path_factory) -> Path:
    """A virtualenv holding only the wheel, non-editable; torch and the other dependencies come from this test
    run's environment through a ``.pth`` path list (``--system-site-packages`` alone reaches only the base
    interpreter's packages when this run is itself in a virtualenv). Directories listed in a ``.pth`` file
    are not scanned for ``.pth`` files of their own, so the editable install's import hook stays out."""
    venv = tmp_path_factory.mktemp("scratch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    ours = [p for p in ours if Path(p).is_dir()]
    (purelib / "zz-test-environment.pth").write_text("".join(f"{p}\n" for p in ours))
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    return venv


def _scratch_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env["GLMQ_OUTLIER_EVAL_SIZE"] = "tiny"  # tiny shapes for quantize's outlier evaluation (as in conftest.py)
    return env


@pytest.mark.slow
def test_wheel_install_runs_the_cli_from_outside_the_clone(scratch_venv, tmp_path):
    python, glmq = scratch_venv / "bin" / "python", scratch_venv / "bin" / "glmq"
    env = _scratch_env()
    where = subprocess.run([str(python), "-c", "import json, sysconfig, glmq, glmq.kernels\n"
                            "from glmq.quant.recipe import recipes_dir\n"
                            "print(json.dumps([sysconfig.get_paths()['purelib'], glmq.__file__, "
                            "glmq.kernels.__file__, str(recipes_dir())]))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    purelib, *files = (Path(p).resolve() for p in json.loads(where.stdout))
    print(purelib, files)
    for f in files:
        assert f.is_relative_to(purelib / "glmq") and not f.is_relative_to(REPO), f

    def glmq_cli(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(glmq), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        print("glmq", " ".join(args), "->", proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
        assert proc.returncode == 0
        return proc

    glmq_cli("make-tiny", "tiny")
    assert (tmp_path / "tiny" / "model_index.json").is_file()

    glmq_cli("quantize", "tiny", "--out", "q", "--recipe", "default", "--no-eval", "--no-layer-outputs")
    config = json.loads((tmp_path / "q" / "vision_language_encoder" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "glmq"
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert report["recipe"]["name"] == "default"

    glmq_cli("export", "hf", "tiny", "--out", "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert '"accelerate>=1.1"' in card and (tmp_path / "hf" / "glmq-manifest.json").is_file()

    glmq_cli("generate", "q", "--prompt", "a sign that says 'glmq'", "--size", "64x64", "--steps", "2",
             "--device", "cpu", "--out", "img.png")
    from PIL import Image

    with Image.open(tmp_path / "img.png") as img:
        assert img.size == (64, 64)
