"""``glmq export onnx``: GLM-Image as four ONNX graphs that ONNX Runtime runs without PyTorch.

Output folder::

    DST/dit/model.onnx             one DiT denoising forward
    DST/vae_decoder/model.onnx     VAE decode (always fp32: an fp16 VAE overflows)
    DST/glyph_encoder/model.onnx   ByT5 glyph encoder (always fp32, as released: T5 overflows in fp16)
    DST/ar_decoder/model.onnx      one AR decoder step with a KV cache
    DST/*/model.onnx.data          weights, for graphs over the 2 GB protobuf limit
    DST/glmq_onnx.json             inputs/outputs, dtypes, weights mode and everything a runtime needs
                                   (scheduler config, latent statistics, token ids, grid rules, sampling)
    DST/processor/, DST/tokenizer/, DST/scheduler/   copied from the source folder
    DST/glmq-manifest.json         sha256 of every file

Each graph is traced once with storage-less (fake) weights, so tracing needs no weight memory; the weights
are then streamed from the checkpoint into the file one tensor at a time, cast to the graph's float dtype
or quantized (``glmq.export.onnx_quant``). Peak memory is the largest single tensor in its checkpoint dtype
plus its cast (the AR's 168064 x 4096 embedding: 1.4 GB bf16 + 2.75 GB fp32 in the int8/int4 graphs) on top
of a ~1 GB trace, except that a graph kept inline (under 2 GB) peaks at ~3.6x its size while protobuf
serializes it; benchmarks/results/onnx_full_cpu2.md has the full-size numbers.
``examples/onnx_generate.py`` runs the folder with onnxruntime, numpy and the tokenizers only.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from glmq.io.finite import count_nonfinite
from glmq.errors import GlmqError

FORMAT_NAME = "glmq-onnx"
FORMAT_VERSION = 1
INDEX_NAME = "glmq_onnx.json"
WEIGHTS = ("fp16", "fp32", "int8", "int4")
# CLI name -> graph name, in the order they are exported.
COMPONENTS = {"ar": "ar_decoder", "glyph": "glyph_encoder", "dit": "dit", "vae": "vae_decoder"}
# Graphs that stay fp32 whatever the weights mode.
FP32_GRAPHS = ("vae_decoder", "glyph_encoder")
DEFAULT_OPSET = 18
OPSETS = range(18, 22)  # torch.onnx lowers to opset 18+; 17 fails its version conversion
# protobuf cannot serialize a message of 2 GiB or more; graphs whose weights come near it use external data.
PROTOBUF_LIMIT = 2**31 - 1
# Weights of an external-data graph smaller than this stay inline; larger ones start on aligned offsets
# so that ONNX Runtime can memory-map them.
EXTERNAL_MIN_BYTES = 1024
EXTERNAL_ALIGN = 4096
COPIED_FOLDERS = ("processor", "tokenizer", "scheduler")


def export_onnx(src: str | Path, out: str | Path, *, component: str = "all", weights: str = "fp16",
                force: bool = False, opset: int = DEFAULT_OPSET, group_size: int = 128, symmetric: bool = False,
                float_dtype: str | None = None, external_data: bool | None = None, int8_layout: str = "matmulnbits",
                progress: bool = True) -> dict:
    """Export GLM-Image folder ``src`` to ONNX graphs in ``out``; returns a summary (also in ``glmq_onnx.json``).

    ``component``: ``"all"`` or one of ``ar``, ``glyph``, ``dit``, ``vae``. ``weights``: ``fp16`` (DiT and AR
    in fp16), ``fp32``, ``int8`` (DiT and AR decoder-layer linears in 8 bits, laid out by ``int8_layout``) or
    ``int4`` (AR decoder-layer linears as ``MatMulNBits`` 4-bit with ``group_size`` and ``symmetric``; DiT
    int8). Quantization is round-to-nearest with glmq's formats. ``float_dtype`` is the dtype of activations
    and unquantized weights of the int8/int4 graphs (``float32`` by default: ONNX Runtime's CPU kernels;
    ``float16`` for GPUs).
    ``external_data``: None writes ``model.onnx.data`` only for graphs near the 2 GB protobuf limit, True
    always, False never (a graph over the limit is then an error). ``int8_layout``: ``matmulnbits`` (default;
    ONNX Runtime's ``MatMulNBits`` bits=8: a session loads the weights as written) or ``qdq`` (standard ONNX
    ``DequantizeLinear`` for other runtimes; ONNX Runtime rewrites those weights while creating the session
    and holds both copies: the full-size DiT passed 11 GB before its session opened,
    ``benchmarks/results/onnx_full_cpu2.md``).
    """
    from glmq.io.reader import PipelineReader
    from glmq.checkpoint.validate import check_component
    from glmq.io.writer import OutputFolder

    from glmq.export.onnx_quant import INT8_LAYOUTS

    graphs = _check_args(component, weights, opset, group_size, float_dtype)
    if int8_layout not in INT8_LAYOUTS:
        raise GlmqError(f"unknown int8 layout {int8_layout!r}; valid layouts: {', '.join(INT8_LAYOUTS)}")
    src, out = Path(src), Path(out)
    reader = PipelineReader(src)
    rs, ro = src.resolve(), out.resolve()
    if ro == rs or rs in ro.parents or ro in rs.parents:
        raise GlmqError(f"output {out} must not be the input folder or inside it (or contain it)")
    from glmq.export.onnx_graphs import GRAPH_COMPONENTS

    for g in graphs:
        check_component(reader.component(GRAPH_COMPONENTS[g]))
    quant = _quant_formats(weights, group_size, symmetric)
    from glmq import __version__

    job = {"command": "export-onnx", "glmq": __version__, "graphs": graphs, "weights": weights, "opset": opset,
           "group_size": group_size, "symmetric": symmetric, "float_dtype": float_dtype,
           "external_data": external_data, "int8_layout": int8_layout}
    folder = OutputFolder(out, job=job, force=force, sources=(src,))
    results = {}
    for g in graphs:
        dtype = graph_dtype(g, weights, float_dtype)
        fmt = quant.get(g)
        t0 = time.perf_counter()
        info = export_graph(reader, g, folder.path(f"{g}/model.onnx"), dtype=dtype, fmt=fmt, opset=opset,
                            external_data=external_data, int8_layout=int8_layout, progress=progress)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        results[g] = info
        gc.collect()
    for name in COPIED_FOLDERS:
        folder.copy_in(src, name)
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created_by": f"glmq {__version__}",
        "weights": weights,
        "int8_layout": int8_layout,
        "opset": opset,
        "graphs": results,
        "pipeline": pipeline_config(reader),
        "files": {"processor": "processor", "glyph_tokenizer": "tokenizer", "scheduler": "scheduler"},
        "notes": [
            "vae_decoder and glyph_encoder are fp32 in every weights mode: an fp16 VAE overflows (NaN) and "
            "T5 encoders overflow in fp16",
            "ar_decoder takes position_ids [3, batch, sequence] (M-RoPE); see pipeline.grid.positions",
            "int8 layout qdq: ONNX Runtime fuses the int8 DequantizeLinear->MatMul pattern into MatMulNBits(bits=8) "
            "with int8 activations (accuracy level 4) by default; session config "
            "session.qdq_matmulnbits_accuracy_level=1 keeps fp32 activations. int8 layout matmulnbits: the linears "
            "are MatMulNBits(bits=8) as written, with fp32 activations (accuracy level 0)",
            "the additive attention mask of ar_decoder uses the float dtype's minimum: left-padded fp16 batches "
            "can overflow to -inf on fully padded rows; batch 1 (no padding) is always safe",
        ],
    }
    folder.write_json(INDEX_NAME, index)
    folder.commit({"source": {"export-onnx": {"path": str(src), "weights": weights}}})
    reader.close()
    return index


def _check_args(component: str, weights: str, opset: int, group_size: int, float_dtype: str | None) -> list[str]:
    if component == "all":
        graphs = list(COMPONENTS.values())
    elif component in COMPONENTS:
        graphs = [COMPONENTS[component]]
    else:
        raise GlmqError(f"unknown component {component!r}; valid components: all, {', '.join(COMPONENTS)}")
    if weights not in WEIGHTS:
        raise GlmqError(f"unknown weights mode {weights!r}; valid modes: {', '.join(WEIGHTS)}")
    if opset not in OPSETS:
        raise GlmqError(f"opset {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1}")
    if float_dtype not in (None, "float32", "float16"):
        raise GlmqError(f"float_dtype must be float32 or float16; got {float_dtype!r}")
    if float_dtype is not None and weights not in ("int8", "int4"):
        raise GlmqError("float_dtype applies to --weights int8/int4 only (fp16/fp32 name their dtype)")
    if weights == "int4" and group_size not in (32, 64, 128):
        raise GlmqError(f"int4 group size must be 32, 64 or 128; got {group_size}")
    return graphs


def graph_dtype(graph: str, weights: str, float_dtype: str | None = None):
    """The float dtype of a graph's activations and unquantized weights."""
    import torch

    if graph in FP32_GRAPHS or weights == "fp32":
        return torch.float32
    if weights == "fp16":
        return torch.float16
    return torch.float16 if float_dtype == "float16" else torch.float32


def _quant_formats(weights: str, group_size: int, symmetric: bool) -> dict[str, Any]:
    from glmq.export.onnx_quant import MODE_FORMATS
    from glmq.quant.formats import get_format

    out = {}
    for graph, name in MODE_FORMATS.get(weights, {}).items():
        out[graph] = get_format("int4", group_size=group_size, symmetric=symmetric) if name == "int4" \
            else get_format(name)
    return out


# ---- one graph -----------------------------------------------------------------------------------------


@contextmanager
def _quiet_export():
    """The exporter logs warnings about optional packages (torchvision) and prints progress; hide them."""
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def trace_graph(spec, opset: int):
    """Trace a :class:`~glmq.export.onnx_graphs.GraphSpec` into a ModelProto whose fake-weight initializers are
    left out; returns ``(proto, {initializer name: (torch dtype, shape)})`` for those."""
    import onnx_ir as ir
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail with a clear message if missing)
    except ImportError:
        raise GlmqError("ONNX export needs the onnxscript package: pip install onnxscript") from None
    with _quiet_export(), torch.no_grad():
        prog = torch.onnx.export(spec.module, spec.args(), None, input_names=list(spec.inputs),
                                 output_names=spec.outputs, dynamic_axes=spec.dynamic_axes, opset_version=opset,
                                 dynamo=True, optimize=False, verbose=False)
    pending = {}
    for name, value in list(prog.model.graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, FakeTensor):
            pending[name] = (raw.dtype, tuple(raw.shape))
            prog.model.graph.initializers.pop(name)
    proto = ir.serde.serialize_model(prog.model)
    del prog
    # The exporter annotates every node with its FX node, module path and class hierarchy: 90 % of the
    # file's structure. Drop them.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in spec.dynamic_axes.get(value.name, {}).items():
            if not dims[axis].dim_param:  # a glmq bug, not a user error: the trace fixed a size
                raise RuntimeError(f"{spec.name}: {value.name} axis {axis} ({name}) was traced as static")
    return proto, pending


def trace(reader, graph: str, dtype, opset: int = DEFAULT_OPSET, *, fmt=None, external_data: bool | None = None,
          int8_layout: str = "matmulnbits"):
    """Trace graph ``graph`` with fake weights: ``(spec, proto, pending)`` for :func:`export_graph`. One trace
    serves every weights mode of the same float dtype (quantization is a rewrite of the traced graph)."""
    import numpy as np

    from glmq.export.onnx_graphs import build_graph

    spec = build_graph(reader, graph, dtype, real=False)
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))
    targets = spec.quant_targets if fmt is not None else set()
    # The weights' size is known before tracing (the graph structure adds ~1 MB): fail before the slow part.
    weight_bytes = sum(_nbytes(p.dtype, tuple(p.shape), fmt if spec.checkpoint_name(n) in targets else None, np_dtype,
                               int8_layout) for n, p in spec.module.named_parameters())
    if external_data is False and weight_bytes >= PROTOBUF_LIMIT:
        raise _too_big(graph, weight_bytes)
    proto, pending = trace_graph(spec, opset)
    spec.module = None  # the fake model is no longer needed
    return spec, proto, pending


def export_graph(reader, graph: str, path: Path, *, dtype, fmt=None, opset: int = DEFAULT_OPSET,
                 external_data: bool | None = None, int8_layout: str = "matmulnbits", progress: bool = True,
                 traced=None) -> dict:
    """Write graph ``graph`` with ``reader``'s weights (cast to ``dtype``, or quantized by ``fmt`` where the graph
    has quantization targets; int8 in ``int8_layout``) to ``path``; returns its description. ``traced`` reuses
    a :func:`trace` result."""
    import numpy as np
    import onnx

    from glmq.export.onnx_graphs import GRAPH_COMPONENTS
    from glmq.export.onnx_quant import LinearRewriter, QuantResult
    from glmq.progress import ByteProgress

    if traced is None:
        traced = trace(reader, graph, dtype, opset, fmt=fmt, external_data=external_data, int8_layout=int8_layout)
    spec, traced_proto, pending = traced
    proto = onnx.ModelProto()
    proto.CopyFrom(traced_proto)  # the rewrite edits the graph in place; a trace stays reusable
    cr = reader.component(GRAPH_COMPONENTS[graph])
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))
    targets = spec.quant_targets if fmt is not None else set()

    names = {}
    for name in pending:
        ckpt = spec.checkpoint_name(name)
        if ckpt is None or ckpt not in cr.tensors:
            raise GlmqError(f"{graph}: graph weight {name!r} has no tensor in {cr.folder.name}/ to read from")
        names[name] = ckpt
    quantize = {n for n, c in names.items() if c in targets}
    total = proto.ByteSize() + sum(_nbytes(dt, shape, fmt if n in quantize else None, np_dtype, int8_layout)
                                   for n, (dt, shape) in pending.items())
    if external_data is None:
        external = total >= PROTOBUF_LIMIT * 0.95
    elif not external_data and total >= PROTOBUF_LIMIT:
        raise _too_big(graph, total)
    else:
        external = bool(external_data)

    sink = _TensorSink(path, external, proto)
    rewriter = LinearRewriter(proto, sink.add, np_dtype)
    result = QuantResult(fmt.config()) if fmt is not None else None
    with ByteProgress(total, f"onnx {graph}", enabled=progress) as bar:
        for name, (tdtype, shape) in pending.items():
            w = cr.get(names[name])
            if name in quantize:
                uses = rewriter.uses(name)
                if uses is None:
                    result.kept_float[names[name]] = "weight is not only used as a linear layer's weight"
                elif fmt.name == "int4" and w.shape[1] % fmt.group_size:
                    result.kept_float[names[name]] = f"K={w.shape[1]} is not a multiple of {fmt.group_size}"
                    uses = None
                if uses is not None:
                    tensors = fmt.quantize(w)
                    if fmt.name == "int4":
                        rewriter.int4(name, tensors, uses, fmt.group_size)
                    elif int8_layout != "matmulnbits" or not rewriter.int8_matmulnbits(name, tensors, uses):
                        if int8_layout == "matmulnbits":
                            result.qdq_fallback.append(names[name])
                        rewriter.int8(name, tensors, uses)
                    result.layers.append(names[name])
                    del tensors
                    bar.update(_nbytes(tdtype, shape, fmt, np_dtype, int8_layout))
                    continue
            sink.add(name, _to_numpy(w, tdtype, f"{graph} weight {names[name]}"))
            bar.update(_nbytes(tdtype, shape, None, np_dtype))
            del w
    rewriter.finish()
    sink.finish()
    del proto, sink, rewriter
    gc.collect()
    _check_file(path)
    info = describe(path)
    info.update({"source_component": GRAPH_COMPONENTS[graph], "dtype": str(np_dtype),
                 "external_data": f"{path.name}.data" if external else None, **spec.meta})
    if result is not None:
        info["quantization"] = result.to_json()
    return info


def _too_big(graph: str, nbytes: int) -> GlmqError:
    return GlmqError(f"{graph} would be {nbytes / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one .onnx file; "
                     "export it with external data (drop --no-external-data)")


def _nbytes(tdtype, shape: tuple[int, ...], fmt, np_dtype, int8_layout: str = "matmulnbits") -> int:
    """Bytes a weight takes in the file: as a float of its graph, or quantized by ``fmt`` (an estimate within
    a block's scales of the MatMulNBits int8 layout)."""
    import torch

    numel = math.prod(shape)
    if fmt is None:
        return numel * torch.empty((), dtype=tdtype).element_size()
    n, k = shape
    item = np_dtype.itemsize
    if fmt.name == "int8":
        if int8_layout == "matmulnbits":
            return n * k + n * -(-k // 128) * item
        return n * k + n * (item + 1)
    blocks = k // fmt.group_size
    zeros = 0 if fmt.symmetric else n * -(-blocks // 2)
    return n * k // 2 + n * blocks * item + zeros


# Elements per chunk of the finiteness check: torch.isfinite makes an |x| copy and two masks of its input,
# which for the AR's 2.75 GB fp32 embedding would double the export's peak memory.
FINITE_CHUNK = 1 << 22


def _all_finite(t) -> bool:
    """The checker every reader and exporter shares (glmq.io.finite), in blocks of FINITE_CHUNK."""
    return count_nonfinite(t, chunk=FINITE_CHUNK) == 0


def _to_numpy(t, tdtype, what: str):
    if t.is_floating_point():
        if tdtype.is_floating_point and t.dtype != tdtype:
            t = t.to(tdtype)
            if not _all_finite(t):
                raise GlmqError(f"{what} does not fit {str(tdtype).removeprefix('torch.')} (values overflow); "
                                "export with --weights fp32")
    elif t.dtype != tdtype:
        t = t.to(tdtype)
    return t.contiguous().numpy()


class _TensorSink:
    """Adds initializers to ``proto``, inline or streamed to ``model.onnx.data`` (aligned offsets), and saves it.

    Inline tensors go into the graph as they come (collecting them first and extending the graph at the end
    held two copies). An inline graph still peaks at about 3.6x its size while it is saved: protobuf
    serializes it into an arena and then into bytes (full-size VAE decoder, 0.93 GB: 3.6 GB)."""

    def __init__(self, path: Path, external: bool, proto):
        self.path = path
        self.external = external
        self.proto = proto
        self.location = f"{path.name}.data"
        self._file = open(path.with_name(self.location), "wb") if external else None
        self._offset = 0

    def add(self, name: str, arr) -> None:
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        arr = np.ascontiguousarray(arr)
        if self._file is None or arr.nbytes < EXTERNAL_MIN_BYTES:
            self.proto.graph.initializer.append(numpy_helper.from_array(arr, name))
            return
        pad = -self._offset % EXTERNAL_ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        # Write the array's own buffer: ``tobytes()`` would hold a second copy of the largest tensor (the
        # AR's fp32 embedding is 2.75 GB).
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
        self._file.write(memoryview(data).cast("B"))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=list(arr.shape))
        for key, value in (("location", self.location), ("offset", str(self._offset)), ("length", str(data.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL
        self.proto.graph.initializer.append(t)
        self._offset += data.nbytes

    def finish(self) -> None:
        import onnx

        if self._file is not None:
            self._file.close()
        if self.proto.ByteSize() >= PROTOBUF_LIMIT:
            raise GlmqError(f"{self.path.parent.name} is over protobuf's 2 GiB limit without external data; "
                            "export it with external data")
        onnx.save_model(self.proto, str(self.path))


def _check_file(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))


def describe(path: Path) -> dict:
    """Inputs and outputs of a saved graph (names, dtypes, shapes with symbolic dims by name)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(path), load_external_data=False)

    def io(values) -> list[dict]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            out.append({"name": v.name, "dtype": str(helper.tensor_dtype_to_np_dtype(tt.elem_type)),
                        "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]})
        return out

    ops = sorted({f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in m.graph.node})
    return {"file": f"{path.parent.name}/{path.name}", "inputs": io(m.graph.input), "outputs": io(m.graph.output),
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import}, "ops": ops}


def reference_graph(reader, graph: str, *, weights: str = "fp32", group_size: int = 128, symmetric: bool = False,
                    float_dtype: str | None = None):
    """The torch computation an exported graph must reproduce: the same wrapper around the upstream module,
    with the checkpoint's weights in the graph's dtype, and glmq's dequantization of exactly the weights the
    export quantizes. Returns a :class:`~glmq.export.onnx_graphs.GraphSpec` whose ``module`` runs it."""
    from glmq.export.onnx_graphs import build_graph

    _check_args("all", weights, DEFAULT_OPSET, group_size, float_dtype)
    dtype = graph_dtype(graph, weights, float_dtype)
    fmt = _quant_formats(weights, group_size, symmetric).get(graph)
    targets = build_graph(reader, graph, dtype, real=False).quant_targets if fmt is not None else set()

    def transform(name, w):
        if name not in targets or (fmt.name == "int4" and w.shape[1] % fmt.group_size):
            return w
        return fmt.dequantize(fmt.quantize(w), tuple(w.shape))

    return build_graph(reader, graph, dtype, real=True, transform=transform)


# ---- what the runtime needs ----------------------------------------------------------------------------


def pipeline_config(reader) -> dict:
    """Everything besides the graphs that text-to-image needs, read from the source folder's configs."""
    from glmq.io.layout import read_json

    ar = reader.component("vision_language_encoder").config
    text = ar.get("text_config", {})
    dit = reader.component("transformer").config
    vae = reader.component("vae").config
    glyph = reader.component("text_encoder").config
    sched = read_json(reader.path / "scheduler" / "scheduler_config.json", "scheduler config")
    gen_path = reader.path / "vision_language_encoder" / "generation_config.json"
    gen = read_json(gen_path, "generation config") if gen_path.exists() else {}
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    patch = dit["patch_size"]
    c = vae["latent_channels"]
    return {
        "scheduler": sched,
        "timesteps": {
            "rule": "t_i = float(int64(linspace(num_train_timesteps, 1, steps + 1)[:-1])); sigma_i = t_i / "
                    "num_train_timesteps shifted by mu = sqrt(image_seq_len / base_image_seq_len) * max_shift + "
                    "base_shift (time_shift_type linear: mu / (mu + (1 / sigma - 1))); the DiT gets t_i - 1 "
                    "(unshifted); Euler: x += (sigma_{i+1} - sigma_i) * v, sigma_steps = 0",
            "dit_timestep_offset": -1,
        },
        "guidance_scale": 1.5,
        "num_inference_steps": 50,
        "vae": {
            "scale_factor": vae_scale,
            "latent_channels": c,
            "latents_mean": vae.get("latents_mean") or [0.0] * c,
            "latents_std": vae.get("latents_std") or [1.0] * c,
            "decode_input": "latents * latents_std + latents_mean",
            "image_output": "[-1, 1], NCHW",
        },
        "dit": {"patch_size": patch, "in_channels": dit["in_channels"], "text_embed_dim": dit["text_embed_dim"],
                "prior_codebook_size": dit["prior_vq_quantizer_codebook_size"]},
        "ar": {
            "image_start_token_id": ar.get("image_start_token_id", 16384),
            "image_end_token_id": ar.get("image_end_token_id", 16385),
            "vision_vocab_size": text.get("vision_vocab_size"),
            "grid_bos_token": "<sop>",
            "grid_eos_token": "<eop>",
            # transformers' GenerationConfig defaults where the checkpoint sets nothing.
            "sampling": {"do_sample": True, "temperature": gen.get("temperature", 1.0),
                         "top_p": gen.get("top_p", 1.0), "top_k": gen.get("top_k", 50)},
        },
        "grid": {
            "factor": vae_scale * patch * 2,
            "preview_base": 16,
            "rule": "token_h, token_w = H // factor, W // factor; preview_h = int(sqrt(token_h / token_w) * "
                    "preview_base), preview_w = int(sqrt(token_w / token_h) * preview_base); the AR prompt is "
                    "the chat-templated text + '<sop>{token_h} {token_w}<eop><sop>{preview_h} {preview_w}<eop>"
                    "' + bos; it samples the preview grid, then the target grid (row-major); the DiT gets the "
                    "target ids upsampled 2x (nearest)",
            "positions": "prompt: arange(L) on all 3 axes; grid g (preview first) at offset p: (p, p + row, "
                         "p + col), then p += max(h, w); p starts at L",
        },
        "glyph": {"d_model": glyph.get("d_model"), "quote_patterns": ["'…'", "“…”", '"…"', "「…」"],
                  "max_length": 2048},
    }


def read_index(path: str | Path) -> dict:
    """``glmq_onnx.json`` of an exported folder."""
    p = Path(path) / INDEX_NAME
    if not p.is_file():
        raise GlmqError(f"{path}: not a glmq ONNX export (no {INDEX_NAME})")
    from glmq.io.safe_read import read_json

    return read_json(p, "glmq ONNX index")


