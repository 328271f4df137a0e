"""Token sampling on the device, without host synchronisation, for GLM-Image's autoregressive decode.

Every function here takes and returns device tensors only (no ``.item()``, no data-dependent Python
branches), so a decode step that calls them can be captured in a CUDA graph.

Semantics follow Hugging Face ``generate(do_sample=True)`` with the warpers it builds from a generation
config, applied in the same order to float32 logits:

1. ``mask_outside_vocab``: ids ``>= vocab_limit`` get ``-inf`` (GLM-Image's grid constraint: ids the DiT
   codebook cannot embed, and EOS, can never be drawn while a grid is being filled). Stock ``generate``
   has no such processor; it is the one deliberate difference.
2. ``TemperatureLogitsWarper``: ``logits / temperature``.
3. ``TopKLogitsWarper`` (only if ``top_k`` is given): drop logits ``<`` the k-th largest (ties kept).
4. ``TopPLogitsWarper``, exactly as transformers computes it: sort the logits ascending, take the softmax
   cumulative sum ``c``, drop every token whose ``c <= 1 - top_p``, but always keep the most likely one.
   Equivalently, in descending order a token is kept iff the probability mass strictly before it is
   ``< top_p``: the smallest set of most likely tokens whose mass reaches ``top_p``.
5. Draw from the softmax of the surviving logits. HF calls ``torch.multinomial``; here the draw is by
   inverse CDF, in vocabulary order, from one uniform number per row, supplied by the caller (drawn up
   front from a ``torch.Generator``), so a whole generation is reproducible and no RNG state lives in a CUDA
   graph. The distribution is the same; the random stream (and so the exact tokens) differs from HF's.
   Vocabulary order keeps a draw stable under the rounding by which a batched step's logits differ from
   the one-row step's (see ``sample_tokens``).

Greedy decoding is ``argmax`` of the masked logits (HF ``do_sample=False``).
"""

from __future__ import annotations

import torch


def mask_outside_vocab(logits: torch.Tensor, vocab_limit: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] with ids ``>= vocab_limit`` set to ``-inf``: one limit for every row (a [1] or 0-d long
    tensor) or one per row ([B])."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_limit.reshape(-1, 1), float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF ``TopKLogitsWarper``: keep logits ``>=`` the ``top_k``-th largest of each row."""
    k = min(max(int(top_k), 1), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """HF ``TopPLogitsWarper``: the logits, in vocabulary order, with the dropped ones set to ``-inf``. The mass
    is summed over the ascending sort, as transformers does. ``top_p`` may be a float or a device tensor
    ([1] or [B, 1])."""
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False  # min_tokens_to_keep = 1: the most likely token always survives
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits.masked_fill(remove, float("-inf")))


def sample_tokens(
    logits: torch.Tensor,
    *,
    vocab_limit: torch.Tensor,
    uniform: torch.Tensor,
    temperature: torch.Tensor | float = 0.9,
    top_p: torch.Tensor | float = 0.75,
    top_k: int | None = None,
    greedy: bool = False,
) -> torch.Tensor:
    """Draw one token per row.

    Args:
        logits: float32 [B, V] raw lm_head logits.
        vocab_limit: long [1] or [B] (device): only ids ``< vocab_limit`` (of the row) may be drawn.
        uniform: float32 [B] in [0, 1): the random number of each row (ignored when ``greedy``).
        temperature, top_p: floats, or device tensors [1] or [B, 1] (one value per row); tensors let a CUDA
            graph serve any value.
        top_k: optional HF top-k, applied before top-p.
        greedy: argmax instead of sampling.

    Returns:
        long [B] token ids.
    """
    logits = mask_outside_vocab(logits.float(), vocab_limit)
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    # Inverse CDF in vocabulary order, not in the sorted order: two tokens whose logits differ by rounding
    # (a batched step against the one-row step, ~1e-6) may swap places in a sort, which would hand the draw to
    # the other token; in vocabulary order such a change moves each cumulative boundary by ~1e-8 and changes
    # the draw only when u lands that close to a boundary. The chosen id is the first whose cumulative mass
    # exceeds u * total; dropped ids carry zero mass, so they can never be the first to exceed it. The cdf never
    # decreases (a running sum of non-negative terms), so binary searches find the ids, and nothing reduces
    # over the vocabulary beside the cumulative sum: Inductor (torch 2.11, CUDA) fused such a reduction (an
    # argmax) into the split scan it uses for the cumsum, failed ("NYI TritonSplitDimKernel reductions"), and
    # the decode step fell back to eager.
    probs = top_p_filter(logits, top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:].contiguous()  # searchsorted warns (once, to the user) about a strided view
    first = torch.searchsorted(cdf, (uniform.reshape(-1, 1) * total).to(cdf.dtype), right=True)
    # u * total rounded up to total (u just below 1): no id exceeds it; take the last id that carries mass
    # (the first whose cdf reaches the total).
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(first, last).squeeze(-1)
