"""glmq's bitsandbytes layouts against bitsandbytes itself (CPU): same state-dict entries, same forward."""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from glmq.errors import GlmqError  # noqa: E402
from glmq.export import bnb_layout as bl  # noqa: E402

# Awkward and real shapes (out_features, in_features): GLM-Image's glyph projector input (1472), a block
# count that leaves a partial nested block (130*192/64 = 390 = 256 + 134), a tiny odd layer.
SHAPES = [(256, 1472), (130, 192), (48, 40), (96, 4096)]


def _linear(out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        lin.weight[1, :7] *= 20  # a few outliers
    return lin.to(dtype)


def _bnb_linear4bit(lin: torch.nn.Linear, double_quant: bool) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=True, compute_dtype=torch.bfloat16,
        compress_statistics=double_quant, quant_type="nf4",
    )
    layer.load_state_dict(lin.state_dict())
    return layer.to(lin.weight.dtype).to("cpu")  # .to(device) quantizes


def _pure_torch_blockwise(values: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch 8-bit blockwise quantizer (its reference backend), bypassing the CPU
    extension that the dispatcher would pick."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(keys, values, F.create_dynamic_map(), 256)[0]


def _check_nested_codes(weight: torch.Tensor, ours: dict, cpu_codes: torch.Tensor) -> int:
    """The double-quantized absmax codes: equal to bitsandbytes' pure-PyTorch backend, and never farther
    from the value than the CPU extension's choice (whose lookup is approximate). Returns how many differ
    from the CPU extension."""
    absmax = weight.float().reshape(-1, 64).abs().amax(1)
    centred = absmax - absmax.mean()
    assert torch.equal(ours["weight.absmax"], _pure_torch_blockwise(centred))
    code = bl.dynamic_map()
    scaled = centred / ours["weight.nested_absmax"].repeat_interleave(256)[: centred.numel()]
    ours_err = (scaled - code[ours["weight.absmax"].long()]).abs()
    cpu_err = (scaled - code[cpu_codes.long()]).abs()
    assert (ours_err <= cpu_err).all()
    return int((ours["weight.absmax"] != cpu_codes).sum())


def _assert_same_entries(ref: dict, ours: dict, skip: tuple[str, ...] = ()) -> None:
    assert list(ref) == list(ours), (list(ref), list(ours))
    for key in ref:
        a, b = ref[key], ours[key]
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        if key not in skip:
            assert torch.equal(a, b), (key, (a != b).sum().item())


def test_constants_match_bitsandbytes() -> None:
    assert torch.equal(bl.dynamic_map(), F.create_dynamic_map())
    assert torch.equal(torch.tensor(bl.NF4_CODE, dtype=torch.float32), F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_nf4_entries_equal_bitsandbytes(shape, double_quant: bool, dtype: torch.dtype) -> None:
    lin = _linear(*shape, dtype)
    ref = _bnb_linear4bit(lin, double_quant).state_dict()
    ours = bl.nf4_state_dict(lin.weight, lin.bias, double_quant=double_quant)
    print(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    if double_quant:
        differ = _check_nested_codes(lin.weight, ours, ref["weight.absmax"])
        print(f"nested absmax codes differing from the CPU extension: {differ} of {ref['weight.absmax'].numel()}")
        assert differ <= 0.05 * ref["weight.absmax"].numel()
        _assert_same_entries(ref, ours, skip=("weight.absmax",))
    else:
        _assert_same_entries(ref, ours)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"{s[0]}x{s[1]}")
def test_nf4_loads_into_linear4bit(shape, double_quant: bool) -> None:
    """Our entries load into a fresh Linear4bit; bitsandbytes decodes them exactly as our reference decoder
    does, and the layer's forward is the dense linear of that decode (= bitsandbytes' own layer where the
    entries agree)."""
    lin = _linear(*shape, torch.bfloat16, seed=1)
    reference_layer = _bnb_linear4bit(lin, double_quant)
    entries = bl.nf4_state_dict(lin.weight, lin.bias, double_quant=double_quant)

    layer = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=True, compute_dtype=torch.bfloat16,
        compress_statistics=double_quant, quant_type="nf4",
    )
    stats = {k.removeprefix("weight."): v for k, v in entries.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(entries["weight"], stats, device="cpu", module=layer)
    layer.bias = torch.nn.Parameter(entries["bias"], requires_grad=False)

    dense = bl.nf4_dequantize(entries, torch.bfloat16)
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), dense)
    w = lin.weight.float()
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - dense.float()).pow(2).sum()).item()
    print(f"{shape} dq={double_quant}: NF4 weight SQNR {sqnr:.2f} dB")
    assert sqnr > 18.5

    x = torch.randn(5, lin.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        y_ref = reference_layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, dense, entries["bias"]))
    same_entries = all(torch.equal(v, reference_layer.state_dict()[k]) for k, v in entries.items())
    print("entries identical to bitsandbytes':", same_entries)
    if same_entries:
        assert torch.equal(y, y_ref)


def test_nested_absmax_takes_the_nearest_code() -> None:
    """Block absmaxes of 0.25, 0.5 and 0.75 in equal numbers put ``absmax - mean`` exactly at 0 for a third
    of the blocks, the densest spot of the 8-bit map. bitsandbytes' pure-PyTorch backend stores code 0.0
    there, as glmq does; its CPU extension's approximate lookup stores a neighbour (about 2e-5)."""
    torch.manual_seed(3)
    w = torch.rand(48, 64) * torch.randn(48, 64).sign()
    w[:, 0] = 1.0  # each row is one block; pin its absmax
    w *= torch.tensor([0.25, 0.5, 0.75]).repeat_interleave(16).unsqueeze(1)
    ours = bl.nf4_state_dict(w, double_quant=True)
    _, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    differ = _check_nested_codes(w, ours, qs.absmax)
    print(f"{differ} of {qs.absmax.numel()} nested codes differ from the CPU extension's")
    assert bl.dynamic_map()[ours["weight.absmax"][16:32].long()].eq(0).all()
    assert differ == 16


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int8_entries_equal_bitsandbytes(shape, dtype: torch.dtype) -> None:
    lin = _linear(*shape, dtype, seed=2)
    with torch.no_grad():
        lin.weight[3] = 0  # an all-zero row
    layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to(dtype).to("cpu")
    ref = layer.state_dict()
    ours = bl.int8_state_dict(lin.weight, lin.bias)
    _assert_same_entries(ref, ours)

    fresh = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
    fresh.weight = bnb.nn.Int8Params(ours["weight"], requires_grad=False, has_fp16_weights=False)
    fresh.weight.CB, fresh.weight.SCB = ours["weight"], ours["SCB"]
    fresh.bias = torch.nn.Parameter(ours["bias"], requires_grad=False)
    x = torch.randn(4, lin.in_features, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    w = lin.weight.float()
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - bl.int8_dequantize(ours)).pow(2).sum()).item()
    print(f"{shape} {dtype}: int8 weight SQNR {sqnr:.2f} dB")
    assert sqnr > 35


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="nf4", double_quant=True, compute_dtype="bfloat16", skip_modules=["lm_head"]),
        dict(mode="nf4", double_quant=False, compute_dtype="float16"),
        dict(mode="int8", skip_modules=["proj_out", "norm_out"]),
    ],
    ids=["nf4-dq", "nf4", "int8"],
)
def test_quantization_config_matches_libraries(kwargs) -> None:
    import diffusers
    import transformers

    ours = bl.bnb_quantization_config(**kwargs)
    four = kwargs["mode"] == "nf4"
    lib_kwargs = dict(llm_int8_skip_modules=kwargs.get("skip_modules"))
    if four:
        lib_kwargs |= dict(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=kwargs["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, kwargs["compute_dtype"]),
        )
    else:
        lib_kwargs |= dict(load_in_8bit=True)
    for lib in (transformers, diffusers):
        expected = lib.BitsAndBytesConfig(**lib_kwargs).to_dict()
        assert json.dumps(ours) == json.dumps(expected), lib.__name__


def test_refuses_bad_input() -> None:
    with pytest.raises(GlmqError, match="2-D"):
        bl.nf4_state_dict(torch.zeros(64))
    with pytest.raises(GlmqError, match="block size"):
        bl.nf4_state_dict(torch.zeros(4, 64), blocksize=48)
    with pytest.raises(GlmqError, match="float32, float16 or bfloat16"):
        bl.int8_state_dict(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(GlmqError, match="fp16 range"):
        bl.int8_state_dict(torch.full((2, 8), 1e6))
    with pytest.raises(GlmqError, match="unknown bitsandbytes mode"):
        bl.bnb_quantization_config("fp4")


@pytest.mark.parametrize(("mode", "double_quant"), [("nf4", False), ("nf4", True), ("int8", False)])
def test_transformers_loads_checkpoint_written_from_our_entries(tmp_path, mode: str, double_quant: bool) -> None:
    """End to end on CPU: a safetensors checkpoint holding our entries plus our ``quantization_config``
    loads through transformers' ``from_pretrained`` to the same model that transformers builds by
    quantizing the bf16 checkpoint itself (diffusers' bitsandbytes loader requires a GPU, so only
    transformers is exercised here)."""
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "bf16")

    skip = ["lm_head"]
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skip}
    entries: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, param = key.rsplit(".", 1)
        if module in linears and param == "weight":
            layer = bl.nf4_state_dict(value, double_quant=double_quant) if mode == "nf4" else bl.int8_state_dict(value)
            entries |= {f"{module}.{k}": v for k, v in layer.items()}
        else:
            entries[key] = value
    out = tmp_path / "ours"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in entries.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict() | {"torch_dtype": "bfloat16"}
    cfg["quantization_config"] = bl.bnb_quantization_config(mode, double_quant=double_quant, skip_modules=skip)
    (out / "config.json").write_text(json.dumps(cfg))

    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")
    if mode == "nf4":
        qc = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip,
        )
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    theirs = LlamaForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.bfloat16, device_map="cpu", quantization_config=qc
    )

    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"{mode} dq={double_quant}: entries differing from transformers' own quantization: {differing}")
    assert all(k.endswith(".weight.absmax") for k in differing)  # only the nested codes (see above)
    if not differing:
        x = torch.randint(0, 128, (1, 9))
        with torch.no_grad():
            assert torch.equal(ours(x).logits, theirs(x).logits)
