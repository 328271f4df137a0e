"""glmq export gguf on the tiny model: files gguf-py reads back, dequantization equal to gguf-py's, SQNR per
tensor, the AR rebuilt from the GGUF alone, resume, and bad input.

The tiny AR's rows are 128 long, so its K types take llama.cpp's 32-block fallbacks (Q4_K -> Q5_0,
Q6_K -> Q8_0); a DiT widened to 256 exercises Q4_K and Q6_K end to end.
"""

from __future__ import annotations

import json
import shutil
import weakref

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from glmq.errors import CheckpointError, GlmqError, OutputExistsError
from glmq.export import gguf_export as ge
from glmq.quant.formats.gguf import names as gn
from glmq.quant.formats.gguf import blocks as gq
from glmq.quant.formats.gguf.reader import GgufTensorSource, read_metadata
from glmq.io.layout import BY_NAME
from glmq.io.reader import PipelineReader
from glmq.testing import assert_one_line_error, tree_snapshot

AR, DIT = "vision_language_encoder", "transformer"

# Per-tensor SQNR floors (dB) against the bf16 source: the worst tensor measured on the tiny models'
# N(0, 0.02) weights minus 0.5 dB. F32 and BF16 tensors must be exact.
SQNR_FLOOR = {T.Q8_0: 44.6, T.Q5_0: 26.7, T.Q6_K: 35.0, T.Q4_K: 22.4}
# AR logits (fp32) of the model rebuilt from the Q4_K_M file vs the bf16 model: measured 18.33 dB. On the
# tiny random AR the sublayer outputs carry as much of the residual stream as the embedding, so the ~27 dB
# (Q5_0) errors of its eleven quantized matrices add up; Gaussian noise of the same weight SQNR added to
# one matrix costs the logits the same as that matrix's quantization does (checked while writing this).
AR_LOGITS_SQNR_FLOOR = 17.8


class Killed(Exception):
    pass


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * np.log10(ref.pow(2).sum().item() / noise)


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-gguf"
    return out, ge.export_gguf(tiny_dir, out, progress=False)


@pytest.fixture(scope="module")
def wide(tiny_dir, tmp_path_factory):
    """The tiny pipeline with a DiT 256 wide (2 heads x 128), so DiT rows fit 256-value K-quant blocks;
    exported with a Q8_0 AR and a Q4_K_S DiT."""
    from safetensors.torch import save_file

    from glmq.models.build import build_model, tensor_specs

    root = tmp_path_factory.mktemp("wide")
    src = root / "src"
    shutil.copytree(tiny_dir, src)
    folder = src / DIT
    config = json.loads((folder / "config.json").read_text())
    config.update(attention_head_dim=128, time_embed_dim=256)
    (folder / "config.json").write_text(json.dumps(config))
    for p in folder.glob("diffusion_pytorch_model*"):
        p.unlink()
    torch.manual_seed(0)
    model = build_model(BY_NAME[DIT], config, device="cpu")
    tensors = {n: (torch.randn(s) * 0.02).to(torch.bfloat16) for n, _, s in tensor_specs(model, "bfloat16")}
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (src / "glmq-manifest.json").unlink()
    out = root / "out"
    return src, out, ge.export_gguf(src, out, ar_type="Q8_0", dit_type="Q4_K_S", progress=False)


def _source_shapes(reader: PipelineReader, name: str) -> dict[str, tuple[int, ...]]:
    from glmq.models.build import build_model, tensor_specs

    cr = reader.component(name)
    return {n: tuple(s) for n, _, s in tensor_specs(build_model(BY_NAME[name], cr.config), "bfloat16")}


def _plan(name: str, type_name: str, shapes: dict) -> dict[str, T]:
    if name == AR:
        return ge.AR_TYPES[type_name].plan({gn.ar_gguf_name(n): s for n, s in shapes.items()})
    return ge.DIT_TYPES[type_name].plan(shapes)


def _cases(exported, wide):
    (out, summary), (wsrc, wout, wsummary) = exported, wide
    return [(summary["files"], out, None), (wsummary["files"], wout, wsrc)]


def test_folder_layout(exported, tiny_dir):
    out, summary = exported
    assert (out / "glm-image-ar-Q4_K_M.gguf").is_file() and (out / "glm-image-dit-Q8_0.gguf").is_file()
    for name, fname in ((AR, "glm-image-ar-Q4_K_M.gguf"), (DIT, "glm-image-dit-Q8_0.gguf")):
        config = json.loads((out / name / "config.json").read_text())
        assert config.pop("quantization_config") == {"quant_method": "gguf", "gguf_file": fname,
                                                     "type": summary["files"][name]["type"]}
        assert config == json.loads((tiny_dir / name / "config.json").read_text())
        assert not list((out / name).glob("*.safetensors"))
    assert (out / AR / "generation_config.json").is_file()
    for name in ("text_encoder", "vae", "processor", "tokenizer", "scheduler"):
        assert _files(out / name) == _files(tiny_dir / name)
    assert (out / "model_index.json").read_bytes() == (tiny_dir / "model_index.json").read_bytes()
    manifest = json.loads((out / "glmq-manifest.json").read_text())["files"]
    assert {"glm-image-ar-Q4_K_M.gguf", "glm-image-dit-Q8_0.gguf", "README.md"} <= set(manifest)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: zai-org/GLM-Image\nbase_model_relation: quantized\n")
    print(json.dumps(summary["files"], indent=1))


def test_gguf_py_reads_every_tensor_with_the_planned_type_and_complete_metadata(exported, wide, tiny_dir):
    for files, out, src in _cases(exported, wide):
        reader = PipelineReader(src or tiny_dir)
        for name, info in files.items():
            r = gguf.GGUFReader(out / info["file"])
            shapes = _source_shapes(reader, name)
            plan = _plan(name, info["type"], shapes)
            to_gguf = gn.ar_gguf_name if name == AR else gn.dit_gguf_name
            stored = {t.name: t for t in r.tensors}
            assert sorted(stored) == sorted(to_gguf(n) for n in shapes)  # every tensor, nothing else
            for hf_name, shape in shapes.items():
                t = stored[to_gguf(hf_name)]
                assert t.tensor_type == plan[t.name], t.name
                assert tuple(int(d) for d in reversed(t.shape.tolist())) == shape
            config = reader.component(name).config
            file_type = int(ge.AR_TYPES[info["type"]].file_type if name == AR else ge.DIT_TYPES[info["type"]].file_type)
            expected = (gn.ar_metadata(config, name="GLM-Image AR", file_type=file_type) if name == AR
                        else gn.dit_metadata(config, file_type=file_type))
            metadata = read_metadata(r)
            assert set(metadata) == {e.key for e in expected}
            for e in expected:
                got = metadata[e.key]
                if e.vtype == gguf.GGUFValueType.FLOAT32:
                    assert got == float(np.float32(e.value)), e.key
                else:
                    assert got == e.value, e.key
            rebuilt = gn.hf_config_from_metadata(metadata)
            assert rebuilt == ({k: v for k, v in config.items() if not k.startswith("_")} if name == DIT else config)
            counts = {}
            for t in r.tensors:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
            print(info["file"], dict(sorted(counts.items())))
            assert counts == info["tensor_types"]
    wide_types = wide[2]["files"][DIT]["tensor_types"]
    assert wide_types.get("Q4_K", 0) >= 10  # the 256-wide DiT really uses the K type


def test_dequantization_equals_gguf_py_and_sqnr_meets_the_floor(exported, wide, tiny_dir):
    worst: dict[str, float] = {}
    for files, out, src in _cases(exported, wide):
        reader = PipelineReader(src or tiny_dir)
        for name, info in files.items():
            source = GgufTensorSource(out / info["file"])
            cr = reader.component(name)
            for hf_name in source.names():
                ours = source.get(hf_name)
                t = source._tensor(hf_name)
                theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
                assert torch.equal(ours.float().reshape(-1), theirs.float().reshape(-1)), hf_name  # bit-exact
                ref = cr.get(hf_name)
                qtype = source.qtype(hf_name)
                if qtype in (T.F32, T.BF16):
                    assert torch.equal(ours.float(), ref.float()), hf_name  # lossless
                    continue
                sqnr = _sqnr(ref.float(), ours)
                key = qtype.name
                worst[key] = min(worst.get(key, float("inf")), sqnr)
                assert sqnr >= SQNR_FLOOR[qtype], (hf_name, qtype.name, sqnr)
    print("worst tensor SQNR per type (dB):", {k: round(float(v), 2) for k, v in sorted(worst.items())})
    assert set(worst) == {"Q8_0", "Q5_0", "Q4_K"}


def test_k_types_round_trip_through_the_exporter_encoding():
    """Q6_K (not used by the tiny plans) through the same encode path, read by gguf-py."""
    x = (torch.randn(48, 512) * 0.02).to(torch.bfloat16)
    raw = ge.encode(x, T.Q6_K)
    ours = gq.dequantize(raw, T.Q6_K)
    theirs = gguf.quants.dequantize(raw, T.Q6_K)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    sqnr = _sqnr(x.float(), torch.from_numpy(ours))
    print(f"Q6_K SQNR {sqnr:.2f} dB")
    assert sqnr >= SQNR_FLOOR[T.Q6_K]


def test_reader_rebuilds_the_ar_and_its_logits_stay_close(exported, tiny_dir):
    from glmq.models.build import build_model
    from glmq.evaluate.fidelity import load_dequantized

    out, summary = exported
    source = GgufTensorSource(out / summary["files"][AR]["file"])
    assert source.component == AR and source.architecture == gn.AR_ARCH
    assert source.config == json.loads((tiny_dir / AR / "config.json").read_text())
    model = build_model(BY_NAME[AR], source.config, device="cpu").float()
    params = dict(model.named_parameters())
    assert set(source.names()) == set(params)
    with torch.no_grad():
        for name in source.names():
            params[name].copy_(source.get(name, torch.float32))
    model.eval()
    reference = load_dequantized(PipelineReader(tiny_dir).component(AR))

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        logits = [m.lm_head(m.model.language_model(input_ids=ids, position_ids=pos).last_hidden_state)
                  for m in (reference, model)]
    sqnr = _sqnr(logits[0], logits[1])
    print(f"AR logits SQNR, Q4_K_M GGUF vs bf16: {sqnr:.2f} dB")
    assert sqnr >= AR_LOGITS_SQNR_FLOOR


def test_reader_rebuilds_the_dit(wide):
    from glmq.models.build import build_model

    src, out, summary = wide
    source = GgufTensorSource(out / summary["files"][DIT]["file"])
    assert source.component == DIT and source.architecture == gn.DIT_ARCH
    model = build_model(BY_NAME[DIT], source.config, device="cpu")
    state = model.state_dict()
    assert set(source.names()) == set(state)
    model.load_state_dict({n: source.get(n, torch.float32) for n in source.names()})
    assert source.shape("proj_out.weight") == tuple(state["proj_out.weight"].shape)
    assert source.raw("transformer_blocks.0.ff.net.2.weight").dtype == np.uint8


def test_resume_after_kill_is_byte_identical(exported, tiny_dir, tmp_path, monkeypatch):
    reference, _ = exported
    real = ge.encode
    calls = []

    def dying(tensor, qtype):
        calls.append(1)
        if len(calls) == 61 + 5:  # the AR file (61 tensors) is done, the DiT file is not
            raise Killed()
        return real(tensor, qtype)

    monkeypatch.setattr(ge, "encode", dying)
    out = tmp_path / "g"
    with pytest.raises(Killed):
        ge.export_gguf(tiny_dir, out, progress=False)
    partial = tmp_path / "g.partial"
    assert not out.exists() and (partial / "glm-image-ar-Q4_K_M.gguf").is_file()
    assert not list(partial.glob("*.tmp"))
    stamp = (partial / "glm-image-ar-Q4_K_M.gguf").stat().st_mtime_ns
    monkeypatch.setattr(ge, "encode", real)
    ge.export_gguf(tiny_dir, out, progress=False)
    assert (out / "glm-image-ar-Q4_K_M.gguf").stat().st_mtime_ns == stamp  # not written again
    assert _files(out) == _files(reference)


def test_streams_one_source_tensor_at_a_time(tiny_dir, tmp_path, monkeypatch):
    """Bounded memory: each source tensor is released before the next is read, and gguf-py's buffering
    ``add_tensor`` is never used."""
    from gguf import GGUFWriter

    from glmq.io.reader import ComponentReader

    real = ComponentReader.get
    live, peak = [0], [0]

    def tracked(self, name):
        peak[0] = max(peak[0], live[0])
        t = real(self, name)
        live[0] += 1
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - 1))
        return t

    def buffering(*args, **kwargs):
        raise AssertionError("GGUFWriter.add_tensor keeps tensors in memory")

    monkeypatch.setattr(ComponentReader, "get", tracked)
    monkeypatch.setattr(GGUFWriter, "add_tensor", buffering)
    ge.export_gguf(tiny_dir, tmp_path / "g", progress=False)
    assert peak[0] == 0


def test_bad_input(exported, tiny_dir, tmp_path):
    before = tree_snapshot(tmp_path)
    with pytest.raises(GlmqError) as e:
        ge.export_gguf(tiny_dir, tmp_path / "o", ar_type="Q3_K_M")
    assert_one_line_error(e.value, "'Q3_K_M'", "Q4_K_M", "Q8_0")
    with pytest.raises(GlmqError) as e:
        ge.export_gguf(tiny_dir, tmp_path / "o", dit_type="q8_0")
    assert_one_line_error(e.value, "'q8_0'", "Q8_0, Q6_K, Q5_K_S, Q4_K_S")
    out, _ = exported
    with pytest.raises(GlmqError) as e:  # a GGUF export is not a source
        ge.export_gguf(out, tmp_path / "o")
    assert_one_line_error(e.value, "already quantized", "gguf")
    assert tree_snapshot(tmp_path) == before  # nothing written, no .partial left

    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputExistsError) as e:
        ge.export_gguf(tiny_dir, existing, progress=False)
    assert_one_line_error(e.value, "already exists", "--force")
    assert not list(existing.iterdir()) and not (tmp_path / "exists.partial").exists()


def test_reader_refuses_foreign_and_broken_files(tmp_path):
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GlmqError) as e:
        GgufTensorSource(path)
    assert_one_line_error(e.value, "not a glmq GLM-Image export", "llama")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(CheckpointError) as e:
        GgufTensorSource(junk)
    assert_one_line_error(e.value, "not a readable GGUF file")
    with pytest.raises(CheckpointError):
        GgufTensorSource(tmp_path / "missing.gguf")


# --- verifying a GGUF export (issue #21: no glmq command could) ------------------------------------------


def test_inspect_verifies_a_gguf_export_through_its_manifest(exported, tmp_path):
    from glmq.inspect import format_report, inspect_pipeline
    from glmq.testing import assert_user_error, run_cli_inprocess

    out, summary = exported
    report = inspect_pipeline(out)
    print(format_report(report))
    assert report["manifest"]["verified"] is True
    by_name = {c["name"]: c for c in report["components"]}
    for name in (AR, DIT):
        assert by_name[name]["gguf_file"] == summary["files"][name]["file"]
        assert by_name[name]["bytes"] == summary["files"][name]["bytes_after"]
    manifest = json.loads((out / "glmq-manifest.json").read_text())
    assert summary["files"][AR]["file"] in manifest["files"]

    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    gguf_path = dst / summary["files"][AR]["file"]
    data = bytearray(gguf_path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one quantized block
    gguf_path.write_bytes(bytes(data))
    proc = run_cli_inprocess("inspect", str(dst))
    assert_user_error(proc, "manifest verification failed", summary["files"][AR]["file"], "sha256")


def test_gguf_pointer_out_of_the_folder_is_refused(exported, tmp_path):
    from glmq.inspect import inspect_pipeline

    out, _ = exported
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    cfg_path = dst / DIT / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["gguf_file"] = "../../../../etc/passwd"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        inspect_pipeline(dst)
    assert_one_line_error(e.value, "gguf_file", "leaves the folder")


def test_unreadable_gguf_error_quotes_nothing_from_the_file(tmp_path):
    import struct

    path = tmp_path / "linked.gguf"
    version = struct.unpack("<I", b"pw=1")[0]  # gguf-py's message would quote these 4 bytes as a version
    path.write_bytes(b"GGUF" + b"pw=1" + b"\0" * 32)
    with pytest.raises(CheckpointError) as e:
        GgufTensorSource(path)
    assert_one_line_error(e.value, "not a readable GGUF file")
    assert str(version) not in str(e.value)
