"""``glmq export hf``: a bf16 GLM-Image folder in, a bitsandbytes folder that stock diffusers loads out.

The AR (``vision_language_encoder``) and the DiT (``transformer``) get their linear layers stored in
bitsandbytes' own serialized layout (:mod:`glmq.export.bnb_layout`: NF4 with double quantization, or
LLM.int8), and each component's ``config.json`` carries the ``quantization_config`` that transformers'
and diffusers' ``from_pretrained`` read to rebuild ``Linear4bit`` / ``Linear8bitLt`` layers from them.
The glyph encoder, VAE, tokenizer, processor and scheduler are copied unchanged.

Which layers a loader converts is decided by the loader, from ``llm_int8_skip_modules``: every
``nn.Linear`` whose name the skip list does not match. The checkpoint must hold quantized entries for
exactly those layers and plain weights for all others, or loading fails (or silently loads garbage), so
the exporter computes the set with the loaders' own matching rules (:func:`converted_linears`) on the
model built on the meta device. Kept in bf16 (:data:`SKIP_MODULES`): the AR's ``lm_head`` (its logits
pick every image token), vision tower and VQ tokenizer (image-to-image only; the VQ's cosine
nearest-neighbour search is noise-sensitive); the DiT's patch embedding in (``image_projector``) and out
(``norm_out``, ``proj_out``) and its conditioning embedders, small layers whose error reaches every token.
NF4 layers whose shape bitsandbytes' CPU kernel cannot run (:func:`_nf4_cpu_fits`; none in GLM-Image, some
in tiny test models) also stay bf16, added to the skip list by full name.

Streaming and atomic like ``glmq quantize``: tensors are read one at a time from the memory-mapped source,
quantized and streamed into planned shards of ``OUT.partial``, which is checked against the plan and
renamed to ``OUT`` at the end; an interrupted run resumes from its finished shards.

One layout detail differs from bitsandbytes' byte for byte: the NF4 ``quant_state`` JSON is padded with
trailing spaces to a length fixed before quantizing (its ``nested_offset`` number varies in length, and
shard headers are written before the data). JSON ignores the padding; the layer loads identically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmq.errors import GlmqError
from glmq.io.layout import BY_NAME, COMPONENTS, Component
from glmq.io.reader import ComponentReader
from glmq.checkpoint.source import open_unquantized_source, source_fingerprint
from glmq.io.writer import DEFAULT_MAX_SHARD_BYTES, OutputFolder

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BNB_MODES",
    "LOAD_REQUIREMENTS",
    "SKIP_MODULES",
    "converted_linears",
    "export_hf",
]

BNB_MODES = ("nf4", "int8")
"""bitsandbytes storage modes: ``nf4`` (``Linear4bit``, NF4, double quantization), ``int8`` (LLM.int8)."""

AR = "vision_language_encoder"
DIT = "transformer"

LOAD_REQUIREMENTS = ("transformers>=5.2", "diffusers>=0.42.1", "bitsandbytes>=0.48", "accelerate>=1.1")
"""What loading an exported folder with the stock libraries needs besides torch, named in its model card:
glmq's own floors for these packages (tests/test_packaging.py keeps them equal to pyproject.toml's).
accelerate is on the list because transformers and diffusers refuse bitsandbytes weights without it."""

SKIP_MODULES: dict[str, tuple[str, ...]] = {
    AR: ("lm_head", "model.visual", "model.vqmodel"),
    DIT: ("image_projector", "glyph_projector", "prior_projector", "time_condition_embed", "norm_out",
          "proj_out"),
}
"""``llm_int8_skip_modules`` per component: module-name prefixes kept in bf16. Each name matches the same
modules under transformers 5's rule (prefix up to a module boundary, or suffix) and under diffusers' and
older transformers' rule (``name + "."`` inside the module name, or equal)."""

_NF4_BLOCK = 64
_NESTED_BLOCK = 256
_QUANT_STATE = "weight.quant_state.bitsandbytes__nf4"
# Longest JSON text of a float32 value as a Python float, e.g. "-1.2345678901234567e-05" (23 characters).
_MAX_FLOAT_JSON = 24
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


# ----------------------------------------------------------------------------------------------------------
# Which linears the loaders convert


def _transformers_rule(name: str, module: nn.Module, skip: Sequence[str]) -> bool:
    """transformers 5's ``replace_with_bnb_linear``: exactly ``nn.Linear`` (not subclasses), unless a skip
    pattern matches the name from its start up to a module boundary, or as a suffix."""
    from torch import nn

    if type(module) is not nn.Linear:
        return False
    return not any(re.match(rf"(?:{key}){_BOUNDARY}", name) or name.endswith(key) for key in skip)


def _diffusers_rule(name: str, module: nn.Module, skip: Sequence[str]) -> bool:
    """diffusers' ``_replace_with_bnb_linear``: any ``nn.Linear`` unless its own name is a skip entry or a
    skip entry followed by ``.`` occurs in (or equals) its full name."""
    from torch import nn

    if not isinstance(module, nn.Linear):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf not in skip and not any(key + "." in name or key == name for key in skip)


def converted_linears(comp: Component, model: nn.Module, skip: Iterable[str]) -> list[str]:
    """Names of the linear modules of ``model`` that ``comp``'s loader (transformers for the AR, diffusers
    for the DiT) replaces by bitsandbytes layers when ``llm_int8_skip_modules`` is ``skip``; the loaders
    also keep the model class's ``_keep_in_fp32_modules``."""
    keep = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or ())
    rule = _transformers_rule if comp.library == "transformers" else _diffusers_rule
    return [name for name, module in model.named_modules() if name and rule(name, module, keep)]


# ----------------------------------------------------------------------------------------------------------
# Shared by the exporters


def copy_component(src: Path, folder: OutputFolder, name: str) -> None:
    """Copy a component folder (config, weights, tokenizer files, ...) unchanged (confined: see
    :meth:`~glmq.io.writer.OutputFolder.copy_in`)."""
    folder.copy_in(src, name)


def copy_side_files(cr: ComponentReader, folder: OutputFolder) -> None:
    """Copy a component's files other than ``config.json`` and its weights (e.g. ``generation_config.json``)."""
    comp = cr.component
    folder.copy_side_files(cr.folder, comp.name,
                           skip=lambda n: n == "config.json" or n.startswith(comp.weights_name))


def check_choice(value: str, valid: Iterable[str], what: str) -> str:
    valid = list(valid)
    if value not in valid:
        raise GlmqError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Planned entries of one quantized layer


def _quant_state_length(shape: tuple[int, int], dtype: str) -> int:
    meta = {"quant_type": "nf4", "blocksize": _NF4_BLOCK, "dtype": dtype, "shape": list(shape),
            "nested_blocksize": _NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": 0.0}
    return len(json.dumps(meta).encode()) - len("0.0") + _MAX_FLOAT_JSON


def _nf4_cpu_fits(out_features: int, in_features: int) -> bool:
    """Whether bitsandbytes' CPU kernel can run an NF4 layer of this shape: on CPUs with AVX512-BF16 it
    repacks the weight in tiles of 32 output rows and one absmax per 64 inputs of a row, and fails for
    other shapes. GLM-Image's own layers all fit; tiny test models' narrow layers may not."""
    return out_features % 32 == 0 and in_features % _NF4_BLOCK == 0


def _layer_specs(prefix: str, shape: tuple[int, int], dtype: str, mode: str) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of the entries :mod:`bnb_layout` stores for one linear weight (bias excluded)."""
    out_f, in_f = shape
    numel = out_f * in_f
    if mode == "int8":
        return [(f"{prefix}.weight", "int8", (out_f, in_f)), (f"{prefix}.SCB", "float32", (out_f,)),
                (f"{prefix}.weight_format", "uint8", ())]
    blocks = -(-numel // _NF4_BLOCK)
    return [
        (f"{prefix}.weight", "uint8", (-(-numel // 2), 1)),
        (f"{prefix}.weight.absmax", "uint8", (blocks,)),
        (f"{prefix}.weight.quant_map", "float32", (16,)),
        (f"{prefix}.weight.nested_absmax", "float32", (-(-blocks // _NESTED_BLOCK),)),
        (f"{prefix}.weight.nested_quant_map", "float32", (256,)),
        (f"{prefix}.{_QUANT_STATE}", "uint8", (_quant_state_length(shape, dtype),)),
    ]


def _quantize_layer(weight, mode: str, state_length: int | None) -> dict:
    """bnb_layout entries of one weight, keys relative to the layer; the NF4 quant_state padded."""
    import torch

    from glmq.export.bnb_layout import int8_state_dict, nf4_state_dict

    if mode == "int8":
        return int8_state_dict(weight)
    entries = nf4_state_dict(weight, double_quant=True, blocksize=_NF4_BLOCK)
    state = entries[_QUANT_STATE]
    if state.numel() > state_length:  # the bound above is the longest float JSON can write
        raise AssertionError(f"quant_state JSON longer than planned ({state.numel()} > {state_length})")
    pad = torch.full((state_length - state.numel(),), ord(" "), dtype=torch.uint8)
    entries[_QUANT_STATE] = torch.cat([state, pad])
    return entries


# ----------------------------------------------------------------------------------------------------------
# The exporter


def _plan(comp: Component, cr: ComponentReader, mode: str) -> dict[str, Any]:
    """Tensor specs of the exported component and the layers it quantizes."""
    from torch import nn

    from glmq.models.build import build_model, tensor_specs

    model = build_model(comp, cr.config)
    modules = dict(model.named_modules())
    skip = list(SKIP_MODULES[comp.name])
    converted = converted_linears(comp, model, skip)
    if mode == "nf4":
        misfits = [n for n in converted if not _nf4_cpu_fits(modules[n].out_features, modules[n].in_features)]
        if misfits:  # named one by one: each full name matches only itself under both loaders' rules
            skip += misfits
            converted = converted_linears(comp, model, skip)
    layers = {f"{n}.weight": (n, (modules[n].out_features, modules[n].in_features)) for n in converted}
    specs: list[tuple[str, str, tuple]] = []
    owner: dict[str, str] = {}  # stored entry -> source weight it is computed from
    for name, _, _ in tensor_specs(model, comp.dtype):
        info = cr.tensors[name]
        if name in layers:
            prefix, shape = layers[name]
            for spec in _layer_specs(prefix, shape, info.dtype, mode):
                specs.append(spec)
                owner[spec[0]] = name
        else:
            specs.append((name, info.dtype, tuple(info.shape)))
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in converted]
    return {"specs": specs, "owner": owner, "layers": layers, "converted": converted, "kept": kept, "skip": skip}


def _check_written(folder: Path, comp: Component, plan: dict[str, Any]) -> int:
    """Re-read the written component: exactly the planned tensors, dtypes and shapes, and every NF4
    ``quant_state`` a JSON object describing its layer's shape. Returns the bytes of tensor data."""
    from glmq.errors import CheckpointError

    cr = ComponentReader(folder, comp)
    got = {n: (i.dtype, tuple(i.shape)) for n, i in cr.tensors.items()}
    want = {n: (d, tuple(s)) for n, d, s in plan["specs"]}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise CheckpointError(f"{folder}: written tensors differ from the plan (first: {diff[0]})")
    for prefix, shape in plan["layers"].values():
        if f"{prefix}.{_QUANT_STATE}" in cr.tensors:
            try:
                state = json.loads(bytes(cr.get(f"{prefix}.{_QUANT_STATE}").tolist()))
            except ValueError:
                state = None
            if not isinstance(state, dict) or state.get("shape") != list(shape):
                raise CheckpointError(f"{folder}: layer {prefix} has a malformed bitsandbytes quant_state")
    cr.close()
    return sum(i.nbytes for i in cr.tensors.values())


def export_hf(src: str | Path, out: str | Path, *, ar: str = "nf4", dit: str = "int8", force: bool = False,
              progress: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Write ``out``: the bf16 GLM-Image folder ``src`` with bitsandbytes AR and DiT linears.

    ``ar`` / ``dit``: ``"nf4"`` or ``"int8"`` (:data:`BNB_MODES`). The result loads with
    ``diffusers.GlmImagePipeline.from_pretrained(out)`` (bitsandbytes installed; diffusers 0.42's
    bitsandbytes loader asks for a GPU). Returns a summary dict: per component the mode, the skip list,
    the numbers of converted and kept linear layers and the bytes before and after.
    """
    from glmq import __version__
    from glmq.export.bnb_layout import bnb_quantization_config
    from glmq.progress import ByteProgress

    modes = {AR: check_choice(ar, BNB_MODES, "bitsandbytes mode for the AR"),
             DIT: check_choice(dit, BNB_MODES, "bitsandbytes mode for the DiT")}
    src, out = Path(src), Path(out)
    reader = open_unquantized_source(src, out)
    plans = {name: _plan(BY_NAME[name], reader.component(name), modes[name]) for name in modes}

    job = {"command": "export-hf", "glmq": __version__, "modes": modes, "source": source_fingerprint(src),
           "shard": max_shard_bytes}
    folder = OutputFolder(out, job=job, force=force, sources=(src,))
    folder.copy_in(src, "model_index.json")
    for comp in COMPONENTS:
        if comp.name not in modes:
            copy_component(src, folder, comp.name)

    writers = []
    for name, plan in plans.items():
        comp, cr = BY_NAME[name], reader.component(name)
        config = dict(cr.config)
        config["quantization_config"] = bnb_quantization_config(modes[name], skip_modules=plan["skip"])
        folder.write_json(f"{name}/config.json", config)
        copy_side_files(cr, folder)
        writers.append((name, cr, plan, folder.component_writer(comp, plan["specs"], max_shard_bytes=max_shard_bytes)))

    total = sum(cr.nbytes for _, cr, _, _ in writers)
    summary: dict[str, Any] = {"format": "bitsandbytes", "out": str(out), "components": {}}
    with ByteProgress(total, "export hf", enabled=progress) as bar:
        for name, cr, plan, writer in writers:
            mode, owner, layers = modes[name], plan["owner"], plan["layers"]
            lengths = {s[0]: s[2][0] for s in plan["specs"] if s[0].endswith(_QUANT_STATE)}
            cache: dict[str, dict] = {}

            def produce(tname, cr=cr, mode=mode, owner=owner, layers=layers, lengths=lengths, cache=cache):
                source = owner.get(tname)
                if source is None:
                    t = cr.get(tname)
                    bar.update(t.numel() * t.element_size())
                    return t
                prefix = layers[source][0]
                if source not in cache:
                    cache.clear()
                    w = cr.get(source)
                    bar.update(w.numel() * w.element_size())
                    cache[source] = _quantize_layer(w, mode, lengths.get(f"{prefix}.{_QUANT_STATE}"))
                return cache[source][tname.removeprefix(prefix + ".")]

            pending = set(writer.pending())
            for i, shard in enumerate(writer.shards):  # finished by an earlier run of this job
                if i not in pending:
                    sources = {owner.get(n, n) for n, _, _ in shard}
                    bar.update(sum(cr.tensors[n].nbytes for n in sources))
            writer.write(produce)
            after = _check_written(folder.partial / name, BY_NAME[name], plan)
            summary["components"][name] = {
                "mode": mode,
                "skip_modules": plan["skip"],
                "converted_linears": len(plan["converted"]),
                "kept_linears": len(plan["kept"]),
                "bytes_before": sum(i.nbytes for i in cr.tensors.values()),
                "bytes_after": after,
            }
    folder.write_text("README.md", model_card(summary))
    folder.commit({"source": {"export-hf": {"ar": ar, "dit": dit}}})
    reader.close()
    return summary


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _installed_version(requirement: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"{name} (not installed)"


def model_card(summary: dict) -> str:
    """README.md of an exported bitsandbytes folder (Hugging Face model card with YAML front matter)."""
    comps = summary["components"]
    ar, dit = comps[AR], comps[DIT]
    lines = [
        "---",
        "base_model: zai-org/GLM-Image",
        "base_model_relation: quantized",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags: [glm-image, bitsandbytes, quantized, glmq]",
        "---",
        "",
        f"# GLM-Image, bitsandbytes {ar['mode'].upper()} AR + {dit['mode'].upper()} DiT",
        "",
        "A diffusers pipeline folder whose linear layers are stored in bitsandbytes' serialized format; "
        "each quantized component's `config.json` carries the `quantization_config` that transformers and "
        "diffusers load it with. Written by `glmq export hf` from the bf16 release.",
        "",
        "| component | format | linears quantized | kept in bf16 | size before | size after |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in comps.items():
        fmt = "NF4, double quantization, blocks of 64" if c["mode"] == "nf4" else "LLM.int8 (per-row int8)"
        kept = ", ".join(f"`{s}`" for s in c["skip_modules"])
        lines.append(f"| `{name}` | {fmt} | {c['converted_linears']} | {kept} | {_size(c['bytes_before'])} "
                     f"| {_size(c['bytes_after'])} |")
    lines += [
        "",
        "The glyph encoder (`text_encoder`), VAE, tokenizer, processor and scheduler are the release's.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from diffusers import GlmImagePipeline",
        "",
        'pipe = GlmImagePipeline.from_pretrained("PATH", torch_dtype=torch.bfloat16)',
        'image = pipe("a red bicycle leaning on a wall", height=1024, width=1024).images[0]',
        "```",
        "",
        "diffusers 0.42's bitsandbytes loader requires a GPU for the DiT; the AR (transformers) also loads on "
        "a CPU.",
        "",
        "## Requirements",
        "",
        "Besides `torch`, loading this folder needs these packages (transformers and diffusers refuse "
        "bitsandbytes weights unless accelerate is installed):",
        "",
        "```bash",
        "pip install " + " ".join(f'"{r}"' for r in LOAD_REQUIREMENTS),
        "```",
        "",
        "Exported with " + ", ".join(_installed_version(r) for r in LOAD_REQUIREMENTS) + ".",
        "",
    ]
    return "\n".join(lines)
