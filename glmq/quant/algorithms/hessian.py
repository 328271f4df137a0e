"""Calibration statistics for GPTQ: the input second moment ``H = X^T X / count`` of one linear layer."""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from glmq.errors import GlmqError


class HessianAccumulator:
    """Accumulates ``X^T X`` and the row count over every input a linear layer sees.

    >>> acc = HessianAccumulator(linear.in_features)
    >>> handle = acc.attach(linear)       # forward pre-hook
    >>> for batch in calibration: model(batch)
    >>> handle.remove(); H = acc.hessian()  # fp32 [K, K], X^T X / count

    Inputs ``[..., K]`` of any float dtype are flattened to rows and accumulated in ``dtype`` (fp32 by
    default; fp64 for very long calibration runs) on the device of the first input unless ``device`` is
    given. Memory: ``K * K`` elements (750 MB in fp32 for K = 13696).
    """

    def __init__(
        self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ):
        self.in_features = in_features
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``[..., K]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator expects inputs [..., {self.in_features}]; got {list(x.shape)}.")
        if self.sum is None:
            device = self.device if self.device is not None else x.device
            self.sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=device)
        rows = x.detach().reshape(-1, self.in_features).to(device=self.sum.device, dtype=self.dtype)
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def _pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        self.add(args[0])

    def attach(self, module: torch.nn.Module) -> RemovableHandle:
        """Register a forward pre-hook on ``module`` that adds its first positional input; remove the
        returned handle when calibration is done."""
        return module.register_forward_pre_hook(self._pre_hook)

    def hessian(self) -> torch.Tensor:
        """fp32 ``[K, K]`` mean ``X^T X / count`` (the scale does not matter to GPTQ: damping is relative)."""
        if self.sum is None or self.count == 0:
            raise GlmqError("no calibration inputs reached this layer; cannot build its Hessian for GPTQ.")
        return (self.sum / self.count).float()
