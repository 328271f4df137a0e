"""Guidance-parallel denoising (the latency mode's DiT): the conditional pass on rank 0, the unconditional
pass on rank 1, at the same time, each as a batch of one.

One GPU batches both passes into one forward (:mod:`glmq.runtime.dit_loop`); here each rank runs only its
own pass and the two ranks exchange the model outputs after every step (one all-gather of ``[B, C, h, w]``,
0.5 MB in bf16 at 1024x1024). Both ranks then hold both outputs and apply the same guidance and the same
scheduler step to the same latents, so their latents stay identical without any further exchange, and rank 0
alone decodes them. With ``guidance_scale <= 1`` there is one pass, which both ranks compute.
"""

from __future__ import annotations

import torch

from glmq.runtime.dit_loop import DitRunner


class GuidanceParallelRunner(DitRunner):
    """A :class:`~glmq.runtime.dit_loop.DitRunner` whose rank runs one of the two guidance passes.

    Args:
        rank, world: this process's place in ``group`` (``world`` must be 2: one pass per rank).
        group: the process group the outputs are gathered over (None: the default group).
        Other arguments: as :class:`DitRunner` (``batch_cfg`` is always False: one pass per rank).
    """

    def __init__(self, transformer, scheduler_config: dict, *, rank: int, world: int, group=None, **kwargs):
        if world != 2:
            raise ValueError(f"guidance parallelism runs the two guidance passes on two ranks, got world={world}")
        kwargs["batch_cfg"] = False
        super().__init__(transformer, scheduler_config, **kwargs)
        self.rank, self.world, self.group = rank, world, group
        self._passes: list = []
        self._theirs: torch.Tensor | None = None

    def _plan(self, bsz, cond, uncond, use_kv):
        self._passes = super()._plan(bsz, cond, uncond, use_kv)  # [conditional, unconditional] with guidance
        return self._passes

    def _run(self, p, x: torch.Tensor, i: int) -> torch.Tensor:
        if len(self._passes) < 2:  # no guidance: one pass, computed on both ranks
            return super()._run(p, x, i)
        if p is self._passes[1]:  # the step's second pass: gathered when the first was asked for
            out, self._theirs = self._theirs, None
            return out
        import torch.distributed as dist

        mine = super()._run(self._passes[self.rank], x, i)
        both = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(both, mine.contiguous(), group=self.group)
        self._theirs = both[1]
        return both[0]
