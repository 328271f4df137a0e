"""Prompt files for ``glmq generate --prompts FILE``, read and checked whole before any work.

- ``.txt``: one prompt per line; blank lines are skipped. Every prompt takes the command line's size, steps,
  guidance and image count, and seed ``--seed + k`` for the k-th prompt (0-based).
- ``.jsonl``: one JSON object per line (blank lines skipped) with ``prompt`` (required) and, optionally,
  ``size`` ("WIDTHxHEIGHT"), ``seed``, ``image`` (a path or a list of paths: reference images, relative to
  the file's folder), ``steps``, ``guidance`` and ``n`` (images of this prompt). What a line leaves out comes
  from the command line (the seed as for ``.txt``).

The ``i``-th image of a prompt uses seed ``seed + i``. A line that cannot be used is refused with one line
naming the file and the line number; unknown keys are refused too (a misspelt ``"seeds"`` would otherwise be
silently ignored).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from glmq.errors import GlmqError
from glmq.io.images import parse_size
from glmq.io.safe_read import loads_json, read_bytes, want_int, want_number, want_str

MAX_PROMPTS_FILE_BYTES = 64 * 1024 * 1024
MAX_IMAGES_PER_PROMPT = 64
MAX_SEED = 2**64 - 1
KEYS = ("prompt", "size", "seed", "image", "steps", "guidance", "n")


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a file, with everything its images need (``images``: resolved reference paths)."""

    line: int  # 1-based line number in the file
    prompt: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    n: int
    images: tuple[str, ...] = ()

    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]

    def file_name(self, i: int, suffix: str = ".png") -> str:
        """The deterministic name of image ``i``: line, a slug of the prompt, its seed, and a digest of every
        setting that shapes the image, so a changed line never resumes onto an old file."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40].rstrip("-") or "prompt"
        what = [self.prompt, self.width, self.height, self.seeds()[i], self.steps, self.guidance, list(self.images)]
        digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]
        return f"{self.line:04d}-{slug}-{self.seeds()[i]}-{digest}{suffix}"


def read_prompts(path: str | Path, *, size: tuple[int, int], seed: int, steps: int, guidance: float,
                 n: int = 1) -> list[PromptLine]:
    """Every prompt of ``path`` (see the module docstring); defaults from the command line: ``size`` (width,
    height), ``seed``, ``steps``, ``guidance`` and ``n``. Raises a one-line :class:`GlmqError` naming the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise GlmqError(f"{path}: a prompts file is .txt (one prompt per line) or .jsonl (one JSON object per line)")
    data = read_bytes(path, "prompts file", MAX_PROMPTS_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GlmqError(f"{path}: the prompts file is not UTF-8 text") from None
    defaults = dict(width=size[0], height=size[1], steps=steps, guidance=guidance, n=n)
    out: list[PromptLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        if suffix == ".txt":
            out.append(PromptLine(number, raw.strip(), seed=(seed + len(out)) % (MAX_SEED + 1), **defaults))
        else:
            out.append(_json_line(raw, where, number, path.parent, (seed + len(out)) % (MAX_SEED + 1), defaults))
    if not out:
        raise GlmqError(f"{path}: no prompts in the file")
    return out


def _json_line(raw: str, where: str, number: int, folder: Path, seed: int, defaults: dict) -> PromptLine:
    entry = loads_json(raw, where, "prompts line")
    if not isinstance(entry, dict):
        raise GlmqError(f"{where}: expected a JSON object with a \"prompt\", got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise GlmqError(f"{where}: unknown key {unknown[0]!r}; a line may have {', '.join(KEYS)}")
    if "prompt" not in entry:
        raise GlmqError(f"{where}: no \"prompt\"")
    prompt = want_str(entry["prompt"], where, "prompt", max_len=1 << 16)
    if not prompt.strip():
        raise GlmqError(f"{where}: the prompt is empty")
    fields = dict(defaults)
    if "size" in entry:
        fields["width"], fields["height"] = parse_size(want_str(entry["size"], where, "size"), f"{where}: size")
    if "steps" in entry:
        fields["steps"] = want_int(entry["steps"], where, "steps", lo=1, hi=10_000)
    if "guidance" in entry:
        fields["guidance"] = float(want_number(entry["guidance"], where, "guidance"))
    if "n" in entry:
        fields["n"] = want_int(entry["n"], where, "n", lo=1, hi=MAX_IMAGES_PER_PROMPT)
    if "seed" in entry:
        seed = want_int(entry["seed"], where, "seed", lo=0, hi=MAX_SEED)
    images = entry.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise GlmqError(f"{where}: image must be a path or a list of paths")
    return PromptLine(number, prompt, seed=seed, images=tuple(str(folder / i) for i in images), **fields)
