"""Calibration for GPTQ on the AR text decoder, one decoder layer at a time.

Calibration sequences are the processor's text-to-image prompts (from ``--calib-prompts``, or a built-in
set) followed by a teacher-forced token grid (the preview and target grids of a ``target`` x ``target``
image). The grid tokens are drawn uniformly from the visual codebook with a fixed seed rather than sampled
from the model: sampling would need the whole AR resident, and it makes no difference for random-weight
checkpoints; for real weights it makes the image-token activations less typical (a known limitation).

Sequential, as GPTQ is meant to run: the inputs of layer ``i`` are the outputs of layers ``< i`` with their
*quantized* weights. Only one decoder layer is materialized at a time (plus the hidden states of the
calibration tokens and the layer's Hessians), so memory stays near one layer even for the 9 B decoder.
Positions are plain 1-D (the M-RoPE sections all get the same index), an approximation of the grid
positions the model sees while generating; it only affects attention, not which activations flow into the
linear layers. Runs on ``device`` (a GPU makes the 40-layer pass take seconds instead of minutes).
"""

from __future__ import annotations

from pathlib import Path

from glmq.errors import GlmqError

DEFAULT_PROMPTS = (
    "A photo of a red fox standing in fresh snow at sunrise, shallow depth of field",
    "A poster with the title 'GLM-Image' in bold letters above a city skyline at night",
    "An isometric illustration of a tiny workshop full of tools, warm light",
    "A watercolor painting of a lighthouse on a cliff during a storm",
)
LAYER_PREFIX = "model.language_model.layers."


class ArCalibrator:
    """Produces GPTQ results for the AR text decoder's planned linear layers, in layer order.

    ``result(name)`` returns ``(stored tensors, hessian)`` for a planned linear module name; calling it for
    layer ``i`` runs calibration for every layer up to ``i`` (once).
    """

    def __init__(self, reader, plans: dict, *, prompts_file: str | Path | None = None, device: str = "cpu",
                 target: int = 512, max_sequences: int = 8, seed: int = 0):
        import torch

        self.reader = reader.component("vision_language_encoder")
        self.plans = plans
        self.device = torch.device(device)
        for name, plan in plans.items():
            if plan.algo.needs_hessian and not name.startswith(LAYER_PREFIX):
                raise GlmqError(f"{plan.algo.name} calibration is implemented for the AR text decoder only, "
                                f"not for {name}")
        prompts = list(DEFAULT_PROMPTS)
        if prompts_file is not None:
            try:
                lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise GlmqError(f"{prompts_file}: cannot read calibration prompts ({e})") from None
            prompts = [line.strip() for line in lines if line.strip()]
            if not prompts:
                raise GlmqError(f"{prompts_file}: no calibration prompts (one prompt per line)")
        self.prompts = prompts[:max_sequences]
        self.target = target
        self.seed = seed
        self._results: dict[str, tuple[dict, object]] = {}
        self._next_layer = 0
        self._hidden = None
        self._setup(reader.path)

    def _setup(self, path: Path) -> None:
        import torch
        from transformers import GlmImageProcessor

        from glmq.io.layout import BY_NAME
        from glmq.models.build import _quiet_transformers, build_model

        _quiet_transformers()
        comp = BY_NAME["vision_language_encoder"]
        self.meta = build_model(comp, self.reader.config)
        text_config = self.meta.config.text_config
        self.num_layers = text_config.num_hidden_layers
        processor = GlmImageProcessor.from_pretrained(path / "processor")
        vq = self.meta.config.vq_config.num_embeddings
        valid = min(vq, text_config.vision_vocab_size)
        gen = torch.Generator().manual_seed(self.seed)
        sequences = []
        for prompt in self.prompts:
            inputs = processor.apply_chat_template(
                [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]], tokenize=True,
                target_h=self.target, target_w=self.target, return_dict=True, return_tensors="pt")
            grids = inputs["image_grid_thw"]
            n_grid = int(sum(int(t * h * w) for t, h, w in grids.tolist()))
            grid_tokens = torch.randint(0, valid, (1, n_grid), generator=gen)
            sequences.append(torch.cat([inputs["input_ids"], grid_tokens], dim=1))
        embed = self.reader.get("model.language_model.embed_tokens.weight").to(self.device)
        self._hidden = [torch.nn.functional.embedding(s.to(self.device), embed).float() for s in sequences]
        del embed
        from transformers.models.glm_image.modeling_glm_image import GlmImageTextRotaryEmbedding

        rotary = GlmImageTextRotaryEmbedding(config=text_config).to(self.device)
        self._pos = []
        for h in self._hidden:
            ids = torch.arange(h.shape[1], device=self.device).view(1, 1, -1).expand(3, 1, -1)
            cos, sin = rotary(h, ids)
            self._pos.append((ids, (cos.float(), sin.float())))

    def result(self, name: str):
        if name not in self._results:
            if not name.startswith(LAYER_PREFIX):
                raise GlmqError(f"no calibration for {name}")
            layer = int(name[len(LAYER_PREFIX):].split(".")[0])
            while self._next_layer <= layer:
                self._run_layer(self._next_layer)
                self._next_layer += 1
        return self._results.pop(name)

    def _run_layer(self, i: int) -> None:
        import torch

        from glmq.quant.algorithms import HessianAccumulator

        prefix = f"{LAYER_PREFIX}{i}."
        layer = self.meta.model.language_model.layers[i]
        layer = layer.to_empty(device=self.device).float()
        state = {n: self.reader.get(prefix + n).float() for n, _ in layer.named_parameters()}
        layer.load_state_dict(state, strict=True)
        layer.self_attn.config._attn_implementation = "sdpa"
        planned = {n[len(prefix):]: p for n, p in self.plans.items() if n.startswith(prefix)}
        accs, hooks = {}, []
        for sub, plan in planned.items():
            mod = layer.get_submodule(sub)
            accs[sub] = HessianAccumulator(mod.in_features, dtype=torch.float64, device=self.device)
            hooks.append(accs[sub].attach(mod))
        with torch.no_grad():
            for h, (ids, pe) in zip(self._hidden, self._pos):
                layer(h, position_embeddings=pe, attention_mask=None, position_ids=ids)
            for hook in hooks:
                hook.remove()
            for sub, plan in planned.items():
                mod = layer.get_submodule(sub)
                hessian = accs[sub].hessian()
                tensors = plan.algo.quantize_weight(plan.fmt, mod.weight.data, hessian=hessian)
                mod.weight.data = plan.fmt.dequantize(tensors, plan.shape).to(mod.weight.dtype)
                self._results[prefix + sub] = ({k: v.cpu() for k, v in tensors.items()}, hessian.cpu())
            outputs = []
            for h, (ids, pe) in zip(self._hidden, self._pos):
                out = layer(h, position_embeddings=pe, attention_mask=None, position_ids=ids)
                outputs.append(out[0] if isinstance(out, tuple) else out)
            self._hidden = outputs
        del layer
        self.meta.model.language_model.layers[i] = self.meta.model.language_model.layers[i].to("meta")
