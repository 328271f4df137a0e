"""Imports flow one way between glmq's folders (STYLE.md, issue #19): an AST walk over every module.

kernels -> torch/triton only; io -> errors; models -> io; quant -> models, io, kernels; runtime ->
quant.formats (and the planner and checkpoint description), models, io, kernels; export -> quant.formats,
models, io; the CLI, bench, inspect and the package root on top. ``errors``, ``progress`` and ``quant.metrics``
(arithmetic) may be used from anywhere; ``from glmq import __version__`` too.

``KNOWN`` lists the edges that still break the rules, each with where it should go. The test fails on any
other edge, and on a known edge that has gone (so that the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANYWHERE = {"errors", "progress", "quant.metrics"}
ALLOWED = {
    "kernels": set(),
    "errors": set(),
    "progress": set(),
    "io": set(),
    "models": {"io"},
    "quant": {"models", "io", "kernels"},
    "runtime": {"quant.formats", "quant.plan", "quant.checkpoint", "models", "io", "kernels"},
    "export": {"quant.formats", "quant.plan", "quant.checkpoint", "models", "io"},
}
KNOWN = {
    # validation needs the models' expected shapes and the formats' stored tensors: a layer above io
    ("glmq/io/validate.py", "glmq.models.build"),
    ("glmq/io/validate.py", "glmq.quant.checkpoint"),
    ("glmq/io/validate.py", "glmq.runtime.loader"),  # GGUF components: with the GGUF reader, below runtime
    # model-level evaluation and reports belong in their own folder above runtime and quant
    ("glmq/quant/fidelity.py", "glmq.runtime.loader"),
    # exporting a bf16 source quantizes it by recipe: the conversion should be reachable below export
    ("glmq/export/compressed_tensors.py", "glmq.quant.convert"),
    ("glmq/export/compressed_tensors.py", "glmq.quant.recipe"),
}


def _folder(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return "kernels" if rel.parts[0] == "kernels" else rel.parts[1].removesuffix(".py")


def _allowed(src: str, module: str) -> bool:
    parts = module.split(".")
    if module == "glmq":  # from glmq import __version__
        return True
    if parts[1] == src or parts[1] in ANYWHERE or ".".join(parts[1:3]) in ANYWHERE:
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
    new = sorted(found - KNOWN)
    assert not new, "imports against the folder rules (see this file's docstring): " + ", ".join(
        f"{f} -> {m}" for f, m in new)


def test_the_known_exceptions_only_shrink():
    gone = sorted(KNOWN - edges())
    assert not gone, "these exceptions no longer occur; remove them from KNOWN: " + ", ".join(
        f"{f} -> {m}" for f, m in gone)


def test_the_walk_sees_a_violation(tmp_path):
    """The checker itself: a runtime module importing the CLI is reported."""
    fake = tmp_path / "glmq" / "runtime"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from glmq.cli import main\nimport glmq.io.layout\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text("from glmq.runtime import pipeline\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert edges() == {("glmq/runtime/bad.py", "glmq.cli"), ("kernels/k.py", "glmq.runtime")}
    finally:
        ROOT = saved
