"""The interface every quantization algorithm implements.

An *algorithm* chooses the numbers (scales, zero points, and for GPTQ the rounding of each weight); a
*format* (``glmq.quant.formats``) says how they are stored. ``algo.quantize_weight(fmt, weight)`` returns
exactly the tensors ``fmt.quantize`` would, so the checkpoint writer does not care which algorithm ran.

Algorithms are frozen dataclasses of their options plus ``version``, with a JSON round trip through
:meth:`QuantAlgorithm.config` and ``algorithm_from_config``, so a checkpoint can record how it was made.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from glmq.errors import GlmqError
from glmq.quant.formats.base import QuantFormat


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantAlgorithm(ABC):
    """Chooses how a weight is quantized into a format. Subclasses are frozen dataclasses of options."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    """True when :meth:`quantize_weight` needs ``hessian`` (calibration activations of the layer)."""
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)

    version: int = 1

    def __post_init__(self) -> None:
        if self.version not in self.VERSIONS:
            raise GlmqError(
                f"{self.name} algorithm version {self.version} is not supported by this glmq "
                f"(supported: {', '.join(map(str, self.VERSIONS))})."
            )

    @abstractmethod
    def quantize_weight(
        self, fmt: QuantFormat, weight: torch.Tensor, *, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Quantize ``weight`` ``[N, K]`` into ``fmt``'s stored tensors (bare names, as ``fmt.quantize``).

        ``hessian`` is ``[K, K]`` (``X^T X / count`` of the layer's inputs, see ``HessianAccumulator``);
        algorithms that do not need it ignore it.
        """

    def config(self) -> dict[str, Any]:
        """JSON-able ``{"algorithm": name, **options}``; ``algorithm_from_config(a.config()) == a``."""
        return {"algorithm": self.name, **dataclasses.asdict(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantAlgorithm:
        opts = {k: v for k, v in config.items() if k != "algorithm"}
        try:
            return cls(**opts)
        except TypeError:
            valid = [f.name for f in dataclasses.fields(cls)]
            raise GlmqError(
                f"bad options {sorted(opts)} for algorithm {cls.name!r}; it takes {', '.join(valid)}."
            ) from None

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if k != "version")
        return f"{self.name}({args})" if args else self.name
