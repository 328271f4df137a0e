"""The images one call makes, from diffusers-style arguments: prompts, references per prompt,
``num_images_per_prompt`` and a generator per image; and how they group into AR rounds and DiT chunks.

Images are ordered prompt-major (prompt 0's images, then prompt 1's, ...), as diffusers orders them.
``generator`` is None, one generator (every image draws from it in that order, as in diffusers), or a list of
one generator per image: then image ``i`` draws only from ``generator[i]``, which is what makes it the same
image as a call that makes it alone with that generator.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmq.errors import GlmqError


@dataclass(frozen=True)
class ImageJob:
    """One image of a call: its place in the output, its prompt and the generator it draws from."""

    index: int
    prompt_index: int
    generator: object | None  # torch.Generator


@dataclass(frozen=True)
class CallSpec:
    """A call's images: ``prompts`` and, per prompt, its reference images (empty for text-to-image)."""

    prompts: tuple[str, ...]
    references: tuple[tuple, ...]
    jobs: tuple[ImageJob, ...]
    shared_generator: bool  # one generator (or None) for every image, drawn from in image order

    @property
    def batched(self) -> bool:
        return len(self.jobs) > 1

    def image_to_image(self, job: ImageJob) -> bool:
        return bool(self.references[job.prompt_index])


def _as_references(image) -> tuple:
    if image is None:
        return ()
    if isinstance(image, (list, tuple)):
        if any(im is None for im in image):
            raise GlmqError("a prompt's reference images cannot contain None")
        return tuple(image)
    return (image,)


def call_spec(prompt, image=None, num_images_per_prompt: int = 1, generator=None) -> CallSpec:
    """Normalize a call's arguments (see the module docstring); a one-line :class:`GlmqError` when they do not
    match up.

    ``prompt``: a string or a list of strings. ``image``: for one prompt, None, an image or a list of images
    (its references); for a list of prompts, None or a list with one entry per prompt (None, an image or a list
    of images)."""
    if isinstance(prompt, str):
        prompts, refs = (prompt,), (_as_references(image),)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
        if image is None:
            refs = ((),) * len(prompts)
        elif isinstance(image, (list, tuple)) and len(image) == len(prompts):
            refs = tuple(_as_references(im) for im in image)
        else:
            raise GlmqError(f"with {len(prompts)} prompts, image must be None or a list of {len(prompts)} entries "
                            "(each None, an image or a list of images: that prompt's references)")
    else:
        raise GlmqError("prompt must be a string or a non-empty list of strings")
    per_prompt = num_images_per_prompt
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise GlmqError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    n = len(prompts) * num_images_per_prompt
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise GlmqError(f"{len(generator)} generators for {n} images ({len(prompts)} prompt(s) x "
                            f"{num_images_per_prompt}): give one generator per image, or a single one")
        gens, shared = list(generator), False
    else:
        gens, shared = [generator] * n, True
    jobs = tuple(ImageJob(i, i // num_images_per_prompt, gens[i]) for i in range(n))
    return CallSpec(prompts, refs, jobs, shared)


def rounds(jobs, size: int) -> list[list[ImageJob]]:
    """``jobs`` in consecutive groups of at most ``size`` (the AR's decode rounds)."""
    jobs = list(jobs)
    return [jobs[i : i + size] for i in range(0, len(jobs), max(int(size), 1))]


def dit_chunks(spec: CallSpec, size: int) -> list[list[ImageJob]]:
    """The images each DiT forward denoises together, at most ``size`` at a time: text-to-image images of any
    prompts together; an image-to-image image only with images of its own prompt, which read the same
    references' K/V cache (the upstream cache concatenates per-sample caches, so different references
    cannot share a forward)."""
    chunks = rounds([j for j in spec.jobs if not spec.image_to_image(j)], size)
    for p in range(len(spec.prompts)):
        chunks += rounds([j for j in spec.jobs if j.prompt_index == p and spec.image_to_image(j)], size)
    return [c for c in chunks if c]
