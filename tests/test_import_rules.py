"""Imports flow one way between glmq's folders (STYLE.md, issue #19): an AST walk over every module.

kernels -> torch/triton only; io -> errors; models -> io; quant.formats (formats, QuantLinear, GGUF, the
quantization_config) -> io, kernels; checkpoint (validation against the configs) -> models, quant.formats,
io; quant (algorithms, calibration, conversion) -> checkpoint, models, io, kernels; runtime -> quant.formats,
quant.plan and quant.recipe (what a recipe asks for), checkpoint, models, io, kernels; export -> the same
without the kernels; evaluate (fidelity, reports, ``glmq quantize`` with its evaluation) -> all of those;
serve (the HTTP server) -> runtime, io; the CLI, bench, inspect, ComfyUI nodes and the package root on top. ``errors``, ``progress`` and
``quant.metrics`` (arithmetic) may be used from anywhere; ``from glmq import __version__`` too.

The test fails on any edge against these rules; there are no exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANYWHERE = {"errors", "progress", "quant.metrics"}
RECIPES = {"quant.formats", "quant.plan", "quant.recipe"}
ALLOWED = {
    "kernels": set(),
    "errors": set(),
    "progress": set(),
    "io": set(),
    "models": {"io"},
    "quant.formats": {"io", "kernels"},
    "checkpoint": {"models", "quant.formats", "io"},
    "quant": {"checkpoint", "models", "io", "kernels"},
    "runtime": RECIPES | {"checkpoint", "models", "io", "kernels"},
    "export": RECIPES | {"checkpoint", "models", "io"},
    "evaluate": {"quant", "runtime", "checkpoint", "models", "io", "kernels"},
    "serve": {"runtime", "io"},  # it serves a pipeline the CLI (or a script) loads
}


def _folder(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    if rel.parts[1:3] == ("quant", "formats"):
        return "quant.formats"
    return rel.parts[1].removesuffix(".py")


def _allowed(src: str, module: str) -> bool:
    parts = module.split(".")
    if module == "glmq":  # from glmq import __version__
        return True
    if ".".join(parts[1:3]) == src or ".".join(parts[1:3]) in ANYWHERE or parts[1] in ANYWHERE:
        return True
    if parts[1] == src:  # within a folder (quant may use its formats; the formats are a layer below quant)
        return True
    return parts[1] in ALLOWED[src] or ".".join(parts[1:3]) in ALLOWED[src]


def edges() -> set[tuple[str, str]]:
    """(file, imported glmq module) pairs that break the rules."""
    found = set()
    files = sorted((ROOT / "glmq").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    for f in files:
        src = _folder(f)
        if src not in ALLOWED:
            continue  # cli, bench, inspect, maketiny, testing, the package root: on top
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for m in modules:
                if m != "glmq" and not m.startswith("glmq."):
                    continue
                if src == "kernels":  # the kernels import torch and triton, and one another only
                    if not m.startswith("glmq.kernels"):
                        found.add((f.relative_to(ROOT).as_posix(), m))
                elif not _allowed(src, m):
                    found.add((f.relative_to(ROOT).as_posix(), m))
    return found


def test_imports_flow_one_way():
    found = edges()
    new = sorted(found)
    assert not new, "imports against the folder rules (see this file's docstring): " + ", ".join(
        f"{f} -> {m}" for f, m in new)


def test_the_walk_sees_a_violation(tmp_path):
    """The checker itself: a runtime module importing the CLI is reported."""
    fake = tmp_path / "glmq" / "runtime"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from glmq.cli import main\nimport glmq.io.layout\n")
    formats = tmp_path / "glmq" / "quant" / "formats"
    formats.mkdir(parents=True)
    (formats / "f.py").write_text("from glmq.quant.plan import plan_layers\nfrom glmq.quant.formats import base\n")
    (tmp_path / "glmq" / "quant" / "q.py").write_text("from glmq.quant.formats import base\nfrom glmq.runtime import x\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text("from glmq.runtime import pipeline\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert edges() == {("glmq/runtime/bad.py", "glmq.cli"), ("kernels/k.py", "glmq.runtime"),
                           ("glmq/quant/formats/f.py", "glmq.quant.plan"), ("glmq/quant/q.py", "glmq.runtime")}
    finally:
        ROOT = saved
