"""The loader's direct fill (glmq.runtime.loader.Filler): stored tensors read straight into the module's own
memory, on the CPU by plain reads and elsewhere through two alternating staging buffers. What it must keep:
the same weights as reading each tensor into a CPU tensor and copying it in, the NaN/Inf refusal naming the
tensor, a clear error for a truncated file."""

from __future__ import annotations

import shutil

import pytest
import torch

import glmq
from glmq.errors import CheckpointError
from glmq.io.finite import count_nonfinite, count_nonfinite_lazy
from glmq.io.reader import PipelineReader
from glmq.io.safetensors_io import read_tensor
from glmq.runtime.loader import Filler, load_component, open_component

COMPONENTS = ("vision_language_encoder", "transformer", "text_encoder", "vae")


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    from glmq.evaluate.quantize import quantize

    out = tmp_path_factory.mktemp("fill") / "q"
    quantize(tiny_dir, out, progress=False)
    return out


def _state(folder, name, dtype):
    model = load_component(open_component(folder, name), device="cpu", dtype=dtype)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["bf16", "quantized"])
def test_filled_weights_equal_the_read_and_copy_path(tiny_dir, quantized_dir, which, monkeypatch):
    """Loading with the fill gives the same bytes as with every tensor read, checked and copied; and the fill
    did take most tensors (so the comparison compares two paths)."""
    folder = tiny_dir if which == "bf16" else quantized_dir
    filled = []
    fill = Filler.fill
    monkeypatch.setattr(Filler, "fill", lambda self, info, target, what: (filled.append(info.name),
                                                                           fill(self, info, target, what))[-1])
    for name in COMPONENTS:
        dtype = torch.float32 if name == "text_encoder" else torch.bfloat16
        before = len(filled)
        fast = _state(folder, name, dtype)
        with monkeypatch.context() as m:
            m.setattr(Filler, "fits", staticmethod(lambda info, target: False))
            slow = _state(folder, name, dtype)
        assert fast.keys() == slow.keys()
        for k in fast:
            assert fast[k].dtype == slow[k].dtype, k
            assert torch.equal(fast[k].view(-1).view(torch.uint8), slow[k].view(-1).view(torch.uint8)), k
        stored = len(open_component(folder, name).names())
        if name != "text_encoder" or which == "quantized":  # a bf16-stored T5 loads in fp32: cast, not filled
            assert len(filled) - before >= stored // 2, (name, len(filled) - before, stored)


@pytest.mark.parametrize("chunk", [513, 1 << 20])
def test_staged_fill_matches_the_stored_bytes_across_chunk_boundaries(quantized_dir, chunk):
    """The staging path (what a GPU load runs), forced on the CPU with small odd chunks: every tensor of the
    quantized DiT arrives byte for byte, whatever its size against the chunk."""
    cr = open_component(quantized_dir, "transformer")
    filler = Filler(chunk=chunk, staged=True)
    spanned = 0
    for name, info in cr.tensors.items():
        target = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        filler.fill(info, target, name)
        want = read_tensor(info)
        assert torch.equal(target.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), name
        spanned += info.nbytes > chunk
    filler.finish()
    if chunk < 1000:
        assert spanned > 20  # many tensors crossed chunk boundaries


def _poisoned(src, dst, value):
    """A copy of ``src`` with one element of the DiT's first bf16 tensor set to ``value``; its name."""
    shutil.copytree(src, dst)
    reader = PipelineReader(dst)
    cr = reader.component("transformer")
    info = next(i for i in cr.tensors.values() if i.dtype == "bfloat16" and i.numel > 4)
    bad = torch.tensor([value], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    with open(info.file, "r+b") as f:
        f.seek(info.data_start + info.begin + 2 * (info.numel // 2))
        f.write(bad)
    return info


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_filled_tensor_with_nan_or_inf_is_refused_by_name(tiny_dir, tmp_path, value):
    info = _poisoned(tiny_dir, tmp_path / "p", value)
    # glmq.load in bf16 on the CPU fills the bf16 tensors directly
    with pytest.raises(CheckpointError, match=f"{info.name}.*NaN/Inf"):
        glmq.load(tmp_path / "p", device="cpu", dtype=torch.bfloat16)
    # the staged path counts on the "device" and refuses at finish(), naming the tensor
    filler = Filler(chunk=4099, staged=True)
    target = torch.empty(info.shape, dtype=torch.bfloat16)
    filler.fill(info, target, f"{info.file}: tensor {info.name!r}")
    with pytest.raises(CheckpointError, match=f"{info.name}.*holds 1 NaN/Inf"):
        filler.finish()


@pytest.mark.parametrize("staged, workers", [(False, 1), (False, 3), (True, 1)])
def test_a_truncated_shard_is_a_clear_error(tiny_dir, tmp_path, staged, workers):
    shutil.copytree(tiny_dir, tmp_path / "t")
    cr = open_component(tmp_path / "t", "transformer")
    info = max(cr.tensors.values(), key=lambda i: i.data_start + i.end)  # the file's last tensor
    with open(info.file, "r+b") as f:
        f.truncate(info.data_start + info.begin + info.nbytes // 2)
    target = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    filler = Filler(chunk=1000, staged=staged, workers=workers)
    try:
        with pytest.raises(CheckpointError, match="truncated while reading tensor"):
            filler.fill(info, target, info.name)
            filler.finish()  # threads report at finish
    finally:
        filler.close()


@pytest.mark.parametrize("workers", [1, 4])
def test_cpu_fills_on_threads_give_the_same_module(quantized_dir, workers, monkeypatch):
    """The DiT filled by one thread or four: the same bytes (each thread reads into its own tensor)."""
    from glmq.runtime import loader

    monkeypatch.setattr(loader, "FILL_WORKERS", workers)
    state = _state(quantized_dir, "transformer", torch.bfloat16)
    monkeypatch.setattr(loader, "FILL_WORKERS", 1)
    one = _state(quantized_dir, "transformer", torch.bfloat16)
    assert all(torch.equal(state[k].view(-1).view(torch.uint8), one[k].view(-1).view(torch.uint8)) for k in one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_device_count_agrees_with_the_numpy_count(dtype):
    """count_nonfinite_lazy (the bit test in torch, what a GPU load reads back) against the numpy bit test,
    with bad values on both sides of block boundaries and finite extremes that must not count."""
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(5000, generator=g) * 100).to(dtype)
    t[::997] = torch.finfo(dtype).max  # finite, largest exponent short of Inf/NaN
    if dtype != torch.float8_e4m3fn:
        t[63:66] = float("inf")
        t[1000] = float("-inf")
    t[4095] = float("nan")
    want = count_nonfinite(t, chunk=64)
    assert want >= 1
    assert int(count_nonfinite_lazy(t, chunk=64)) == want
    assert int(count_nonfinite_lazy(t)) == want


def test_filled_weights_equal_what_safetensors_reads(tiny_dir):
    """The bf16 tiny folder through glmq.load in bf16 on the CPU (the fill for nearly every tensor) gives the
    weights safetensors itself reads."""
    from safetensors import safe_open

    model = load_component(open_component(tiny_dir, "transformer"), device="cpu", dtype=torch.bfloat16)
    state = model.state_dict()
    cr = open_component(tiny_dir, "transformer")
    files = {info.file for info in cr.tensors.values()}
    seen = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                assert torch.equal(state[name], f.get_tensor(name).to(torch.bfloat16)), name
                seen += 1
    assert seen == len(cr.tensors)
