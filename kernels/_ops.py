"""Registering kernels as ``torch.library`` custom ops, once per process.

This folder can be imported under two names (``glmq.kernels`` when installed, ``kernels`` when Python runs
from the repository root, as transformers and diffusers may do by accident): both imports execute the
same files, and registering an op name a second time raises. The second import reuses the first op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def custom_op_once(qualname: str, impl: Callable, fake: Callable):
    """``impl`` registered as the functional custom op ``qualname`` ("namespace::name") with the fake
    (meta) implementation ``fake``, or the op already registered under that name."""
    namespace, name = qualname.split("::")
    ops = getattr(torch.ops, namespace)
    if hasattr(ops, name):
        return getattr(ops, name)
    op = torch.library.custom_op(qualname, mutates_args=())(impl)
    op.register_fake(fake)
    return op
