"""Build GLM-Image components from the upstream transformers/diffusers classes.

Models are built on the ``meta`` device by default: that costs no memory at any size and gives the exact
tensor names, shapes and module types, which is what checkpoint writers, validators and converters need.
Random weights are produced per tensor by :func:`random_tensor`, seeded by the tensor's name, so the
same seed gives the same checkpoint whether it is written whole (tiny) or streamed (full).
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import TYPE_CHECKING, Any

from glmq.errors import CheckpointError
from glmq.io.layout import Component
from glmq.models.configs import IMAGE_PROCESSOR, PAD_TOKEN_ID, SCHEDULER, SPECIAL_TOKEN_IDS, component_config

if TYPE_CHECKING:
    import torch
    from torch import nn

# The weights' scale in ``make-tiny --size full`` (about the released checkpoint's); the tiny model scales by
# fan-in instead (:func:`fan_in_stds`).
DEFAULT_STD = 0.02

# Base id of the tiny tokenizer's character vocabulary: above the 16512 visual ids, below the specials.
_TINY_CHAR_BASE = 20000

# A chat template: each reference image becomes an <|image|> placeholder between the image start and end
# tokens (GlmImageModel.get_rope_index finds reference images by those delimiters), text passes through.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|dit_token_16384|><|image|><|dit_token_16385|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)


def _quiet_transformers() -> None:
    """Silence the torchvision-fallback and similar advisory warnings of the model libraries."""
    for name in ("transformers", "diffusers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - only cosmetics
        pass


def config_object(role: str, config: dict[str, Any]):
    """The upstream config object for an AR or glyph-encoder config dict (diffusers models take kwargs)."""
    if role == "ar":
        from transformers import GlmImageConfig

        return GlmImageConfig.from_dict(config)
    if role == "glyph":
        from transformers import T5Config

        return T5Config.from_dict(config)
    raise ValueError(f"no config object for role {role!r}")


def build_model(comp: Component, config: dict[str, Any], *, device: str = "meta", dtype=None) -> nn.Module:
    """Instantiate a weight-bearing component from constructor arguments (or a saved ``config.json``)."""
    import torch

    from glmq.models.check_config import check_config

    _quiet_transformers()
    # Types and sizes first: the constructors allocate (or loop over layers) before checking anything.
    check_config(comp.role, config, f"{comp.name}/config.json")
    config = {k: v for k, v in config.items() if k not in ("quantization_config",)}
    with torch.device(device):
        if comp.role == "ar":
            from transformers import GlmImageForConditionalGeneration

            model = GlmImageForConditionalGeneration(config_object("ar", config))
        elif comp.role == "glyph":
            from transformers import T5EncoderModel

            model = T5EncoderModel(config_object("glyph", config))
        elif comp.role == "dit":
            from diffusers import GlmImageTransformer2DModel

            model = GlmImageTransformer2DModel.from_config(config)
        elif comp.role == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        else:
            raise ValueError(f"component {comp.name} has no weights")
    if dtype is not None:
        model = model.to(dtype)
    return model


def build_component(comp: Component, size: str, **kwargs) -> nn.Module:
    return build_model(comp, component_config(comp.name, size), **kwargs)


def tensor_specs(model: nn.Module, dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor ``save_pretrained`` stores, in module order.

    Tied parameters are stored once under their first name (T5's ``shared.weight``, not
    ``encoder.embed_tokens.weight``); non-persistent buffers (rotary tables) are not stored.
    """
    specs = [(n, dtype, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=True)]
    state_keys = set(model.state_dict().keys())
    for n, b in model.named_buffers(remove_duplicate=True):
        if n in state_keys:
            specs.append((n, dtype if b.is_floating_point() else str(b.dtype).removeprefix("torch."), tuple(b.shape)))
    return specs


def expected_specs(comp: Component, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a component with this ``config.json`` must store."""
    try:
        model = build_model(comp, config)
    except ImportError:  # a broken installation or an interrupted import, not the checkpoint's fault
        raise
    except Exception as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise CheckpointError(f"{comp.name}/config.json does not describe a {comp.class_name} ({detail})") from None
    return {n: shape for n, _, shape in tensor_specs(model, comp.dtype or "float32")}


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that belong to normalization layers (initialized to 1 / 0 rather than random)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower():
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def fan_in_stds(model: nn.Module) -> dict[str, float]:
    """Per-parameter init scales that keep every activation of order one: ``1 / sqrt(fan_in)`` for linear
    and convolution weights, 1 for embedding tables (what ``nn.Embedding`` draws). The tiny model uses them:
    with the release's own scale (0.02 for every weight) its narrow layers would shrink each block's output,
    and above all the DiT's AdaLN gates, to ~1e-4 of the residual stream, so that zeroing a whole DiT block
    changed its velocity by -86 dB and no fidelity check could see a broken block."""
    from torch import nn

    stds = {}
    for mod_name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(mod, nn.Embedding):
            stds[name] = 1.0
        else:
            stds[name] = 1.0 / math.sqrt(math.prod(weight.shape[1:]))
    return stds


def random_tensor(name: str, shape: tuple[int, ...], dtype: str, *, seed: int, is_norm: bool,
                  std: float = DEFAULT_STD) -> torch.Tensor:
    """A deterministic random tensor for ``name``: N(0, std) weights, zero biases, unit norm scales.

    The generator is seeded from ``seed`` and the tensor name, so each tensor is independent of the order
    or the process in which it is produced. Large tensors are filled in row chunks to bound peak memory.
    """
    import torch

    tdtype = getattr(torch, dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=tdtype)
    if is_norm:
        return torch.ones(shape, dtype=tdtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    out = torch.empty(shape, dtype=tdtype)
    flat = out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1)
    rows_per_chunk = max(1, (64 * 1024 * 1024) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], rows_per_chunk):
        stop = min(flat.shape[0], start + rows_per_chunk)
        chunk = torch.randn((stop - start, flat.shape[1]), generator=gen, dtype=torch.float32)
        flat[start:stop] = chunk.mul_(std).to(tdtype)
    return out


def build_glyph_tokenizer():
    """The glyph encoder's ByT5 tokenizer (byte-level, needs no vocabulary files)."""
    _quiet_transformers()
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def build_processor():
    """An offline GlmImageProcessor: a character-level tokenizer that keeps GLM-Image's special token ids.

    The real release ships GLM-4's 151k-token BPE; any tokenizer works with random weights as long as the
    special tokens have the ids the model and pipeline hard-code (see ``configs.SPECIAL_TOKEN_IDS``).
    """
    _quiet_transformers()
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import GlmImageImageProcessor, GlmImageProcessor, PreTrainedTokenizerFast

    vocab = {"[UNK]": _TINY_CHAR_BASE}
    for c in range(32, 127):
        vocab[chr(c)] = _TINY_CHAR_BASE + c
    specials = dict(SPECIAL_TOKEN_IDS)
    specials["<|endoftext|>"] = PAD_TOKEN_ID
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|dit_token_16384|>",
        eos_token="<|dit_token_16385|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )
    image_processor = GlmImageImageProcessor(**IMAGE_PROCESSOR)
    return GlmImageProcessor(image_processor=image_processor, tokenizer=fast, chat_template=CHAT_TEMPLATE)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER)
