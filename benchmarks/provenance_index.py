"""Where did the results under ``benchmarks/results/`` that carry no provenance record come from?

Results written since ``glmq.bench.provenance`` existed hold their own commit and command (a ``provenance``
key). For the older ones this script writes ``benchmarks/results/PROVENANCE.md``: one row per results file
(files sharing a name up to the suffix share a row) or run folder, with

- the commit(s) that added it: ``git log --diff-filter=A --format=%h -- PATH``;
- the commit(s) whose tree first held its current bytes (a later rewrite, or a copy of an earlier run's
  output under a new name, shows here);
- the command that produced it, where one can be recovered, and from where:
  1. ``NOTES`` below: read by a person from a commit message, a README, a script's docstring or the file
     itself, each note saying which;
  2. ``benchmarks/gpu_e2e.sh`` as of the commit that first held the current bytes: the command whose output
     went to a log that was saved with the results (``> "$OUT/NAME.log"``);
  3. the file's own top-level ``command`` key (``bench_streaming.py`` records the command it measured).
  Otherwise: "not recorded". Nothing is filled in by guesswork.

    python benchmarks/provenance_index.py          # rewrite benchmarks/results/PROVENANCE.md
    python benchmarks/provenance_index.py --check  # exit 1 if it is out of date

It needs the git history (a clone, not a copy of the tree).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INDEX = RESULTS / "PROVENANCE.md"
E2E = "benchmarks/gpu_e2e.sh"

# label (path relative to benchmarks/results; a folder ends with "/", a group of files is "stem.*") ->
# (command or None, where the command or the producer is known from). Checked by hand against the sources.
NOTES: dict[str, tuple[str | None, str]] = {
    "ar_decode_h100.*": (None, "written by `benchmarks/bench_ar_decode.py` (`ar_decode_<tag>`, `--tag` defaults "
                               "to h100); its arguments are not in the file, the commit message or the README"),
    "attention_h100.*": (None, "written by `benchmarks/bench_attention.py` (its fixed output name; "
                               "`attention_notes.md` calls this the final run)"),
    "attention_h100_v1.*": (None, "a `benchmarks/bench_attention.py` run of an earlier version of the kernels, "
                                  "renamed (`attention_notes.md`)"),
    "attention_h100_v2_sweep.*": (None, "a `benchmarks/bench_attention.py` run with a launch sweep, renamed "
                                        "(`attention_notes.md`)"),
    "attention_notes.*": (None, "no command: a note about the three attention runs that no script writes"),
    "dit_step_h100.*": (None, "merged by `benchmarks/bench_dit_step.py --report` from its device runs (the .md "
                              "names the script); neither the runs' nor the merge's arguments are recorded"),
    "e2e_h100/attempts_2048/": (
        "glmq2048_50steps_timeout290s.log: timeout 290 python3 -X faulthandler -m glmq bench --model full-random "
        "--recipe default --tiers 80 --size 2048x2048 --steps 50 --out \"$OUT/glmq2048\"; "
        "glmq2048_20steps_timeout190s.log: timeout 190 python3 -X faulthandler -m glmq bench --model full-random "
        "--recipe default --tiers 80 --size 2048x2048 --steps 20 --warmup-steps 1 --no-compile "
        "--out \"$OUT/glmq2048_20steps\"",
        "commit f980db0 (\"two 2048x2048 attempts that ran out of device time\"); each log's name gives its steps "
        "and timeout, which match exactly one line of `benchmarks/gpu_e2e.sh` at f980db0 (cases checks2048 and "
        "quick2048); the logs were renamed when saved"),
    "e2e_h100/combined/": (None, "merged by `glmq bench --from-json` (added in cc10a70; `benchmarks/gpu_e2e.sh`'s "
                                 "header says the 2048 rows are merged this way); which JSON files it merged is "
                                 "not recorded"),
    "e2e_h100/glmq_default_1024.*": (None, "`glmq bench` output (its `config` key holds the settings), renamed "
                                           "when saved; the command is not recorded"),
    "e2e_h100/glmq_default_1024_tier12_offload.*": (None, "`glmq bench` output (its `config` key holds the "
                                                          "settings), renamed when saved"),
    "e2e_h100/glmq_default_1024_tiers16_12.*": (None, "`glmq bench` output (its `config` key holds the settings), "
                                                      "renamed when saved"),
    "e2e_h100/glmq_default_256_staged_nograph.*": (None, "`glmq bench` output (its `config` key holds the "
                                                         "settings), renamed when saved"),
    "e2e_h100/stock_bf16_1024.*": (None, "`glmq bench` output (its `config` key holds the settings), renamed "
                                         "when saved"),
    "fp8_fast_accum_h100/": (None, "written by `benchmarks/bench_fp8_fast_accum.py OUT` (its output names); "
                                   "no log was saved and `benchmarks/gpu_e2e.sh` has no case for it"),
    "make_full_cpu2.*": (None, "the `command` key is the glmq command that `benchmarks/bench_streaming.py` "
                               "timed (`glmq make-tiny /tmp/glm-full --size full`); the script's own arguments "
                               "are not recorded"),
    "memory_sequence_h200/before_fix/": (
        "python3 benchmarks/check_memory_sequence.py --tier 16 --history --calls t2i,t2i,edit1,edit1,edit2 "
        "--out $OUT/seqA; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 "
        "benchmarks/check_memory_sequence.py --tier 16 --calls t2i,t2i,edit1,edit1,edit2 --out $OUT/seqB",
        "the folder's README.md (the JSON `command` keys leave out the PYTORCH_CUDA_ALLOC_CONF of the second)"),
    "onnx_full_cpu2.*": (None, "written by `benchmarks/bench_onnx_full.py` (its default `--results`), which "
                               "merges one run per component; the JSON records each component's `glmq export "
                               "onnx` command, not the script's arguments"),
    "outlier_eval_cpu2.*": (None, "the file's `what` key names a Python call (`evaluate_outliers(load_recipe(name))`), "
                                  "not a command line"),
    "qmatmul_h100.*": (None, "written by `benchmarks/bench_qmatmul.py` (`qmatmul_<tag>`; the tag defaults to the "
                             "card, h100)"),
    "qmatmul_h100_v1.*": (None, "a `benchmarks/bench_qmatmul.py` run of an earlier kernel version, renamed "
                                "(`qmatmul_h100.md` says so)"),
    "quant_algorithms_cpu2.*": (None, "written by `benchmarks/bench_quant_algorithms.py` (its default `--out`); its "
                                      ".md says a first run was stopped and the rest timed in a second part (what "
                                      "the script's `--prior-log`/`--fill-missing` do); neither invocation is "
                                      "recorded"),
    "quantize_full_fast_cpu2_before_plain_reads.*": (None, "the `command` key is the glmq command that "
                                                           "`benchmarks/bench_streaming.py` timed; the script's own "
                                                           "arguments are not recorded"),
    "quantize_full_fast_cpu2_before_row_blocks.*": (None, "the `command` key is the glmq command that "
                                                          "`benchmarks/bench_streaming.py` timed; the script's own "
                                                          "arguments are not recorded"),
    "quantize_full_fast_cpu2.*": (None, "the `command` key is the glmq command that `benchmarks/bench_streaming.py` "
                                        "timed; the script's own arguments are not recorded"),
    "quantize_full_fast_layer_outputs_cpu2.*": (None, "the `command` key is the glmq command that "
                                                      "`benchmarks/bench_streaming.py` timed"),
    "quantize_full_fast_layer_outputs_report.*": (
        "glmq quantize .scratch/full --out .scratch/q_fast --recipe fast",
        "commit 0b7ed8c (\"...; its report\"): the fidelity report `glmq quantize` writes beside the weights, of "
        "the run whose `command` key is in `quantize_full_fast_layer_outputs_cpu2.json` (same commit)"),
    "quantize_full_fast_report.*": (
        "glmq quantize /tmp/glm-full --out /tmp/glm-full-q --recipe fast",
        "commit 6c6ed1f (\"...; its fidelity report\"): the report `glmq quantize` writes beside the weights, of "
        "the run whose `command` key is in `quantize_full_fast_cpu2.json` (rewritten in the same commit)"),
    "quantize_layer_outputs_cpu2.*": (None, "summarized by hand from `benchmarks/bench_layer_outputs.py` output "
                                            "(that script's docstring); the script's arguments are not recorded"),
    "sensitivity_cpu2.*": (None, "written by `benchmarks/bench_sensitivity.py` (its default `--out`); its arguments "
                                 "(e.g. `--from-log`) are not recorded"),
}


@dataclass
class Unit:
    label: str  # relative to RESULTS; "dir/" for a folder, "stem.*" for files sharing a stem
    paths: list[Path]  # relative to RESULTS
    added: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    command: str | None = None
    source: str = ""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def _has_provenance(obj) -> bool:
    if isinstance(obj, dict):
        # glmq bench writes the provenance fields into its "environment" (glmq.bench.run.environment).
        env = obj.get("environment")
        if isinstance(env, dict) and "git_commit" in env and "command" in env:
            return True
        return "provenance" in obj or any(_has_provenance(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_provenance(v) for v in obj)
    return False


def records_provenance(files: list[Path]) -> bool:
    """A JSON among ``files`` that holds a ``provenance`` key (at any depth): the unit speaks for itself."""
    for f in files:
        if f.suffix == ".json":
            try:
                if _has_provenance(json.loads(f.read_text())):
                    return True
            except (OSError, ValueError):
                continue
    return False


def units(root: Path = RESULTS) -> list[Unit]:
    """A folder without subfolders is one run: one unit. A folder with subfolders is a collection: each
    subfolder is looked at the same way, and its files are grouped by stem. Units whose JSON records its
    provenance are left out."""
    out = []

    def walk(folder: Path) -> None:
        groups: dict[str, list[Path]] = {}
        for p in sorted(folder.iterdir()):
            if p == INDEX or p.name.startswith("."):
                continue
            if p.is_dir():
                if any(c.is_dir() for c in p.iterdir()):
                    walk(p)
                elif not records_provenance(sorted(p.rglob("*"))):
                    out.append(Unit(p.relative_to(root).as_posix() + "/", [p.relative_to(root)]))
            else:
                groups.setdefault(p.name.split(".")[0], []).append(p)
        for stem, files in groups.items():
            if not records_provenance(files):
                rel = (folder / stem).relative_to(root).as_posix()
                out.append(Unit(rel + ".*", [f.relative_to(root) for f in files]))

    walk(root)
    return sorted(out, key=lambda u: u.label)


def _ordered(hashes: list[str]) -> list[str]:
    return list(dict.fromkeys(hashes))


def first_commits_of_blobs() -> tuple[dict[str, tuple[str, set[str]]], dict[str, int]]:
    """blob sha -> (short commit, paths) of the oldest commit that added or changed a file under results to those
    bytes; and the position of each such commit in history (oldest first)."""
    short = dict(line.split() for line in git("log", "--format=%H %h").splitlines())
    log = git("log", "--reverse", "--no-renames", "--raw", "--no-abbrev", "--format=C %H", "--",
              "benchmarks/results")
    first: dict[str, tuple[str, set[str]]] = {}
    order: dict[str, int] = {}
    commit = ""
    for line in log.splitlines():
        if line.startswith("C "):
            commit = short[line[2:]]
            order.setdefault(commit, len(order))
        elif line.startswith(":"):
            meta, path = line.split("\t", 1)
            seen = first.setdefault(meta.split()[3], (commit, set()))
            if seen[0] == commit:
                seen[1].add(path)
    return first, order


def e2e_commands(commit: str, log_name: str) -> list[tuple[str, str]]:
    """(case, command) of every line of gpu_e2e.sh at ``commit`` that sends its output to "$OUT/<log_name>"."""
    try:
        text = git("show", f"{commit}:{E2E}")
    except subprocess.CalledProcessError:
        return []
    found, case = [], "?"
    for line in re.sub(r"\\\n\s*", "", text).splitlines():
        m = re.match(r"\s{2}([\w-]+)\)\s*(.*)", line)
        if m:
            case, line = m.group(1), m.group(2)
        target = f'> "$OUT/{log_name}"'
        if target in line:
            cmd = line.split(target)[0].strip()
            found.append((case, cmd))
    return found


def from_e2e(unit: Unit, commit: str) -> tuple[str, str] | None:
    """The command(s) behind the logs saved in a unit, from gpu_e2e.sh at ``commit``."""
    logs = sorted({f.name for p in unit.paths for f in ([RESULTS / p] if (RESULTS / p).is_file()
                                                           else (RESULTS / p).rglob("*.log"))})
    commands, sources = [], []
    for log in logs:
        hits = e2e_commands(commit, log)
        if not hits:
            continue
        # `timeout N` only bounds the wall time; cases that differ in nothing else ran the same command.
        plain = _ordered([re.sub(r"\btimeout \d+ ", "", cmd) for _, cmd in hits])
        timeouts = _ordered(re.findall(r"\btimeout (\d+) ", " ".join(cmd for _, cmd in hits)))
        cases = "/".join(_ordered([c for c, _ in hits]))
        cmd = plain[0] if len(plain) == 1 else "one of: " + " | ".join(plain)
        commands.append(f"{log}: {cmd}" if len(logs) > 1 else cmd)
        sources.append((f"{log}: " if len(logs) > 1 else "") + f"case {cases}"
                       + (f", under `timeout` {'/'.join(timeouts)} s" if timeouts else ""))
    if not commands:
        return None
    return "; ".join(commands), f"`{E2E}` at {commit}, by the saved log's name: " + "; ".join(sources)


def fill(unit: Unit, blobs: dict[str, tuple[str, set[str]]], order: dict[str, int], head: str) -> None:
    paths = [f"benchmarks/results/{p.as_posix()}" for p in unit.paths]
    unit.added = _ordered(list(reversed(git("log", "--diff-filter=A", "--format=%h", "--", *paths).split())))
    files = [f for p in unit.paths
             for f in ([RESULTS / p] if (RESULTS / p).is_file() else sorted((RESULTS / p).rglob("*"))) if f.is_file()]
    content, commits, moved_from = [], [], {}
    for f in files:
        rel = f.relative_to(REPO).as_posix()
        try:
            blob = git("rev-parse", f"{head}:{rel}").strip()
        except subprocess.CalledProcessError:
            content.append("not committed")
            continue
        commit, paths = blobs.get(blob, ("?", {rel}))
        commits.append(commit)
        earlier = Path(min(paths)).relative_to("benchmarks/results")
        if rel in paths:
            content.append(commit)
        else:
            content.append(f"{commit} (as `{earlier.as_posix()}`)")
            moved_from.setdefault(commit, set()).add(earlier.parent.as_posix())
    if unit.label.endswith("/") and moved_from and all(c in moved_from for c in commits):
        # A folder copied whole from an earlier run's folder: say so once.
        content = [f"{c} (as `{'`, `'.join(sorted(moved_from[c]))}/`)" for c in commits]
    unit.content = _ordered(content)
    note = NOTES.get(unit.label)
    if note is not None and note[0] is not None:
        unit.command, unit.source = note
        return
    # The script as of the newest commit among the unit's current bytes: the one closest to the run.
    known = sorted((c for c in commits if c in order), key=order.__getitem__)
    e2e = from_e2e(unit, known[-1]) if known else None
    if e2e is not None:
        unit.command, unit.source = e2e
        if note is not None:
            unit.source += "; " + note[1]
        return
    keys = []
    for f in files:
        if f.suffix == ".json":
            with_cmd = json.loads(f.read_text())
            if isinstance(with_cmd, dict) and isinstance(with_cmd.get("command"), str):
                keys.append(with_cmd["command"])
    if keys:
        unit.command = "; ".join(_ordered(keys))
        unit.source = note[1] if note is not None else "the file's `command` key"
        return
    unit.command, unit.source = None, note[1] if note is not None else "nothing found"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(all_units: list[Unit]) -> str:
    lines = [
        "# Provenance of the results saved before results recorded their own",
        "",
        "Generated by `python benchmarks/provenance_index.py` (do not edit by hand; add what a person can recover "
        "to its `NOTES` and regenerate). Results written since `glmq.bench.provenance` existed carry a "
        "`provenance` key (commit, dirty flag, command, the environment variables that steer glmq and torch, "
        "date) and are not listed.",
        "",
        "Columns: the results; the commit(s) that added them (`git log --diff-filter=A`); the commit(s) whose tree "
        "first held their current bytes, with the earlier name where they were copied or renamed; the command that "
        "produced them, or \"not recorded\"; where that command, or what produced them, is known from. "
        "`timeout N` is left out of commands taken from `benchmarks/gpu_e2e.sh` (it only bounds the wall time) "
        "and named in the last column. Such a command is the script's line as committed with (or before) the "
        "results, matched by the saved log's name: strong evidence, though the script may have changed between "
        "the run and the commit.",
        "",
        "| results | added in | current bytes from | command | known from |",
        "|---|---|---|---|---|",
    ]
    for u in all_units:
        names = " ".join(f"`{p.as_posix()}{'/' if (RESULTS / p).is_dir() else ''}`" for p in u.paths)
        cmd = f"`{_cell(u.command)}`" if u.command else "not recorded"
        lines.append(f"| {names} | {', '.join(u.added) or '-'} | {', '.join(u.content)} | {cmd} | {_cell(u.source)} |")
    return "\n".join(lines) + "\n"


def build() -> str:
    head = git("rev-parse", "--short", "HEAD").strip()
    blobs, order = first_commits_of_blobs()
    all_units = units()
    for u in all_units:
        fill(u, blobs, order, head)
    for label in sorted(set(NOTES) - {u.label for u in all_units}):
        print(f"provenance_index: note for {label!r} matches no results without provenance", file=sys.stderr)
    return render(all_units)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if PROVENANCE.md differs from what would be written")
    args = ap.parse_args(argv)
    try:
        text = build()
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"provenance_index: needs a git clone with its history ({e})", file=sys.stderr)
        return 2
    if args.check:
        current = INDEX.read_text() if INDEX.exists() else ""
        if current != text:
            print(f"{INDEX.relative_to(REPO)} is out of date: run python benchmarks/provenance_index.py",
                  file=sys.stderr)
            return 1
        return 0
    tmp = INDEX.with_suffix(".md.partial")
    tmp.write_text(text)
    tmp.replace(INDEX)
    rows = sum(line.startswith("| `") for line in text.splitlines())
    print(f"wrote {INDEX.relative_to(REPO)} ({rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
