"""Plug glmq's Triton attention into GLM-Image through the upstream plug points (no forked model code).

AR (transformers): :func:`register_ar_attention` registers :func:`glmq_ar_attention` as the attention
implementation ``"glmq"``; then ``model.set_attn_implementation("glmq")`` on ``GlmImageForConditionalGeneration``
(or on its text model) routes every attention call through it. The vision tower may use it too: it calls with
``is_causal=False`` per image, which the kernel handles.

DiT (diffusers): :class:`GlmqDiTAttnProcessor` replaces ``GlmImageAttnProcessor`` on each
``GlmImageTransformerBlock.attn1``; :func:`install_dit_attention` sets one shared instance on every block.

On the CPU (without ``TRITON_INTERPRET=1``) both fall back to torch: the AR function to transformers' SDPA
function, the DiT processor to :func:`glmq.kernels.attention_ref`, so the same model code runs everywhere.
"""

from __future__ import annotations

import torch

__all__ = ["glmq_ar_attention", "register_ar_attention", "GlmqDiTAttnProcessor", "install_dit_attention",
           "install_attention", "attention_policy",
           "AR_ATTENTION_NAME", "MASK_MODES"]

AR_ATTENTION_NAME = "glmq"
MASK_MODES = ("stock", "padding")


def _triton_usable(t: torch.Tensor) -> bool:
    """The Triton kernels run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if t.is_cuda:
        return True
    from glmq.kernels import _attention

    return t.device.type == "cpu" and _attention._interpreting()


# ------------------------------------------------------------------------------------------------------- AR
def glmq_ar_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers attention function (same contract as ``sdpa_attention_forward``).

    ``query [B, Hq, Sq, D]``, ``key``/``value`` ``[B, Hkv, Sk, D]`` un-repeated (GQA); ``attention_mask`` is
    None or the boolean 4-D mask transformers builds for SDPA (we register ``sdpa_mask`` for our name).
    Returns ``(attn_output [B, Sq, Hq, D], None)``.

    The kernel takes: no mask (causal prefill, or decode against a dynamic cache), and a one-query mask
    ``[B, 1, 1, Sk]`` (decode against a static cache or a padded batch), which becomes a key padding mask.
    Callers that own a static cache (``glmq.runtime.ar_engine``) may also pass ``kv_len`` (int ``[B]``: slots
    written so far, the queries being the last ``Sq`` of them) and ``key_padding_mask`` (bool ``[B, Sk]``);
    then the dense mask is not read: the kernel skips unwritten slots and handles prefill as well as decode
    (padded query rows come out as zeros; they are never attended to).
    Everything else falls back to SDPA with identical semantics: a multi-query 4-D mask (padded or chunked
    prefill), dropout while training, softcap/position_bias/sliding windows, head dim > 256, and CPU tensors
    outside the Triton interpreter.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    usable = (
        _triton_usable(query)
        and not (dropout and module.training)
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("sliding_window") is None
        and query.shape[-1] <= 256
        and key.shape[-1] == value.shape[-1] == query.shape[-1]
    )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cache_len = kwargs.get("kv_len")
    if usable and isinstance(cache_len, torch.Tensor) and cache_len.dim() == 1:
        from glmq.kernels import attention

        out = attention(query, key, value, causal=bool(is_causal), scale=scaling, kv_len=cache_len,
                        key_padding_mask=kwargs.get("key_padding_mask"))
        return out.transpose(1, 2).contiguous(), None

    kpm = None
    if usable and attention_mask is not None:
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool
                and attention_mask.dim() == 4 and q_len == 1 and attention_mask.shape[1] == 1
                and attention_mask.shape[-1] == kv_len):
            kpm = attention_mask[:, 0, 0, :].expand(query.shape[0], kv_len)
            if not kpm.is_contiguous():
                kpm = kpm.contiguous()
        else:
            usable = False
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    from glmq.kernels import attention

    causal = bool(is_causal) and q_len > 1 and attention_mask is None
    if causal and kv_len > q_len:
        # Same as SDPA: with no mask and more keys than queries, this is a prefill into an empty static cache
        # (transformers only drops the mask then), whose slots past the prompt are unwritten.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=kpm)
    return out.transpose(1, 2).contiguous(), None


def register_ar_attention(name: str = AR_ATTENTION_NAME) -> str:
    """Register :func:`glmq_ar_attention` with transformers under ``name`` (idempotent); returns the name.

    Also registers transformers' SDPA mask builder for the name: transformers builds no mask at all for
    attention functions it does not know, which would silently drop padding and static-cache masks.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, glmq_ar_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ------------------------------------------------------------------------------------------------------ DiT
class GlmqDiTAttnProcessor:
    """Drop-in for diffusers 0.42.1 ``GlmImageAttnProcessor`` that calls :func:`glmq.kernels.attention`.

    Same steps as upstream: joint [text; image] QKV projections, parameter-free LayerNorm on q and k, 2-D RoPE
    on the image tokens only, the ``GlmImageLayerKVCache`` modes ("write" stores this pass's K/V, "read"
    prepends the cached reference K/V, "skip" ignores them), output projection, split back into
    ``(image, text)``.

    Args:
        precision: ``"bf16"``, ``"int8"`` or ``"fp8"`` (see :func:`glmq.kernels.attention`).
        mask_mode: what a text ``attention_mask [B, T]`` (1 = real token) does. ``"stock"`` reproduces
            diffusers exactly: it turns the mask into a 0/1 matrix and hands it to SDPA as an *additive*
            float mask, which adds +1 to the logits of real-real pairs instead of masking padding (the
            pipeline never passes a mask); that path runs through SDPA. ``"padding"`` applies the evidently
            intended semantics in the kernel: padded text tokens are never attended to (cached keys are real).
        backend: ``"auto"`` (Triton where usable, else ``attention_ref``), ``"triton"`` or ``"ref"``.
        min_tokens: an 8-bit ``precision`` applies only to joint sequences (glyph + image tokens) at least
            this long; shorter ones run in bf16 (the 8-bit kernel pays only at long sequences).

    The RoPE tables arrive on the CPU from upstream; they are moved to the device once per forward (the
    tuple is shared by all blocks), not once per block.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, precision: str = "bf16", mask_mode: str = "stock", backend: str = "auto",
                 min_tokens: int = 0):
        from glmq.kernels._attention import PRECISIONS

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {mask_mode!r}; valid: {', '.join(MASK_MODES)}")
        if backend not in ("auto", "triton", "ref"):
            raise ValueError(f"unknown backend {backend!r}; valid: auto, triton, ref")
        self.precision = precision
        self.min_tokens = int(min_tokens)
        self.mask_mode = mask_mode
        self.backend = backend
        self._rope_src = None
        self._rope_dev = None

    def _rope_on(self, image_rotary_emb, device):
        cos, sin = image_rotary_emb
        if cos.device == device:
            return image_rotary_emb
        # Hold the source tensor: identity then means "same tables", and its id cannot be reused meanwhile.
        if self._rope_src is not cos or self._rope_dev[0].device != device:
            self._rope_src = cos
            self._rope_dev = (cos.to(device, non_blocking=True), sin.to(device, non_blocking=True))
        return self._rope_dev

    def _attend(self, q, k, v, key_padding_mask):
        from glmq.kernels import attention, attention_ref

        use_triton = self.backend == "triton" or (self.backend == "auto" and _triton_usable(q))
        fn = attention if use_triton else attention_ref
        return fn(q, k, v, key_padding_mask=key_padding_mask, precision=self.precision_for(q.shape[2]))

    def precision_for(self, seq_len: int) -> str:
        """The precision used for a joint sequence of ``seq_len`` query tokens."""
        return self.precision if seq_len >= self.min_tokens else "bf16"

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None):
        from diffusers.models.embeddings import apply_rotary_emb

        dtype = encoder_hidden_states.dtype
        batch_size, text_seq_length, _ = encoder_hidden_states.shape
        image_seq_length = hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            rope = self._rope_on(image_rotary_emb, query.device)
            query[:, text_seq_length:] = apply_rotary_emb(query[:, text_seq_length:], rope, sequence_dim=1,
                                                          use_real_unbind_dim=-2)
            key[:, text_seq_length:] = apply_rotary_emb(key[:, text_seq_length:], rope, sequence_dim=1,
                                                        use_real_unbind_dim=-2)
        if kv_cache is not None:
            if kv_cache.mode == "write":
                kv_cache.store(key, value)
            elif kv_cache.mode == "read":
                key, value = kv_cache.get(key, value)

        if attention_mask is not None and self.mask_mode == "stock":
            out = self._stock_masked_attention(query, key, value, attention_mask, text_seq_length,
                                               image_seq_length)
        else:
            kpm = None
            if attention_mask is not None:
                if attention_mask.dim() != 2:
                    raise ValueError("the text attention mask must be [batch, text_seq_length]")
                n_cached = key.shape[1] - text_seq_length - image_seq_length
                kpm = torch.ones(batch_size, key.shape[1], dtype=torch.bool, device=query.device)
                kpm[:, n_cached:n_cached + text_seq_length] = attention_mask.to(query.device) > 0
            # [B, S, H, D] -> [B, H, S, D] as strided views: the kernel reads them in place.
            out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), kpm)
            out = out.transpose(1, 2)
        hidden_states = out.flatten(2, 3).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
        return hidden_states, encoder_hidden_states

    @staticmethod
    def _stock_masked_attention(query, key, value, text_mask, text_len, image_len):
        """diffusers 0.42.1's masked path, unchanged: an additive 0/1 float mask through SDPA."""
        if text_mask.dim() != 2:
            raise ValueError("the text attention mask must be [batch, text_seq_length]")
        batch_size = query.shape[0]
        mix = torch.ones((batch_size, text_len + image_len), device=query.device)
        mix[:, :text_len] = text_mask.float().to(query.device)
        mix = mix.unsqueeze(2)
        bias = ((mix @ mix.transpose(1, 2)) > 0).unsqueeze(1).to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=bias)
        return out.transpose(1, 2)


def install_dit_attention(transformer, precision: str = "bf16", mask_mode: str = "stock",
                          backend: str = "auto", min_tokens: int = 0) -> GlmqDiTAttnProcessor:
    """Set one :class:`GlmqDiTAttnProcessor` on every block of a ``GlmImageTransformer2DModel``; returns it."""
    proc = GlmqDiTAttnProcessor(precision=precision, mask_mode=mask_mode, backend=backend, min_tokens=min_tokens)
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(proc)
    return proc


def attention_policy(requested: str | None, transformer_config: dict, device: torch.device) -> tuple[str, int]:
    """The DiT attention ``(precision, min_tokens)`` to run: ``requested`` ("bf16", "fp8", "int8"), or with
    None the choice the quantizing recipe recorded in the transformer's ``quantization_config`` (bf16 for
    unquantized folders). fp8 needs fp8 tensor cores (compute capability 8.9+); elsewhere it becomes int8,
    with a warning."""
    from glmq.errors import GlmqError
    from glmq.kernels._attention import PRECISIONS

    if requested is not None:
        if requested not in PRECISIONS:
            raise GlmqError(f"unknown attention precision {requested!r}; valid: {', '.join(PRECISIONS)}")
        precision, min_tokens = requested, 0
    else:
        qcfg = transformer_config.get("quantization_config")
        recorded = qcfg.get("recipe", {}).get("attention", {}) if isinstance(qcfg, dict) else {}
        precision = recorded.get("dit", "bf16")
        min_tokens = int(recorded.get("min_tokens", 0))
        if precision not in PRECISIONS:
            raise GlmqError(f"the checkpoint asks for DiT attention precision {precision!r}, which this glmq "
                            f"does not know (valid: {', '.join(PRECISIONS)})")
    if precision == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        import warnings

        warnings.warn("fp8 attention needs compute capability 8.9+; using int8 attention instead", stacklevel=2)
        precision = "int8"
    return precision, min_tokens


def install_attention(components: dict, device: torch.device, attention: str, precision: str | None,
                      transformer_config: dict) -> str:
    """Plug glmq's kernels into the AR and the DiT as ``attention`` says ("auto": on CUDA; "glmq"; "sdpa":
    leave upstream's). Returns the DiT attention precision in words ("sdpa" when glmq's kernels are off)."""
    from glmq.errors import GlmqError
    from glmq.quant.recipe import ATTENTION_KERNELS

    if attention not in ATTENTION_KERNELS:
        raise GlmqError(f"unknown attention {attention!r}; valid: {', '.join(ATTENTION_KERNELS)}")
    use_glmq = attention == "glmq" or (attention == "auto" and device.type == "cuda")
    if not use_glmq:
        if precision not in (None, "bf16"):
            raise GlmqError(f"attention precision {precision!r} needs glmq's attention kernels "
                            f"(attention='glmq', or 'auto' on CUDA), not {attention!r} on {device.type}")
        return "sdpa"
    dit_precision, min_tokens = attention_policy(precision, transformer_config, device)
    register_ar_attention()
    components["vision_language_encoder"].model.language_model.set_attn_implementation("glmq")
    install_dit_attention(components["transformer"], precision=dit_precision, min_tokens=min_tokens)
    return dit_precision if not min_tokens else f"{dit_precision} (>= {min_tokens} tokens, else bf16)"
