"""Storage formats for quantized linear weights, keyed by name.

``get_format("int4", group_size=128, symmetric=False)`` builds one; ``format_from_config(fmt.config())``
rebuilds one from the description a checkpoint carries. Every format implements
:class:`~glmq.quant.formats.base.QuantFormat`; the layouts are documented in each format's module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from glmq.errors import GlmqError
from glmq.quant.formats.base import PerChannelFormat, QuantFormat
from glmq.quant.formats.fp8 import Fp8Format
from glmq.quant.formats.int4 import Int4Format, pack_int4, unpack_int4
from glmq.quant.formats.int8 import Int8Format

FORMATS: dict[str, type[QuantFormat]] = {cls.name: cls for cls in (Int4Format, Fp8Format, Int8Format)}


def _lookup(name: str) -> type[QuantFormat]:
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise GlmqError(f"unknown quantization format {name!r}; valid formats: {', '.join(FORMATS)}.") from None


def get_format(name: str, **params: Any) -> QuantFormat:
    """Build the format registered as ``name`` with its parameters (e.g. ``group_size``, ``symmetric``)."""
    cls = _lookup(name)
    try:
        return cls(**params)
    except TypeError:
        valid = [f.name for f in dataclasses.fields(cls)]
        raise GlmqError(
            f"bad parameters {sorted(params)} for format {name!r}; it takes {', '.join(valid)}."
        ) from None


def format_from_config(config: dict[str, Any]) -> QuantFormat:
    """Rebuild a format from the dict its :meth:`~QuantFormat.config` returned (e.g. read from a
    checkpoint's ``quantization_config``). Raises :class:`GlmqError` for an unknown format or version, or
    for a description that does not match the layout this glmq implements."""
    if not isinstance(config, dict) or "format" not in config:
        raise GlmqError(f"a format config must be a dict with a 'format' key; got {config!r}.")
    return _lookup(config["format"]).from_config(config)


__all__ = [
    "FORMATS",
    "Fp8Format",
    "Int4Format",
    "Int8Format",
    "PerChannelFormat",
    "QuantFormat",
    "format_from_config",
    "get_format",
    "pack_int4",
    "unpack_int4",
]
