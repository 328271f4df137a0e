"""The inline PTX that unpacks int4 weights on the GPU, executed on the CPU (issue #13: the interpreter takes
another branch, so without this a broken unpack on the GPU path would pass every CPU test).

A small emulator runs the kernel's own PTX strings (``_UNPACK_BF16`` ... as the kernel passes them to
``tl.inline_asm_elementwise``) instruction by instruction: ``mov``, ``prmt``, ``shr``, ``lop3`` and packed
``fma.rn`` on bf16x2/f16x2, each with PTX's documented semantics (``fma.rn``: the exact a*b+c rounded once to
nearest even). Operands follow Triton's packing for ``pack=4``: the four weight bytes in one register
(element j in byte j), 16-bit inputs and outputs two per register (element 2r+h in half h of register r).
Every byte value, with random zero points and scales, must give bit for bit the numbers the interpreter
branch computes: (q - z) rounded to the 16-bit type, times s rounded again (or (q - z) alone).
"""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch

from glmq.kernels import int4_matmul as I4

MASK32 = 0xFFFFFFFF


def _round_bits(x: Fraction, fmt: str) -> int:
    """``x`` rounded to nearest even in bf16 or fp16 (normal range), as its 16-bit pattern."""
    if x == 0:
        return 0x8000 if fmt == "bf16" and x < 0 else 0
    mant, bias = (7, 127) if fmt == "bf16" else (10, 15)
    sign = 1 if x < 0 else 0
    ax = abs(x)
    e = ax.numerator.bit_length() - ax.denominator.bit_length()
    if Fraction(2) ** e > ax:
        e -= 1
    ulp = Fraction(2) ** (e - mant)
    q = ax / ulp
    n = q.numerator // q.denominator
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    if n == 2 ** (mant + 1):  # rounding carried into the next binade
        n //= 2
        e += 1
    assert 1 - bias <= e <= bias, f"{x} outside the normal range of {fmt}"
    return (sign << 15) | ((e + bias) << mant) | (n - 2 ** mant)


def _value(bits: int, fmt: str) -> Fraction:
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
    return Fraction(torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).float().item())


def _halves(reg: int) -> tuple[int, int]:
    return reg & 0xFFFF, (reg >> 16) & 0xFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    src = (b << 32) | a  # bytes 0-3 from a, 4-7 from b
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:  # sign replication
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute ``asm`` (the subset the unpack uses) with ``$n`` operands; returns the registers."""
    regs = dict(operands)

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        return int(tok, 16) if tok.lower().startswith("0x") else int(tok)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        d = args[0]
        if op == "mov.b32":
            regs[d] = val(args[1]) & MASK32
        elif op == "prmt.b32":
            regs[d] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "shr.b32":
            regs[d] = (val(args[1]) & MASK32) >> val(args[2])
        elif op == "lop3.b32":
            regs[d] = _lop3(val(args[1]), val(args[2]), val(args[3]), val(args[4]))
        elif (m := re.fullmatch(r"fma\.rn\.(bf16|f16)x2", op)):
            fmt = "bf16" if m.group(1) == "bf16" else "f16"
            lanes = []
            for a, b, c in zip(_halves(val(args[1])), _halves(val(args[2])), _halves(val(args[3]))):
                exact = _value(a, fmt) * _value(b, fmt) + _value(c, fmt)
                lanes.append(_round_bits(exact, fmt))
            regs[d] = lanes[0] | (lanes[1] << 16)
        else:
            raise NotImplementedError(f"PTX emulator: {op}")
    return regs


def unpack_on_gpu_path(asm: str, packed: torch.Tensor, neg_zero: torch.Tensor, scale: torch.Tensor | None,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-nibble, high-nibble) weights the PTX produces for uint8 ``packed`` [4n], per-element -zero and
    scale (``dtype``), four elements per asm invocation as Triton packs them."""
    bits16 = lambda t: t.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()  # noqa: E731
    nz, sc = bits16(neg_zero), bits16(scale) if scale is not None else None
    lo, hi = [], []
    for j in range(0, packed.numel(), 4):
        b = packed[j:j + 4].tolist()
        ops = {"$4": b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24),
               "$5": nz[j] | (nz[j + 1] << 16), "$6": nz[j + 2] | (nz[j + 3] << 16)}
        if sc is not None:
            ops.update({"$7": sc[j] | (sc[j + 1] << 16), "$8": sc[j + 2] | (sc[j + 3] << 16)})
        r = run_ptx(asm, ops)
        lo += [*_halves(r["$0"]), *_halves(r["$1"])]
        hi += [*_halves(r["$2"]), *_halves(r["$3"])]
    as16 = lambda v: torch.tensor(v, dtype=torch.int32).to(torch.int16).view(dtype)  # noqa: E731
    return as16(lo), as16(hi)


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.arange(256, dtype=torch.uint8)  # every byte value
    zero = (15 * torch.rand(256, generator=gen)).to(dtype)  # float zero points, as the format allows
    scale = (0.004 + 0.03 * torch.rand(256, generator=gen)).to(dtype)
    return packed, zero, scale


def _expected(packed, zero, scale, dtype):
    """The interpreter branch's numbers: (q - z) rounded to ``dtype``, then times s rounded again."""
    out = []
    for q in (packed & 0xF, packed >> 4):
        w = (q.float() - zero.float()).to(dtype)
        out.append(w if scale is None else (w.float() * scale.float()).to(dtype))
    return out


ASMS = [("bf16_scaled", "_UNPACK_BF16", torch.bfloat16, True), ("fp16_scaled", "_UNPACK_FP16", torch.float16, True),
        ("bf16_zero_only", "_UNPACK_Z_BF16", torch.bfloat16, False),
        ("fp16_zero_only", "_UNPACK_Z_FP16", torch.float16, False)]


@pytest.mark.parametrize("name,attr,dtype,scaled", ASMS, ids=[a[0] for a in ASMS])
def test_gpu_unpack_ptx_matches_the_reference_bit_for_bit(name, attr, dtype, scaled):
    asm = getattr(I4, attr)
    asm = getattr(asm, "value", asm)
    packed, zero, scale = _inputs(dtype)
    lo, hi = unpack_on_gpu_path(asm, packed, -zero, scale if scaled else None, dtype)
    want_lo, want_hi = _expected(packed, zero, scale if scaled else None, dtype)
    bad = (lo.view(torch.int16) != want_lo.view(torch.int16)).sum() + (hi.view(torch.int16) != want_hi.view(torch.int16)).sum()
    print(f"{name}: {int(bad)} of 512 weights differ")
    assert torch.equal(lo.view(torch.int16), want_lo.view(torch.int16))
    assert torch.equal(hi.view(torch.int16), want_hi.view(torch.int16))


@pytest.mark.parametrize("fault", [("0x4140", "0x4041"), ("0x000F000F", "0x000F001F"), ("shr.b32 c, a, 4", "shr.b32 c, a, 3"),
                                   ("fma.rn.T $0, a, $7, nzero", "fma.rn.T $0, a, $8, nzero")],
                         ids=["byte-selector", "nibble-mask", "high-shift", "scale-lane"])
def test_the_emulator_catches_a_broken_unpack(fault):
    """A wrong selector, mask, shift or scale register in the PTX text is caught on the CPU."""
    old, new = fault
    assert old in I4._UNPACK_ASM
    broken = I4._specialize(I4._UNPACK_ASM.replace(old, new), True)
    packed, zero, scale = _inputs(torch.bfloat16)
    lo, hi = unpack_on_gpu_path(broken.value, packed, -zero, scale, torch.bfloat16)
    want_lo, want_hi = _expected(packed, zero, scale, torch.bfloat16)
    assert not (torch.equal(lo.view(torch.int16), want_lo.view(torch.int16))
                and torch.equal(hi.view(torch.int16), want_hi.view(torch.int16)))


def test_fma_rounding_is_round_to_nearest_even():
    """The emulator's fma rounds the exact result once: bf16 1 + 2^-8 (a tie) goes to 1, 1 + 3*2^-9 to
    1 + 2^-7."""
    one = 0x3F80
    tiny = _round_bits(Fraction(1, 256), "bf16")
    r = run_ptx("fma.rn.bf16x2 $0, $1, $2, $3;", {"$1": one | (one << 16), "$2": one | (one << 16),
                                                  "$3": tiny | (_round_bits(Fraction(3, 512), "bf16") << 16)})
    assert _halves(r["$0"]) == (0x3F80, 0x3F81)
