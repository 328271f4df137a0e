"""The DiT attention precision: chosen per recipe, recorded in the checkpoint, applied (or overridden) by the runtime.

CPU only. Kernel numerics are covered by tests/kernels/test_attention.py; here the question is which
precision runs where, and that the recipe's length threshold really switches kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before glmq.kernels' Triton code is first imported

import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from glmq.errors import GlmqError  # noqa: E402
from glmq.quant.recipe import AttentionPolicy, load_recipe  # noqa: E402
from glmq.runtime import attention as RA  # noqa: E402


def _write_recipe(tmp_path, attention: str) -> str:
    base = load_recipe("fast").source
    text = open(base, encoding="utf-8").read()
    start = text.index("[attention]")
    end = text.index("[[rules]]")
    p = tmp_path / "r.toml"
    p.write_text(text[:start] + attention + "\n" + text[end:], encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------------------------------------ recipes
def test_recipes_and_the_kernel_know_the_same_precisions():
    from glmq.kernels._attention import PRECISIONS
    from glmq.quant.recipe import ATTENTION_PRECISIONS

    assert sorted(ATTENTION_PRECISIONS) == sorted(PRECISIONS)


def test_shipped_recipes_state_their_attention():
    for name in ("default", "fast", "tier16"):
        assert load_recipe(name).attention == AttentionPolicy("fp8", 8192)
    for name in ("ampere", "quality"):
        assert load_recipe(name).attention == AttentionPolicy("bf16", 0)
    assert load_recipe("default").summary()["attention"] == {"dit": "fp8", "min_tokens": 8192}


@pytest.mark.parametrize("table, message", [
    ('[attention]\ndit = "fp4"\n', "unknown dit precision 'fp4'; valid: bf16, fp8, int8"),
    ('[attention]\ndit = "fp8"\nmin_tokens = -1\n', "min_tokens must be a non-negative integer"),
    ('[attention]\ndit = "fp8"\nmin_tokens = 1.5\n', "min_tokens must be a non-negative integer"),
    ('[attention]\nprecision = "fp8"\n', "unknown key 'precision'; valid: dit, min_tokens"),
    ('attention = "fp8"\n', "[attention] must be a table"),
])
def test_bad_attention_tables_are_refused(tmp_path, table, message):
    with pytest.raises(GlmqError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(_write_recipe(tmp_path, table))


def test_a_recipe_without_the_table_keeps_bf16(tmp_path):
    assert load_recipe(_write_recipe(tmp_path, "")).attention == AttentionPolicy()


# ------------------------------------------------------------------------------------------- the policy
def _qcfg(dit, min_tokens=0):
    return {"quantization_config": {"recipe": {"name": "x", "attention": {"dit": dit, "min_tokens": min_tokens}}}}


def test_policy_reads_the_checkpoint_and_honours_overrides():
    cpu = torch.device("cpu")
    assert RA.attention_policy(None, {}, cpu) == ("bf16", 0)  # an unquantized folder
    assert RA.attention_policy(None, _qcfg("fp8", 8192), cpu) == ("fp8", 8192)
    assert RA.attention_policy("int8", _qcfg("fp8", 8192), cpu) == ("int8", 0)  # explicit: every length
    assert RA.attention_policy("bf16", _qcfg("fp8", 8192), cpu) == ("bf16", 0)
    with pytest.raises(GlmqError, match="unknown attention precision 'fp4'"):
        RA.attention_policy("fp4", {}, cpu)
    with pytest.raises(GlmqError, match="asks for DiT attention precision 'fp6'"):
        RA.attention_policy(None, _qcfg("fp6"), cpu)


@pytest.mark.parametrize("capability, expected", [((8, 0), "int8"), ((8, 6), "int8"), ((8, 9), "fp8"), ((9, 0), "fp8")])
def test_fp8_falls_back_to_int8_without_fp8_tensor_cores(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision, _ = RA.attention_policy(None, _qcfg("fp8", 8192), torch.device("cuda"))
    assert precision == expected
    assert any("8.9" in str(w.message) for w in caught) == (expected == "int8")


# --------------------------------------------------------------------------- the threshold switches kernels
def _tiny_dit():
    from diffusers import GlmImageTransformer2DModel

    torch.manual_seed(0)
    return GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=128,
    ).eval().to(torch.bfloat16)


def _forward(model):
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=g).bfloat16(),
                  prior_token_id=torch.randint(0, 128, (1, 16), generator=g),
                  prior_token_drop=torch.tensor([False]), timestep=torch.tensor([500.0]).bfloat16(),
                  target_size=torch.tensor([[64.0, 64.0]]).bfloat16(), crop_coords=torch.zeros(1, 2).bfloat16())
    with torch.no_grad():
        return model(**inputs).sample.float()


def test_min_tokens_decides_which_kernel_runs():
    model = _tiny_dit()  # joint sequence: 5 glyph + 16 image tokens = 21
    RA.install_dit_attention(model, precision="bf16", backend="ref")
    bf16 = _forward(model)
    RA.install_dit_attention(model, precision="fp8", backend="ref", min_tokens=22)
    assert torch.equal(_forward(model), bf16)  # 21 < 22: the bf16 kernel
    RA.install_dit_attention(model, precision="fp8", backend="ref", min_tokens=21)
    fp8 = _forward(model)
    sqnr = 10 * torch.log10(bf16.pow(2).sum() / (fp8 - bf16).pow(2).sum()).item()
    print(f"tiny DiT output, fp8 vs bf16 attention: SQNR {sqnr:.1f} dB")
    assert not torch.equal(fp8, bf16) and sqnr > 25.0  # 21 >= 21: the 8-bit kernel, close to bf16


def test_the_reported_kernel_looks_through_the_dit_loop_s_wrapper():
    """What bench records as ran.dit_attention: glmq's processor's choice per length, also once the DiT loop has
    wrapped every processor (every GPU bench row said "sdpa" while glmq's kernel ran, until this looked
    through the wrapper), and "sdpa" for upstream's processor."""
    from glmq.runtime.dit_loop import attention_in_use, install_grouped_processors, remove_grouped_processors

    model = _tiny_dit()
    assert attention_in_use(model, 21) == "sdpa"
    RA.install_dit_attention(model, precision="fp8", backend="ref", min_tokens=22)
    install_grouped_processors(model)
    assert (attention_in_use(model, 21), attention_in_use(model, 22)) == ("bf16", "fp8")
    remove_grouped_processors(model)
    assert attention_in_use(model, 22) == "fp8"


# ------------------------------------------------------------------- recorded by quantize, used by load
@pytest.fixture(scope="module")
def quantized_fast(tiny_dir, tmp_path_factory):
    from glmq.evaluate.quantize import quantize

    out = tmp_path_factory.mktemp("attn") / "q"
    quantize(tiny_dir, out, recipe="fast", progress=False, evaluate=False)
    return out


def test_quantize_records_the_recipe_attention(quantized_fast):
    cfg = json.loads((quantized_fast / "transformer" / "config.json").read_text())
    assert cfg["quantization_config"]["recipe"]["attention"] == {"dit": "fp8", "min_tokens": 8192}


def test_load_applies_the_recorded_precision_and_overrides(quantized_fast, tiny_dir):
    import glmq

    pipe = glmq.load(quantized_fast, device="cpu", attention="glmq")
    procs = {id(b.attn1.processor) for b in pipe.transformer.transformer_blocks}
    proc = pipe.transformer.transformer_blocks[0].attn1.processor
    assert len(procs) == 1 and (proc.precision, proc.min_tokens) == ("fp8", 8192)
    assert pipe.attention_precision == "fp8 (>= 8192 tokens, else bf16)"
    # What a call records as run (StageTimes.extra, the bench's "ran"): the processor's choice for its sequence.
    assert pipe._attention_for(8 + 4096) == "bf16" and pipe._attention_for(8 + 16384) == "fp8"

    pipe = glmq.load(quantized_fast, device="cpu", attention="glmq", attention_precision="int8")
    proc = pipe.transformer.transformer_blocks[0].attn1.processor
    assert (proc.precision, proc.min_tokens) == ("int8", 0) and pipe.attention_precision == "int8"

    # On the CPU "auto" keeps upstream SDPA: the recipe's choice does not apply, and asking for 8-bit is an error.
    assert glmq.load(quantized_fast, device="cpu").attention_precision == "sdpa"
    assert glmq.load(quantized_fast, device="cpu")._attention_for(16392) == "sdpa"
    with pytest.raises(GlmqError, match="attention precision 'fp8' needs glmq's attention kernels"):
        glmq.load(quantized_fast, device="cpu", attention_precision="fp8")
    # An unquantized folder runs bf16 attention.
    assert glmq.load(tiny_dir, device="cpu", attention="glmq").attention_precision == "bf16"


def test_in_place_quantization_carries_the_recipe_to_from_modules(tiny_dir):
    from transformers import ByT5Tokenizer, GlmImageProcessor

    from glmq.io.layout import read_json
    from glmq.io.reader import PipelineReader
    from glmq.quant.inplace import quantize_modules
    from glmq.runtime.loader import load_component
    from glmq.runtime.load import from_modules

    reader = PipelineReader(tiny_dir)
    comps = {n: load_component(reader.component(n), device="cpu", dtype=torch.float32)
             for n in ("vision_language_encoder", "transformer", "text_encoder", "vae")}
    quantize_modules({k: comps[k] for k in ("vision_language_encoder", "transformer")}, "default")
    pipe = from_modules(comps, processor=GlmImageProcessor.from_pretrained(tiny_dir / "processor"),
                        tokenizer=ByT5Tokenizer.from_pretrained(tiny_dir / "tokenizer"),
                        scheduler_config=read_json(tiny_dir / "scheduler" / "scheduler_config.json", "scheduler"),
                        device="cpu", attention="glmq")
    assert pipe.attention_precision == "fp8 (>= 8192 tokens, else bf16)"
