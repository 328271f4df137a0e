"""Text-to-image with a GLM-Image folder exported by ``glmq export onnx``, on ONNX Runtime alone.

    python examples/onnx_generate.py DST --prompt 'a sign that says "hello"' --out img.png --size 1024x1024

Needs onnxruntime (or onnxruntime-gpu), numpy, Pillow and transformers' tokenizers (no model code): the
four graphs and ``glmq_onnx.json`` in DST hold everything else. The steps mirror diffusers'
``GlmImagePipeline`` for text-to-image:

1. AR: the chat-templated prompt plus ``<sop>H W<eop><sop>h w<eop>`` and the image-start token; the AR samples
   a preview grid, then the target grid, one token per step with a KV cache. Positions are 3-D M-RoPE,
   computed here from the grid sizes (transformers' ``get_rope_index``): the prompt counts 0..L-1 on all
   three axes; each grid, preview first, starts at offset p and gives cell (r, c) the position
   (p, p + r, p + c); then p += max(h, w). Ids outside the DiT codebook are masked while sampling.
2. Glyph encoder: the ByT5 encoding of the quoted substrings of the prompt ("" when there are none).
3. DiT: flow-matching Euler over ``steps`` steps with classifier-free guidance. The timestep trap: the DiT
   is fed the *unshifted* timestep minus one, while the Euler update uses the *shifted* sigmas
   (``mu = sqrt(image_seq_len / 256) * 0.75 + 0.25``, linear time shift ``mu / (mu + 1 / sigma - 1)``).
4. VAE: decode ``latents * std + mean``; the image is in [-1, 1].
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

INDEX_NAME = "glmq_onnx.json"
GRAPHS = ("ar_decoder", "glyph_encoder", "dit", "vae_decoder")


class ExportError(Exception):
    """A problem with the exported folder or the arguments; printed as one line."""


# ---- pure functions (unit-tested against transformers / diffusers) ----------------------------------------


def grid_sizes(height: int, width: int, factor: int = 32, preview_base: int = 16) -> tuple[int, int, int, int]:
    """``(token_h, token_w, preview_h, preview_w)`` for an image of ``height`` x ``width`` pixels."""
    token_h, token_w = height // factor, width // factor
    ratio = token_h / token_w
    return token_h, token_w, int(math.sqrt(ratio) * preview_base), int(math.sqrt(1 / ratio) * preview_base)


def decode_positions(prompt_len: int, grids: list[tuple[int, int]]) -> np.ndarray:
    """int64 [3, n] M-RoPE positions of the tokens the AR generates: the cells of ``grids`` in generation order
    (row-major, each grid starting where the previous one's longest side ended), then one end marker."""
    pos = prompt_len
    cols = []
    for h, w in grids:
        rows = np.repeat(np.arange(h), w)
        cells = np.tile(np.arange(w), h)
        cols.append(np.stack([np.full(h * w, pos), pos + rows, pos + cells]))
        pos += max(h, w)
    cols.append(np.full((3, 1), pos))
    return np.concatenate(cols, axis=1).astype(np.int64)


def flow_schedule(steps: int, image_seq_len: int, sched: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, sigmas)``: the unshifted timesteps [steps] (the DiT gets ``t - 1``) and the shifted sigmas
    [steps + 1] ending at 0 that the Euler update uses (diffusers' FlowMatchEulerDiscreteScheduler)."""
    n_train = sched.get("num_train_timesteps", 1000)
    t = np.linspace(n_train, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    sigmas = t / np.float32(n_train)
    if sched.get("use_dynamic_shifting", False):
        m = (image_seq_len / sched.get("base_image_seq_len", 256)) ** 0.5
        mu = m * sched.get("max_shift", 0.75) + sched.get("base_shift", 0.25)
        if sched.get("time_shift_type", "exponential") == "linear":
            sigmas = mu / (mu + (1 / sigmas - 1))
        else:
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        shift = sched.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return t, np.append(sigmas.astype(np.float32), np.float32(0.0))


def glyph_texts(prompt: str) -> list[str]:
    """The quoted substrings the glyph encoder sees: '..', curly double quotes, "..", and 「..」."""
    return (re.findall(r"'([^']*)'", prompt) + re.findall(r"\u201c([^\u201c\u201d]*)\u201d", prompt)
            + re.findall(r'"([^"]*)"', prompt) + re.findall(r"「([^「」]*)」", prompt))


def sample_token(logits: np.ndarray, rng: np.random.Generator, *, valid: int, temperature: float, top_k: int,
                 top_p: float) -> int:
    """One id from ``logits`` [V], restricted to ids < ``valid``, with transformers' order of warpers:
    temperature, top-k, then top-p."""
    x = logits[:valid].astype(np.float64) / max(temperature, 1e-6)
    if 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(p, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        cum = np.cumsum(p[order])
        drop = cum <= 1 - top_p
        drop[-1] = False
        p[order[drop]] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


# ---- the pipeline ---------------------------------------------------------------------------------------


class OnnxGlmImage:
    """The four exported graphs plus tokenizers; ``__call__`` makes one image."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, session_options=None):
        import onnxruntime as ort

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if not index.is_file():
            raise ExportError(f"{self.folder}: not a glmq ONNX export (no {INDEX_NAME})")
        self.index = json.loads(index.read_text(encoding="utf-8"))
        missing = [g for g in GRAPHS if g not in self.index["graphs"]]
        if missing:
            raise ExportError(f"{self.folder}: export lacks graphs {', '.join(missing)} (export with --component all)")
        self.cfg = self.index["pipeline"]
        providers = providers or ort.get_available_providers()
        self.sessions = {}
        self.dtypes = {}
        for g in GRAPHS:
            info = self.index["graphs"][g]
            self.sessions[g] = ort.InferenceSession(str(self.folder / info["file"]), sess_options=session_options,
                                                    providers=providers)
            self.dtypes[g] = {v["name"]: np.dtype(v["dtype"]) for v in info["inputs"]}
        from transformers import AutoTokenizer

        files = self.index["files"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder / files["processor"])
        self.glyph_tokenizer = AutoTokenizer.from_pretrained(self.folder / files["glyph_tokenizer"])
        self.chat_template = self.tokenizer.chat_template or _processor_chat_template(self.folder / files["processor"])

    # -- AR ---------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """The AR prompt's token ids [L] and the grid sizes, as ``GlmImageProcessor.apply_chat_template`` makes
        them for text-to-image."""
        grid = self.cfg["grid"]
        th, tw, ph, pw = grid_sizes(height, width, grid["factor"], grid["preview_base"])
        ar = self.cfg["ar"]
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False)
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))
        text += f"{ar['grid_bos_token']}{th} {tw}{ar['grid_eos_token']}{ar['grid_bos_token']}{ph} {pw}" \
                f"{ar['grid_eos_token']}{bos}"
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        return np.asarray(ids, dtype=np.int64), (th, tw, ph, pw)

    def generate_prior(self, prompt: str, height: int, width: int, rng: np.random.Generator, on_step=None,
                       sampling: dict | None = None) -> np.ndarray:
        """The target grid's ids [token_h * token_w], sampled by the AR with a KV cache. ``sampling`` overrides
        the export's ``temperature``/``top_k``/``top_p`` (``top_k=1`` is greedy)."""
        ids, (th, tw, ph, pw) = self.prompt_ids(prompt, height, width)
        s = {**self.cfg["ar"]["sampling"], **(sampling or {})}
        valid = min(self.index["graphs"]["ar_decoder"]["vocab_size"], self.cfg["dit"]["prior_codebook_size"])

        def choose(step, logits):
            if on_step is not None:
                on_step("ar", step, ph * pw + th * tw)
            return sample_token(logits, rng, valid=valid, temperature=s["temperature"], top_k=s["top_k"],
                                top_p=s["top_p"])

        tokens, _ = self.run_ar(ids, [(ph, pw), (th, tw)], choose)
        return tokens[ph * pw:]

    def run_ar(self, ids: np.ndarray, grids: list[tuple[int, int]], choose) -> tuple[np.ndarray, list[np.ndarray]]:
        """Fill ``grids`` token by token after prompt ``ids``: ``choose(step, logits [V])`` picks each token.
        Returns the tokens and the logits each step saw."""
        info = self.index["graphs"]["ar_decoder"]
        sess = self.sessions["ar_decoder"]
        kv_dtype = self.dtypes["ar_decoder"]["past_key_values.0.key"]
        layers, heads, head_dim = info["num_layers"], info["num_key_value_heads"], info["head_dim"]
        total = sum(h * w for h, w in grids)
        positions = decode_positions(len(ids), grids)
        past = {f"past_key_values.{i}.{k}": np.zeros((1, heads, 0, head_dim), dtype=kv_dtype)
                for i in range(layers) for k in ("key", "value")}
        presents = [o.name for o in sess.get_outputs()][1:]
        feed_ids = ids[None]
        feed_pos = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, 1, len(ids)))
        tokens, seen_logits = [], []
        for step in range(total):
            outputs = sess.run(None, {"input_ids": feed_ids,
                                      "attention_mask": np.ones((1, len(ids) + step), dtype=np.int64),
                                      "position_ids": np.ascontiguousarray(feed_pos), **past})
            logits = outputs[0][0, -1]
            seen_logits.append(logits)
            token = int(choose(step, logits))
            tokens.append(token)
            past = {name.replace("present.", "past_key_values.", 1): value
                    for name, value in zip(presents, outputs[1:])}
            feed_ids = np.array([[token]], dtype=np.int64)
            feed_pos = positions[:, step].reshape(3, 1, 1)  # the cell of the token just chosen
        return np.asarray(tokens, dtype=np.int64), seen_logits

    # -- glyph encoder --------------------------------------------------------------------------------------

    def glyph_embeds(self, prompt: str) -> np.ndarray:
        """[1, T, d_model]: the glyph encoder's states of every valid token of the prompt's quoted texts."""
        texts = glyph_texts(prompt) or [""]
        ids = self.glyph_tokenizer(texts, max_length=self.cfg["glyph"]["max_length"], truncation=True)["input_ids"]
        pad = self.glyph_tokenizer.pad_token_id
        # diffusers prepends one pad token to every text when the number of texts is even.
        ids = [[pad] * ((len(ids) + 1) % 2) + x for x in ids]
        n = max(len(x) for x in ids)
        mask = np.array([[1] * len(x) + [0] * (n - len(x)) for x in ids], dtype=np.int64)
        batch = np.array([x + [pad] * (n - len(x)) for x in ids], dtype=np.int64)
        states = self.sessions["glyph_encoder"].run(None, {"input_ids": batch, "attention_mask": mask})[0]
        return states[mask.astype(bool)][None].astype(np.float32)

    # -- DiT and VAE ----------------------------------------------------------------------------------------

    def denoise(self, prior_ids: np.ndarray, glyph: np.ndarray, glyph_uncond: np.ndarray, height: int, width: int,
                rng: np.random.Generator, steps: int, guidance: float, on_step=None,
                latents: np.ndarray | None = None) -> np.ndarray:
        """Final latents [1, C, H / f, W / f] (fp32) from ``prior_ids`` [4 * token_h * token_w] (the upsampled
        target grid) and the glyph states; ``latents`` are the initial noise (drawn from ``rng`` if None)."""
        dit = self.cfg["dit"]
        vae_scale = self.cfg["vae"]["scale_factor"]
        lh, lw = height // vae_scale, width // vae_scale
        image_seq_len = lh * lw // dit["patch_size"] ** 2
        timesteps, sigmas = flow_schedule(steps, image_seq_len, self.cfg["scheduler"])
        dt = self.dtypes["dit"]["latents"]
        if latents is None:
            latents = rng.standard_normal((1, dit["in_channels"], lh, lw), dtype=np.float32)
        latents = latents.astype(np.float32)
        sess = self.sessions["dit"]
        base = {
            "prior_token_ids": prior_ids[None],
            "target_size": np.array([[height, width]], dtype=dt),
            "crop_coords": np.zeros((1, 2), dtype=dt),
        }
        offset = self.cfg["timesteps"]["dit_timestep_offset"]
        for i, t in enumerate(timesteps):
            feed = {**base, "latents": latents.astype(dt), "timestep": np.array([t + offset], dtype=dt)}
            cond = sess.run(None, {**feed, "glyph_embeds": glyph.astype(dt),
                                   "prior_token_drop": np.zeros(prior_ids.shape, dtype=bool)[None]})[0]
            pred = cond.astype(np.float32)
            if guidance > 1.0:
                uncond = sess.run(None, {**feed, "glyph_embeds": glyph_uncond.astype(dt),
                                         "prior_token_drop": np.ones(prior_ids.shape, dtype=bool)[None]})[0]
                uncond = uncond.astype(np.float32)
                pred = uncond + np.float32(guidance) * (pred - uncond)
            latents = latents + (sigmas[i + 1] - sigmas[i]) * pred
            if on_step is not None:
                on_step("dit", i, len(timesteps))
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float32 [H, W, 3] image in [0, 1] from final latents."""
        vae = self.cfg["vae"]
        c = vae["latent_channels"]
        mean = np.asarray(vae["latents_mean"], dtype=np.float32).reshape(1, c, 1, 1)
        std = np.asarray(vae["latents_std"], dtype=np.float32).reshape(1, c, 1, 1)
        x = (latents * std + mean).astype(self.dtypes["vae_decoder"]["latents"])
        image = self.sessions["vae_decoder"].run(None, {"latents": x})[0][0].astype(np.float32)
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)

    def __call__(self, prompt: str, height: int = 1024, width: int = 1024, *, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, on_step=None) -> np.ndarray:
        """A uint8 [height, width, 3] image for ``prompt``."""
        factor = self.cfg["grid"]["factor"]
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ExportError(f"height and width must be positive multiples of {factor}; got {width}x{height}")
        steps = steps or self.cfg["num_inference_steps"]
        guidance = self.cfg["guidance_scale"] if guidance is None else guidance
        rng = np.random.default_rng(seed)
        prior = self.generate_prior(prompt, height, width, rng, on_step)
        th, tw = height // factor, width // factor
        prior = prior.reshape(th, tw).repeat(2, axis=0).repeat(2, axis=1).reshape(-1)  # 2x nearest upsampling
        glyph = self.glyph_embeds(prompt)
        glyph_uncond = self.glyph_embeds("")
        latents = self.denoise(prior, glyph, glyph_uncond, height, width, rng, steps, guidance, on_step)
        return (self.decode(latents) * 255).round().astype(np.uint8)


def _processor_chat_template(folder: Path) -> str:
    """The processor's chat template, where the tokenizer files carry none."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    raise ExportError(f"{folder}: no chat template (chat_template.jinja or chat_template.json)")


def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x768; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="output folder of `glmq export onnx`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--size", type=_parse_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the export's, 50)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--provider", action="append", default=None,
                        help="ONNX Runtime execution provider, e.g. CUDAExecutionProvider (repeatable)")
    args = parser.parse_args(argv)
    from PIL import Image

    width, height = args.size
    try:
        pipe = OnnxGlmImage(args.folder, providers=args.provider)
        t0 = time.perf_counter()
        image = pipe(args.prompt, height, width, steps=args.steps, guidance=args.guidance, seed=args.seed)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Image.fromarray(image).save(args.out)
    print(f"wrote {args.out} ({width}x{height}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
