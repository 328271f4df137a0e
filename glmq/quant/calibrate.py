"""Calibration activations of the AR component: GPTQ Hessians and sampled layer inputs, one layer at a time.

Two jobs share one pass over the AR text decoder:

- GPTQ layers get the Hessian ``X^T X / n`` of their inputs and are quantized inside the pass; a sample of
  their inputs on *held-out* sequences (other prompts and grid tokens, never in the Hessian) is kept for the
  output SQNR, so that a fitted layer is not scored on the data it was fitted to.
- Every other planned layer (data-free algorithms: RTN, HQQ) gets a bounded, evenly spaced sample of its
  input rows ``X`` (fp32, at most ``max_rows``), so that the converter can report the *output* SQNR
  ``10 log10(||X W^T||^2 / ||X (W_q - W)^T||^2)`` of every quantized layer on calibration activations.

Calibration sequences are the processor's text-to-image prompts (from ``--calib-prompts``, or a built-in
set) followed by a teacher-forced token grid (the preview and target grids of a ``target`` x ``target``
image). The grid tokens are drawn uniformly from the visual codebook with a fixed seed rather than sampled
from the model: sampling would need the whole AR resident, and it makes no difference for random-weight
checkpoints; for real weights it makes the image-token activations less typical (a known limitation).

Sequential, as GPTQ is meant to run: the inputs of layer ``i`` are the outputs of layers ``< i`` with their
GPTQ layers already *quantized*; data-free layers keep their unquantized weights in the pass, so a data-free
recipe's layer inputs are those of the unquantized model. Only one decoder layer is materialized at a time
(plus the hidden states of the calibration tokens, the layer's Hessians and input samples), so memory stays
near one layer even for the 9 B decoder. Positions are plain 1-D (the M-RoPE sections all get the same
index), an approximation of the grid positions the model sees while generating; it only affects attention,
not which activations flow into the linear layers. Runs on ``device`` (a GPU makes the 40-layer pass take
seconds instead of minutes). Without GPTQ layers the pass uses a smaller token budget (``max_tokens``).

The vision tower (``model.visual.blocks.*``, quantized by the tier16 recipe) is calibrated on synthetic
images (smooth random colour fields) with its upstream forward, one block materialized at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmq.errors import GlmqError

DEFAULT_PROMPTS = (
    "A photo of a red fox standing in fresh snow at sunrise, shallow depth of field",
    "A poster with the title 'GLM-Image' in bold letters above a city skyline at night",
    "An isometric illustration of a tiny workshop full of tools, warm light",
    "A watercolor painting of a lighthouse on a cliff during a storm",
)
LAYER_PREFIX = "model.language_model.layers."
VISION_PREFIX = "model.visual.blocks."
# Held out from GPTQ's Hessians; their inputs score the GPTQ layers (and RTN on the same rows).
HELD_OUT_PROMPTS = (
    "A bowl of ramen on a wooden table, steam rising, overhead shot",
    "A street sign that reads 'NORTH' under heavy rain at dusk",
)
MAX_ROWS = 256  # input rows kept per layer for the output SQNR
DATA_FREE_TOKENS = 512  # AR tokens of the pass when no layer needs a Hessian (two sequences of 256)
SEQUENCE_TOKENS = 256


def read_prompts(prompts_file: str | Path | None) -> list[str]:
    """The calibration prompts: one per non-empty line of ``prompts_file``, or :data:`DEFAULT_PROMPTS`."""
    if prompts_file is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GlmqError(f"{prompts_file}: cannot read calibration prompts ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise GlmqError(f"{prompts_file}: no calibration prompts (one prompt per line)")
    return prompts


@dataclass
class LayerCalibration:
    """What calibration knows about one planned linear layer."""

    tensors: dict | None = None
    """Stored tensors already computed in the pass (GPTQ), CPU."""
    hessian: Any = None
    """``[K, K]`` ``X^T X / n`` over all calibration rows (GPTQ), CPU."""
    inputs: Any = None
    """``[n, K]`` fp32 sample of the layer's input rows (``n <= max_rows``), CPU; for a GPTQ layer, rows of
    the held-out sequences only."""


class InputSampler:
    """Keeps an evenly spaced fraction ``keep`` of the input rows each watched linear layer sees (fp32, CPU;
    a call of at most ``max_rows`` rows is kept whole, and no call keeps fewer); :meth:`take` thins them to
    at most ``max_rows`` evenly spaced rows."""

    def __init__(self, keep: float = 1.0, max_rows: int = MAX_ROWS):
        self.keep = min(1.0, max(keep, 0.0))
        self.max_rows = max_rows
        self.rows: dict[str, list] = {}

    def attach(self, module, name: str):
        """Watch ``module`` (a forward pre-hook) under ``name``; returns the removable handle."""
        self.rows.setdefault(name, [])
        return module.register_forward_pre_hook(lambda mod, args: self.add(name, args[0]))

    def add(self, name: str, x) -> None:
        """Record the rows of ``x`` ``[..., K]`` as inputs of ``name``."""
        x = x.detach().reshape(-1, x.shape[-1])
        # Small inputs (the DiT's time embedding: one row per sample) are kept whole.
        n = x.shape[0] if x.shape[0] <= self.max_rows else max(self.max_rows, round(x.shape[0] * self.keep))
        self.rows.setdefault(name, []).append(_spaced(x, n).float().cpu())

    def take(self, name: str):
        """The ``[n, K]`` sample of ``name`` (removed from the sampler), or None if it saw nothing."""
        import torch

        parts = self.rows.pop(name, None)
        if not parts:
            return None
        x = torch.cat(parts)
        return _spaced(x, self.max_rows).contiguous()


def _spaced(x, n: int):
    """At most ``n`` evenly spaced rows of ``x`` (all of them, in order, if it has no more)."""
    import torch

    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx]


def materialize(module, reader, prefix: str, device) -> None:
    """Give the meta ``module`` real fp32 parameters read from ``reader`` under ``prefix``, one tensor at a
    time (no second copy of the module in a state dict)."""
    import torch

    module.to_empty(device=device).float()
    with torch.no_grad():
        for n, p in module.named_parameters():
            # Moved in its stored dtype, converted where the parameter lives: a blocking copy_ from a bf16 host
            # tensor into an fp32 GPU one converts on the host first (an fp32 host copy of the tensor).
            p.copy_(reader.get(prefix + n).to(p.device))


def read_rows(reader, name: str, rows: list[int]):
    """Rows ``rows`` (sorted, unique) of the 2-D tensor ``name``, read one row at a time from its file."""
    import torch

    info = reader.tensors[name]
    out = torch.empty(len(rows), info.shape[1], dtype=getattr(torch, info.dtype))
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    row_bytes = view.nbytes // max(1, len(rows))
    with open(info.file, "rb") as f:
        for i, r in enumerate(rows):
            f.seek(info.data_start + info.begin + r * row_bytes)
            if f.readinto(view[i * row_bytes:(i + 1) * row_bytes]) != row_bytes:
                raise GlmqError(f"{info.file}: truncated while reading tensor {name!r}")
    return out


def release(module) -> None:
    """Hand a materialized module's memory back (its parameters return to the meta device)."""
    module.to("meta")


class ArCalibrator:
    """Calibration of the AR component's planned linear layers, in layer order.

    ``result(name)`` returns a :class:`LayerCalibration` for a planned linear module name (the text decoder's
    layers, ``lm_head`` and the vision tower's blocks); calling it for decoder layer ``i`` runs the pass for
    every layer up to ``i`` (once). ``capture`` (default on) samples the inputs of data-free layers; layers
    not in ``wanted`` (when given: the ones still to be written after a resume) are neither sampled nor kept.
    """

    def __init__(self, reader, plans: dict, *, prompts_file: str | Path | None = None, device: str = "cpu",
                 target: int = 512, max_sequences: int = 8, seed: int = 0, capture: bool = True,
                 max_rows: int = MAX_ROWS, max_tokens: int = DATA_FREE_TOKENS, wanted: set[str] | None = None):
        import torch

        self.reader = reader.component("vision_language_encoder")
        self.path = reader.path
        self.plans = plans
        self.device = torch.device(device)
        for name, plan in plans.items():
            if plan.algo.needs_hessian and not name.startswith(LAYER_PREFIX):
                raise GlmqError(f"{plan.algo.name} calibration is implemented for the AR text decoder only, "
                                f"not for {name}")
        self.gptq = any(p.algo.needs_hessian for p in plans.values())
        prompts = read_prompts(prompts_file)
        if self.gptq:
            self.prompts, self.target, self.seq_tokens = prompts[:max_sequences], target, None
        else:  # data-free: output SQNR only, so a small budget of short sequences
            n = max(1, min(len(prompts), max_tokens // SEQUENCE_TOKENS))
            self.prompts, self.target, self.seq_tokens = prompts[:n], 256, max(1, max_tokens // n)
        self.capture = capture
        self.max_rows = max_rows
        self.wanted = wanted
        self.seed = seed
        self._results: dict[str, LayerCalibration] = {}
        self._next_layer = 0
        self._hidden = None
        self._vision_done = False

    def describe(self) -> dict:
        """Where the activations come from, for the report."""
        grids = f"the token grids of a {self.target}x{self.target} image"
        return {
            "sequences": len(self.prompts),
            "sequence": f"first {self.seq_tokens} tokens of prompt + {grids}" if self.seq_tokens else f"prompt + {grids}",
            "inputs": "sequentially GPTQ-quantized decoder" if self.gptq else "unquantized model",
            # GPTQ layers: scored on sequences that are not in their Hessians
            "held_out_sequences": len(HELD_OUT_PROMPTS) if self.gptq and self.capture else None,
            "max_rows": self.max_rows,
            "vision_tower": ("2 synthetic 256x256 images (smooth random colour fields)"
                             if any(n.startswith(VISION_PREFIX) for n in self.plans) else None),
        }

    def _setup(self) -> None:
        import torch
        from transformers import GlmImageProcessor

        from glmq.io.layout import BY_NAME
        from glmq.models.build import _quiet_transformers, build_model

        _quiet_transformers()
        comp = BY_NAME["vision_language_encoder"]
        self.meta = build_model(comp, self.reader.config)
        text_config = self.meta.config.text_config
        self.num_layers = text_config.num_hidden_layers
        processor = GlmImageProcessor.from_pretrained(self.path / "processor")
        vq = self.meta.config.vq_config.num_embeddings
        valid = min(vq, text_config.vision_vocab_size)
        gen = torch.Generator().manual_seed(self.seed)
        sequences = []
        held = list(HELD_OUT_PROMPTS) if self.gptq and self.capture else []
        for prompt in self.prompts + held:
            inputs = processor.apply_chat_template(
                [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]], tokenize=True,
                target_h=self.target, target_w=self.target, return_dict=True, return_tensors="pt")
            grids = inputs["image_grid_thw"]
            n_grid = int(sum(int(t * h * w) for t, h, w in grids.tolist()))
            grid_tokens = torch.randint(0, valid, (1, n_grid), generator=gen)
            seq = torch.cat([inputs["input_ids"], grid_tokens], dim=1)
            sequences.append(seq[:, :self.seq_tokens] if self.seq_tokens else seq)
        self.n_fit = len(self.prompts)  # sequences[n_fit:] are held out (GPTQ only)
        self.tokens = sum(s.shape[1] for s in sequences[:self.n_fit])
        held_tokens = sum(s.shape[1] for s in sequences[self.n_fit:])
        # Only the embedding rows of the calibration tokens are read (the table is 1.4 GB at full size).
        ids = torch.cat([s.flatten() for s in sequences]).unique()
        rows = read_rows(self.reader, "model.language_model.embed_tokens.weight", ids.tolist()).to(self.device)
        self._hidden = [rows[torch.searchsorted(ids, s).to(self.device)].float() for s in sequences]
        del rows
        from transformers.models.glm_image.modeling_glm_image import GlmImageTextRotaryEmbedding

        rotary = GlmImageTextRotaryEmbedding(config=text_config).to(self.device)
        self._pos = []
        for h in self._hidden:
            ids = torch.arange(h.shape[1], device=self.device).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = rotary(h, ids)
            self._pos.append((ids, (cos.float(), sin.float())))
        # Twice the rows finally kept, so that take() still spaces them over every sequence.
        self._sampler = InputSampler(keep=2 * self.max_rows / self.tokens, max_rows=self.max_rows)
        self._held_sampler = InputSampler(keep=2 * self.max_rows / max(1, held_tokens), max_rows=self.max_rows)

    def _captured(self, name: str, *, fitted: bool = False) -> bool:
        """Whether the inputs of ``name`` are sampled: data-free layers' (``fitted`` False) on the calibration
        sequences, GPTQ layers' (``fitted`` True) on the held-out ones."""
        plan = self.plans.get(name)
        return (plan is not None and self.capture and plan.algo.needs_hessian == fitted
                and (self.wanted is None or name in self.wanted))

    def result(self, name: str) -> LayerCalibration | None:
        if name not in self._results:
            if name.startswith(VISION_PREFIX):
                self._run_vision()
            elif name.startswith(LAYER_PREFIX) or name == "lm_head":
                if self._hidden is None:
                    self._setup()
                layer = self.num_layers if name == "lm_head" else int(name[len(LAYER_PREFIX):].split(".")[0])
                while self._next_layer <= layer:
                    if self._next_layer == self.num_layers:
                        self._run_head()
                    else:
                        self._run_layer(self._next_layer)
                    self._next_layer += 1
            if name not in self._results:
                if name in self.plans and self.plans[name].algo.needs_hessian:
                    raise GlmqError(f"no calibration for {name}")
                return None
        return self._results.pop(name)

    def _run_layer(self, i: int) -> None:
        import torch

        from glmq.quant.algorithms import HessianAccumulator

        prefix = f"{LAYER_PREFIX}{i}."
        layer = self.meta.model.language_model.layers[i]
        materialize(layer, self.reader, prefix, self.device)
        layer.self_attn.config._attn_implementation = "sdpa"
        planned = {n[len(prefix):]: p for n, p in self.plans.items() if n.startswith(prefix)}
        accs, hooks, held_hooks = {}, [], []
        for sub, plan in planned.items():
            mod = layer.get_submodule(sub)
            if plan.algo.needs_hessian:
                accs[sub] = HessianAccumulator(mod.in_features, dtype=torch.float64, device=self.device)
                hooks.append(accs[sub].attach(mod))
            elif self._captured(prefix + sub):
                hooks.append(self._sampler.attach(mod, prefix + sub))
        fit, held = list(zip(self._hidden, self._pos))[:self.n_fit], list(zip(self._hidden, self._pos))[self.n_fit:]
        with torch.no_grad():
            outputs = [self._forward(layer, h, ids, pe) for h, (ids, pe) in fit]
            for hook in hooks:
                hook.remove()
            for sub, plan in planned.items():  # the held-out sequences reach GPTQ layers' samples only
                if self._captured(prefix + sub, fitted=True):
                    held_hooks.append(self._held_sampler.attach(layer.get_submodule(sub), prefix + sub))
            outputs += [self._forward(layer, h, ids, pe) for h, (ids, pe) in held]
            for hook in held_hooks:
                hook.remove()
            for sub, plan in planned.items():
                if self._captured(prefix + sub):
                    self._results[prefix + sub] = LayerCalibration(inputs=self._sampler.take(prefix + sub))
            for sub in accs:
                plan = planned[sub]
                mod = layer.get_submodule(sub)
                hessian = accs[sub].hessian()
                tensors = plan.algo.quantize_weight(plan.fmt, mod.weight.data, hessian=hessian)
                mod.weight.data = plan.fmt.dequantize(tensors, plan.shape).to(mod.weight.dtype)
                if self.wanted is not None and prefix + sub not in self.wanted:
                    continue  # a finished shard's layer (resume): quantized for the pass, not kept
                self._results[prefix + sub] = LayerCalibration(
                    tensors={k: v.cpu() for k, v in tensors.items()}, hessian=hessian.cpu(),
                    inputs=self._held_sampler.take(prefix + sub))
            if accs and (i + 1 < self.num_layers or self._captured("lm_head")):
                # GPTQ changed the weights: the next layer sees the quantized layer's outputs.
                outputs = [self._forward(layer, h, ids, pe) for h, (ids, pe) in fit + held]
            self._hidden = outputs
        del layer
        self.meta.model.language_model.layers[i] = self.meta.model.language_model.layers[i].to("meta")

    @staticmethod
    def _forward(layer, h, ids, pe):
        out = layer(h, position_embeddings=pe, attention_mask=None, position_ids=ids)
        return out[0] if isinstance(out, tuple) else out

    def _run_head(self) -> None:
        """The final norm's output is what ``lm_head`` sees."""
        import torch

        if not self._captured("lm_head"):
            return
        norm = self.meta.model.language_model.norm
        materialize(norm, self.reader, "model.language_model.norm.", self.device)
        with torch.no_grad():
            for h in self._hidden[:self.n_fit]:
                self._sampler.add("lm_head", norm(h))
        self._results["lm_head"] = LayerCalibration(inputs=self._sampler.take("lm_head"))
        self.meta.model.language_model.norm = norm.to("meta")

    def _run_vision(self) -> None:
        """One upstream forward of the vision tower on synthetic images, blocks streamed one at a time."""
        import torch

        if self._vision_done:
            return
        self._vision_done = True
        names = [n for n in self.plans if n.startswith(VISION_PREFIX) and self._captured(n)]
        if not names:
            return
        from glmq.io.layout import BY_NAME
        from glmq.models.build import _quiet_transformers, build_model

        _quiet_transformers()
        visual = build_model(BY_NAME["vision_language_encoder"], self.reader.config).model.visual
        pixel_values, grid_thw = synthetic_images(self.path, self.seed)
        tokens = int(grid_thw.prod(-1).sum())
        sampler = InputSampler(keep=2 * self.max_rows / tokens, max_rows=self.max_rows)
        hooks = [sampler.attach(visual.get_submodule(n.removeprefix("model.visual.")), n) for n in names]
        for child_name, child in visual.named_children():
            if child_name != "blocks":
                materialize(child, self.reader, f"model.visual.{child_name}.", self.device)
        for i, block in enumerate(visual.blocks):
            hooks.append(block.register_forward_pre_hook(
                lambda mod, args, i=i: materialize(mod, self.reader, f"{VISION_PREFIX}{i}.", self.device)))
            hooks.append(block.register_forward_hook(lambda mod, args, out: release(mod)))
        visual.config._attn_implementation = "sdpa"
        with torch.no_grad():
            visual(pixel_values.to(self.device), grid_thw=grid_thw.to(self.device))
        for hook in hooks:
            hook.remove()
        for n in names:
            self._results[n] = LayerCalibration(inputs=sampler.take(n))


def synthetic_images(path: Path, seed: int = 0, size: int = 256):
    """Two smooth random colour fields of ``size`` x ``size`` px through the checkpoint's image processor:
    ``(pixel_values, image_grid_thw)``."""
    import torch
    from transformers import GlmImageProcessor

    gen = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(2):
        coarse = torch.rand(1, 3, 8, 8, generator=gen)
        img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        img = (img + 0.05 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
        images.append((img[0] * 255).round().to(torch.uint8))
    processor = GlmImageProcessor.from_pretrained(path / "processor").image_processor
    out = processor(images=images, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]
