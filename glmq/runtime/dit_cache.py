"""What the GLM-Image DiT recomputes on every forward although it is fixed for a whole generation.

``GlmImageTransformer2DModel.forward`` rebuilds, on every one of its 100 calls per image (50 steps, a
conditional and an unconditional pass):

- the 2-D RoPE tables, on the CPU, then copies them to the GPU once per block (``apply_rotary_emb``);
- the glyph projection of the prompt embeddings and the prior-token embedding + projection, which depend
  only on the prompt and the AR's tokens;
- the timestep + size embedding and, in each of the 30 blocks, the AdaLN modulation
  ``norm1.linear(temb)`` (a 512 x 49152 matrix-vector product), which depend only on the step.

This module computes them once per generation with the upstream submodules themselves and serves them
back: :class:`StepTable` stands in for each ``norm1.linear`` and returns the row of the current step, so
the upstream ``GlmImageAdaLayerNormZero`` (and everything else in the block) runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class StepTable(nn.Module):
    """A stand-in for a linear layer whose input depends only on the denoising step.

    While a table is loaded (:meth:`load`), ``forward`` ignores its input and returns the row of the
    current step, shape (1, out_features), which broadcasts over the batch exactly like the upstream
    (batch, out_features) output whose rows are all equal. The row lives in a buffer of its own that
    :meth:`select` refreshes from row ``step`` of the table, ``step`` a 1-element int64 tensor on the
    table's device: no host synchronization, so the copy can be captured in a CUDA graph. The caller
    selects before each forward, outside the compiled blocks, so a compiled block sees a (1, out_features)
    tensor whatever the number of steps: a call with another step count does not recompile it (a
    ``dynamic=False`` block that saw the whole (steps, out_features) table recompiled for each new count
    and, past Dynamo's limit of 8, ran eager).
    Unloaded, it calls the wrapped layer: the model behaves exactly as before.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.table: torch.Tensor | None = None
        self.step: torch.Tensor | None = None
        self.row: torch.Tensor | None = None

    def load(self, table: torch.Tensor, step: torch.Tensor) -> None:
        self.table, self.step = table, step
        self.row = table[:1].clone()  # step 0's; ``step`` may still hold the last call's step

    def select(self) -> None:
        """Copy the table's row ``step`` into the buffer that :meth:`forward` returns."""
        torch.index_select(self.table, 0, self.step, out=self.row)

    def unload(self) -> None:
        self.table, self.step, self.row = None, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row is None:  # not self.table: Dynamo would guard on the table's shape, the step count
            return self.inner(x)
        return self.row


def install_step_tables(transformer: nn.Module) -> list[StepTable]:
    """Wrap every block's ``norm1.linear`` in a :class:`StepTable` (idempotent); returns them in block order.

    A block whose ``norm1.linear`` was replaced since (a quantized linear, say) gets a fresh wrapper
    around the new module. While installed, the modulation weights are named
    ``transformer_blocks.N.norm1.linear.inner.*``; :func:`remove_step_tables` restores the names.
    """
    tables = []
    for block in transformer.transformer_blocks:
        if not isinstance(block.norm1.linear, StepTable):
            block.norm1.linear = StepTable(block.norm1.linear)
        tables.append(block.norm1.linear)
    return tables


def remove_step_tables(transformer: nn.Module) -> None:
    for block in transformer.transformer_blocks:
        if isinstance(block.norm1.linear, StepTable):
            block.norm1.linear = block.norm1.linear.inner


def modulation_tables(tables: list[StepTable], temb: torch.Tensor) -> list[torch.Tensor]:
    """``norm1.linear(temb)`` of every block for every step at once: (steps, 12 * inner_dim) each."""
    return [t.inner(temb) for t in tables]


def timestep_embeddings(transformer: nn.Module, dit_timesteps: torch.Tensor, target_size: torch.Tensor,
                        crop_coords: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The conditioning vector ``temb`` of every step, (steps, time_embed_dim).

    ``dit_timesteps`` are the values the DiT is fed (the pipeline's unshifted timestep minus one);
    ``target_size`` and ``crop_coords`` are one (1, 2) row each, the same for the whole batch.
    """
    n = dit_timesteps.shape[0]
    return transformer.time_condition_embed(dit_timesteps, target_size.expand(n, 2), crop_coords.expand(n, 2),
                                            dtype)


def rope_tables(transformer: nn.Module, latent_height: int, latent_width: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) RoPE tables of the image tokens, (tokens, head_dim) fp32, built once and kept on ``device``.

    Built by the upstream ``transformer.rope`` itself (it reads only the latent height and width), so the
    values are bit-identical to what the stock forward uses.
    """
    cos, sin = transformer.rope(torch.empty((1, 1, latent_height, latent_width)))
    return cos.to(device), sin.to(device)


def prior_hidden_states(transformer: nn.Module, prior_token_ids: torch.Tensor, *, drop: bool) -> torch.Tensor:
    """The prior-token term added to the patch embeddings, (batch, tokens, inner_dim).

    ``drop=True`` is the unconditional pass: the stock forward zeroes the embedding
    (``prior_embedding[prior_token_drop] *= 0.0``) before the projector, which leaves the projector's
    bias path, a constant per token.
    """
    emb = transformer.prior_token_embedding(prior_token_ids)
    if drop:
        emb = emb * 0.0
    return transformer.prior_projector(emb)
