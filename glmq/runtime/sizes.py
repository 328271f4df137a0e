"""GPU bytes of each network, from a checkpoint's headers (before anything is loaded) or from live modules:
the inputs of the memory plan (:mod:`glmq.runtime.memory`)."""

from __future__ import annotations

from glmq.runtime.memory import StageSizes, activation_allowance

_VISION_PREFIXES = ("model.visual.", "model.vqmodel.")


def _gpu_tensor_bytes(cr, dtype_bytes: int) -> list[tuple[str, int]]:
    """(name, bytes on the GPU) of a checkpoint component's tensors: floats become ``dtype_bytes`` wide."""
    out = []
    for name, info in cr.tensors.items():
        floating = info.dtype in ("float32", "bfloat16", "float16")
        out.append((name, info.numel * dtype_bytes if floating else info.nbytes))
    return out


def _module_tensor_bytes(module) -> list[tuple[str, int]]:
    """(name, bytes) of a live module's parameters and buffers, each shared tensor once."""
    out, seen = [], set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t.numel() * t.element_size()))
    return out


def _largest_group(named: list[tuple[str, int]], prefix: str) -> int:
    """The largest total over tensors ``prefix<i>.*`` grouped by ``i`` (one decoder layer or DiT block)."""
    groups: dict[str, int] = {}
    for name, nbytes in named:
        if name.startswith(prefix):
            key = name[len(prefix):].split(".", 1)[0]
            groups[key] = groups.get(key, 0) + nbytes
    return max(groups.values(), default=0)


def _kv_bytes_per_token(dit_config) -> int:
    """bf16 K and V of one token in every DiT layer: what each reference token costs in the K/V cache."""
    get = dit_config.get if isinstance(dit_config, dict) else (lambda k, d=None: getattr(dit_config, k, d))
    inner = int(get("num_attention_heads", 0) or 0) * int(get("attention_head_dim", 0) or 0)
    return 2 * int(get("num_layers", 0) or 0) * inner * 2


def _ar_kv_bytes_per_token(ar_config) -> int:
    """bf16 K and V of one token in every AR decoder layer: one slot of the decode engine's cache."""
    if ar_config is None:
        return 0
    if isinstance(ar_config, dict):  # a config.json: what it leaves out takes the class's defaults
        from transformers import GlmImageConfig

        ar_config = GlmImageConfig(**ar_config)
    text = ar_config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2


def _stage_sizes(named: dict[str, list[tuple[str, int]]], height: int, width: int, dit_config=None,
                 ar_config=None, host_only: int = 0) -> StageSizes:
    """``host_only``: bytes of the AR's tensors that never go to the GPU (glmq.runtime.embedding)."""
    ar, dit = named["vision_language_encoder"], named["transformer"]
    vision = sum(b for n, b in ar if n.startswith(_VISION_PREFIXES))
    act_ar, act_dit, act_vae = activation_allowance(height, width)
    return StageSizes(
        ar_weights=sum(b for _, b in ar) - vision - host_only,
        vision_weights=vision,
        glyph_weights=sum(b for _, b in named["text_encoder"]),
        dit_weights=sum(b for _, b in dit),
        vae_weights=sum(b for _, b in named["vae"]),
        ar_activations=act_ar,
        dit_activations=act_dit,
        vae_activations=act_vae,
        largest_ar_block=_largest_group(ar, "model.language_model.layers."),
        largest_dit_block=_largest_group(dit, "transformer_blocks."),
        dit_kv_bytes_per_token=_kv_bytes_per_token(dit_config) if dit_config is not None else 0,
        ar_kv_bytes_per_token=_ar_kv_bytes_per_token(ar_config),
        size=(height, width),
    )


def stage_sizes(reader, height: int = 1024, width: int = 1024) -> StageSizes:
    """Per-stage GPU bytes from a checkpoint's headers (bf16 compute; the glyph encoder stays fp32), the AR's
    embedding counted with only the rows the runtime keeps on the GPU (glmq.runtime.embedding)."""
    from glmq.runtime.embedding import host_only_bytes

    widths = {"vision_language_encoder": 2, "transformer": 2, "text_encoder": 4, "vae": 2}
    ar = reader.component("vision_language_encoder")
    return _stage_sizes({name: _gpu_tensor_bytes(reader.component(name), w) for name, w in widths.items()},
                        height, width, reader.component("transformer").config, ar.config,
                        host_only=host_only_bytes(ar.tensors, ar.config, widths["vision_language_encoder"]))


def stage_sizes_from_modules(components: dict, height: int = 1024, width: int = 1024) -> StageSizes:
    """Like :func:`stage_sizes`, measured on live modules (their current dtypes; a split embedding's host table
    is no parameter, so it is not counted)."""
    names = ("vision_language_encoder", "transformer", "text_encoder", "vae")
    return _stage_sizes({name: _module_tensor_bytes(components[name]) for name in names}, height, width,
                        components["transformer"].config, components["vision_language_encoder"].config)
