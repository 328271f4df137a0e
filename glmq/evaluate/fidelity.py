"""Model-level fidelity of a quantized GLM-Image checkpoint against its bf16 source.

Quantized layers compute what the runtime computes on a GPU, through the kernels' pure-torch references
(:func:`load_as_run`: ``QuantLinear`` modules in ``as_run_on_gpu(mode)``): W8A8 layers quantize their
activations per token, weight-only layers multiply by the dequantized weight. Every kernel is tested
against these references.

- AR: teacher-forced logits over a full token grid (prompt + preview grid + target grid of a 1024x1024
  image; grid tokens drawn with a fixed seed), SQNR in dB and mean KL(bf16 || quantized) at the grid
  positions.
- DiT: velocity SQNR of the conditional pass at several timesteps, same latents, glyph embeddings and
  prior tokens for both.
- Image: PSNR of the whole pipeline's image against the bf16 pipeline's, with the same AR tokens and the
  same initial noise (so the number measures the quantized DiT/VAE path, not AR sampling luck).

Full-size models need a GPU for this (the bf16 and quantized components are both materialized); on the
CPU the evaluation runs only for models small enough to fit comfortably.
"""

from __future__ import annotations

from pathlib import Path

CPU_PARAM_LIMIT = 2_000_000_000  # above this, model-level evaluation on the CPU is skipped


def load_dequantized(cr, *, device="cpu", dtype=None):
    """A component's upstream module on ``device`` with quantized layers dequantized into plain linears,
    loaded one tensor at a time; ``dtype`` defaults to fp32 (evaluation precision).

    On a GPU each stored tensor is moved there as read, so that its conversion to ``dtype`` and the
    dequantization of quantized layers run on the device: done on the host, the full-size AR's 1.4 GB bf16
    embedding table became a 2.8 GB fp32 host copy next to it (the 5.2 GB peak RSS of a CUDA conversion).
    Host memory then holds one stored tensor at a time, in its stored dtype."""
    import torch

    from glmq.runtime.loader import load_component

    if torch.device(device).type != "cpu":
        cr = OnDeviceReader(cr, device)
    return load_component(cr, device=device, dtype=dtype or torch.float32, dequantize=True)


def load_as_run(cr, *, device="cpu"):
    """A component's upstream module on ``device`` in fp32, its quantized layers :class:`QuantLinear`
    modules that compute what the runtime's kernels compute (:func:`~glmq.quant.formats.linear.as_run_on_gpu`:
    ``"auto"`` becomes the kernel's pure-torch reference, which runs anywhere). Tensors are moved to the
    device as read (see :func:`load_dequantized`)."""
    import torch

    from glmq.quant.formats.linear import QuantLinear, as_run_on_gpu
    from glmq.runtime.loader import load_component

    if torch.device(device).type != "cpu":
        cr = OnDeviceReader(cr, device)
    model = load_component(cr, device=device, dtype=torch.float32)
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.mode = as_run_on_gpu(mod.mode)
    return model


class OnDeviceReader:
    """A :class:`~glmq.io.reader.ComponentReader` whose :meth:`get` returns tensors on ``device`` (read into
    host memory in their stored dtype, then copied); everything else is the wrapped reader's."""

    def __init__(self, cr, device):
        import torch

        self._cr = cr
        self.device = torch.device(device)

    def get(self, name: str):
        return self._cr.get(name).to(self.device)

    def __getattr__(self, attr):
        return getattr(self._cr, attr)


def sqnr(ref, test) -> float:
    """SQNR in dB, rounded for the report (see :func:`glmq.quant.metrics.sqnr_db`)."""
    from glmq.quant.metrics import sqnr_db

    return round(sqnr_db(ref, test), 3)


def evaluate(src: Path, quantized: Path, *, device: str = "cpu", seed: int = 0, steps: int = 20) -> dict:
    """AR logits SQNR/KL, DiT velocity SQNR per timestep and image PSNR of ``quantized`` vs ``src``."""
    import torch

    from glmq.io.reader import PipelineReader

    src_r, q_r = PipelineReader(src), PipelineReader(quantized)
    params = sum(info.numel for cr in src_r.components() for info in cr.tensors.values())
    if torch.device(device).type == "cpu" and params > CPU_PARAM_LIMIT:
        return {"skipped": f"{params / 1e9:.1f} B parameters: model-level evaluation needs --device cuda"}
    out: dict = {"device": device, "seed": seed}
    with torch.no_grad():
        out["ar"] = _eval_ar(src_r, q_r, device, seed)
        out["dit"], out["image"] = _eval_dit_and_image(src, src_r, q_r, device, seed, steps)
    return out


def _eval_ar(src_r, q_r, device, seed) -> dict:
    from transformers import GlmImageProcessor

    ref = load_dequantized(src_r.component("vision_language_encoder"), device=device)
    processor = GlmImageProcessor.from_pretrained(src_r.path / "processor")
    seq, prompt_len = ar_grid_sequence(processor, ref.config, seed, device=device)
    ref_logits = ar_grid_logits(ref, seq, prompt_len)
    del ref
    q = load_as_run(q_r.component("vision_language_encoder"), device=device)
    q_logits = ar_grid_logits(q, seq, prompt_len)
    del q
    return {"tokens": seq.shape[1] - prompt_len, **compare_logits(ref_logits, q_logits)}


def ar_grid_sequence(processor, config, seed: int, *, px: int = 1024, device="cpu"):
    """A teacher-forcing sequence: the text-to-image prompt for a ``px`` x ``px`` image followed by its
    preview and target grids filled with seeded random valid codebook ids. Returns ``(ids [1, L],
    prompt_len)``."""
    import torch

    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": "A lighthouse on a cliff, 'GLM' painted on it"}]}]],
        tokenize=True, target_h=px, target_w=px, return_dict=True, return_tensors="pt")
    n_grid = int(sum(int(t * h * w) for t, h, w in inputs["image_grid_thw"].tolist()))
    valid = min(config.vq_config.num_embeddings, config.text_config.vision_vocab_size)
    gen = torch.Generator().manual_seed(seed)
    seq = torch.cat([inputs["input_ids"], torch.randint(0, valid, (1, n_grid), generator=gen)], dim=1).to(device)
    return seq, inputs["input_ids"].shape[1]


def ar_grid_logits(model, seq, prompt_len: int):
    """fp32 logits ``[1, L - prompt_len, V]`` that predict each grid token of ``seq`` (teacher forcing)."""
    import torch

    ids = torch.arange(seq.shape[1], device=seq.device).view(1, 1, -1).expand(3, 1, -1)
    hidden = model.model.language_model(input_ids=seq, position_ids=ids).last_hidden_state
    return model.lm_head(hidden[:, prompt_len - 1:-1]).float()


def compare_logits(ref_logits, q_logits) -> dict:
    """Logits SQNR (dB), mean KL(ref || q) in nats and top-1 agreement."""
    import torch

    logp_ref = torch.log_softmax(ref_logits, -1)
    logp_q = torch.log_softmax(q_logits, -1)
    kl = float((logp_ref.exp() * (logp_ref - logp_q)).sum(-1).mean())
    agree = float((ref_logits.argmax(-1) == q_logits.argmax(-1)).float().mean())
    return {"logits_sqnr_db": sqnr(ref_logits, q_logits), "kl_mean": round(kl, 6), "top1_agreement": round(agree, 4)}


def _eval_dit_and_image(src, src_r, q_r, device, seed, steps):
    def components(reader):
        return {name: load_as_run(reader.component(name), device=device)
                for name in ("transformer", "text_encoder", "vae")}

    ref = components(src_r)
    q = components(q_r)
    dit_ref, dit_q = ref["transformer"], q["transformer"]
    cfg = dit_ref.config
    side = 1024 // 8 if cfg.num_layers >= 30 else 64 // 8  # latent side: 1024x1024 full, 64x64 tiny
    inputs = dit_inputs(cfg, side, seed, device=device)
    dit = {}
    for t in (999, 750, 500, 250, 0):
        dit[str(t)] = sqnr(dit_velocity(dit_ref, inputs, t), dit_velocity(dit_q, inputs, t))
    image = _image_psnr(src, ref, q, inputs["prior_token_id"], inputs["hidden_states"], side * 8, steps, device)
    return {"velocity_sqnr_db": dit}, image


def dit_inputs(cfg, side: int, seed: int, *, device="cpu") -> dict:
    """Seeded conditional-pass inputs of the DiT for a ``side`` x ``side`` latent: latents, 8 glyph
    embeddings, random prior ids, target size and crop (the keyword arguments of its forward)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, cfg.in_channels, side, side, generator=gen).to(device)
    tokens = (side // cfg.patch_size) ** 2
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, tokens), generator=gen).to(device)
    glyph = torch.randn(1, 8, cfg.text_embed_dim, generator=gen).to(device)
    return dict(hidden_states=latents, encoder_hidden_states=glyph, prior_token_id=prior,
                prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
                target_size=torch.tensor([[side * 8, side * 8]], dtype=torch.float32, device=device),
                crop_coords=torch.zeros(1, 2, device=device))


def dit_velocity(model, inputs: dict, t: float):
    """The DiT's velocity for ``inputs`` (:func:`dit_inputs`) at timestep ``t``."""
    import torch

    device = inputs["hidden_states"].device
    return model(**inputs, timestep=torch.tensor([float(t)], device=device), return_dict=False)[0]


def _image_psnr(src, ref, q, prior, latents, px, steps, device):
    from diffusers import GlmImagePipeline

    from glmq.quant.metrics import psnr

    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer, GlmImageProcessor

    images = []
    for comps in (ref, q):
        # The AR is not needed: the prior tokens are given. Stock pipeline code runs the rest.
        pipe = GlmImagePipeline(
            tokenizer=ByT5Tokenizer.from_pretrained(src / "tokenizer"),
            processor=GlmImageProcessor.from_pretrained(src / "processor"),
            text_encoder=comps["text_encoder"], vision_language_encoder=None, vae=comps["vae"],
            transformer=comps["transformer"],
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(src / "scheduler"))
        pipe.set_progress_bar_config(disable=True)
        img = pipe(prompt="A lighthouse on a cliff, 'GLM' painted on it", prior_token_ids=prior, latents=latents,
                   height=px, width=px, num_inference_steps=steps, output_type="pt").images
        images.append(img.float().clamp(0, 1))
    return {"psnr_db": round(float(psnr(images[0], images[1])), 3), "steps": steps, "size": px}
