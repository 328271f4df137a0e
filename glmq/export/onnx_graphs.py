"""The four ONNX graphs of GLM-Image: what each computes, its inputs and outputs, and its weights.

Each graph is the upstream transformers/diffusers module behind a thin wrapper that fixes the calling
convention ONNX needs; the model math is not re-implemented:

- ``dit`` (:class:`DitStep`): one denoising forward of ``GlmImageTransformer2DModel``.
- ``vae_decoder`` (:class:`VaeDecoder`): ``AutoencoderKL.decode`` of already de-normalized latents.
- ``glyph_encoder`` (:class:`GlyphEncoder`): ``T5EncoderModel`` -> ``last_hidden_state``.
- ``ar_decoder`` (:class:`ArDecoderStep`): one step of the AR text decoder with a KV cache, named as ONNX
  Runtime GenAI / optimum name decoders (``past_key_values.N.key`` in, ``present.N.key`` out). The 3-D
  M-RoPE ``position_ids`` are an input: GLM-Image's grid positions come from Python control flow over the
  prompt (``get_rope_index``) that a trace cannot capture, so the runtime computes them.

A graph is built in one of two ways. For export its parameters are *fake* tensors (shapes and dtypes, no
storage): tracing then costs no weight memory at any model size, and the weights are streamed from the
checkpoint into the ONNX file afterwards, one tensor at a time. For checking an export, the same wrapper is
built with the checkpoint's *real* weights. Either way only the modules a graph uses are materialized (the
AR's vision tower and VQ model never are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from glmq.errors import CheckpointError

if TYPE_CHECKING:
    from glmq.io.reader import ComponentReader, PipelineReader

# Graph name -> the pipeline component whose weights it holds.
GRAPH_COMPONENTS = {
    "dit": "transformer",
    "vae_decoder": "vae",
    "glyph_encoder": "text_encoder",
    "ar_decoder": "vision_language_encoder",
}

# A hook that may replace a checkpoint tensor before it enters a real-weight graph: (checkpoint name, tensor)
# -> tensor. Used to build references with dequantized weights.
Transform = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class GraphSpec:
    """A wrapper module ready to trace, with example inputs and the ONNX names and dynamic axes."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]  # name -> example tensor, in forward() order
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    prefix: str  # wrapper attribute holding the upstream model, e.g. "dit."
    ckpt_prefix: str  # what that attribute is called in the checkpoint, e.g. "" or "model.language_model."
    # Checkpoint names of the linear weights that weight quantization targets.
    quant_targets: set[str] = field(default_factory=set)
    tied: dict[str, str] = field(default_factory=dict)  # checkpoint name -> the name it is stored under
    meta: dict[str, Any] = field(default_factory=dict)

    def args(self) -> tuple:
        """Positional arguments for ``module`` (the AR cache goes in as one list)."""
        values = list(self.inputs.values())
        if self.name == "ar_decoder":
            return (*values[:3], values[3:])
        return tuple(values)

    def checkpoint_name(self, onnx_name: str) -> str | None:
        """The checkpoint tensor behind an ONNX initializer named after the wrapper's parameter."""
        if not onnx_name.startswith(self.prefix):
            if onnx_name.startswith("lm_head."):  # the AR head sits next to the text model
                return onnx_name
            return None
        name = self.ckpt_prefix + onnx_name[len(self.prefix):]
        return self.tied.get(name, name)


# ---- weights -------------------------------------------------------------------------------------------


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise CheckpointError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")


def _tied_names(model: nn.Module) -> dict[str, str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return dict(tied) if isinstance(tied, dict) else {}


def _quiet_diffusers() -> None:
    """diffusers warns that ``.to(dtype)`` may change fp32-kept modules; GLM-Image's DiT declares none."""
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def load_model(cr: ComponentReader, dtype: torch.dtype, *, real: bool, keep: Callable[[str], bool] = lambda n: True,
               transform: Transform | None = None) -> nn.Module:
    """The upstream model of component ``cr`` in ``dtype``: tensors whose checkpoint names pass ``keep`` get the
    checkpoint's values (``real``) or fake storage-less stand-ins; everything else stays on ``meta``."""
    from glmq.models.build import build_model

    if cr.quantization_config is not None:
        raise CheckpointError(
            f"{cr.folder}: ONNX export reads unquantized checkpoints, and this component is already quantized "
            f"({cr.quantization_config.get('quant_method', '?')}); export the original and choose --weights instead"
        )
    _quiet_diffusers()
    model = build_model(cr.component, cr.config, device="meta", dtype=dtype)
    model.eval()
    tied = _tied_names(model)
    persistent = set(model.state_dict())
    new: dict[int, torch.Tensor] = {}  # aliases of one tensor (tied weights) get one new tensor
    mode = None if real else _fake_mode()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if not keep(name) or name not in persistent:
            continue
        if id(t) not in new:
            if real:
                src = tied.get(name, name)
                if src not in cr.tensors:
                    raise CheckpointError(f"{cr.folder}: checkpoint lacks tensor {src!r}")
                value = cr.get(src)
                if transform is not None:
                    value = transform(src, value)
                new[id(t)] = value.to(dtype) if value.is_floating_point() else value
            else:
                with mode:
                    new[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            if isinstance(t, nn.Parameter):
                new[id(t)] = nn.Parameter(new[id(t)], requires_grad=False)
        _set_tensor(model, name, new[id(t)])
    return model


def check_materialized(module: nn.Module, what: str) -> None:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise CheckpointError(f"{what}: tensor {name!r} was not loaded")


# ---- wrappers ------------------------------------------------------------------------------------------


class DitStep(nn.Module):
    """One conditional or unconditional forward of the DiT; returns the flow prediction."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents, glyph_embeds, prior_token_ids, prior_token_drop, timestep, target_size, crop_coords):
        return self.dit(
            hidden_states=latents,
            encoder_hidden_states=glyph_embeds,
            prior_token_id=prior_token_ids,
            prior_token_drop=prior_token_drop,
            timestep=timestep,
            target_size=target_size,
            crop_coords=crop_coords,
            return_dict=False,
        )[0]


class VaeDecoder(nn.Module):
    """``AutoencoderKL.decode``: de-normalized latents -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class GlyphEncoder(nn.Module):
    """``T5EncoderModel`` -> ``last_hidden_state``."""

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids, attention_mask):
        return self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class ArDecoderStep(nn.Module):
    """One AR decoder step: new tokens plus the KV cache so far -> logits over the visual vocabulary and the
    extended cache.

    ``attention_mask`` [B, past + S] (1 = attend, 0 = padding) becomes the additive 4-D causal mask that the
    upstream attention takes as is; ``position_ids`` [3, B, S] are the M-RoPE (temporal, height, width)
    positions; ``past_key_values`` is a list of ``2 * num_layers`` tensors [B, kv_heads, past, head_dim]
    (key, value per layer). Returns ``(logits [B, S, V], present_0_key, present_0_value, ...)``.
    """

    def __init__(self, text_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.text_model = text_model
        self.lm_head = lm_head
        self.num_layers = len(text_model.layers)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from transformers import DynamicCache

        past = past_key_values
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        emb = self.text_model.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        total = attention_mask.shape[1]
        q_pos = torch.arange(seq, device=input_ids.device) + (total - seq)
        k_pos = torch.arange(total, device=input_ids.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=emb.dtype).masked_fill(~allowed, torch.finfo(emb.dtype).min)
        out = self.text_model(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids, cache=cache,
                              use_cache=True)
        logits = self.lm_head(out.last_hidden_state)
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (logits, *presents)


# ---- graph specs ---------------------------------------------------------------------------------------


def _linear_weights(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def dit_graph(reader: PipelineReader, dtype: torch.dtype, real: bool, transform: Transform | None) -> GraphSpec:
    cr = reader.component("transformer")
    dit = load_model(cr, dtype, real=real, transform=transform)
    check_materialized(dit, "transformer")
    cfg = cr.config
    p, c = cfg["patch_size"], cfg["in_channels"]
    # Example latents of 2 x 3 patches (non-square): every size is dynamic, the values are arbitrary. No
    # example size may be 1: torch.export would specialize that dimension to 1.
    h, w, b, t = 2 * p, 3 * p, 2, 3
    n = (h // p) * (w // p)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "latents": torch.randn(b, c, h, w, generator=gen).to(dtype),
        "glyph_embeds": torch.randn(b, t, cfg["text_embed_dim"], generator=gen).to(dtype),
        "prior_token_ids": torch.randint(0, cfg["prior_vq_quantizer_codebook_size"], (b, n), generator=gen),
        "prior_token_drop": torch.zeros(b, n, dtype=torch.bool),
        "timestep": torch.full((b,), 999.0, dtype=dtype),
        "target_size": torch.tensor([[h * 8.0, w * 8.0]], dtype=dtype).expand(b, 2).contiguous(),
        "crop_coords": torch.zeros(b, 2, dtype=dtype),
    }
    dyn = {
        "latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "glyph_embeds": {0: "batch", 1: "glyph_length"},
        "prior_token_ids": {0: "batch", 1: "image_tokens"},
        "prior_token_drop": {0: "batch", 1: "image_tokens"},
        "timestep": {0: "batch"},
        "target_size": {0: "batch"},
        "crop_coords": {0: "batch"},
        "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
    }
    return GraphSpec("dit", DitStep(dit), inputs, ["noise_pred"], dyn, "dit.", "",
                     quant_targets=_linear_weights(dit.transformer_blocks, "transformer_blocks."))


def vae_decoder_graph(reader: PipelineReader, dtype: torch.dtype, real: bool, transform: Transform | None) -> GraphSpec:
    cr = reader.component("vae")
    vae = load_model(cr, dtype, real=real, transform=transform,
                     keep=lambda n: not n.startswith(("encoder.", "quant_conv.")))
    check_materialized(vae.decoder, "vae")
    if vae.post_quant_conv is not None:
        check_materialized(vae.post_quant_conv, "vae")
    c = cr.config["latent_channels"]
    inputs = {"latents": torch.randn(2, c, 3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)}
    dyn = {"latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
           "image": {0: "batch", 2: "height", 3: "width"}}
    return GraphSpec("vae_decoder", VaeDecoder(vae), inputs, ["image"], dyn, "vae.", "")


def glyph_encoder_graph(reader: PipelineReader, dtype: torch.dtype, real: bool,
                        transform: Transform | None) -> GraphSpec:
    cr = reader.component("text_encoder")
    t5 = load_model(cr, dtype, real=real, transform=transform)
    check_materialized(t5, "text_encoder")
    ids = torch.tensor([[5, 77, 120, 9, 1], [6, 7, 8, 1, 0]], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    dyn = {"input_ids": {0: "batch", 1: "glyph_length"}, "attention_mask": {0: "batch", 1: "glyph_length"},
           "last_hidden_state": {0: "batch", 1: "glyph_length"}}
    return GraphSpec("glyph_encoder", GlyphEncoder(t5), inputs, ["last_hidden_state"], dyn, "t5.", "",
                     tied=_tied_names(t5))


def ar_decoder_graph(reader: PipelineReader, dtype: torch.dtype, real: bool, transform: Transform | None) -> GraphSpec:
    cr = reader.component("vision_language_encoder")
    model = load_model(cr, dtype, real=real, transform=transform,
                       keep=lambda n: n.startswith(("model.language_model.", "lm_head.")))
    text = model.model.language_model
    # The rotary tables are non-persistent buffers, not in the checkpoint: rebuild that small module (real
    # values: they become constants of the graph).
    text.rotary_emb = type(text.rotary_emb)(config=text.config)
    text.config._attn_implementation = "eager"  # plain MatMul/Softmax attention: runs on every provider
    step = ArDecoderStep(text, model.lm_head)
    check_materialized(step, "vision_language_encoder")
    tc = text.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    b, s, past = 2, 3, 2
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, tc.vision_vocab_size, (b, s), generator=gen),
        "attention_mask": torch.ones(b, past + s, dtype=torch.long),
        "position_ids": (torch.arange(s) + past).view(1, 1, s).expand(3, b, s).contiguous(),
    }
    dyn = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {1: "batch", 2: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    outputs = ["logits"]
    for i in range(step.num_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = torch.randn(b, tc.num_key_value_heads, past, head_dim,
                                                                generator=gen).to(dtype)
            dyn[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past_sequence"}
            outputs.append(f"present.{i}.{kind}")
            dyn[f"present.{i}.{kind}"] = {0: "batch", 2: "total_sequence"}
    meta = {"num_layers": step.num_layers, "num_key_value_heads": tc.num_key_value_heads, "head_dim": head_dim,
            "vocab_size": model.lm_head.out_features}
    # Decoder-layer linears only: embeddings and lm_head stay in float (as glmq's default recipe keeps them).
    targets = _linear_weights(text.layers, "model.language_model.layers.")
    return GraphSpec("ar_decoder", step, inputs, outputs, dyn, "text_model.", "model.language_model.",
                     quant_targets=targets, meta=meta)


GRAPH_BUILDERS = {
    "dit": dit_graph,
    "vae_decoder": vae_decoder_graph,
    "glyph_encoder": glyph_encoder_graph,
    "ar_decoder": ar_decoder_graph,
}


def build_graph(reader: PipelineReader, name: str, dtype: torch.dtype, *, real: bool,
                transform: Transform | None = None) -> GraphSpec:
    """The :class:`GraphSpec` of graph ``name`` with fake (``real=False``, for export) or checkpoint weights."""
    return GRAPH_BUILDERS[name](reader, dtype, real, transform)
