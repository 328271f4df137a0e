"""GPTQ: calibrated rounding that compensates each column's error on the columns not yet quantized.

Frantar et al., 2022. For ``y = x @ W^T`` and calibration inputs ``X``, GPTQ quantizes ``W`` one input
column at a time and spreads the column's rounding error over the remaining columns through the inverse
Hessian ``H^-1`` (``H = X^T X``), minimizing ``||X W^T - X Q^T||`` greedily. Implemented here:

- blockwise processing with lazy batch updates (``block_size`` columns updated in place, the rest of the
  matrix once per block);
- damping ``damp * mean(diag(H))`` on the diagonal (1% by default), raised tenfold up to three times if
  the Cholesky factorization still fails;
- inputs never seen in calibration (``H[k, k] == 0``) keep their weights, rounded without compensation;
- optional ``act_order``: columns in decreasing ``diag(H)`` order. The stored layout groups *consecutive*
  ``k``, so with ``act_order`` (or ``static_groups``) the group scales are fixed from the original weight
  before any update; otherwise each group's scale and zero are chosen from the already-updated weights
  when its first column is reached, as in the paper.

Works with every format: group-wise int4 (symmetric and asymmetric) and per-output-channel int8 / fp8.
Runs on the device of ``weight`` (CUDA is fine and much faster; the Hessian is moved there); the Cholesky
steps run in fp64, the rest in fp32. Cost: ``O(N K^2 + K^3)``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from glmq.errors import GlmqError
from glmq.quant.algorithms.base import QuantAlgorithm
from glmq.quant.formats.base import QuantFormat


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(QuantAlgorithm):
    """GPTQ with ``block_size`` lazy updates, relative ``damp``ing and optional ``act_order``."""

    name: ClassVar[str] = "gptq"
    needs_hessian: ClassVar[bool] = True

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or not 0 <= self.damp < 1:
            raise GlmqError(f"gptq options out of range: block_size >= 1, 0 <= damp < 1; got {self}.")

    @torch.no_grad()
    def quantize_weight(
        self, fmt: QuantFormat, weight: torch.Tensor, *, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if hessian is None:
            raise GlmqError("gptq needs calibration data: pass the layer's Hessian (see HessianAccumulator).")
        w = fmt.checked_weight(weight).clone()
        n, k = w.shape
        if tuple(hessian.shape) != (k, k):
            raise GlmqError(f"gptq: the Hessian is {list(hessian.shape)}, the weight needs [{k}, {k}].")
        h = hessian.to(device=w.device, dtype=torch.float64)
        if not bool(torch.isfinite(h).all()):
            raise GlmqError("gptq: the Hessian holds NaN/Inf values; check the calibration activations.")
        g = fmt.group_size_for(k)
        static = self.act_order or self.static_groups or g == k
        scale, zero = fmt.qparams(w)  # [n, k // g]; overwritten group by group unless static
        stored = scale.dtype, None if zero is None else zero.dtype
        # fp32 working copies (exact: they hold stored-dtype values), so no per-column conversions.
        scale, zero = scale.float(), None if zero is None else zero.float()

        perm = None
        if self.act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
            w, h = w[:, perm], h[perm][:, perm]
        u = self._inverse_hessian_factor(h).float()
        del h
        # Group of each (permuted) column, as a Python list: no device sync per column.
        group_of = [c // g for c in (perm.tolist() if perm is not None else range(k))]

        # Groups never straddle a block when every group starts fresh inside one.
        block = self.block_size if static else max(g, self.block_size // g * g)
        q = torch.empty_like(w)
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            w1 = w[:, i1:i2].clone()
            err1 = torch.empty_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if not static and col % g == 0:
                    s_g, z_g = fmt.qparams(w1[:, i : i + g])
                    scale[:, col // g] = s_g[:, 0].float()
                    if zero is not None:
                        zero[:, col // g] = z_g[:, 0].float()
                grp = group_of[col]
                s_c = scale[:, grp : grp + 1]
                z_c = None if zero is None else zero[:, grp : grp + 1]
                q_col = fmt.fake_quantize(w1[:, i : i + 1], s_c, z_c)
                q[:, col : col + 1] = q_col
                e = (w1[:, i : i + 1] - q_col) / u1[i, i]
                w1[:, i:] -= e * u1[i : i + 1, i:]
                err1[:, i : i + 1] = e
            w[:, i2:] -= err1 @ u[i1:i2, i2:]

        if perm is not None:
            q = q[:, torch.argsort(perm)]
        zero = None if zero is None else zero.to(stored[1])
        return fmt.quantize(q, scale=scale.to(stored[0]), zero=zero)

    def _inverse_hessian_factor(self, h: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 = U^T U``), in fp64.

        With ``J`` the order-reversing permutation and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky
        and one triangular inverse, instead of inverting ``H`` and factoring the inverse.
        """
        hf = h.flip(0, 1)  # a copy; damped in place below
        diag = hf.diagonal()
        diag[diag == 0] = 1.0  # unseen inputs: no correlation, plain rounding
        mean_diag = float(diag.mean())
        damp, added = self.damp * mean_diag, 0.0
        for _ in range(4):
            diag += damp - added
            added = damp
            lower, info = torch.linalg.cholesky_ex(hf)
            if int(info) == 0:
                del hf
                eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
                return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            damp = damp * 10 if damp > 0 else 1e-6 * mean_diag
        raise GlmqError("gptq: the Hessian is not positive definite even with heavy damping; check calibration.")
