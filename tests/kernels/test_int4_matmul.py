"""int4_matmul (W4A16 Triton kernels) against its pure-torch reference, on CPU under Triton's interpreter.

Tolerance (STYLE.md #7): the kernels and the reference both accumulate in float32; the kernel's relative
error against the float32 reference must stay within twice that of torch's own bf16/fp16 matmul of the
dequantized weights (which rounds the weights and the output to that dtype, as the kernels do).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the wrapper reads it at call time; set before any launch

import pytest
import torch

from glmq.kernels.int4_matmul import (GemmConfig, GemvConfig, GemvTcConfig, _launch, int4_dequantize,
                                      int4_matmul, int4_matmul_ref)
from glmq.quant.formats import Int4Format, pack_int4

K = 256


_pack = pack_int4  # glmq's one int4 packer: codes [N, K] in 0..15 -> [N, K // 2], low nibble = even k


def _case(m, n, group, symmetric, bias, dtype=torch.bfloat16, k=K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = (0.01 + 0.02 * torch.rand(n, k // group, generator=gen)).to(torch.bfloat16)
    # float zero points (the format allows them), not just integers
    zero = None if symmetric else (15 * torch.rand(n, k // group, generator=gen)).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, _pack(q), scale, zero, b, q


def _errors(y, x, qweight, scale, zero, group, bias):
    """(kernel error, torch error), both relative to the float32 reference."""
    w = int4_dequantize(qweight, scale, zero, group_size=group)
    ref = x.float() @ w.T + (bias.float() if bias is not None else 0)
    torch_y = x @ w.to(x.dtype).T + (bias if bias is not None else 0)
    norm = ref.norm()
    return ((y.float() - ref).norm() / norm).item(), ((torch_y.float() - ref).norm() / norm).item()


def test_dequantize_matches_layout_bit_exact():
    x, qweight, scale, zero, _, q = _case(1, 6, 32, symmetric=False, bias=False)
    w = int4_dequantize(qweight, scale, zero, group_size=32)
    expected = (q.float() - zero.float().repeat_interleave(32, 1)) * scale.float().repeat_interleave(32, 1)
    assert torch.equal(w, expected)
    assert torch.equal(_pack(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)),
                       torch.tensor([[0x21, 0x0F]], dtype=torch.uint8))
    w_sym = int4_dequantize(qweight, scale, None, group_size=32)
    assert torch.equal(w_sym, (q.float() - 8) * scale.float().repeat_interleave(32, 1))


# Every M (CUDA-core GEMV: 1-3; tensor-core GEMV for several sequences: 8, 16; GEMM: 17, 64) with both N,
# all group sizes; symmetry and bias alternate.
CASES = [(m, n, g, (i % 2 == 0), (i // 2) % 2 == 0)
         for i, (m, n, g) in enumerate((m, n, g) for m in (1, 2, 3, 8, 16, 17, 64) for n in (96, 200)
                                       for g in (32, 64, 128))]


@pytest.mark.parametrize("m,n,kind", [(1, 96, GemvConfig), (4, 200, GemvConfig), (1, 4096, GemvTcConfig),
                                      (5, 96, GemvTcConfig), (16, 200, GemvTcConfig), (17, 200, GemmConfig)])
def test_rows_choose_the_kernel(m, n, kind):
    """Up to 16 rows (a decode step of up to 16 sequences) read the weights once, in a GEMV; the CUDA-core
    GEMV only up to 4 rows and small N."""
    from glmq.kernels.int4_matmul import GEMV_MAX_ROWS, _gemm_config, _gemv_config

    chosen = _gemv_config(m, n, K, 64) if m <= GEMV_MAX_ROWS else _gemm_config(m, n, K, 64)
    assert isinstance(chosen, kind)


@pytest.mark.parametrize("m,n,group,symmetric,bias", CASES)
def test_kernel_matches_reference(m, n, group, symmetric, bias):
    x, qweight, scale, zero, b, _ = _case(m, n, group, symmetric, bias, seed=m * 1000 + n + group)
    y = int4_matmul(x, qweight, scale, zero, group_size=group, bias=b)
    err, torch_err = _errors(y, x, qweight, scale, zero, group, b)
    print(f"M={m} N={n} G={group} sym={symmetric} bias={bias}: kernel {err:.2e}, torch bf16 {torch_err:.2e}")
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert err <= 2 * torch_err
    assert torch.allclose(y.float(), int4_matmul_ref(x, qweight, scale, zero, group_size=group, bias=b).float(),
                          rtol=0.05, atol=0.05 * y.float().abs().max().item())


VARIANTS = [
    GemvConfig(block_n=32, groups_per_tile=2, split_k=1),
    GemvConfig(block_n=32, groups_per_tile=1, split_k=3),  # split-K reduction, ragged split
    GemvConfig(block_n=64, groups_per_tile=4, split_k=2),  # ragged last K-tile (clamped groups)
    GemvTcConfig(block_n=32, block_k=64, split_k=1),
    GemvTcConfig(block_n=64, block_k=128, split_k=3),
    GemvTcConfig(block_n=32, block_k=64, split_k=2, fold_scale=True, prefetch_x=False, prefetch_sz=True),
    GemmConfig(block_m=16, block_n=32, block_k=128, num_warps=4),  # K-tile spans several groups (G=32/64)
    GemmConfig(block_m=32, block_n=64, block_k=32, num_warps=4),
]


@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("group,symmetric,m", [(32, False, 3), (128, True, 1), (64, False, 4)])
def test_kernel_variants(config, group, symmetric, m):
    x, qweight, scale, zero, b, _ = _case(m, 100, group, symmetric, bias=True, k=384, seed=group + m)
    y = _launch(x, qweight, scale, zero, group, b, config)
    err, torch_err = _errors(y, x, qweight, scale, zero, group, b)
    print(f"{config} G={group} M={m}: kernel {err:.2e}, torch bf16 {torch_err:.2e}")
    assert err <= 2 * torch_err
    assert torch.equal(y, _launch(x, qweight, scale, zero, group, b, config))  # split-K is deterministic


def test_float16_leading_dims_and_strided_input():
    x, qweight, scale, zero, b, _ = _case(6, 96, 64, symmetric=False, bias=True, dtype=torch.float16)
    x3 = x.reshape(2, 3, K)
    y = int4_matmul(x3, qweight, scale, zero, group_size=64, bias=b)
    assert y.shape == (2, 3, 96) and y.dtype == torch.float16
    err, torch_err = _errors(y.reshape(6, 96), x, qweight, scale, zero, 64, b)
    print(f"fp16 [2,3,K]: kernel {err:.2e}, torch fp16 {torch_err:.2e}")
    assert err <= 2 * torch_err
    wide = torch.randn(2, 2 * K, dtype=torch.bfloat16)[:, ::2]  # stride 2 along K: copied, same result
    assert torch.equal(int4_matmul(wide, qweight, scale, group_size=64),
                       int4_matmul(wide.contiguous(), qweight, scale, group_size=64))
    assert int4_matmul(x[:0], qweight, scale, group_size=64).shape == (0, 96)


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(2, K)), "bfloat16 or float16"),
    (dict(x=torch.randn(2, K + 2, dtype=torch.bfloat16)), "must equal 2 \\* qweight.shape\\[1\\]"),
    (dict(qweight=torch.zeros(96, K // 2, dtype=torch.int8)), "uint8"),
    (dict(group_size=48), "group_size must be one of"),
    (dict(scale=torch.ones(96, 3, dtype=torch.bfloat16)), "scale must be"),
    (dict(zero=torch.ones(96, 3, dtype=torch.bfloat16)), "zero must be"),
    (dict(bias=torch.ones(95, dtype=torch.bfloat16)), "bias must be"),
    (dict(qweight=torch.zeros(K // 2, 96, dtype=torch.uint8).t()), "contiguous"),
])
def test_host_checks_name_the_constraint(change, message):
    x, qweight, scale, zero, b, _ = _case(2, 96, 64, symmetric=False, bias=True)
    args = dict(x=x, qweight=qweight, scale=scale, zero=zero, group_size=64, bias=b) | change
    with pytest.raises(ValueError, match=message):
        int4_matmul(args.pop("x"), args.pop("qweight"), args.pop("scale"), args.pop("zero"), **args)


def test_custom_op_has_fake_impl():
    x, qweight, scale, zero, b, _ = _case(3, 96, 64, symmetric=False, bias=True)
    torch.library.opcheck(torch.ops.glmq.int4_matmul.default, (x, qweight, scale, zero, 64, b),
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    x3 = x.reshape(1, 3, K)
    with FakeTensorMode() as mode:
        y = int4_matmul(mode.from_tensor(x3), mode.from_tensor(qweight), mode.from_tensor(scale), group_size=64)
    assert y.shape == (1, 3, 96) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 128])
def test_kernel_dequantize_equals_the_format_bit_for_bit(group, symmetric):
    # kernels/ keeps its own host-side unpacking (it imports nothing from glmq): it must read glmq's int4
    # layout exactly as glmq.quant.formats.Int4Format does, nibble order and zero point included.
    n, k = 40, 4 * group
    _, qweight, scale, zero, _, q = _case(1, n, group, symmetric, False, k=k, seed=3)
    fmt = Int4Format(group_size=group, symmetric=symmetric)
    stored = {"weight": qweight, "weight_scale": scale} | ({} if symmetric else {"weight_zero": zero})
    ours = int4_dequantize(qweight, scale, zero, group_size=group)
    theirs = fmt.dequantize(stored, (n, k))
    print(f"group {group} symmetric {symmetric}: max |kernel - format| = {(ours - theirs).abs().max()}")
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    # random codes differ between neighbours, so a swapped nibble order or a wrong zero point fails above
    assert (q[:, 0::2] != q[:, 1::2]).any()
