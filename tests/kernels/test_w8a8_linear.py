"""W8A8 paths (fp8 / int8) on CPU: the row-quantization Triton kernel under the interpreter against its
reference (bit-exact), the linears' references against a float32 linear (SQNR, recorded thresholds), and
torch._int_mm's int8 path against its reference. The fp8 _scaled_mm path needs an sm_89+ GPU: skipped here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from glmq.kernels.w8a8_linear import (fp8_linear, fp8_linear_ref, fp8_supported, int8_linear, int8_linear_ref,
                                      quantize_rows, quantize_rows_ref, weight_only_linear)
from glmq.quant.metrics import sqnr_db

# SQNR (dB) of a W8A8 reference against the float32 linear of the same dequantized weights, i.e. the cost
# of quantizing activations per row, measured on Gaussian activations: fp8 e4m3 31.6, int8 42.3.
SQNR_FP8_ACT_DB = 29.0
SQNR_INT8_ACT_DB = 40.0


_sqnr = sqnr_db  # glmq's one SQNR: (reference, test)


def _weights(n, k, fmt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    qmax = 448.0 if fmt == torch.float8_e4m3fn else 127.0
    s = w.abs().amax(1, keepdim=True) / qmax
    y = (w / s).clamp(-qmax, qmax)
    q = y.to(fmt) if fmt == torch.float8_e4m3fn else y.round().to(torch.int8)
    return q, s, torch.randn(n, generator=gen).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("m,k", [(3, 100), (5, 1472), (2, 9000)])
def test_quantize_rows_kernel_bit_exact(dtype, m, k):
    gen = torch.Generator().manual_seed(m + k)
    x = (3 * torch.randn(m, k, generator=gen)).to(torch.bfloat16)
    x[0] = 0  # an all-zero row: finite scale, zero codes
    x[-1, 7] = 1e4  # an outlier row
    q, s = quantize_rows(x, dtype)
    q_ref, s_ref = quantize_rows_ref(x, dtype)
    mismatches = (q.float() != q_ref.float()).sum().item()
    print(f"{dtype} [{m}, {k}]: {mismatches} code mismatches")
    assert q.dtype == dtype and s.shape == (m, 1) and s.dtype == torch.float32
    assert mismatches == 0 and torch.equal(s, s_ref)
    assert torch.isfinite(s).all() and (q[0].float() == 0).all()


def test_quantize_rows_op_checks():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.glmq.quantize_rows.default, (x, torch.int8),
                          test_utils=("test_schema", "test_faketensor"))
    acc = torch.randint(-1000, 1000, (4, 32), dtype=torch.int32)
    torch.library.opcheck(torch.ops.glmq.int8_rescale.default,
                          (acc, torch.rand(4, 1), torch.rand(32, 1), torch.randn(32), torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.int8"):
        quantize_rows(x, torch.float16)
    with pytest.raises(ValueError, match="stride 1 along K"):
        quantize_rows(x.t(), torch.int8)


@pytest.mark.parametrize("fmt,ref_fn,threshold", [
    (torch.float8_e4m3fn, fp8_linear_ref, SQNR_FP8_ACT_DB), (torch.int8, int8_linear_ref, SQNR_INT8_ACT_DB)])
def test_w8a8_references_sqnr(fmt, ref_fn, threshold):
    q, s, b = _weights(96, 1472, fmt)
    x = torch.randn(2, 5, 1472).to(torch.bfloat16)
    ref = x.float() @ (q.float() * s).T + b.float()
    y = ref_fn(x, q, s, b)
    sqnr = _sqnr(ref, y)
    print(f"{fmt} W8A8 reference vs float32 linear: {sqnr:.1f} dB (threshold {threshold})")
    assert y.shape == (2, 5, 96) and y.dtype == torch.bfloat16
    assert sqnr >= threshold


def test_int8_int_mm_matches_reference():
    q, s, b = _weights(64, 256, torch.int8, seed=1)
    x = torch.randn(20, 256).to(torch.bfloat16)
    y, ref = int8_linear(x, q, s, b), int8_linear_ref(x, q, s, b)
    # integer dot products are exact in both; only the final float32 rescale and bf16 rounding may differ
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"int8 _int_mm vs reference: relative difference {err:.2e}")
    assert err <= 2 ** -9  # below one bf16 rounding


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.int8])
def test_weight_only_fallback(fmt):
    q, s, b = _weights(96, 256, fmt, seed=2)
    x = torch.randn(7, 256).to(torch.bfloat16)
    w = q.float() * s
    ref = x.float() @ w.T + b.float()
    torch_y = x @ w.to(torch.bfloat16).T + b
    err = ((weight_only_linear(x, q, s, b).float() - ref).norm() / ref.norm()).item()
    torch_err = ((torch_y.float() - ref).norm() / ref.norm()).item()
    print(f"{fmt} weight-only: {err:.2e}, torch bf16 {torch_err:.2e}")
    assert err <= 2 * torch_err


def test_host_checks():
    q, s, b = _weights(96, 256, torch.int8)
    x = torch.randn(3, 256).to(torch.bfloat16)
    with pytest.raises(ValueError, match="weight must be torch.float8_e4m3fn"):
        fp8_linear(x, q, s)
    with pytest.raises(ValueError, match="weight_scale must be float32 \\[N, 1\\]"):
        int8_linear(x, q, s.squeeze(1))
    with pytest.raises(ValueError, match="must equal weight.shape\\[1\\]"):
        int8_linear(x[:, :128], q, s)
    q8, s8, _ = _weights(96, 256, torch.float8_e4m3fn)
    if not fp8_supported(x.device):
        with pytest.raises(ValueError, match="compute capability >= 8.9"):
            fp8_linear(x, q8, s8)


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported(torch.device("cuda"))),
                    reason="needs a CUDA GPU of compute capability >= 8.9 (fp8 tensor cores)")
def test_fp8_scaled_mm_matches_reference_gpu():
    q, s, b = _weights(256, 1024, torch.float8_e4m3fn)
    x = torch.randn(33, 1024).to(torch.bfloat16)
    q, s, b, x = q.cuda(), s.cuda(), b.cuda(), x.cuda()
    y, ref = fp8_linear(x, q, s, b).float(), fp8_linear_ref(x, q, s, b).float()
    err = ((y - ref).norm() / ref.norm()).item()
    print(f"fp8 _scaled_mm vs reference: {err:.2e}")
    assert err <= 2 ** -7  # same codes; bf16 output rounding and accumulation order only


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_act_quant_inductor_traces_the_reference(dtype, monkeypatch):
    """GLMQ_ACT_QUANT=inductor: inside torch.compile the rows are quantized by the reference's torch operations
    (no glmq::quantize_rows op in the graph), fused with the operation producing x, and the codes and scales
    are the reference's. Unset, the graph calls the custom op."""
    import torch._dynamo

    from glmq.kernels.w8a8_linear import act_quant_choice

    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(6, 80, generator=gen)).to(torch.bfloat16)
    norm = torch.nn.LayerNorm(80, elementwise_affine=False)

    def producer_then_quant(t):
        return quantize_rows(norm(t.float()).to(torch.bfloat16) * 2 + 1, dtype)

    want = quantize_rows_ref(norm(x.float()).to(torch.bfloat16) * 2 + 1, dtype)
    for choice, has_op in (("inductor", False), ("kernel", True)):
        monkeypatch.setenv("GLMQ_ACT_QUANT", choice)
        assert act_quant_choice() == choice
        torch._dynamo.reset()
        graphs = []

        def backend(gm, example_inputs, graphs=graphs):
            graphs.append(str(gm.graph))
            return gm.forward

        q, s = torch.compile(producer_then_quant, backend=backend, fullgraph=True)(x)
        assert graphs and ("quantize_rows" in graphs[0]) == has_op, (choice, graphs[0])
        assert torch.equal(s, want[1])
        assert torch.equal(q.view(torch.uint8) if dtype != torch.int8 else q,
                           want[0].view(torch.uint8) if dtype != torch.int8 else want[0])
    # and through Inductor itself (what the DiT compiles with): fused with its producer, Inductor keeps the
    # producer's float32 result instead of rounding it to bf16 in between, and quantizes that: the codes are
    # the reference's on the float32 x, the scales within 2 float32 ulps (its division may round otherwise).
    monkeypatch.setenv("GLMQ_ACT_QUANT", "inductor")
    torch._dynamo.reset()
    q, s = torch.compile(producer_then_quant, fullgraph=True)(x)
    want32 = quantize_rows_ref(norm(x.float()) * 2 + 1, dtype)
    torch.testing.assert_close(s, want32[1], rtol=2.4e-7, atol=0)
    assert torch.equal(q.float(), want32[0].float())
    monkeypatch.setenv("GLMQ_ACT_QUANT", "fast")
    with pytest.raises(ValueError, match="GLMQ_ACT_QUANT"):
        act_quant_choice()
