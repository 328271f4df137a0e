"""glmq export compressed-tensors on the tiny model, proven with the real readers.

Two proofs run in fresh interpreters that never import glmq (cwd outside the repository):

- the AR folder loads through stock transformers' compressed-tensors quantizer on the CPU; every
  quantized layer's weight equals glmq's dequantized weight rounded to the scale dtype (bf16: the format
  dequantizes ``(q - zp) * scale`` in the scale's dtype), and the logits match glmq's dequantized model's;
- the compressed-tensors library's own model-free dequantizer decompresses every DiT tensor to exactly glmq's
  dequantized weights, and both components' configs pass compressed-tensors' config validation.

The glmq side of each comparison is computed here and handed over in a safetensors file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import compressed_tensors
import pytest
import torch

from glmq.errors import GlmqError
from glmq.export import compressed_tensors as ctx
from glmq.export import ct_layout as ctl
from glmq.io.reader import PipelineReader
from glmq.quant.formats import get_format
from glmq.testing import assert_one_line_error, assert_user_error, run_cli_inprocess, tree_snapshot

assert compressed_tensors.__version__  # the `test` extra installs it: these proofs must not skip in CI

AR, DIT = "vision_language_encoder", "transformer"
SYM_RECIPE = """
name = "sym4"
version = 1
description = "int4 g128 symmetric RTN AR; DiT int8 W8A8"
[[rules]]
component = "vision_language_encoder"
modules = ["model.language_model.layers.*.self_attn.*_proj", "model.language_model.layers.*.mlp.*"]
format = "int4"
params = { group_size = 128, symmetric = true }
algorithm = "rtn"
[[rules]]
component = "transformer"
modules = ["transformer_blocks.*.attn1.to_*", "transformer_blocks.*.ff.net.*", "transformer_blocks.*.norm1.linear"]
format = "int8"
activations = "dynamic_per_token"
"""


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory):
    """glmq-quantized tiny folders (fast: RTN, integer zero points; default: HQQ, float zero points) and
    their exports, plus a symmetric export straight from the bf16 folder."""
    from glmq.evaluate.quantize import quantize

    root = tmp_path_factory.mktemp("ct")
    out = {}
    for rec in ("fast", "default"):
        q = root / f"q-{rec}"
        quantize(tiny_dir, q, recipe=rec, progress=False, evaluate=False, layer_outputs=False)
        out[rec] = (q, root / f"ct-{rec}", ctx.export_compressed_tensors(q, root / f"ct-{rec}", progress=False,
                                                                         max_shard_bytes=64 * 1024))
    out["bf16-default"] = (tiny_dir, root / "ct-bf16-default",
                           ctx.export_compressed_tensors(tiny_dir, root / "ct-bf16-default", progress=False))
    (root / "sym4.toml").write_text(SYM_RECIPE)
    out["sym4"] = (tiny_dir, root / "ct-sym4",
                   ctx.export_compressed_tensors(tiny_dir, root / "ct-sym4", recipe=root / "sym4.toml", progress=False))
    return out


# ----------------------------------------------------------------------------------------------------------
# Layout, against compressed-tensors' own packers


@pytest.mark.parametrize("n,k,g", [(40, 256, 128), (36, 128, 32), (7, 192, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_repack_is_compressed_tensors_packing(n, k, g, symmetric):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from glmq.quant.formats.int4 import unpack_int4

    fmt = get_format("int4", group_size=g, symmetric=symmetric)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    t = fmt.quantize(w)  # RTN: integer zero points
    out, exact = ctl.convert_layer(fmt, "weight_only", t, (n, k))
    signed = (unpack_int4(t["weight"]).to(torch.int16) - 8).to(torch.int8)
    assert exact
    assert torch.equal(out["weight_packed"], pack_to_int32(signed, 4))
    assert out["weight_shape"].tolist() == [n, k]
    if not symmetric:
        zp = (t["weight_zero"].float() - 8).to(torch.int8)
        assert torch.equal(out["weight_zero_point"], pack_to_int32(zp, 4, packed_dim=0))
    assert torch.equal(ctl.dequantize_ct(fmt, "weight_only", out, (n, k)), fmt.dequantize(t, (n, k)))
    specs = {name.split(".")[-1]: (dtype, shape) for name, dtype, shape in ctl.tensor_specs(fmt, "weight_only", "p", (n, k))}
    assert specs == {key: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for key, v in out.items()}


def test_int4_float_zero_points_are_rerounded():
    from glmq.quant.algorithms import get_algorithm

    fmt = get_format("int4", group_size=128, symmetric=False)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    t = get_algorithm("hqq").quantize_weight(fmt, w)
    assert not torch.equal(t["weight_zero"].float().round(), t["weight_zero"].float())  # HQQ: float zeros
    out, exact = ctl.convert_layer(fmt, "weight_only", t, (64, 256))
    glmq_w, ct_w = fmt.dequantize(t, (64, 256)), ctl.dequantize_ct(fmt, "weight_only", out, (64, 256))
    err = float((ct_w - glmq_w).square().sum() / glmq_w.square().sum())
    print("re-rounding relative error", err)
    assert not exact and 0 < err < 0.05


@pytest.mark.parametrize("name,acts,form", [("int8", "weight_only", "pack-quantized"),
                                            ("int8", "dynamic_per_token", "int-quantized"),
                                            ("fp8_e4m3", "dynamic_per_token", "float-quantized"),
                                            ("fp8_e4m3", "weight_only", "naive-quantized")])
def test_8bit_layouts_decompress_exactly_in_compressed_tensors(name, acts, form):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    fmt = get_format(name)
    n, k = 24, 100  # K not a multiple of 4: int32 packing pads
    t = fmt.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(2)))
    got_form, scheme = ctl.scheme_for(fmt, acts)
    assert got_form == form
    scheme = QuantizationScheme.model_validate({"targets": ["Linear"], **scheme})
    out, exact = ctl.convert_layer(fmt, acts, t, (n, k))
    dense = BaseCompressor.get_value_from_registry(form).decompress(dict(out), scheme)["weight"]
    assert exact and torch.equal(dense, fmt.dequantize(t, (n, k)))


# ----------------------------------------------------------------------------------------------------------
# The folders


def test_config_groups_cover_exactly_the_quantized_layers(folders):
    from glmq.quant.formats.qconfig import layer_formats

    for rec in ("fast", "default"):
        q, out, report = folders[rec]
        for name in (AR, DIT):
            qcfg = PipelineReader(out).component(name).config["quantization_config"]
            glmq_layers = layer_formats(PipelineReader(q).component(name).quantization_config)
            linears = list(glmq_layers) + qcfg["ignore"]
            targeted = {}
            for g, s in qcfg["config_groups"].items():
                for lin in linears:
                    if any(ctx._matches(t, lin) for t in s["targets"]) and lin not in qcfg["ignore"]:
                        assert lin not in targeted, (lin, g)
                        targeted[lin] = g
            assert set(targeted) == set(glmq_layers)
            assert report["components"][name]["ignored_linears"] == len(qcfg["ignore"])
            assert qcfg["quant_method"] == "compressed-tensors" and qcfg["quantization_status"] == "compressed"
        ar = PipelineReader(out).component(AR).config["quantization_config"]
        assert ar["format"] == "pack-quantized" and "lm_head" in ar["ignore"]
        assert PipelineReader(out).component(DIT).config["quantization_config"]["format"] == "mixed-precision"


def test_report_exact_for_rtn_rerounded_for_hqq(folders):
    fast, default = folders["fast"][2], folders["default"][2]
    assert all(s["exact"] and s["sqnr_change_db"] == 0.0 for s in fast["layers"].values())
    ar_default = [s for k, s in default["layers"].items() if k.startswith(AR)]
    print([(s["glmq_sqnr_db"], s["export_sqnr_db"], s["rerounding_sqnr_db"]) for s in ar_default])
    assert ar_default and all(not s["exact"] and s["sqnr_change_db"] < 0 and s["export_sqnr_estimated"]
                              for s in ar_default)
    assert all(s["exact"] for k, s in default["layers"].items() if k.startswith(DIT))
    sym = folders["sym4"][2]  # bf16 source: measured against the source weights, not estimated
    assert all(s["exact"] and not s["export_sqnr_estimated"] and s["glmq_sqnr_db"] == s["export_sqnr_db"] > 15
               for s in sym["layers"].values())
    # bf16 source, HQQ: integer zero points refitted to the source weight, measured (not estimated) against it
    hqq = [s for k, s in folders["bf16-default"][2]["layers"].items() if k.startswith(AR)]
    print([(s["glmq_sqnr_db"], s["export_sqnr_db"]) for s in hqq])
    assert hqq and all(not s["exact"] and not s["export_sqnr_estimated"] for s in hqq)
    assert all(s["glmq_sqnr_db"] - 1.0 < s["export_sqnr_db"] for s in hqq)
    card = (folders["default"][1] / "README.md").read_text()
    assert "base_model_relation: quantized" in card and "Recipe: `default`" in card
    assert "dequantize=True" in card and "dequantize=True" not in (folders["sym4"][1] / "README.md").read_text()
    assert (folders["default"][1] / "quantization_report.md").is_file()
    assert "| no |" in (folders["default"][1] / "compressed_tensors_report.md").read_text()


def test_resume_is_byte_identical(folders, tmp_path):
    from glmq.io.writer import OutputFolder

    q, done, _ = folders["fast"]
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real = OutputFolder.record_shard

    def kill_after_two(self, *a, **kw):
        real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    OutputFolder.record_shard = kill_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            ctx.export_compressed_tensors(q, out, progress=False, max_shard_bytes=64 * 1024)
    finally:
        OutputFolder.record_shard = real
    ctx.export_compressed_tensors(q, out, progress=False, max_shard_bytes=64 * 1024)
    files = lambda root: {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert files(out) == files(done)


# ----------------------------------------------------------------------------------------------------------
# Proofs with the real readers (processes that never import glmq)

STOCK_AR = textwrap.dedent(r"""
    import json, sys, torch
    from safetensors.torch import load_file
    from transformers import CompressedTensorsConfig, GlmImageForConditionalGeneration
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    made = []  # observe (not change) which quantizer from_pretrained builds
    init = CompressedTensorsHfQuantizer.__init__
    CompressedTensorsHfQuantizer.__init__ = lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1]
    results = []
    args = sys.argv[1:]
    for folder, ref_path, mode in zip(args[0::3], args[1::3], args[2::3]):
        ref = load_file(ref_path)
        kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if mode == "dequantize" else {}
        before = len(made)
        model = GlmImageForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, **kw).eval()
        with torch.no_grad():
            logits = model(input_ids=ref["input_ids"]).logits  # a compressed model decompresses on this call
        params = dict(model.named_parameters())
        wrong = [n for n in ref if n.startswith("w:") and not torch.equal(params[n[2:]].float(), ref[n])]
        ref_l, err = ref["logits"].double(), (logits.double() - ref["logits"].double())
        results.append({
            "quantizer built": len(made) - before, "checked": sum(n.startswith("w:") for n in ref), "wrong": wrong[:3],
            "logits_sqnr_db": float(10 * torch.log10(ref_l.square().sum() / err.square().sum())) if err.any() else None,
        })
    print(json.dumps({"results": results, "compressed_tensors used": "compressed_tensors.compressors" in sys.modules,
                      "glmq imported": any(m == "glmq" or m.startswith("glmq.") for m in sys.modules)}))
""")


STOCK_DIT = textwrap.dedent(r"""
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import load_file
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from transformers import CompressedTensorsConfig

    root, ref_path, comp = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    for name in ("vision_language_encoder", "transformer"):  # compressed-tensors' own config validation
        qcfg = json.loads((root / name / "config.json").read_text())["quantization_config"]
        QuantizationConfig.model_validate(qcfg)
        for g in qcfg["config_groups"].values():
            QuantizationScheme.model_validate(g)  # QuantizationArgs forbid unknown keys
        CompressedTensorsConfig.from_dict(qcfg)
    tensors = {}
    for f in sorted((root / comp).glob("*.safetensors")):
        tensors.update(load_file(f))
    dense = CompressedTensorsDequantizer(root / comp, dtype=torch.float32).validate(tensors)
    ref = load_file(ref_path)
    print(json.dumps({
        "names_equal": set(dense) == set(ref),
        "wrong": sorted(n for n in ref if n not in dense or not torch.equal(dense[n].float(), ref[n]))[:3],
        "checked": len(ref),
        "glmq imported": any(m == "glmq" or m.startswith("glmq.") for m in sys.modules),
    }))
""")


def _stock(script, *args, cwd):
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(res)
    assert res["glmq imported"] is False
    return res


def _ar_reference(q, out, path):
    """Expected AR weights (compressed-tensors' dequantization of the export, in the scale dtype) and glmq's
    dequantized model's logits on a fixed token sequence."""
    from safetensors.torch import save_file

    from glmq.quant.formats.qconfig import layer_formats
    from glmq.evaluate.fidelity import load_dequantized

    cr_q, cr_out = PipelineReader(q).component(AR), PipelineReader(out).component(AR)
    ref = {"input_ids": torch.randint(0, 200, (1, 37), generator=torch.Generator().manual_seed(0))}
    for name, (fmt, acts) in layer_formats(cr_q.quantization_config).items():
        shape = tuple(cr_q.get(f"{name}.weight").shape[:1]) + (cr_q.get(f"{name}.weight").shape[1] * 2,)
        stored = {k.removeprefix(name + "."): cr_out.get(k) for k in cr_out.names() if k.startswith(name + ".weight")}
        ref[f"w:{name}.weight"] = ctl.dequantize_ct(fmt, acts, stored, shape).to(stored["weight_scale"].dtype).float()
    with torch.no_grad():
        ref["logits"] = load_dequantized(cr_q)(input_ids=ref["input_ids"]).logits.contiguous()
    save_file(ref, str(path))


def _sym_reference(src, out, path):
    """For the symmetric export from bf16: the exported layers' exact values (the compressed path decompresses
    in the model's dtype, fp32 here, so nothing rounds) and the logits of glmq's model holding them."""
    from safetensors.torch import save_file

    from glmq.evaluate.fidelity import load_dequantized

    cr = PipelineReader(out).component(AR)
    ref = {"input_ids": torch.randint(0, 200, (1, 29), generator=torch.Generator().manual_seed(1))}
    fmt = get_format("int4", group_size=128, symmetric=True)
    model = load_dequantized(PipelineReader(src).component(AR))
    for name in [n for n in cr.names() if n.endswith(".weight_packed")]:
        prefix = name.removesuffix(".weight_packed")
        stored = {k.removeprefix(prefix + "."): cr.get(k) for k in cr.names() if k.startswith(prefix + ".weight")}
        w = ctl.dequantize_ct(fmt, "weight_only", stored, tuple(stored["weight_shape"].tolist()))
        ref[f"w:{prefix}.weight"] = w
        model.get_submodule(prefix).weight.data.copy_(w)  # glmq's view of the exported layers
    with torch.no_grad():
        ref["logits"] = model(input_ids=ref["input_ids"]).logits.contiguous()
    save_file(ref, str(path))


@pytest.mark.slow
def test_stock_transformers_loads_the_ar(folders, tmp_path):
    """Three exports in one fresh interpreter: `fast` (RTN, exact repack) and `default` (HQQ, re-rounded), both
    asymmetric W4A16, load with CompressedTensorsConfig(dequantize=True): transformers 5.24 + compressed-tensors
    0.20.1 build an unpacked weight_zero_point on the compressed path and reject the packed one. The symmetric
    export loads with no flag, compressed until its first forward."""
    args = []
    for rec in ("fast", "default"):
        q, out, _ = folders[rec]
        _ar_reference(q, out, tmp_path / f"{rec}.safetensors")
        args += [out / AR, tmp_path / f"{rec}.safetensors", "dequantize"]
    src, out, _ = folders["sym4"]
    assert PipelineReader(out).component(AR).config["quantization_config"]["config_groups"]["group_0"]["weights"][
        "symmetric"] is True
    _sym_reference(src, out, tmp_path / "sym4.safetensors")
    args += [out / AR, tmp_path / "sym4.safetensors", "compressed"]
    res = _stock(STOCK_AR, *args, cwd=tmp_path)
    fast, default, sym = res["results"]
    assert res["compressed_tensors used"]
    for r in (fast, default, sym):  # every layer equals the exported layer as the format dequantizes it
        assert r["quantizer built"] == 1 and r["checked"] == 12 and r["wrong"] == []
    # fast: exact repack, only the bf16 scale-dtype rounding (<= 2^-9 relative per weight, 54 dB) separates the
    # weights from glmq's; default: the re-rounded zero points (27-29 dB per layer on this model) add to it.
    assert fast["logits_sqnr_db"] > 40.0
    assert default["logits_sqnr_db"] > 15.0
    assert sym["logits_sqnr_db"] is None  # same weights, same math: bit-identical logits


@pytest.mark.slow
def test_compressed_tensors_decompresses_every_dit_tensor_exactly(folders, tmp_path):
    """float-quantized FP8 and pack-quantized int8 (the default recipe); int-quantized int8 is checked against
    compressed-tensors' compressor in test_8bit_layouts_decompress_exactly_in_compressed_tensors."""
    from safetensors.torch import save_file

    from glmq.evaluate.fidelity import load_dequantized

    src, out, _ = folders["default"]
    model = load_dequantized(PipelineReader(src).component(DIT))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ref.safetensors"))
    res = _stock(STOCK_DIT, out, tmp_path / "ref.safetensors", DIT, cwd=tmp_path)
    assert res["names_equal"] and res["wrong"] == [] and res["checked"] == len(model.state_dict())


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_one_line_exit_2(folders, tiny_dir, tmp_path):
    q = folders["fast"][0]
    not_glm = tmp_path / "not-glm"
    not_glm.mkdir()
    (not_glm / "model_index.json").write_text("{}")
    assert_user_error(run_cli_inprocess("export", "compressed-tensors", str(not_glm), "--out", str(tmp_path / "a")))
    before = tree_snapshot(folders["fast"][1])
    assert_user_error(run_cli_inprocess("export", "compressed-tensors", str(q), "--out", str(folders["fast"][1])),
                      "already exists")
    assert tree_snapshot(folders["fast"][1]) == before
    assert_user_error(run_cli_inprocess("export", "compressed-tensors", str(q), "--out", str(tmp_path / "b"),
                                        "--recipe", "fast"), "already quantized")
    bnb = tmp_path / "bnb"  # a folder quantized by another method
    shutil.copytree(tiny_dir, bnb)
    cfg = json.loads((bnb / AR / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (bnb / AR / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli_inprocess("export", "compressed-tensors", str(bnb), "--out", str(tmp_path / "c")),
                      "bitsandbytes")
    assert_user_error(run_cli_inprocess("export", "compressed-tensors", str(tiny_dir), "--out", str(tmp_path / "d"),
                                        "--recipe", "quality"), "quality")
    assert not any(p.name in "abcd" or p.name.endswith(".partial") for p in tmp_path.iterdir())
    with pytest.raises(GlmqError) as e:
        ctl.scheme_for(type("F", (), {"name": "nf4"})(), "weight_only")
    assert_one_line_error(e.value, "nf4")


def test_cli_writes_the_export(folders, tmp_path):
    q = folders["fast"][0]
    proc = run_cli_inprocess("export", "compressed-tensors", str(q), "--out", str(tmp_path / "o"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "compressed-tensors" and set(summary["components"]) == {AR, DIT}
    assert (tmp_path / "o" / "glmq-manifest.json").is_file()


def test_refit_to_the_source_beats_rerounding_and_rtn():
    """From a bf16 source, HQQ's float zero points are refitted to the source weight (integer zeros, least-squares
    bf16 scales): better than re-rounding glmq's weight and than plain round-to-nearest."""
    from glmq.quant.algorithms import get_algorithm
    from glmq.quant.metrics import sqnr_db

    fmt = get_format("int4", group_size=128, symmetric=False)
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    t = get_algorithm("hqq").quantize_weight(fmt, w)
    plain, _ = ctl.convert_layer(fmt, "weight_only", t, (256, 512))
    fitted, exact = ctl.convert_layer(fmt, "weight_only", t, (256, 512), target=w)
    db = {"hqq": sqnr_db(w, fmt.dequantize(t, (256, 512))),
          "rtn": sqnr_db(w, fmt.dequantize(get_algorithm("rtn").quantize_weight(fmt, w), (256, 512))),
          "reround": sqnr_db(w, ctl.dequantize_ct(fmt, "weight_only", plain, (256, 512))),
          "refit": sqnr_db(w, ctl.dequantize_ct(fmt, "weight_only", fitted, (256, 512)))}
    print(db)
    assert not exact and fitted["weight_scale"].dtype == torch.bfloat16
    assert db["refit"] > max(db["reround"], db["rtn"]) + 0.2


def test_row_blocks_give_the_same_layer(monkeypatch, tiny_dir):
    """A layer converted in blocks of 8 rows (zero points packed per block, then concatenated) is
    byte-identical to one converted whole, from a glmq folder and from bf16 with HQQ."""
    from glmq.quant.algorithms import get_algorithm

    fmt = get_format("int4", group_size=128, symmetric=False)
    w = (torch.randn(44, 256, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    stored = get_algorithm("hqq").quantize_weight(fmt, w)

    class Reader:  # what _convert reads from a component: get(name)
        def __init__(self, tensors):
            self.get = tensors.__getitem__

    readers = {"glmq": Reader({f"p.{k}": v for k, v in stored.items()}), "bf16": Reader({"p.weight": w})}
    results = {}
    for chunk in (1 << 24, 8 * 256):
        monkeypatch.setattr(ctx, "CHUNK_ELEMENTS", chunk)
        for kind, algo in (("glmq", None), ("bf16", get_algorithm("hqq"))):
            entry = (fmt, "weight_only", algo, (44, 256))
            results[chunk, kind] = ctx._convert("c", readers[kind], "p", entry, {"c:p": 20.0})
    for kind in ("glmq", "bf16"):
        (whole, s1), (blocks, s2) = results[1 << 24, kind], results[8 * 256, kind]
        assert whole.keys() == blocks.keys() and all(torch.equal(whole[key], blocks[key]) for key in whole)
        print(kind, s1, s2)  # fp32 sums per block vs whole: the same figure to float32 rounding
        assert abs(s1["rerounding_sqnr_db"] - s2["rerounding_sqnr_db"]) < 0.02 and not s1["exact"]


@pytest.mark.slow
def test_mixed_ar_groups_decompress_in_compressed_tensors(tiny_dir, tmp_path):
    """tier16's AR holds two config groups (int4 W4A16 text decoder and lm_head, int8 W8A16 vision tower):
    compressed-tensors' dequantizer picks each layer's scheme from its targets and gives exactly the weights
    this module's reference dequantization gives. (transformers 5.24's dequantize path cannot load it: it
    applies one group's scheme to every layer; see the README.)"""
    from safetensors.torch import save_file

    out = tmp_path / "ct-tier16"
    report = ctx.export_compressed_tensors(tiny_dir, out, recipe="tier16", progress=False)
    groups = report["components"][AR]["config_groups"]
    assert sorted((g["format"], g["weights"]["num_bits"]) for g in groups.values()) == [("pack-quantized", 4),
                                                                                        ("pack-quantized", 8)]
    cr = PipelineReader(out).component(AR)
    ref = {}
    for name in cr.names():
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("weight_scale", "weight_shape", "weight_zero_point"):
            continue
        if leaf != "weight_packed":
            ref[name] = cr.get(name).float()
            continue
        stored = {k.removeprefix(prefix + "."): cr.get(k) for k in cr.names() if k.startswith(prefix + ".weight_")}
        shape = tuple(stored["weight_shape"].tolist())
        int4 = stored["weight_packed"].shape[1] * 8 == shape[1]  # eight codes per int32 (int8: four)
        fmt = get_format("int4", group_size=128, symmetric=False) if int4 else get_format("int8")
        # compressed-tensors dequantizes in the scale's dtype (bf16 for int4, float32 for int8)
        ref[f"{prefix}.weight"] = ctl.dequantize_ct(fmt, "weight_only", stored, shape).to(stored["weight_scale"].dtype).float()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "ref.safetensors"))
    res = _stock(STOCK_DIT, out, tmp_path / "ref.safetensors", AR, cwd=tmp_path)
    assert res["names_equal"] and res["wrong"] == [] and res["checked"] == len(ref)


def test_ar_logits_against_bf16(folders, tiny_dir):
    """Model-level cost of the format, against the bf16 source (the fidelity evaluation's teacher-forced grid):
    an exact repack (fast) keeps glmq's logits; re-rounded HQQ layers (from a glmq folder or refitted from bf16)
    lose part of HQQ's gain. Printed figures are the README's."""
    from transformers import GlmImageProcessor

    from glmq.quant.formats.qconfig import layer_formats
    from glmq.evaluate.fidelity import ar_grid_logits, ar_grid_sequence, compare_logits, load_dequantized

    def exported_model(q, out):  # glmq's model with the exported layers as the format dequantizes them
        cr_q, cr_out = PipelineReader(q).component(AR), PipelineReader(out).component(AR)
        model = load_dequantized(cr_q)
        for name, (fmt, acts) in layer_formats(cr_q.quantization_config).items():
            lin = model.get_submodule(name)
            st = {k.removeprefix(name + "."): cr_out.get(k) for k in cr_out.names() if k.startswith(name + ".weight")}
            lin.weight.data.copy_(ctl.dequantize_ct(fmt, acts, st, tuple(lin.weight.shape)))
        return model

    ref = load_dequantized(PipelineReader(tiny_dir).component(AR))
    seq, plen = ar_grid_sequence(GlmImageProcessor.from_pretrained(tiny_dir / "processor"), ref.config, 0)
    with torch.no_grad():
        r = ar_grid_logits(ref, seq, plen)
        db = {}
        for rec in ("fast", "default"):
            q, out, _ = folders[rec]
            db[f"glmq {rec}"] = compare_logits(r, ar_grid_logits(load_dequantized(PipelineReader(q).component(AR)),
                                                                 seq, plen))["logits_sqnr_db"]
            db[f"export {rec}"] = compare_logits(r, ar_grid_logits(exported_model(q, out), seq, plen))["logits_sqnr_db"]
        db["export default from bf16"] = compare_logits(
            r, ar_grid_logits(exported_model(folders["default"][0], folders["bf16-default"][1]), seq, plen))["logits_sqnr_db"]
    print(db)
    assert db["export fast"] == db["glmq fast"]
    assert db["glmq default"] - 1.5 < db["export default"] < db["glmq default"]
    assert db["glmq default"] - 1.5 < db["export default from bf16"] < db["glmq default"]
