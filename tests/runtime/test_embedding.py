"""The AR's embedding with only the lm_head's rows on the device (glmq.runtime.embedding, issue #14: trim what
never needs to be resident)."""

from __future__ import annotations

import copy

import pytest
import torch

from glmq.runtime.ar_engine import ArEngine, ArRequest
from glmq.runtime.embedding import EMBEDDING, VisualRowsEmbedding, host_only_bytes, split_embedding


@pytest.fixture(scope="module")
def model():
    from glmq.testing import tiny_ar

    return tiny_ar()


def test_rows_agree_with_the_whole_table_and_only_the_head_rows_are_tensors_of_the_module():
    emb = torch.nn.Embedding(50, 8)
    split = VisualRowsEmbedding(emb, 12)
    ids = torch.tensor([[0, 11, 12, 49, 30]])
    assert torch.equal(split(ids), emb(ids))  # any id: from the host table
    visual = torch.tensor([[0, 5, 11]])
    assert torch.equal(split.visual(visual), emb(visual))
    # What .to(), placement and state_dict see: the 12 rows alone.
    assert [t.shape for t in split.parameters()] == [torch.Size([12, 8])] and not list(split.buffers())
    assert list(split.state_dict()) == ["weight"]
    # Padding fed to a finished row (an id past the head) reads a real row, not out of bounds.
    assert torch.equal(split.visual(torch.tensor([[40]])), emb(torch.tensor([[11]])))


def test_the_engine_makes_the_same_tokens_and_logits_with_the_split_embedding(model):
    from glmq.models.build import build_processor

    processor = build_processor()
    inp = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": "a red fox"}]}]],
                                        tokenize=True, target_h=64, target_w=64, return_dict=True, return_tensors="pt")

    def run(m):
        req = ArRequest(inp["input_ids"], inp["image_grid_thw"], inp.get("images_per_sample"), None,
                        inp.get("attention_mask"), torch.Generator().manual_seed(3))
        (tokens, logits), = ArEngine(m).generate_batch([req], output_logits=True)
        return tokens, logits

    split = copy.deepcopy(model)
    split_embedding(split)
    emb = split.model.language_model.embed_tokens
    assert isinstance(emb, VisualRowsEmbedding) and emb.rows == split.lm_head.out_features
    split_embedding(split)  # idempotent: the bench re-plans the same modules for every tier
    assert split.model.language_model.embed_tokens is emb
    calls = []
    emb.register_forward_hook(lambda *a: calls.append("prefill"))
    tokens, logits = run(model)
    tokens2, logits2 = run(split)
    assert torch.equal(tokens, tokens2) and torch.equal(logits, logits2)
    assert calls == ["prefill"]  # the decode steps read the on-device rows, not the host table


def test_the_memory_plan_counts_only_the_rows_left_on_the_device(tiny_dir):
    from transformers import GlmImageConfig

    from glmq.io.reader import PipelineReader
    from glmq.runtime.sizes import stage_sizes

    reader = PipelineReader(tiny_dir)
    ar = reader.component("vision_language_encoder")
    emb = ar.tensors[EMBEDDING]
    rows = GlmImageConfig(**ar.config).text_config.vision_vocab_size
    expected = (emb.shape[0] - rows) * emb.shape[1] * 2
    assert expected > 0 and host_only_bytes(ar.tensors, ar.config, 2) == expected
    whole = sum((i.numel * 2 if i.dtype in ("float32", "bfloat16", "float16") else i.nbytes)
                for n, i in ar.tensors.items() if not n.startswith(("model.visual.", "model.vqmodel.")))
    assert stage_sizes(reader).ar_weights == whole - expected


def test_released_shapes_keep_1_16_gib_on_the_host():
    from transformers import GlmImageConfig

    class Info:
        shape = (168064, 4096)

    saved = host_only_bytes({EMBEDDING: Info()}, GlmImageConfig().to_dict(), 2)
    assert saved == (168064 - 16512) * 4096 * 2 and round(saved / 1024**3, 2) == 1.16


def test_a_pipeline_over_built_modules_sizes_them_after_the_split(tiny_dir):
    """``from_modules`` (and a GGUF load) sizes the networks from the live modules: after the split, so the plan
    does not count the rows that stay on the host."""
    import glmq
    from glmq.runtime.load import from_modules

    pipe = glmq.load(tiny_dir, device="cpu")
    comps = {"vision_language_encoder": pipe.ar, "transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
             "vae": pipe.vae}
    pipe.release()
    text = pipe.ar.model.language_model
    table = text.embed_tokens.host_table
    text.embed_tokens = torch.nn.Embedding.from_pretrained(table.clone(), freeze=True)  # built modules: unsplit
    again = from_modules(comps, processor=pipe.processor, tokenizer=pipe.tokenizer,
                         scheduler_config=pipe.scheduler_config, device="cpu")
    emb = text.embed_tokens
    vision = sum(p.numel() * p.element_size() for m in (pipe.ar.model.visual, pipe.ar.model.vqmodel)
                 for p in list(m.parameters()) + list(m.buffers()))
    ar = {id(t): t for t in list(pipe.ar.parameters()) + list(pipe.ar.buffers())}
    expected = sum(t.numel() * t.element_size() for t in ar.values()) - vision
    assert isinstance(emb, VisualRowsEmbedding) and again.sizes.ar_weights == expected
    assert emb.host_table.numel() * emb.host_table.element_size() > emb.weight.numel() * emb.weight.element_size()
