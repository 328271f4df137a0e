"""Calibration activations of the DiT (``GlmImageTransformer2DModel``), one transformer block at a time.

The DiT's inputs are synthetic but shaped like a real denoising step, and built with the upstream modules
exactly as ``GlmImageTransformer2DModel.forward`` builds them (this file calls them, it does not re-implement
them): a batch of ``len(timesteps)`` samples of ``size`` x ``size`` px (latents ``size / 8`` a side,
``(size / 16)^2`` image tokens), each with

- latents: standard normal (the VAE-normalized latent space is close to unit variance at every noise level);
- prior tokens: a random target grid at 1/32 resolution upsampled 2x (nearest), as the pipeline does; every
  other sample has its prior embedding dropped, as in the unconditional pass of classifier-free guidance;
- glyph embeddings: ``glyph_tokens`` standard-normal vectors of the glyph encoder's width (random rather
  than encoded: the ByT5 encoder would be one more model to load, and with quote-free prompts it only sees
  an empty string);
- timesteps spread evenly over ``[0, 1000)`` (the DiT sees unshifted timesteps), target size ``size``.

Inputs of the DiT's linear layers come from the unquantized model (all DiT algorithms here are data-free).
Only the stem (patch, glyph, prior and time embeddings, about 0.1 B parameters), then one block at a time,
are materialized from the lazy reader; each planned linear keeps at most ``max_rows`` evenly spaced input
rows (fp32). The AdaLN ``norm1.linear`` sees one row per sample (the time embedding).
"""

from __future__ import annotations

from glmq.quant.calibrate import MAX_ROWS, InputSampler, LayerCalibration, materialize, release

STEM = ("image_projector", "glyph_projector", "prior_token_embedding", "prior_projector", "time_condition_embed")
TAIL = ("norm_out", "proj_out")
BLOCK_PREFIX = "transformer_blocks."


class DitCalibrator:
    """Calibration of the DiT's planned linear layers, in module order.

    ``result(name)`` returns a :class:`~glmq.quant.calibrate.LayerCalibration` with the sampled inputs of
    ``name``; asking for block ``i`` runs the blocks up to ``i`` (once). Layers not in ``wanted`` (when
    given) are not sampled.
    """

    def __init__(self, reader, plans: dict, *, device: str = "cpu", size: int = 192,
                 timesteps: tuple[int, ...] = (875, 625, 375, 125), glyph_tokens: int = 16, seed: int = 0,
                 max_rows: int = MAX_ROWS, wanted: set[str] | None = None):
        import torch

        from glmq.io.layout import BY_NAME
        from glmq.models.build import build_model

        self.cr = reader.component("transformer")
        self.plans = plans
        self.device = torch.device(device)
        self.size = size
        self.timesteps = tuple(timesteps)
        self.glyph_tokens = glyph_tokens
        self.seed = seed
        self.max_rows = max_rows
        self.wanted = wanted
        self._results: dict[str, LayerCalibration] = {}
        self._next = -1  # -1: the stem, 0..num_layers-1: blocks, num_layers: the tail
        self.meta = build_model(BY_NAME["transformer"], self.cr.config)  # on meta: no memory
        self.tokens = len(self.timesteps) * ((self.size // 16) ** 2 + self.glyph_tokens)

    def describe(self) -> dict:
        return {
            "samples": len(self.timesteps),
            "size_px": self.size,
            "timesteps": list(self.timesteps),
            "glyph": f"{self.glyph_tokens} random N(0, 1) embeddings",
            "inputs": "unquantized model",
            "max_rows": self.max_rows,
        }

    def forward_inputs(self) -> dict:
        """The keyword arguments of the equivalent full ``GlmImageTransformer2DModel`` forward."""
        import torch

        cfg = self.cr.config
        gen = torch.Generator().manual_seed(self.seed)
        b, side = len(self.timesteps), self.size // 8
        tokens_side = side // cfg["patch_size"]
        latents = torch.randn(b, cfg["in_channels"], side, side, generator=gen)
        grid = torch.randint(0, cfg["prior_vq_quantizer_codebook_size"], (b, 1, tokens_side // 2, tokens_side // 2),
                             generator=gen)
        prior = torch.nn.functional.interpolate(grid.float(), scale_factor=2, mode="nearest").long().flatten(1)
        drop = torch.zeros_like(prior, dtype=torch.bool)
        drop[1::2] = True  # the unconditional passes
        glyph = torch.randn(b, self.glyph_tokens, cfg["text_embed_dim"], generator=gen)
        dev = self.device
        return dict(hidden_states=latents.to(dev), encoder_hidden_states=glyph.to(dev), prior_token_id=prior.to(dev),
                    prior_token_drop=drop.to(dev),
                    timestep=torch.tensor(self.timesteps, dtype=torch.float32, device=dev),
                    target_size=torch.tensor([[self.size, self.size]] * b, dtype=torch.float32, device=dev),
                    crop_coords=torch.zeros(b, 2, device=dev))

    def _captured(self, name: str) -> bool:
        return name in self.plans and (self.wanted is None or name in self.wanted)

    def _watch(self, module, prefix: str, sampler: InputSampler) -> list:
        return [sampler.attach(module.get_submodule(n[len(prefix):]), n)
                for n in self.plans if n.startswith(prefix) and self._captured(n)]

    def _collect(self, sampler: InputSampler, hooks: list) -> None:
        for hook in hooks:
            hook.remove()
        for name in list(sampler.rows):
            self._results[name] = LayerCalibration(inputs=sampler.take(name))

    def result(self, name: str) -> LayerCalibration | None:
        if name not in self._results:
            n = self.meta.config.num_layers
            if name.startswith(BLOCK_PREFIX):
                stage = int(name[len(BLOCK_PREFIX):].split(".")[0])
            elif name.split(".")[0] in TAIL:
                stage = n
            else:
                stage = -1
            while self._next <= stage:
                if self._next == -1:
                    self._run_stem()
                elif self._next < n:
                    self._run_block(self._next)
                else:
                    self._run_tail()
                self._next += 1
        return self._results.pop(name, None)

    def _sampler(self) -> InputSampler:
        return InputSampler(keep=2 * self.max_rows / self.tokens, max_rows=self.max_rows)

    def _run_stem(self) -> None:
        """Step 1-2 of the upstream forward: RoPE, patch/glyph/prior embeddings, time embedding."""
        import torch

        m = self.meta
        sampler = self._sampler()
        hooks = []
        for name in STEM:
            materialize(m.get_submodule(name), self.cr, f"{name}.", self.device)
            hooks += self._watch(m.get_submodule(name), f"{name}.", sampler)
        kw = self.forward_inputs()
        with torch.no_grad():
            self.rotary = m.rope(kw["hidden_states"])
            hidden = m.image_projector(kw["hidden_states"])
            self.encoder = m.glyph_projector(kw["encoder_hidden_states"])
            prior = m.prior_token_embedding(kw["prior_token_id"])
            prior[kw["prior_token_drop"]] *= 0.0
            self.hidden = hidden + m.prior_projector(prior)
            self.temb = m.time_condition_embed(kw["timestep"], kw["target_size"], kw["crop_coords"], hidden.dtype)
        self._collect(sampler, hooks)
        for name in STEM:
            release(m.get_submodule(name))

    def _run_block(self, i: int) -> None:
        import torch

        prefix = f"{BLOCK_PREFIX}{i}."
        block = self.meta.transformer_blocks[i]
        materialize(block, self.cr, prefix, self.device)
        sampler = self._sampler()
        hooks = self._watch(block, prefix, sampler)
        with torch.no_grad():
            self.hidden, self.encoder = block(self.hidden, self.encoder, self.temb, self.rotary)
        self._collect(sampler, hooks)
        release(block)

    def _run_tail(self) -> None:
        """Step 4 of the upstream forward, for recipes that quantize the output projections."""
        import torch

        m = self.meta
        if not any(n.split(".")[0] in TAIL and self._captured(n) for n in self.plans):
            return
        sampler = self._sampler()
        hooks = []
        for name in TAIL:
            materialize(m.get_submodule(name), self.cr, f"{name}.", self.device)
            hooks += self._watch(m.get_submodule(name), f"{name}.", sampler)
        with torch.no_grad():
            m.proj_out(m.norm_out(self.hidden, self.temb))
        self._collect(sampler, hooks)
        for name in TAIL:
            release(m.get_submodule(name))
