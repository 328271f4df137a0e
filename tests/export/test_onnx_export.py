"""glmq's ONNX export of the tiny GLM-Image, run by ONNX Runtime (CPU) against the upstream torch modules.

Tolerances: an fp32 graph's error against a float64 run of the same torch module may be at most twice the
error of the fp32 torch module itself (plus one fp32 ulp of the output's scale, for outputs torch happens
to get exact); int8/int4 graphs are held to the same bound against the torch module with glmq-dequantized
weights, and their SQNR against the fp32 module is printed and checked against recorded floors. The
MatMulNBits conversion is checked bit for bit, and the example pipeline against diffusers/transformers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from glmq.errors import GlmqError, OutputExistsError
from glmq.export import onnx_export as oe
from glmq.export.onnx_quant import int4_to_matmulnbits, matmulnbits_dequantize_ref
from glmq.io.reader import PipelineReader
from glmq.quant.formats import get_format

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "onnx_generate.py"
GRAPHS = ["ar_decoder", "glyph_encoder", "dit", "vae_decoder"]
# SQNR floors (dB) of the tiny model's outputs against fp32, about 2 dB under the lowest measured: 13.3-13.4
# (int4 AR, g128 asymmetric) and 45.3-46.4 (int8 DiT; ORT's default and no-fusion sessions). The floor was 60 dB
# while the tiny DiT's blocks barely moved its output (> 100 dB then); with fan-in init every block matters.
SQNR_FLOOR = {("int4", "ar_decoder"): 11.0, ("int8", "dit"): 43.0}


@pytest.fixture(scope="module")
def reader(tiny_dir):
    return PipelineReader(tiny_dir)


@pytest.fixture(scope="module", autouse=True)
def reuse_traces():
    """Tracing is 90 % of an export's time; one trace serves every weights mode of a float dtype (the
    quantization is a rewrite of the traced graph), so tests share them."""
    cache = {}
    original = oe.trace

    def cached(reader, graph, dtype, opset=oe.DEFAULT_OPSET, **kwargs):
        key = (str(reader.path), graph, dtype, opset)
        if key not in cache:
            cache[key] = original(reader, graph, dtype, opset, **kwargs)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(oe, "trace", cached)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def fp32_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    index = oe.export_onnx(tiny_dir, out, weights="fp32", progress=False)
    return out, index


def _session(path, fp32_matmulnbits: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if fp32_matmulnbits:
        # ONNX Runtime fuses weight-only int8 QDQ into MatMulNBits with int8 *activations* (accuracy level 4)
        # by default; level 1 keeps fp32 activations, so the graph computes exactly what glmq exported.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _inputs(graph: str, case: int, cfg: dict) -> tuple[dict[str, torch.Tensor], tuple]:
    """Awkward example inputs for ``graph``: ``case`` 0 and 1 differ in batch and every dynamic size."""
    g = torch.Generator().manual_seed(10 + case)
    if graph == "dit":
        c, d = cfg["transformer"]["in_channels"], cfg["transformer"]["text_embed_dim"]
        b, h, w, t = (1, 6, 10, 7) if case == 0 else (2, 8, 4, 1)
        n = (h // 2) * (w // 2)
        drop = torch.zeros(b, n, dtype=torch.bool)
        drop[-1] = True
        x = {"latents": torch.randn(b, c, h, w, generator=g), "glyph_embeds": torch.randn(b, t, d, generator=g),
             "prior_token_ids": torch.randint(0, 128, (b, n), generator=g), "prior_token_drop": drop,
             "timestep": torch.tensor([979.0, 3.0][:b]), "target_size": torch.tensor([[h * 8.0, w * 8.0]] * b),
             "crop_coords": torch.zeros(b, 2)}
        return x, tuple(x.values())
    if graph == "vae_decoder":
        b, h, w = (1, 5, 3) if case == 0 else (2, 2, 7)
        x = {"latents": torch.randn(b, cfg["vae"]["latent_channels"], h, w, generator=g)}
        return x, tuple(x.values())
    if graph == "glyph_encoder":
        b, t = (1, 9) if case == 0 else (3, 4)
        ids = torch.randint(3, 259, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[-1, t // 2:] = 0
        x = {"input_ids": ids, "attention_mask": mask}
        return x, tuple(x.values())
    # ar_decoder: case 0 = prefill (past 0), case 1 = decode of 2 tokens after 5, batch 2 left-padded
    tc = cfg["vision_language_encoder"]["text_config"]
    layers, kvh = tc["num_hidden_layers"], tc["num_key_value_heads"]
    hd = tc["hidden_size"] // tc["num_attention_heads"]
    b, s, past = (1, 7, 0) if case == 0 else (2, 2, 5)
    mask = torch.ones(b, past + s, dtype=torch.long)
    if b == 2:
        mask[1, :3] = 0
    x = {"input_ids": torch.randint(0, 168064, (b, s), generator=g), "attention_mask": mask,
         "position_ids": torch.randint(0, 60, (3, b, s), generator=g)}
    cache = []
    for i in range(layers):
        for kind in ("key", "value"):
            x[f"past_key_values.{i}.{kind}"] = t = torch.randn(b, kvh, past, hd, generator=g)
            cache.append(t)
    return x, (x["input_ids"], x["attention_mask"], x["position_ids"], cache)


def _as(args, dtype):
    if isinstance(args, (list, tuple)):
        return type(args)(_as(a, dtype) for a in args)
    return args.to(dtype) if args.is_floating_point() else args


def _run_torch(module, args) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*args)
    return [o.float().numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _check_close(ort_out, spec, args, what: str) -> None:
    """ORT vs the torch module: error against float64 at most 2x torch fp32's own, plus 8 ulp of the output's
    scale. The ulp term covers how ORT's fp32 kernels order their sums differently from torch's: on the tiny
    DiT, whose attention logits and AdaLN gates are of order one (fan-in init), ORT's noise_pred error is
    4.7x torch's (3.3e-6 against 7.2e-7, outputs up to ~5) while an export error moves outputs by >1e-3."""
    ref32 = _run_torch(spec.module, args)
    ref64 = _run_torch(spec.module.double(), _as(args, torch.float64))
    spec.module.float()
    for name, o, r32, r64 in zip(spec.outputs, ort_out, ref32, ref64):
        err_ort = float(np.abs(o.astype(np.float64) - r64).max())
        err_torch = float(np.abs(r32.astype(np.float64) - r64).max())
        bound = 2 * err_torch + 8 * np.finfo(np.float32).eps * float(np.abs(r64).max())
        print(f"{what} {name}: ort err {err_ort:.3g}, torch fp32 err {err_torch:.3g}, bound {bound:.3g}")
        assert o.shape == r64.shape, (name, o.shape, r64.shape)
        assert err_ort <= bound, (what, name)


def _sqnr(x: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((x - ref).astype(np.float64) ** 2).sum()))


def _configs(tiny_dir) -> dict:
    return {c: json.loads((Path(tiny_dir) / c / "config.json").read_text())
            for c in ("transformer", "vae", "vision_language_encoder")}


# ---- fp32 graphs ----------------------------------------------------------------------------------------


def test_layout_and_index(fp32_export):
    out, index = fp32_export
    for g in GRAPHS:
        assert (out / g / "model.onnx").is_file()
        assert index["graphs"][g]["external_data"] is None
        onnx.checker.check_model(str(out / g / "model.onnx"))
    saved = json.loads((out / "glmq_onnx.json").read_text())
    assert saved == json.loads(json.dumps(index))
    ar = index["graphs"]["ar_decoder"]
    names = [i["name"] for i in ar["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in ar["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    assert ar["inputs"][2]["shape"] == [3, "batch", "sequence"]
    assert ar["inputs"][3]["shape"][2] == "past_sequence"
    p = index["pipeline"]
    assert p["vae"]["scale_factor"] == 8 and p["grid"]["factor"] == 32
    assert p["scheduler"]["time_shift_type"] == "linear" and p["ar"]["image_start_token_id"] == 16384
    for folder in oe.COPIED_FOLDERS:
        assert any((out / folder).iterdir())
    assert (out / "glmq-manifest.json").is_file()


@pytest.mark.parametrize("graph", GRAPHS)
def test_fp32_graph_matches_torch(graph, fp32_export, reader, tiny_dir):
    out, _ = fp32_export
    spec = oe.reference_graph(reader, graph, weights="fp32")
    sess = _session(out / graph / "model.onnx")
    for case in (0, 1):
        feed, args = _inputs(graph, case, _configs(tiny_dir))
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        _check_close(got, spec, args, f"{graph}[{case}]")


# ---- quantized graphs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights,graphs,layout", [("int8", ["dit"], "qdq"), ("int8", ["dit"], "matmulnbits"),
                                                   ("int4", ["ar_decoder"], "qdq")])
def test_quantized_graphs(weights, graphs, layout, tiny_dir, reader, tmp_path):
    """int8 on the DiT (its linears come as MatMul(x, Transpose(W)) and, for the 2-D AdaLN input, Gemm) as QDQ
    and as MatMulNBits bits=8, and int4 on the AR through the public API. The AR's int8 path is the DiT's
    MatMul one."""
    if weights == "int8":  # the graph alone, without the folder around it
        index = {"graphs": {}}
        fmt = oe._quant_formats(weights, 128, False)
        for g in graphs:
            path = tmp_path / g / "model.onnx"
            path.parent.mkdir()
            index["graphs"][g] = oe.export_graph(reader, g, path, dtype=torch.float32, fmt=fmt[g], progress=False,
                                                 int8_layout=layout)
        out = tmp_path
    else:
        out = tmp_path / "int4"
        index = oe.export_onnx(tiny_dir, out, component="ar", weights=weights, progress=False)
    cfg = _configs(tiny_dir)
    for g in graphs:
        q = index["graphs"][g]["quantization"]
        print(g, weights, q["num_layers"], "layers quantized; kept float:", q["kept_float"])
        assert q["num_layers"] == {"ar_decoder": 12, "dit": 14}[g] and not q["kept_float"]
        ops = set(index["graphs"][g]["ops"])
        nbits = weights == "int4" or layout == "matmulnbits"
        assert ("com.microsoft::MatMulNBits" if nbits else "DequantizeLinear") in ops
        if nbits:  # every quantized linear, MatMul and Gemm alike, is one MatMulNBits of the expected width
            nodes = onnx.load(str(out / g / "model.onnx"), load_external_data=False).graph.node
            bits = {a.i for nd in nodes if nd.op_type == "MatMulNBits" for a in nd.attribute if a.name == "bits"}
            assert bits == {4 if weights == "int4" else 8} and "DequantizeLinear" not in ops
            assert sum(nd.op_type == "MatMulNBits" for nd in nodes) >= q["num_layers"]
        elif g == "dit":  # both patterns: DequantizeLinear on [K, N] (axis 1) for MatMul, on [N, K] (axis 0) for Gemm
            nodes = onnx.load(str(out / g / "model.onnx"), load_external_data=False).graph.node
            axes = {a.i for nd in nodes if nd.op_type == "DequantizeLinear" for a in nd.attribute if a.name == "axis"}
            assert axes == {0, 1}
        spec = oe.reference_graph(reader, g, weights=weights)
        fp32 = oe.reference_graph(reader, g, weights="fp32")
        exact, default = _session(out / g / "model.onnx", True), _session(out / g / "model.onnx")
        for case in (0, 1):
            feed, args = _inputs(g, case, cfg)
            np_feed = {k: v.numpy() for k, v in feed.items()}
            got = exact.run(None, np_feed)
            _check_close(got, spec, args, f"{weights} {g}[{case}]")
            ref = _run_torch(fp32.module, args)[0]
            sqnr = _sqnr(got[0], ref)
            sqnr_default = _sqnr(default.run(None, np_feed)[0], ref)
            print(f"{weights} {layout} {g}[{case}] SQNR vs fp32: {sqnr:.1f} dB (ORT default session: "
                  f"{sqnr_default:.1f} dB)")
            if layout == "matmulnbits":  # no fusion to opt out of: the default session is already exact
                _check_close(default.run(None, np_feed), spec, args, f"{weights} {layout} {g}[{case}] default")
            assert sqnr >= SQNR_FLOOR[(weights, g)]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_matmulnbits_layout_bit_exact(group_size, symmetric):
    n, k = 77, 384  # awkward N; K a multiple of every group size
    g = torch.Generator().manual_seed(group_size + symmetric)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
    w[3] = 0  # an all-zero row
    fmt = get_format("int4", group_size=group_size, symmetric=symmetric)
    tensors = fmt.quantize(w)
    packed = int4_to_matmulnbits(tensors, group_size, np.float32)
    assert packed["B"].shape == (n, k // group_size, group_size // 2) and packed["B"].dtype == np.uint8
    assert packed["scales"].shape == (n, k // group_size)
    if not symmetric:
        assert packed["zero_points"].dtype == np.uint8  # RTN zero points are integers: packed
        assert packed["zero_points"].shape == (n, -(-(k // group_size) // 2))
    ours = matmulnbits_dequantize_ref(packed["B"], packed["scales"], packed.get("zero_points"), k=k, n=n, bits=4,
                                      block_size=group_size)
    glmq = fmt.dequantize(tensors, (n, k)).numpy()
    assert np.array_equal(ours, glmq)
    # ONNX Runtime's kernel on the same bytes: x @ W^T to fp32 matmul accuracy.
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    y = _run_matmulnbits(x, packed, n, k, group_size)
    ref = x.astype(np.float64) @ glmq.T.astype(np.float64)
    bound = 4 * k * np.finfo(np.float32).eps * float((np.abs(x) @ np.abs(glmq).T).max())
    print(f"MatMulNBits g{group_size} sym={symmetric}: max err {np.abs(y - ref).max():.3g}, bound {bound:.3g}")
    assert np.abs(y - ref).max() <= bound


@pytest.mark.parametrize("k,block", [(4096, 128), (1472, 64), (13696, 128), (208, 16), (200, None)])
def test_int8_matmulnbits_layout_bit_exact(k, block):
    """int8 codes as MatMulNBits bits=8 decode to glmq's dequantized weight bit for bit, and ONNX Runtime's
    kernel computes x @ W^T with it to fp32 matmul accuracy. K: GLM-Image's real widths (DiT/AR hidden, glyph
    d_model, AR MLP), a small block, and one that fits no block (the layer then stays QDQ)."""
    from glmq.export.onnx_quant import int8_to_matmulnbits

    n = 37
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * 0.02).to(torch.bfloat16)
    w[5] = 0  # an all-zero row
    w[6, 7] = 1.0  # a row whose extreme code is +127 and one ...
    w[7, 3] = -1.0  # ... -127: both ends of the code range
    fmt = get_format("int8")
    tensors = fmt.quantize(w)
    converted = int8_to_matmulnbits(tensors, np.float32)
    if block is None:
        assert converted is None
        return
    packed, got_block = converted
    assert got_block == block and packed["B"].shape == (n, k // block, block) and packed["B"].dtype == np.uint8
    ours = matmulnbits_dequantize_ref(packed["B"], packed["scales"], None, k=k, n=n, bits=8, block_size=block)
    glmq = fmt.dequantize(tensors, (n, k)).numpy()
    assert np.array_equal(ours, glmq)
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    y = _run_matmulnbits(x, packed, n, k, block, bits=8)
    ref = x.astype(np.float64) @ glmq.T.astype(np.float64)
    bound = 4 * k * np.finfo(np.float32).eps * float((np.abs(x) @ np.abs(glmq).T).max())
    print(f"MatMulNBits bits=8 K={k} block {block}: max err {np.abs(y - ref).max():.3g}, bound {bound:.3g}")
    assert np.abs(y - ref).max() <= bound


def test_matmulnbits_float_zero_points():
    """HQQ-style fractional zero points stay unpacked floats; the layout still decodes to glmq's weight."""
    n, k, gs = 9, 64, 32
    fmt = get_format("int4", group_size=gs, symmetric=False)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    scale, zero = fmt.qparams(w)
    zero = (zero.float() + 0.25).to(torch.bfloat16)
    tensors = fmt.quantize(w, scale=scale, zero=zero)
    packed = int4_to_matmulnbits(tensors, gs, np.float32)
    assert packed["zero_points"].dtype == np.float32 and packed["zero_points"].shape == (n, k // gs)
    ours = matmulnbits_dequantize_ref(packed["B"], packed["scales"], packed["zero_points"], k=k, n=n, bits=4,
                                      block_size=gs)
    assert np.array_equal(ours, fmt.dequantize(tensors, (n, k)).numpy())
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    y = _run_matmulnbits(x, packed, n, k, gs)
    err = np.abs(y - x.astype(np.float64) @ ours.T.astype(np.float64)).max()
    print("MatMulNBits float zero points: max err", err)
    assert err <= 4 * k * np.finfo(np.float32).eps * float((np.abs(x) @ np.abs(ours).T).max())


@pytest.mark.parametrize("fmt_name", ["int8", "int4"])
def test_linear_rewrite_patterns(fmt_name):
    """Both linear patterns the exporter emits, rewritten on a hand-built graph: MatMul(x, Transpose(W)) + bias
    for 3-D x, Gemm(x, W, b, transB=1) for 2-D x; a weight with any other use stays float."""
    from onnx import TensorProto, helper, numpy_helper

    from glmq.export.onnx_quant import LinearRewriter

    n, k = 24, 64
    rng = np.random.default_rng(0)
    w = {f"W{i}": (rng.standard_normal((n, k)) * 0.05).astype(np.float32) for i in (1, 2, 3)}
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x3", "W1t"], ["m1"]),
        helper.make_node("Add", ["m1", "b"], ["y1"]),
        helper.make_node("Gemm", ["x2", "W2", "b"], ["y2"], transB=1),
        helper.make_node("Transpose", ["W3"], ["W3t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x3", "W3t"], ["m3"]),
        helper.make_node("ReduceSum", ["W3"], ["y3"], keepdims=0),  # a second, non-linear use of W3
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("x3", TensorProto.FLOAT, [2, 3, k]), vi("x2", TensorProto.FLOAT, [4, k])],
                              [vi("y1", TensorProto.FLOAT, [2, 3, n]), vi("y2", TensorProto.FLOAT, [4, n]),
                               vi("m3", TensorProto.FLOAT, [2, 3, n]), vi("y3", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    emitted = {}
    rw = LinearRewriter(model, lambda name, arr: emitted.__setitem__(name, arr), np.dtype(np.float32))
    fmt = get_format("int4", group_size=32, symmetric=False) if fmt_name == "int4" else get_format("int8")
    deq = {}
    for name in ("W1", "W2", "W3"):
        uses = rw.uses(name)
        if name == "W3":
            assert uses is None
            emitted[name] = w[name]
            continue
        tensors = fmt.quantize(torch.from_numpy(w[name]))
        deq[name] = fmt.dequantize(tensors, (n, k)).numpy()
        rw.int4(name, tensors, uses, 32) if fmt_name == "int4" else rw.int8(name, tensors, uses)
    rw.finish()
    model.graph.initializer.extend(numpy_helper.from_array(a, nm) for nm, a in emitted.items())
    onnx.checker.check_model(model)
    assert "W1" not in emitted and "W2" not in emitted
    ops = [nd.op_type for nd in model.graph.node]
    assert ops.count("Transpose") == 1  # W1's is gone, W3's stays
    assert ops.count("MatMulNBits" if fmt_name == "int4" else "DequantizeLinear") == 2
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x3 = rng.standard_normal((2, 3, k)).astype(np.float32)
    x2 = rng.standard_normal((4, k)).astype(np.float32)
    y1, y2, m3, y3 = sess.run(None, {"x3": x3, "x2": x2})
    for got, x, name in ((y1, x3, "W1"), (y2, x2, "W2")):
        ref = x.astype(np.float64) @ deq[name].T.astype(np.float64) + b
        bound = 4 * k * np.finfo(np.float32).eps * float((np.abs(x) @ np.abs(deq[name]).T).max() + np.abs(b).max())
        print(f"{fmt_name} {name}: max err {np.abs(got - ref).max():.3g}, bound {bound:.3g}")
        assert np.abs(got - ref).max() <= bound
    assert np.allclose(m3, x3 @ w["W3"].T, rtol=1e-5, atol=1e-6) and np.allclose(y3, w["W3"].sum(), rtol=1e-4)


def _run_matmulnbits(x, packed, n, k, group_size, bits: int = 4) -> np.ndarray:
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(packed["B"], "B"), numpy_helper.from_array(packed["scales"], "scales")]
    inputs = ["x", "B", "scales"]
    if "zero_points" in packed:
        inits.append(numpy_helper.from_array(packed["zero_points"], "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=group_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0].astype(np.float64)


# ---- fp16 and external data --------------------------------------------------------------------------------


def test_fp16_ar(reader, tmp_path, tiny_dir):
    """fp16 graph vs float64: at most 2x the fp16 torch module's own error (the VAE/glyph stay fp32)."""
    assert oe.graph_dtype("vae_decoder", "fp16") == torch.float32
    assert oe.graph_dtype("glyph_encoder", "fp16") == torch.float32
    assert oe.graph_dtype("dit", "fp16") == torch.float16
    path = tmp_path / "ar" / "model.onnx"
    path.parent.mkdir()
    oe.export_graph(reader, "ar_decoder", path, dtype=torch.float16, progress=False)
    spec16 = oe.reference_graph(reader, "ar_decoder", weights="fp16")
    spec64 = oe.reference_graph(reader, "ar_decoder", weights="fp32")
    spec64.module.double()
    sess = _session(path)
    for case in (0, 1):
        feed, args = _inputs("ar_decoder", case, _configs(tiny_dir))
        got = sess.run(None, {k: (v.half() if v.is_floating_point() else v).numpy() for k, v in feed.items()})
        assert got[0].dtype == np.float16 and got[1].dtype == np.float16
        r16 = _run_torch(spec16.module, _as(args, torch.float16))
        r64 = _run_torch(spec64.module, _as(args, torch.float64))
        for name, o, a, b in zip(spec16.outputs, got, r16, r64):
            err, err_torch = np.abs(o - b).max(), np.abs(a - b).max()
            print(f"fp16 ar[{case}] {name}: ort err {err:.3g}, torch fp16 err {err_torch:.3g}")
            assert err <= 2 * err_torch + np.finfo(np.float16).eps * np.abs(b).max()


def test_external_data_and_protobuf_limit(reader, tmp_path, monkeypatch, tiny_dir):
    # The tiny glyph encoder (120 kB of weights, 38 kB of structure) is now "too big" for one file.
    monkeypatch.setattr(oe, "PROTOBUF_LIMIT", 100_000)
    path = tmp_path / "auto" / "model.onnx"
    path.parent.mkdir()
    info = oe.export_graph(reader, "glyph_encoder", path, dtype=torch.float32, progress=False)
    assert info["external_data"] == "model.onnx.data" and (path.parent / "model.onnx.data").is_file()
    assert path.stat().st_size < 100_000
    feed, args = _inputs("glyph_encoder", 1, _configs(tiny_dir))
    got = _session(path).run(None, {k: v.numpy() for k, v in feed.items()})
    _check_close(got, oe.reference_graph(reader, "glyph_encoder"), args, "external glyph")
    path = tmp_path / "never" / "model.onnx"
    path.parent.mkdir()
    with pytest.raises(GlmqError, match="over protobuf's 2 GiB limit") as e:
        oe.export_graph(reader, "glyph_encoder", path, dtype=torch.float32, external_data=False, progress=False)
    assert "\n" not in str(e.value)


# ---- the example pipeline --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("onnx_generate", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_writes_png(fp32_export, tmp_path):
    out, _ = fp32_export
    png = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(out), "--prompt", 'a sign that says "glmq"',
                           "--out", str(png), "--size", "64x96", "--steps", "3"], capture_output=True, text=True,
                          timeout=300)
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (64, 96) and im.mode == "RGB"


def test_example_matches_diffusers(fp32_export, tiny_dir, example):
    """Prompt ids, M-RoPE positions, teacher-forced AR logits, glyph states, the flow schedule and the
    denoised image agree with transformers/diffusers' GlmImagePipeline."""
    from diffusers import GlmImagePipeline
    from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

    out, _ = fp32_export
    pipe = GlmImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ox = example.OnnxGlmImage(out, providers=["CPUExecutionProvider"])
    h, w, steps = 64, 96, 3
    prompt = "two quotes: \u201cGLM\u201d and 'image'"
    ids, (th, tw, ph, pw) = ox.prompt_ids(prompt, h, w)
    msgs = [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]]
    inputs = pipe.processor.apply_chat_template(msgs, tokenize=True, target_h=h, target_w=w, return_dict=True,
                                                return_tensors="pt")
    assert np.array_equal(ids, inputs["input_ids"][0].numpy())
    assert inputs["image_grid_thw"].tolist() == [[1, th, tw], [1, ph, pw]]
    model = pipe.vision_language_encoder
    model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                               images_per_sample=inputs["images_per_sample"], attention_mask=inputs["attention_mask"])
    grids = [(ph, pw), (th, tw)]
    assert np.array_equal(model.model._cached_decode_position_ids[0].numpy(), example.decode_positions(len(ids), grids))

    torch.manual_seed(3)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=ph * pw + th * tw, do_sample=True, output_logits=True,
                             return_dict_in_generate=True)
    tokens = gen.sequences[0, len(ids):].numpy()
    assert len(set(tokens.tolist())) > 20  # sampled, not degenerate: positions matter for every step
    ours_tokens, ours_logits = ox.run_ar(ids, grids, lambda step, logits: tokens[step])
    hf_logits = torch.stack(gen.logits)[:, 0].numpy()
    err = np.abs(np.stack(ours_logits) - hf_logits).max()
    print(f"teacher-forced AR logits, {len(tokens)} steps: err {err:.3g}, max |logit| {np.abs(hf_logits).max():.3g}")
    assert err <= 1e-5 * max(1.0, np.abs(hf_logits).max())

    seq = (h // 8) * (w // 8) // 4
    ts = np.linspace(1000, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    t_hf, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu", ts, ts / 1000, mu=calculate_shift(seq, 256, 0.25, 0.75))
    t_ours, s_ours = example.flow_schedule(steps, seq, ox.cfg["scheduler"])
    assert np.array_equal(t_hf.numpy(), t_ours) and np.array_equal(pipe.scheduler.sigmas.numpy(), s_ours)

    with torch.no_grad():
        glyph_hf = pipe._get_glyph_embeds(prompt, device="cpu", dtype=torch.float32).numpy()
    glyph = ox.glyph_embeds(prompt)
    print("glyph states max err", np.abs(glyph - glyph_hf).max())
    assert glyph.shape == glyph_hf.shape and np.abs(glyph - glyph_hf).max() <= 1e-5

    target = tokens[ph * pw:]
    prior = pipe._upsample_token_ids(torch.from_numpy(target).view(1, -1), th, tw)
    latents = torch.randn(1, 4, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img_hf = pipe(prompt=prompt, height=h, width=w, num_inference_steps=steps, prior_token_ids=prior,
                      latents=latents.clone(), output_type="np").images[0]
    ours_prior = target.reshape(th, tw).repeat(2, 0).repeat(2, 1).reshape(-1)
    assert np.array_equal(ours_prior, prior[0].numpy())
    lat = ox.denoise(ours_prior, glyph, ox.glyph_embeds(""), h, w, np.random.default_rng(0), steps, 1.5,
                     latents=latents.numpy())
    img = ox.decode(lat)
    print("image max err", np.abs(img - img_hf).max(), "image std", img_hf.std())
    assert np.abs(img - img_hf).max() <= 1e-4


def test_example_sampling_order(example):
    """temperature, then top-k, then top-p, restricted to the codebook: against transformers' warpers."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(0).standard_normal(40).astype(np.float32) * 3
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.9), TopKLogitsWarper(12), TopPLogitsWarper(0.75)])
    probs = torch.softmax(warp(None, torch.from_numpy(logits)[None]), -1)[0].numpy()
    counts = np.zeros(40)
    rng = np.random.default_rng(1)
    for _ in range(4000):
        counts[example.sample_token(logits, rng, valid=40, temperature=0.9, top_k=12, top_p=0.75)] += 1
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs > 0))
    assert np.abs(counts / 4000 - probs).max() < 0.04
    assert example.sample_token(logits, rng, valid=5, temperature=1.0, top_k=1, top_p=1.0) == int(np.argmax(logits[:5]))


def test_example_grid_rules(example):
    assert example.grid_sizes(1024, 1024) == (32, 32, 16, 16)
    assert example.grid_sizes(1152, 768) == (36, 24, 19, 13)  # the processor's default target, non-square
    assert example.glyph_texts('say "hi" and \u201cyo\u201d, 「字」') == ["yo", "hi", "字"]


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input(tiny_dir, tmp_path, example, fp32_export):
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputExistsError) as e:
        oe.export_onnx(tiny_dir, existing, component="vae", weights="fp32", progress=False)
    assert "--force" in str(e.value)
    cases = [({"component": "unet"}, "unknown component 'unet'; valid components: all, ar, glyph, dit, vae"),
             ({"weights": "int3"}, "unknown weights mode 'int3'; valid modes: fp16, fp32, int8, int4"),
             ({"opset": 9}, "opset 9 is not supported"),
             ({"weights": "fp16", "float_dtype": "float16"}, "float_dtype applies to --weights int8/int4 only"),
             ({"weights": "int4", "group_size": 48}, "int4 group size must be 32, 64 or 128")]
    for kwargs, message in cases:
        with pytest.raises(GlmqError) as e:
            oe.export_onnx(tiny_dir, tmp_path / "new", progress=False, **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()
    with pytest.raises(GlmqError, match="must not be the input folder"):
        oe.export_onnx(tiny_dir, Path(tiny_dir) / "onnx", progress=False)
    with pytest.raises(GlmqError, match="not a GLM-Image pipeline folder"):
        oe.export_onnx(existing, tmp_path / "x", progress=False)
    # The example refuses a folder that is not a complete export, in one line.
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path), "--prompt", "x", "--out", "x.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not a glmq ONNX export" in proc.stderr
