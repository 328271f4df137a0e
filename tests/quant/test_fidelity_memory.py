"""Host memory of the model-level evaluation's loads on a GPU (glmq.evaluate.fidelity.load_dequantized).

The evaluation runs in fp32 from bf16 and quantized storage. Converted or dequantized on the host, the
full-size AR's 1.4 GB bf16 embedding table needs a 2.8 GB fp32 host copy: a CUDA conversion peaked at
5.2 GB RSS. With no GPU here, the meta device stands in for it: every operation that makes a CPU tensor
during the load is recorded, and the only ones allowed are reading stored tensors (in their stored
dtype) and views of them.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glmq.io.reader import PipelineReader
from glmq.evaluate.quantize import quantize
from glmq.quant import convert
from glmq.evaluate.fidelity import load_dequantized

# Reads and views. split: the NaN/Inf check (glmq.io.finite) walks each stored tensor in views of 4M values.
READ_OPS = {"aten.empty.memory_format", "aten.view.default", "aten.view.dtype", "aten.detach.default",
            "aten.split.Tensor"}


class HostTensors(TorchDispatchMode):
    """The largest CPU tensor each aten op produced, in bytes; and every ``copy_`` from one device to another
    that also changes the dtype (PyTorch converts those on the host when the copy is blocking: an fp32 host
    copy of a bf16 tensor on its way to an fp32 GPU parameter)."""

    def __init__(self):
        super().__init__()
        self.largest: dict[str, int] = {}
        self.converting_transfers: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if dst.device != src.device and dst.dtype != src.dtype:
                self.converting_transfers.append((tuple(dst.shape), src.dtype, dst.dtype))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.largest[str(func)] = max(self.largest.get(str(func), 0), t.numel() * t.element_size())
        return out


@pytest.fixture(scope="module")
def quantized_fast(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity-mem") / "q"
    quantize(tiny_dir, out, recipe="fast", progress=False, evaluate=False, layer_outputs=False)
    return out


@pytest.mark.parametrize("which", ["source", "quantized"])
@pytest.mark.parametrize("comp", ["vision_language_encoder", "transformer", "vae"])
def test_loading_for_a_device_converts_and_dequantizes_there_not_on_the_host(tiny_dir, quantized_fast, which,
                                                                             comp):
    cr = PipelineReader(tiny_dir if which == "source" else quantized_fast).component(comp)
    stored_max = max(info.nbytes for info in cr.tensors.values())
    spy = HostTensors()
    with spy:
        model = load_dequantized(cr, device="meta")
    print(comp, which, "largest stored tensor", stored_max, "host tensors by op", spy.largest)
    assert next(model.parameters()).dtype == torch.float32  # still evaluated in fp32
    assert max(spy.largest.values()) <= stored_max
    # Anything computed on the host beyond reads and views is at most a rotary table's few bytes.
    computed = {op: n for op, n in spy.largest.items() if op not in READ_OPS and n > 1024}
    assert not computed, computed
    assert not spy.converting_transfers, spy.converting_transfers[:3]


@pytest.mark.parametrize("comp, prefix", [("vision_language_encoder", "model.language_model.layers.0."),
                                          ("transformer", "transformer_blocks.0.")])
def test_calibration_materializes_layers_for_a_device_without_host_conversion(tiny_dir, comp, prefix):
    """The calibration passes (glmq.quant.calibrate.materialize) read one layer at a time into fp32
    parameters on the device; the bf16 -> fp32 conversion must happen there too."""
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_model
    from glmq.quant.calibrate import materialize

    cr = PipelineReader(tiny_dir).component(comp)
    meta = build_model(BY_NAME[comp], cr.config)
    layer = meta.get_submodule(prefix.rstrip("."))
    stored = [info for name, info in cr.tensors.items() if name.startswith(prefix)]
    assert {info.dtype for info in stored} == {"bfloat16"}  # what makes a host-side conversion cost 2x
    spy = HostTensors()
    with spy:
        materialize(layer, cr, prefix, "meta")
    print(comp, "largest stored tensor", max(i.nbytes for i in stored), "host tensors by op", spy.largest)
    assert all(p.dtype == torch.float32 and p.device.type == "meta" for p in layer.parameters())
    assert max(spy.largest.values()) <= max(i.nbytes for i in stored)
    assert set(spy.largest) <= READ_OPS, spy.largest
    assert not spy.converting_transfers, spy.converting_transfers[:3]
