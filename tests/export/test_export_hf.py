"""glmq export hf on the tiny model: bitsandbytes folders that stock transformers/diffusers load on a CPU.

The load test runs in a fresh interpreter that never imports glmq (cwd outside the repository). The AR is
loaded fully stock. diffusers 0.42.1's bitsandbytes quantizers refuse to run without a GPU
(``validate_environment`` raises "No GPU found", and ``update_device_map`` defaults to CUDA) although
bitsandbytes >= 0.48 runs on a CPU: the script first shows that this GPU check is the only thing that
stops the stock pipeline, then replaces exactly those two methods (validate_environment skipped,
device map defaulting to the CPU as transformers' does) and loads and runs the whole pipeline.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from glmq.errors import GlmqError, OutputExistsError
from glmq.export import bnb_layout as bl
from glmq.export import hf
from glmq.io.layout import BY_NAME
from glmq.io.reader import PipelineReader
from glmq.testing import assert_one_line_error, tree_snapshot

pytest.importorskip("bitsandbytes")

SMALL_SHARDS = 2 * 1024 * 1024  # several AR shards, to exercise resume
AR, DIT = "vision_language_encoder", "transformer"
# Weight SQNR floors (dB): the worst layer measured on the tiny model's Gaussian weights, minus 0.5 dB
# (NF4 20.61, int8 43.65).
NF4_SQNR_FLOOR = 20.1
INT8_SQNR_FLOOR = 43.1


class Killed(Exception):
    pass


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """The default export (NF4 AR, int8 DiT) and the swapped one (int8 AR, NF4 DiT)."""
    root = tmp_path_factory.mktemp("hf")
    default = root / "nf4-int8"
    summary = hf.export_hf(tiny_dir, default, progress=False, max_shard_bytes=SMALL_SHARDS)
    swapped = root / "int8-nf4"
    summary2 = hf.export_hf(tiny_dir, swapped, ar="int8", dit="nf4", progress=False)
    return {"nf4-int8": (default, summary), "int8-nf4": (swapped, summary2)}


def _quantized_layers(cr) -> set[str]:
    """Layers stored as bitsandbytes entries, read from the checkpoint itself."""
    out = set()
    for name in cr.tensors:
        for suffix in (".weight.quant_state.bitsandbytes__nf4", ".SCB"):
            if name.endswith(suffix):
                out.add(name.removesuffix(suffix))
    return out


def test_converted_layers_are_what_both_loader_rules_convert(exported):
    from glmq.models.build import build_model

    for key, (folder, summary) in exported.items():
        reader = PipelineReader(folder)
        for name in (AR, DIT):
            cr = reader.component(name)
            model = build_model(BY_NAME[name], cr.config)
            skip = cr.quantization_config["llm_int8_skip_modules"]
            by_transformers = {n for n, m in model.named_modules() if n and hf._transformers_rule(n, m, skip)}
            by_diffusers = {n for n, m in model.named_modules() if n and hf._diffusers_rule(n, m, skip)}
            print(key, name, len(by_transformers), "converted,", summary["components"][name]["kept_linears"], "kept")
            assert by_transformers == by_diffusers == _quantized_layers(cr)  # the skip list means one thing
            assert summary["components"][name]["converted_linears"] == len(by_transformers)
            if name == AR:
                assert all(".language_model.layers." in n for n in by_transformers)
                assert len(by_transformers) == 12  # 2 layers x q, k, v, o, gate_up, down
            else:
                assert all(n.startswith("transformer_blocks.") for n in by_transformers)
                # int8: 2 blocks x norm1.linear, q, k, v, out, ff in, ff out; NF4: only ff out (128 inputs)
                assert len(by_transformers) == (14 if key.endswith("int8") else 2)


def test_transformers_own_matching_function_agrees(exported):
    """transformers 5's own ``should_convert_module`` makes the same decision for every AR linear."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from glmq.models.build import build_model

    folder, _ = exported["nf4-int8"]
    cr = PipelineReader(folder).component(AR)
    model = build_model(BY_NAME[AR], cr.config)
    skip = cr.quantization_config["llm_int8_skip_modules"]
    theirs = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and should_convert_module(n, skip)}
    assert theirs == _quantized_layers(cr)


def test_config_and_model_card(exported):
    import diffusers
    import transformers

    for key, (folder, summary) in exported.items():
        ar_mode, dit_mode = key.split("-")
        reader = PipelineReader(folder)
        for name, mode, lib in ((AR, ar_mode, transformers), (DIT, dit_mode, diffusers)):
            qcfg = reader.component(name).quantization_config
            skip = summary["components"][name]["skip_modules"]
            extra = skip[len(hf.SKIP_MODULES[name]):]
            assert tuple(skip[: len(hf.SKIP_MODULES[name])]) == hf.SKIP_MODULES[name]
            # Full names added only for NF4 layers bitsandbytes' CPU kernel cannot run (tiny DiT only).
            assert extra == ([] if (name, mode) != (DIT, "nf4") else
                             [f"transformer_blocks.{i}.{m}" for i in range(2) for m in
                              ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                               "ff.net.0.proj")])
            assert qcfg == bl.bnb_quantization_config(mode, skip_modules=skip)
            kwargs = (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16) if mode == "nf4" else dict(load_in_8bit=True))
            assert qcfg == lib.BitsAndBytesConfig(llm_int8_skip_modules=skip, **kwargs).to_dict()
            assert summary["components"][name]["bytes_after"] < summary["components"][name]["bytes_before"]
        for name in ("text_encoder", "vae"):
            assert reader.component(name).quantization_config is None
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nbase_model: zai-org/GLM-Image\nbase_model_relation: quantized\n")
        manifest = json.loads((folder / "glmq-manifest.json").read_text())
        assert "README.md" in manifest["files"] and "vision_language_encoder/config.json" in manifest["files"]
    ar_shards = list((exported["nf4-int8"][0] / AR).glob("model-*-of-*.safetensors"))
    assert len(ar_shards) > 2


def test_stored_layers_decode_close_to_the_source(exported, tiny_dir):
    """Every quantized layer decodes (bnb_layout's reference decoders) within the format's SQNR floor;
    every other tensor is the source's, bit for bit."""
    src = PipelineReader(tiny_dir)
    for key, (folder, _) in exported.items():
        reader = PipelineReader(folder)
        for name in (AR, DIT):
            cr, ref = reader.component(name), src.component(name)
            layers = _quantized_layers(cr)
            worst = float("inf")
            for layer in layers:
                entries = {k.removeprefix(layer + "."): cr.get(k) for k in cr.tensors if k.startswith(layer + ".")}
                w = ref.get(f"{layer}.weight").float()
                if "SCB" in entries:
                    dense, floor = bl.int8_dequantize(entries), INT8_SQNR_FLOOR
                else:
                    state = json.loads(bytes(entries["weight.quant_state.bitsandbytes__nf4"].tolist()))
                    assert state["shape"] == list(w.shape) and state["dtype"] == "bfloat16"
                    dense, floor = bl.nf4_dequantize(entries), NF4_SQNR_FLOOR
                sqnr = 10 * torch.log10(w.pow(2).sum() / (w - dense).pow(2).sum()).item()
                worst = min(worst, sqnr)
                assert sqnr > floor, (layer, sqnr)
                if "bias" in entries:
                    assert torch.equal(entries["bias"], ref.get(f"{layer}.bias"))
            print(f"{key} {name}: {len(layers)} layers, worst weight SQNR {worst:.2f} dB")
            quantized_names = {k for k in cr.tensors if any(k.startswith(layer + ".") for layer in layers)}
            for tname in set(cr.tensors) - quantized_names:
                assert torch.equal(cr.get(tname), ref.get(tname)), tname


STOCK = textwrap.dedent(
    r"""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig as TransformersBnb, GlmImageForConditionalGeneration
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    src, default, swapped = sys.argv[1:4]
    res = {}

    def linear_types(model):
        return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def compare(ours, theirs):
        a, b = ours.state_dict(), theirs.state_dict()
        return {"same_keys": sorted(a) == sorted(b),
                "differ": sorted(k for k in a if k in b and not torch.equal(a[k], b[k]))}

    def bnb_kwargs(qc):
        if qc["load_in_4bit"]:
            return dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=qc["llm_int8_skip_modules"])
        return dict(load_in_8bit=True, llm_int8_skip_modules=qc["llm_int8_skip_modules"])

    def config(folder, name):
        return json.load(open(f"{folder}/{name}/config.json"))["quantization_config"]

    # 1. The AR, fully stock: our export and transformers quantizing the bf16 source at load time.
    for key, folder in (("nf4-int8", default), ("int8-nf4", swapped)):
        qc = config(folder, "vision_language_encoder")
        ours = GlmImageForConditionalGeneration.from_pretrained(f"{folder}/vision_language_encoder",
                                                                dtype=torch.bfloat16)
        theirs = GlmImageForConditionalGeneration.from_pretrained(
            f"{src}/vision_language_encoder", dtype=torch.bfloat16,
            quantization_config=TransformersBnb(**bnb_kwargs(qc)))
        ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(23).view(1, 1, -1).expand(3, 1, -1)
        with torch.no_grad():
            la, lb = [m.lm_head(m.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state).float()
                      for m in (ours, theirs)]
        sqnr = 10 * torch.log10(lb.pow(2).sum() / (la - lb).pow(2).sum()).item() if not torch.equal(la, lb) else None
        res[f"ar {key}"] = {"types": linear_types(ours), **compare(ours, theirs), "logits_equal": torch.equal(la, lb),
                            "logits_sqnr_db": sqnr}
        del ours, theirs

    # 2. The stock pipeline on a CPU: diffusers' bitsandbytes quantizer asks for a GPU.
    from diffusers import BitsAndBytesConfig as DiffusersBnb, GlmImagePipeline, GlmImageTransformer2DModel
    from diffusers.utils import logging as dlog
    dlog.set_verbosity_error()
    try:
        GlmImagePipeline.from_pretrained(default, dtype=torch.bfloat16)
        res["stock pipeline"] = "loaded"
    except Exception as e:
        res["stock pipeline"] = f"{type(e).__name__}: {e}"

    # 3. The shim: only diffusers' GPU check and its CUDA default device map.
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    for cls in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        cls.validate_environment = lambda self, *args, **kwargs: None
        cls.update_device_map = lambda self, device_map: {"": "cpu"} if device_map is None else device_map

    pipe = GlmImagePipeline.from_pretrained(default, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a tiny 'sign' on a wall", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    res["generated"] = {"size": list(image.size), "mode": image.mode, "extrema": list(image.getextrema())}
    res["pipeline ar types"] = linear_types(pipe.vision_language_encoder)

    # 4. The DiT: our export vs diffusers quantizing the bf16 source at load time; same prior tokens and
    # latents through the stock pipeline (the AR is skipped when prior_token_ids are given).
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, cfg.in_channels, 8, 8, generator=gen).to(torch.bfloat16)
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, 16), generator=gen)
    for key, folder in (("nf4-int8", default), ("int8-nf4", swapped)):
        ours = GlmImageTransformer2DModel.from_pretrained(f"{folder}/transformer", dtype=torch.bfloat16)
        theirs = GlmImageTransformer2DModel.from_pretrained(
            f"{src}/transformer", dtype=torch.bfloat16,
            quantization_config=DiffusersBnb(**bnb_kwargs(config(folder, "transformer"))))
        images = []
        for dit in (ours, theirs):
            pipe.transformer = dit
            images.append(pipe("a 'b'", height=64, width=64, num_inference_steps=3, prior_token_ids=prior,
                               latents=latents, output_type="pt").images.float())
        res[f"dit {key}"] = {"types": linear_types(ours), **compare(ours, theirs),
                             "image_max_abs_diff": (images[0] - images[1]).abs().max().item()}
    res["glmq imported"] = any(m == "glmq" or m.startswith("glmq.") for m in sys.modules)
    print("RESULT " + json.dumps(res))
    """
)


def test_stock_libraries_load_and_run_the_export(exported, tiny_dir, tmp_path):
    default, swapped = exported["nf4-int8"][0], exported["int8-nf4"][0]
    proc = subprocess.run([sys.executable, "-c", STOCK, str(tiny_dir), str(default), str(swapped)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    print(proc.stderr[-4000:])
    assert proc.returncode == 0
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "types"} if isinstance(v, dict) else v
                      for k, v in res.items()}, indent=1))
    assert res["glmq imported"] is False

    layer_class = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
    for key, folder in exported.items():
        ar_mode, dit_mode = key.split("-")
        reader = PipelineReader(folder[0])
        for name, mode, prefix in ((AR, ar_mode, "ar"), (DIT, dit_mode, "dit")):
            r = res[f"{prefix} {key}"]
            converted = _quantized_layers(reader.component(name))
            # Exactly the layers stored quantized became bitsandbytes layers; the rest stayed nn.Linear.
            assert {n for n, t in r["types"].items() if t != "Linear"} == converted
            assert {r["types"][n] for n in converted} == {layer_class[mode]}
            assert r["same_keys"]
            # The same quantization as bitsandbytes' own, except double-quantized absmax codes where
            # bitsandbytes' CPU lookup picks a neighbour of the nearest code (see bnb_layout).
            assert all(k.endswith(".weight.absmax") for k in r["differ"]), r["differ"]
            if mode == "int8":
                assert r["differ"] == []
        ar = res[f"ar {key}"]
        assert ar["logits_equal"] if not ar["differ"] else ar["logits_sqnr_db"] > 30
        dit = res[f"dit {key}"]
        assert dit["image_max_abs_diff"] == 0.0 if not dit["differ"] else dit["image_max_abs_diff"] < 0.05

    # The only obstacle for the stock pipeline on this CPU-only machine is diffusers' GPU check.
    assert res["stock pipeline"] == "loaded" or res["stock pipeline"].startswith("RuntimeError: No GPU found"), \
        res["stock pipeline"]
    assert res["generated"]["size"] == [64, 64] and res["generated"]["mode"] == "RGB"
    assert res["pipeline ar types"] == res["ar nf4-int8"]["types"]


def test_resume_after_kill_is_byte_identical(exported, tiny_dir, tmp_path, monkeypatch):
    reference, _ = exported["nf4-int8"]
    real = bl.nf4_state_dict
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7:
            raise Killed()
        return real(*args, **kwargs)

    monkeypatch.setattr(bl, "nf4_state_dict", dying)
    out = tmp_path / "hf"
    with pytest.raises(Killed):
        hf.export_hf(tiny_dir, out, progress=False, max_shard_bytes=SMALL_SHARDS)
    partial = tmp_path / "hf.partial"
    assert partial.is_dir() and not out.exists()
    done = json.loads((partial / ".glmq-journal.json").read_text())["shards"]
    print("finished shards before the kill:", sorted(done))
    assert done
    monkeypatch.setattr(bl, "nf4_state_dict", real)
    hf.export_hf(tiny_dir, out, progress=False, max_shard_bytes=SMALL_SHARDS)
    assert _files(out) == _files(reference)


def test_streams_one_source_tensor_at_a_time(tiny_dir, tmp_path, monkeypatch):
    """Bounded memory: each source tensor is released before the next one is read."""
    from glmq.io.reader import ComponentReader

    real = ComponentReader.get
    live, peak = [0], [0]

    def tracked(self, name):
        peak[0] = max(peak[0], live[0])
        t = real(self, name)
        live[0] += 1
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    monkeypatch.setattr(ComponentReader, "get", tracked)
    hf.export_hf(tiny_dir, tmp_path / "h", progress=False)
    assert peak[0] == 0


def test_bad_input(exported, tiny_dir, tmp_path):
    before = tree_snapshot(tmp_path)
    with pytest.raises(GlmqError) as e:
        hf.export_hf(tiny_dir, tmp_path / "o", ar="fp4")
    assert_one_line_error(e.value, "'fp4'", "nf4", "int8")
    with pytest.raises(GlmqError) as e:
        hf.export_hf(tiny_dir, tmp_path / "o", dit="q8")
    assert_one_line_error(e.value, "'q8'", "nf4, int8")
    folder, _ = exported["nf4-int8"]
    with pytest.raises(GlmqError) as e:  # a bitsandbytes export is not a source
        hf.export_hf(folder, tmp_path / "o")
    assert_one_line_error(e.value, "already quantized", "bitsandbytes")
    with pytest.raises(GlmqError) as e:
        hf.export_hf(tiny_dir, tiny_dir / "inside")
    assert_one_line_error(e.value, "must not be")
    assert tree_snapshot(tmp_path) == before  # nothing written, no .partial left

    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as e:
        hf.export_hf(tiny_dir, existing, progress=False)
    assert_one_line_error(e.value, "already exists", "--force")
    assert (existing / "keep.txt").read_text() == "mine" and not (tmp_path / "exists.partial").exists()


def test_glmq_quantized_source_is_refused(tiny_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    config_path = src / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "glmq", "layers": {}}
    config_path.write_text(json.dumps(config))
    before = tree_snapshot(tmp_path)
    with pytest.raises(GlmqError) as e:
        hf.export_hf(src, tmp_path / "o", progress=False)
    assert_one_line_error(e.value, "already quantized", "glmq", "transformer")
    assert tree_snapshot(tmp_path) == before


def test_skip_patterns_match_module_boundaries():
    """The skip names do not reach into look-alike names under either loader's rule."""
    lin = torch.nn.Linear(2, 2)
    skip = hf.SKIP_MODULES[DIT]
    for name in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn1.to_out.0",
                 "transformer_blocks.0.ff.net.2"):
        assert hf._diffusers_rule(name, lin, skip) and hf._transformers_rule(name, lin, skip)
    for name in ("proj_out", "norm_out.linear", "image_projector.proj",
                 "time_condition_embed.condition_embedder.linear_1"):
        assert not hf._diffusers_rule(name, lin, skip) and not hf._transformers_rule(name, lin, skip)
    skip = hf.SKIP_MODULES[AR]
    for name in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.3.mlp.down_proj"):
        assert hf._diffusers_rule(name, lin, skip) and hf._transformers_rule(name, lin, skip)
    for name in ("lm_head", "model.visual.blocks.0.attn.qkv", "model.visual.merger.proj"):
        assert not hf._diffusers_rule(name, lin, skip) and not hf._transformers_rule(name, lin, skip)
