"""The AR's token embedding with only the rows a decode step reads on the GPU.

GLM-Image's text decoder embeds 168064 ids (1.38 GB in bf16), but a decode step only ever feeds back tokens the
``lm_head`` can emit: its 16512 rows (the visual tokens and EOS, 135 MB). The prompt's text and special ids
are embedded once per call, in the prefill. :class:`VisualRowsEmbedding` keeps the whole table in host memory
and only the ``lm_head``'s rows as a parameter, so wherever the AR goes (resident, or a staged AR stage) the
other 151552 rows stay behind: 1.16 GiB less on the GPU in every memory mode.

- ``forward(ids)`` (any id; the prefill, and upstream code that calls ``embed_tokens``): rows gathered from the
  host table, then copied to ``ids``' device. It reads ``ids`` on the host, so it synchronises.
- ``visual(ids)`` (the decode step; no host work, so a CUDA graph can capture it): rows of the on-device
  parameter. Ids past it can only be the padding a finished row is fed in a batch; they read its last row, and
  that row's outputs are discarded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The checkpoint tensor this replaces (memory plans count only the rows that stay on the device).
EMBEDDING = "model.language_model.embed_tokens.weight"


class VisualRowsEmbedding(torch.nn.Module):
    """An ``nn.Embedding`` whose first ``rows`` rows are its parameter and whose whole table lives on the host
    (a plain attribute: ``.to()``, placement and ``state_dict`` leave it alone)."""

    def __init__(self, embedding: torch.nn.Embedding, rows: int):
        super().__init__()
        table = embedding.weight.detach()
        self.num_embeddings, self.embedding_dim = table.shape
        if not 1 <= rows <= self.num_embeddings:
            raise ValueError(f"rows must be in [1, {self.num_embeddings}], got {rows}")
        self.padding_idx = embedding.padding_idx
        self.rows = int(rows)
        self.host_table = table.to("cpu")
        self.weight = torch.nn.Parameter(table[:rows].clone(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids.to("cpu"), self.host_table)
        return out.to(device=self.weight.device, dtype=self.weight.dtype)

    def visual(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.clamp(max=self.rows - 1), self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the device: {self.rows} rows"


def split_embedding(ar) -> None:
    """Replace the AR's (``GlmImageForConditionalGeneration``) token embedding with a
    :class:`VisualRowsEmbedding` over the ``lm_head``'s rows; a second call changes nothing."""
    text = ar.model.language_model
    if isinstance(text.embed_tokens, VisualRowsEmbedding):
        return
    rows = getattr(ar.lm_head, "out_features", None) or ar.lm_head.weight.shape[0]  # a quantized head too
    rows = int(rows)
    if rows >= text.embed_tokens.num_embeddings:
        return  # nothing would stay behind
    text.embed_tokens = VisualRowsEmbedding(text.embed_tokens, rows)


def host_only_bytes(tensors: dict, ar_config, bytes_per_value: int) -> int:
    """Bytes of the embedding rows that :func:`split_embedding` keeps off the device, from a checkpoint's tensor
    infos (name -> object with ``shape``) and the AR's config (its ``lm_head`` has ``vision_vocab_size`` rows), at
    ``bytes_per_value`` per element; 0 if nothing stays behind."""
    emb = tensors.get(EMBEDDING)
    if emb is None or ar_config is None or len(emb.shape) != 2:
        return 0
    if isinstance(ar_config, dict):  # a config.json: what it leaves out takes the class's defaults
        from transformers import GlmImageConfig

        ar_config = GlmImageConfig(**ar_config)
    rows = ar_config.text_config.vision_vocab_size
    return max(0, emb.shape[0] - int(rows)) * emb.shape[1] * bytes_per_value
