"""``glmq.load``: a GLM-Image folder (or already-built modules) assembled into a :class:`GlmqPipeline`, with
its memory mode chosen from the budget and glmq's attention installed, in one place for both entry points."""

from __future__ import annotations

from pathlib import Path

import torch

from glmq.errors import GlmqError
from glmq.quant.formats import tinygemm
from glmq.runtime.memory import GiB, MemoryMode, StageSizes, choose_mode
from glmq.runtime.pipeline import GlmqPipeline


def _assemble(components: dict, *, sizes: StageSizes | None, mode: str | None, vram_budget_gb: float | None,
              device: torch.device, dtype: torch.dtype, transformer_config: dict, attention: str,
              attention_precision: str | None, cache_dir=None, **pipeline_kwargs) -> GlmqPipeline:
    """The one place a pipeline is put together (``load`` and ``from_modules``): budget, mode, attention, the
    compile caches. ``sizes`` None: measured on the modules, once their embedding is split."""
    from glmq.runtime.attention import install_attention
    from glmq.runtime.compile_cache import activate
    from glmq.runtime.embedding import split_embedding

    split_embedding(components["vision_language_encoder"])  # on every device: one code path, tested on the CPU
    if tinygemm.enabled(device):  # the default on one CUDA GPU, measured faster (glmq.quant.formats.tinygemm)
        for module in components.values():
            tinygemm.install(module, device)
    if sizes is None:
        from glmq.runtime.sizes import stage_sizes_from_modules

        sizes = stage_sizes_from_modules(components)
    budget = int(vram_budget_gb * GiB) if vram_budget_gb is not None and device.type == "cuda" else None
    chosen = choose_mode(sizes, budget, requested=mode) if device.type == "cuda" else MemoryMode.RESIDENT
    precision = install_attention(components, device, attention, attention_precision, transformer_config)
    cache_root = activate(cache_dir) if device.type == "cuda" else None
    return GlmqPipeline(device=device, dtype=dtype, mode=chosen, sizes=sizes, components=components,
                        attention=attention, attention_precision=precision, vram_budget=budget, cache_root=cache_root,
                        **pipeline_kwargs)


def _device_and_dtype(device: str, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    from glmq.kernels.w8a8_linear import act_quant_choice
    from glmq.runtime import ar_engine, ar_fused

    # a bad GLMQ_INT4_KERNEL, GLMQ_AR_FUSED, GLMQ_AR_COMPILE or GLMQ_ACT_QUANT: one error before any work
    tinygemm.choice(), ar_fused.choice(), ar_engine.compile_mode()
    try:
        act_quant_choice()
    except ValueError as e:
        raise GlmqError(str(e)) from None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GlmqError("device cuda requested but no CUDA GPU is available (use device='cpu')")
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def from_modules(components: dict, *, processor, tokenizer, scheduler_config: dict, device: str = "cuda",
                 vram_budget_gb: float | None = None, dtype: torch.dtype | None = None, mode: str | None = None,
                 attention: str = "auto", cuda_graph: bool = True, compile: bool = False,
                 path: Path | None = None, attention_precision: str | None = None, cache_dir=None) -> GlmqPipeline:
    """A pipeline over already-built modules (e.g. random full-size weights built on the GPU).
    ``attention_precision``, ``cache_dir``: see :func:`load`; None reads the recipe's choice from the
    transformer's config."""
    dev, dtype = _device_and_dtype(device, dtype)
    if attention_precision is None and path is not None:
        from glmq.io.layout import read_json

        tcfg = read_json(Path(path) / "transformer" / "config.json", "transformer config.json")
    else:  # modules quantized in place carry their recipe (glmq.quant.inplace)
        recipe = getattr(components["transformer"], "glmq_recipe", None)
        tcfg = {"quantization_config": {"recipe": recipe}} if recipe else {}
    return _assemble(components, sizes=None, mode=mode,
                     vram_budget_gb=vram_budget_gb, device=dev, dtype=dtype, transformer_config=tcfg,
                     attention=attention, attention_precision=attention_precision, path=path, processor=processor,
                     tokenizer=tokenizer, scheduler_config=scheduler_config, cuda_graph=cuda_graph, compile=compile,
                     cache_dir=cache_dir)


def load(path: str | Path, device: str = "cuda", vram_budget_gb: float | None = None, *,
         dtype: torch.dtype | None = None, mode: str | None = None, attention: str = "auto",
         cuda_graph: bool = True, compile: bool = False, attention_precision: str | None = None,
         cache_dir: str | Path | None = None, gpus: int = 1, parallel: str | None = None) -> GlmqPipeline:
    """Load a GLM-Image folder (the bf16 release, make-tiny output, ``glmq quantize`` or GGUF export output).

    Args:
        path: the pipeline folder.
        device: "cuda" (default), "cuda:N" or "cpu".
        vram_budget_gb: GPU memory to plan for, counted as a card counts it (the allocator's peak reserved
            bytes plus the CUDA context); the fastest memory mode whose estimated peak fits text-to-image is
            used (``resident``, ``staged``, ``offload``), and each call is planned again from its size and
            references (see :mod:`glmq.runtime.memory`); None: all resident.
        dtype: compute dtype of the unquantized parts (bf16 on GPU, fp32 on CPU by default).
        mode: force a memory mode.
        attention: "auto" (glmq's Triton kernels on CUDA, upstream SDPA elsewhere), "glmq", "sdpa".
        cuda_graph: capture the AR step and DiT step in CUDA graphs (CUDA, non-offload modes only).
        compile: ``torch.compile`` the AR decode step and (except in the offload mode) the DiT blocks (CUDA; the
            first image pays the compilation).
        attention_precision: DiT attention kernel precision, "bf16", "fp8" or "int8"; None (default) uses what
            the quantizing recipe recorded (its ``[attention]`` table), bf16 for unquantized folders. Applies
            to glmq's kernels only (``attention`` "auto" on CUDA, or "glmq").
        cache_dir: the folder for compilation and autotuning artifacts that later processes reuse (CUDA; see
            :mod:`glmq.runtime.compile_cache`); None: ``$GLMQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/glmq``, else
            ``~/.cache/glmq``.
        gpus: 2 runs the pipeline on two GPUs (``device`` "cuda": GPUs 0 and 1; "cpu": two CPU processes), in
            worker processes this call starts; returns a :class:`~glmq.runtime.parallel.pipeline.ParallelPipeline`.
        parallel: with ``gpus=2``, "latency" (default: tensor-parallel AR, one guidance pass per GPU) or
            "throughput" (the AR of one image beside the DiT of the previous one); see :mod:`glmq.runtime.parallel`.
    """
    if gpus != 1 or parallel is not None:
        from glmq.runtime.parallel.pipeline import load_parallel

        if tinygemm.wanted():
            raise GlmqError("GLMQ_INT4_KERNEL=tinygemm applies to one GPU (tensor parallelism shards glmq's int4 "
                            "layers); unset it for gpus=2, which runs glmq's kernels")

        if gpus == 1:
            raise GlmqError(f"parallel={parallel!r} needs gpus=2")
        if vram_budget_gb is not None or mode is not None:
            raise GlmqError("vram_budget_gb and mode apply to one GPU; with gpus=2 each GPU keeps its part resident")
        return load_parallel(path, device=device, gpus=gpus, parallel=parallel or "latency", dtype=dtype,
                             attention=attention, cuda_graph=cuda_graph, compile=compile,
                             attention_precision=attention_precision, cache_dir=cache_dir)
    from transformers import ByT5Tokenizer, GlmImageProcessor

    from glmq.io.layout import read_json
    from glmq.io.reader import PipelineReader
    from glmq.models.build import _quiet_transformers
    from glmq.quant.formats.gguf.reader import GgufComponent
    from glmq.runtime.loader import check_before_load, load_component, open_component
    from glmq.runtime.sizes import stage_sizes

    _quiet_transformers()
    dev, dtype = _device_and_dtype(device, dtype)
    path = Path(path)
    check_before_load(path)  # validates as `glmq inspect` does (configs, tensors, manifest) before allocating
    sources = {name: open_component(path, name)
               for name in ("vision_language_encoder", "transformer", "text_encoder", "vae")}
    # Sizes straight from the safetensors headers, so a resident pipeline loads onto the GPU directly; GGUF
    # components are dequantized on load and sized from the modules.
    sizes = None if any(isinstance(s, GgufComponent) for s in sources.values()) else stage_sizes(PipelineReader(path))
    budget = vram_budget_gb * GiB if vram_budget_gb is not None and dev.type == "cuda" else None
    direct = sizes is not None and (dev.type != "cuda" or choose_mode(sizes, budget, requested=mode)
                                    is MemoryMode.RESIDENT)
    components = {}
    for name, src in sources.items():
        target_dtype = torch.float32 if name == "text_encoder" else dtype
        if name == "vae" and dtype == torch.float16:
            target_dtype = torch.bfloat16  # an fp16 VAE overflows to NaN
        components[name] = load_component(src, device=dev if direct else "cpu", dtype=target_dtype)
    return _assemble(components, sizes=sizes, mode=mode,
                     vram_budget_gb=vram_budget_gb, device=dev, dtype=dtype,
                     transformer_config=sources["transformer"].config, attention=attention,
                     attention_precision=attention_precision, path=path,
                     processor=GlmImageProcessor.from_pretrained(path / "processor"),
                     tokenizer=ByT5Tokenizer.from_pretrained(path / "tokenizer"),
                     scheduler_config=read_json(path / "scheduler" / "scheduler_config.json", "scheduler config"),
                     cuda_graph=cuda_graph, compile=compile, cache_dir=cache_dir)
