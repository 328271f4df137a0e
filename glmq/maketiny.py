"""``glmq make-tiny``: write a complete GLM-Image pipeline folder with random weights.

``size="tiny"`` gives a folder of a few tens of MB that stock ``diffusers.GlmImagePipeline`` loads and
runs end to end on a CPU in seconds. ``size="full"`` writes the released architecture (about 36 GB of
random bf16/fp32 weights), streaming one tensor at a time; it is what converters and memory tests run on.
Both use the release's folder layout, tensor names, dtypes and config files.
"""

from __future__ import annotations

from pathlib import Path

from glmq.io.layout import COMPONENTS, WEIGHT_COMPONENTS, model_index
from glmq.io.writer import DEFAULT_MAX_SHARD_BYTES, OutputFolder
from glmq.models.configs import SIZES, component_config
from glmq.progress import ByteProgress

# Tiny shards are kept small so the tiny AR is split over several files, as the release is.
TINY_MAX_SHARD_BYTES = 8 * 1024 * 1024


def make_tiny(out: str | Path, *, size: str = "tiny", seed: int = 0, force: bool = False,
              progress: bool = True, max_shard_bytes: int | None = None) -> Path:
    """Write a GLM-Image pipeline folder with random weights to ``out``; returns the path.

    Writes into ``out.partial`` and renames at the end; an interrupted ``full`` run resumes from its
    finished shards when rerun with the same arguments.
    """
    import torch

    from glmq import __version__
    from glmq.errors import GlmqError
    from glmq.models.build import (
        build_glyph_tokenizer,
        build_model,
        build_processor,
        build_scheduler,
        fan_in_stds,
        norm_parameter_names,
        DEFAULT_STD,
        random_tensor,
        tensor_specs,
    )

    if size not in SIZES:
        raise GlmqError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if max_shard_bytes is None:
        max_shard_bytes = TINY_MAX_SHARD_BYTES if size == "tiny" else DEFAULT_MAX_SHARD_BYTES
    import diffusers

    job = {"command": "make-tiny", "size": size, "seed": seed, "glmq": __version__, "shard": max_shard_bytes,
           "init": "fan_in" if size == "tiny" else DEFAULT_STD}
    folder = OutputFolder(out, job=job, force=force)
    folder.write_json("model_index.json", model_index(diffusers.__version__))

    models = {}
    for comp in WEIGHT_COMPONENTS:
        model = build_model(comp, component_config(comp.name, size))
        models[comp.name] = model
        target = folder.path(comp.name)
        if comp.library == "transformers":
            model.config.dtype = getattr(torch, comp.dtype)
            model.config.save_pretrained(target)
            if comp.role == "ar":
                from transformers import GenerationConfig

                GenerationConfig.from_model_config(model.config).save_pretrained(target)
        else:
            model.save_config(target)
    build_processor().save_pretrained(folder.path("processor"))
    build_glyph_tokenizer().save_pretrained(folder.path("tokenizer"))
    build_scheduler().save_pretrained(folder.path("scheduler"))

    writers = []
    for comp in WEIGHT_COMPONENTS:
        model = models[comp.name]
        specs = tensor_specs(model, comp.dtype)
        stds = fan_in_stds(model) if size == "tiny" else {}
        writers.append((comp, specs, norm_parameter_names(model), stds, folder.component_writer(
            comp, specs, max_shard_bytes=max_shard_bytes)))
    total = sum(w.total_size for *_, w in writers)
    with ByteProgress(total, f"make-tiny {size}", enabled=progress) as bar:
        for comp, specs, norms, stds, writer in writers:
            shapes = {name: (dtype, shape) for name, dtype, shape in specs}
            pending = set(writer.pending())
            for i, shard in enumerate(writer.shards):
                if i not in pending:
                    bar.update(sum(_nbytes(dt, sh) for _, dt, sh in shard))

            def produce(name, shapes=shapes, norms=norms, stds=stds):
                dtype, shape = shapes[name]
                return random_tensor(name, shape, dtype, seed=seed, is_norm=name in norms,
                                     std=stds.get(name, DEFAULT_STD))

            order = [name for i in writer.pending() for name, _, _ in writer.shards[i]]
            sizes = {name: _nbytes(*shapes[name]) for name in order}
            with Ahead(produce, order, sizes) as ahead:
                writer.write(ahead.take, on_tensor=lambda name, n: bar.update(n))
    return folder.commit({"source": {"make-tiny": {"size": size, "seed": seed}}})


AHEAD_BYTES = 512 << 20  # tensors made ahead of the writer, at most (besides the one it writes)
AHEAD_WORKERS = 4  # each holds a 256 MB float32 chunk while it draws (random_tensor)


class Ahead:
    """``produce(name)`` for the names of ``order``, computed ahead on a few threads while the writer writes.

    Each tensor comes from its own generator, seeded by its name (:func:`glmq.models.build.random_tensor`), so
    making them concurrently gives the same bytes as one at a time. At most :data:`AHEAD_BYTES` of tensors wait
    beside the one being written (one larger tensor may wait alone), so memory stays bounded; ``take`` must
    be called in ``order``.
    """

    def __init__(self, produce, order: list[str], sizes: dict[str, int], *, workers: int | None = None,
                 budget: int = AHEAD_BYTES):
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.produce, self.order, self.sizes, self.budget = produce, order, sizes, budget
        self.pool = ThreadPoolExecutor(max_workers=workers or min(AHEAD_WORKERS, os.cpu_count() or 1))
        self.futures: dict[str, object] = {}
        self.next = 0  # index in order of the next name to submit
        self.waiting = 0  # bytes submitted and not yet taken

    def _fill(self) -> None:
        while self.next < len(self.order):
            name = self.order[self.next]
            if self.futures and self.waiting + self.sizes[name] > self.budget:
                return
            self.futures[name] = self.pool.submit(self.produce, name)
            self.waiting += self.sizes[name]
            self.next += 1

    def take(self, name: str):
        self._fill()
        future = self.futures.pop(name, None)
        if future is None:  # not in order (or not planned): make it here
            return self.produce(name)
        self.waiting -= self.sizes[name]
        result = future.result()
        self._fill()
        return result

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for future in self.futures.values():
            future.cancel()
        self.pool.shutdown(wait=True)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    import torch

    n = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    for d in shape:
        n *= d
    return n


__all__ = ["make_tiny", "COMPONENTS"]
