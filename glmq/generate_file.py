"""``glmq generate PATH --prompts FILE --out DIR``: every image of a prompts file from one process.

One load (and, with compilation, one compilation: every later call reuses it), then the images in batched
calls: text-to-image images that share a size, step count and guidance go through the pipeline together, up
to ``batch`` per call, so the AR decodes them together and the DiT denoises them in the chunks the memory plan
allows; an edit's images go together with the other images of its line (one set of references).
Each image uses its own generator (seed from the file, see :mod:`glmq.io.prompts`), so it is the image
``glmq generate --prompt ... --seed S`` makes alone.

Outputs are PNGs with deterministic names (:meth:`~glmq.io.prompts.PromptLine.file_name`), each written
atomically as soon as its call returns; an image whose file exists is skipped (rerunning an interrupted run
resumes it), ``force`` makes it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from glmq.errors import GlmqError
from glmq.io.images import read_image, save_image
from glmq.io.prompts import PromptLine


@dataclass(frozen=True)
class FileJob:
    """One image of a prompts file."""

    line: PromptLine
    index: int  # which image of its line
    seed: int
    path: Path

    @property
    def shape(self) -> tuple:
        return (self.line.width, self.line.height, self.line.steps, self.line.guidance)


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that cannot be used, before any work."""
    if out.exists() and not out.is_dir():
        raise GlmqError(f"{out} exists and is not a folder; with --prompts, --out names a folder for the images")
    if not out.exists() and not out.parent.is_dir():
        raise GlmqError(f"{out.parent}: output folder does not exist")


def read_references(lines: list[PromptLine], where: str | Path) -> dict[str, object]:
    """Every reference image the file ``where`` names, read (and decoded) once, before any work."""
    images: dict[str, object] = {}
    for line in lines:
        for ref in line.images:
            if ref not in images:
                try:
                    images[ref] = read_image(ref)
                except GlmqError as e:
                    raise GlmqError(f"{where} line {line.line}: {e}") from None
    return images


def jobs_for(lines: list[PromptLine], out: Path, *, force: bool) -> tuple[list[FileJob], list[FileJob]]:
    """(to make, already made) over every image of ``lines``; existing files count as made unless ``force``."""
    todo, done = [], []
    for line in lines:
        for i, seed in enumerate(line.seeds()):
            job = FileJob(line, i, seed, out / line.file_name(i))
            (done if job.path.exists() and not force else todo).append(job)
    return todo, done


def generate_file(pipe, lines: list[PromptLine], out: Path, references: dict, *, batch: int = 8,
                  force: bool = False, progress: bool = True) -> dict:
    """Make every image of ``lines`` into ``out`` (see the module docstring); returns the summary."""
    import torch

    from glmq.progress import StageProgress

    todo, done = jobs_for(lines, out, force=force)
    out.mkdir(exist_ok=True)
    groups: dict[tuple, list[FileJob]] = {}
    for job in todo:  # text-to-image images of any lines together; an edit's images with its own line's
        groups.setdefault(job.shape + ((job.line.line,) if job.line.images else ()), []).append(job)
    bar = StageProgress(enabled=progress)
    bar.stage("images", total=len(todo), unit="img")
    calls, written = [], set()
    t_start = time.perf_counter()
    try:
        for (width, height, steps, guidance, *edit), group in groups.items():
            for start in range(0, len(group), batch):
                chunk = group[start : start + batch]
                gens = [torch.Generator().manual_seed(job.seed) for job in chunk]
                t0 = time.perf_counter()
                if edit:  # one prompt, its references read once and its images denoised together
                    line = chunk[0].line
                    images = pipe(line.prompt, image=[references[r] for r in line.images], height=height, width=width,
                                  num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                                  num_images_per_prompt=len(chunk))
                else:
                    images = pipe([job.line.prompt for job in chunk], height=height, width=width,
                                  num_inference_steps=steps, guidance_scale=guidance, generator=gens)
                for job, image in zip(chunk, images):
                    save_image(image, job.path, "PNG")
                    written.add(job.path)
                    bar.step()
                t = pipe.last_times
                calls.append({"images": len(chunk), "size": f"{width}x{height}", "steps": steps,
                              "guidance": guidance, "seconds": round(time.perf_counter() - t0, 3),
                              "mode": t.extra.get("mode"), "ar_batch": t.extra.get("ar_batch", 1),
                              "dit_batch": t.extra.get("dit_batch", 1), "ar_s": round(t.ar_s, 3),
                              "dit_s": round(t.dit_s, 3), "vae_s": round(t.vae_s, 3)})
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    entries = [{"file": job.path.name, "line": job.line.line, "prompt": job.line.prompt, "seed": job.seed,
                "size": f"{job.line.width}x{job.line.height}", "steps": job.line.steps,
                "guidance": job.line.guidance, "references": list(job.line.images),
                "status": "written" if job.path in written else "skipped"}
               for job in sorted(todo + done, key=lambda j: (j.line.line, j.index))]
    return {"out": str(out), "written": len(written), "skipped": len(done), "seconds": round(seconds, 3),
            "images_per_hour": round(3600 * len(written) / seconds, 1) if written and seconds > 0 else None,
            "calls": calls, "images": entries}
