"""Pipelines the two-process tests build in each worker (``from_builder("tp_builders:tiny_pipeline", ...)``)
and in the test process itself, from the same seed: the tiny GLM-Image with its AR's linears quantized in
formats that shard differently.

The AR text decoder gets an MLP 96 wide, so ``down_proj`` (int4, groups of 32) has 3 groups: rank 0 keeps 2,
rank 1 keeps 1, the uneven cut GLM-Image's 107 groups of 128 need. ``o_proj`` and ``lm_head`` are int8 (one
scale per row: a row-parallel cut keeps it whole), ``v_proj`` fp8, the rest int4 (asymmetric, groups of 32).
"""

from __future__ import annotations

import torch

MLP_WIDTH = 96


def _formats():
    from glmq.quant.formats import get_format

    int4 = get_format("int4", group_size=32, symmetric=False)
    return {"q_proj": int4, "k_proj": int4, "v_proj": get_format("fp8_e4m3"), "o_proj": get_format("int8"),
            "gate_up_proj": int4, "down_proj": int4}


def tiny_pipeline(device: str, *, dtype: str = "float32", seed: int = 0, quantize: bool = True,
                  kv_heads: int = 2, fail_rank: int | None = None):
    """The tiny pipeline on ``device`` in ``dtype``. ``kv_heads``: the AR's KV heads (1 cannot be split over
    two ranks). ``fail_rank``: on that rank of the process group, the DiT's first block raises on its first
    forward: a worker that fails mid-generation while the other rank waits in a collective."""
    from glmq.io.layout import BY_NAME
    from glmq.models.build import build_glyph_tokenizer, build_model, build_processor, build_scheduler
    from glmq.models.configs import component_config
    from glmq.quant.formats.linear import swap_linears
    from glmq.runtime.load import from_modules

    torch.manual_seed(seed)
    comps = {}
    for name in ("vision_language_encoder", "transformer", "text_encoder", "vae"):
        cfg = component_config(name, "tiny")
        if name == "vision_language_encoder":
            cfg["text_config"].update(intermediate_size=MLP_WIDTH, num_key_value_heads=kv_heads)
        comps[name] = build_model(BY_NAME[name], cfg, device="cpu").eval().requires_grad_(False)
    ar = comps["vision_language_encoder"]
    if quantize:
        fmts = _formats()
        plan = {f"model.language_model.layers.{i}.{part}.{proj}": {"format": fmts[proj]}
                for i in range(len(ar.model.language_model.layers))
                for part, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                    ("mlp", ("gate_up_proj", "down_proj")))
                for proj in projs}
        plan["lm_head"] = {"format": fmts["o_proj"]}
        swap_linears(ar, plan)
    torch_dtype = getattr(torch, dtype)
    for m in comps.values():
        m.to(device=device, dtype=torch_dtype)
    pipe = from_modules(comps, processor=build_processor(), tokenizer=build_glyph_tokenizer(),
                        scheduler_config=dict(build_scheduler().config), device=device, dtype=torch_dtype)
    if fail_rank is not None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == fail_rank:
            def fail(module, args):
                raise RuntimeError(f"injected failure in the DiT on rank {fail_rank}")

            pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail)
    return pipe
