"""int4 layers through PyTorch's tinygemm kernel (glmq.quant.formats.tinygemm), on the CPU build of the same
kernel: the scale/zero-point conversion and the swap are checked here; the GPU packing call is the one the H200
measurement used (benchmarks/results/int4_gemv_libraries_h200/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from glmq.errors import GlmqError
from glmq.quant.formats.linear import QuantLinear
from glmq.quant.metrics import sqnr_db
from glmq.quant.formats import tinygemm as tg

CPU = torch.device("cpu")


def _layer(symmetric: bool, n=96, k=512, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return QuantLinear.from_linear(lin, "int4", group_size=128, symmetric=symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_tinygemm_computes_the_layer_glmq_stores(symmetric):
    layer = _layer(symmetric)
    fast = tg.TinygemmLinear(layer, CPU)
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    ref = layer.format.matmul_kernel_ref(x.reshape(-1, layer.in_features).float(), layer.stored_tensors(),
                                         layer.bias.float()).reshape(2, 5, -1)
    got = fast(x)
    db = sqnr_db(ref, got)
    print(f"symmetric={symmetric}: {db:.1f} dB against glmq's reference")
    # bf16 activations and outputs bound it near 50 dB (51.8 on the H200); a zero point off by one code
    # (the asymmetric/symmetric mix-up, or 8 - z taken as z - 8) lands below 20.
    assert got.shape == ref.shape and got.dtype == x.dtype and db > 45


def test_a_wrong_zero_point_is_far_below_the_check():
    layer = _layer(False)
    fast = tg.TinygemmLinear(layer, CPU)
    sz = fast.scales_and_zeros.clone()
    sz[..., 1] = -sz[..., 1]  # (z - 8) * s instead of (8 - z) * s
    fast.scales_and_zeros = sz
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(2))
    ref = layer.format.matmul_kernel_ref(x, layer.stored_tensors(), layer.bias.float())
    assert sqnr_db(ref, fast(x)) < tg.MIN_SQNR_DB - 20


def test_install_swaps_every_int4_layer_and_refuses_when_its_check_fails(monkeypatch):
    # The first layer's 96 outputs, padded to 128, feed the second (a K tinygemm's groups take).
    net = nn.Sequential(_layer(False), nn.ReLU(), nn.ConstantPad1d((0, 32), 0.0), _layer(True, n=64, k=128, seed=3))
    net.append(QuantLinear.from_linear(nn.Linear(64, 32), "int8"))  # an 8-bit layer stays as it is
    x = torch.randn(3, 512)
    before = net(x)
    monkeypatch.setattr(tg, "scales_and_zeros", lambda s, z: torch.zeros(s.shape[1], s.shape[0], 2,
                                                                          dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match="not used"):
        assert tg.install(net, CPU) == 0
    assert isinstance(net[0], QuantLinear)
    monkeypatch.undo()
    assert tg.install(net, CPU) == 2
    assert isinstance(net[0], tg.TinygemmLinear) and isinstance(net[3], tg.TinygemmLinear)
    assert isinstance(net[4], QuantLinear)
    assert sqnr_db(before, net(x)) > 40
    assert tg.install(net, CPU) == 0  # nothing left to swap


def test_the_choice_comes_from_the_environment(monkeypatch):
    """Unset: tinygemm on a CUDA device (the measured default), glmq's kernels elsewhere; "glmq" keeps glmq's
    everywhere; "tinygemm" asks for it by name (also on the CPU)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("GLMQ_INT4_KERNEL", raising=False)
    assert tg.choice() == "auto" and not tg.wanted()
    assert tg.enabled(cuda) and not tg.enabled(cpu)
    monkeypatch.setenv("GLMQ_INT4_KERNEL", "glmq")
    assert not tg.enabled(cuda) and not tg.enabled(cpu)
    monkeypatch.setenv("GLMQ_INT4_KERNEL", "tinygemm")
    assert tg.wanted() and tg.enabled(cuda) and tg.enabled(cpu)
    monkeypatch.setenv("GLMQ_INT4_KERNEL", "fast")
    with pytest.raises(GlmqError, match="'auto', 'glmq' or 'tinygemm'"):
        tg.choice()


@pytest.mark.parametrize("name, value", [("GLMQ_INT4_KERNEL", "fast"), ("GLMQ_AR_FUSED", "yes"),
                                         ("GLMQ_AR_COMPILE", "all"), ("GLMQ_ACT_QUANT", "triton")])
def test_a_bad_switch_is_one_line_before_any_work(tiny_dir, tmp_path, monkeypatch, name, value):
    from glmq.testing import assert_user_error, run_cli_inprocess

    monkeypatch.setenv(name, value)
    out = tmp_path / "img.png"
    assert_user_error(run_cli_inprocess("generate", str(tiny_dir), "--prompt", "a fox", "--size", "64x64", "--steps",
                                        "1", "--device", "cpu", "--out", str(out)), name, value)
    assert list(tmp_path.iterdir()) == []


def test_the_pipeline_runs_with_tinygemm_layers(tiny_dir, tmp_path, monkeypatch):
    """A quantized tiny folder loaded with GLMQ_INT4_KERNEL=tinygemm: its AR's int4 layers are swapped and an
    image comes out."""
    import glmq
    from glmq.testing import run_cli_inprocess

    q = tmp_path / "q"
    proc = run_cli_inprocess("quantize", str(tiny_dir), "--out", str(q), "--recipe", "default", "--no-eval",
                             "--no-layer-outputs")
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("GLMQ_INT4_KERNEL", "tinygemm")
    pipe = glmq.load(q, device="cpu")
    swapped = [m for m in pipe.ar.modules() if isinstance(m, tg.TinygemmLinear)]
    assert swapped and not [m for m in pipe.ar.modules() if isinstance(m, QuantLinear)
                            and m.format.name == "int4"]
    assert pipe.int4_kernel == "tinygemm"
    out = pipe("a red fox", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="pt")
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert pipe.last_times.extra["int4_kernel"] == "tinygemm"  # what glmq bench records as ran.int4_kernel
    monkeypatch.delenv("GLMQ_INT4_KERNEL")
    assert glmq.load(q, device="cpu").int4_kernel == "glmq" and glmq.load(tiny_dir, device="cpu").int4_kernel is None
