"""ArEngine.generate_batch on the tiny AR (CPU): independent sequences in one decode loop (issue #13 item 2).

Each row must be the sequence its request makes alone: the same sampled tokens, and logits whose error against
a float64 run is at most twice the one-row run's own fp32 error (STYLE.md rule 7: the batched step multiplies
B rows at once, which rounds differently, but no worse).
"""

from __future__ import annotations

import copy

import pytest
import torch

from glmq.runtime.ar_engine import ArEngine, ArRequest


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    from glmq.testing import tiny_ar

    return tiny_ar()


@pytest.fixture(scope="module")
def processor():
    from glmq.models.build import build_processor

    return build_processor()


def _request(processor, prompt, h=64, w=64, seed=None, image=None, **kw):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": prompt}]
    inp = processor.apply_chat_template([[{"role": "user", "content": content}]], tokenize=True, target_h=h,
                                        target_w=w, return_dict=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return ArRequest(inp["input_ids"], inp["image_grid_thw"], inp.get("images_per_sample"), inp.get("pixel_values"),
                     inp.get("attention_mask"), gen, **kw)


def _reseeded(r: ArRequest, seed: int) -> ArRequest:
    return ArRequest(r.input_ids, r.image_grid_thw, r.images_per_sample, r.pixel_values, r.attention_mask,
                     torch.Generator().manual_seed(seed), r.temperature, r.top_p)


def _image(seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 96, 3, generator=g) * 255).byte().numpy())


def test_rows_are_the_sequences_made_alone(model, processor):
    """Four prompts of different lengths, two image sizes (different grids and token counts), one image-to-image
    request (its prompt holds the reference's VQ ids; it generates only the target grid), each with its own
    seed, temperature and top-p."""
    specs = [("a cat", 64, 64, 0.9, 0.75), ("a big red dog on a hill", 96, 64, 0.7, 0.9),
             ("x", 64, 96, 1.0, 0.5), ("make it blue", 64, 64, 0.9, 0.75)]
    requests = [_request(processor, p, h, w, seed=i, temperature=t, top_p=q, image=_image() if i == 3 else None)
                for i, (p, h, w, t, q) in enumerate(specs)]
    engine = ArEngine(model, max_batch=4)
    totals = []
    batch = engine.generate_batch(requests, step_callback=lambda done, total: totals.append(total))
    lengths = [t.shape[1] for t in batch]
    print("tokens per row", lengths)
    assert lengths == [261, 254, 254, 5]  # grids + EOS: 16x16 + 2x2; 19x13 + 3x2; 13x19 + 2x3; i2i: 2x2 only
    assert set(totals) == {261}
    for i, r in enumerate(requests):
        alone, = engine.generate_batch([_reseeded(r, i)])
        assert torch.equal(alone, batch[i]), i
    assert len({tuple(t[0, :4].tolist()) for t in batch}) == 4  # really different sequences


def test_batched_logits_are_within_twice_the_one_row_error(model, processor):
    requests = [_request(processor, p, h, w) for p, h, w in (("a cat", 64, 64), ("a big red dog", 96, 64),
                                                                ("x", 64, 64))]
    engine = ArEngine(model, max_batch=3)
    ref_engine = ArEngine(copy.deepcopy(model).double(), max_batch=1)
    batch = engine.generate_batch(requests, greedy=True, output_logits=True)
    for i, r in enumerate(requests):
        (alone_tokens, alone_logits), = engine.generate_batch([r], greedy=True, output_logits=True)
        (ref_tokens, ref_logits), = ref_engine.generate_batch([r], greedy=True, output_logits=True)
        tokens, logits = batch[i]
        assert torch.equal(tokens, alone_tokens) and torch.equal(tokens, ref_tokens)
        err_batch = (logits.double() - ref_logits).abs().max().item()
        err_alone = (alone_logits.double() - ref_logits).abs().max().item()
        print(f"row {i}: max |logit - fp64| batched {err_batch:.3e}, alone {err_alone:.3e}, "
              f"batched vs alone {(logits - alone_logits).abs().max().item():.3e}")
        assert 0 < err_batch <= 2 * err_alone


def test_a_shared_generator_serves_the_rows_in_order(model, processor):
    """One generator for every row: row 0 draws first (so it is row 0 made alone), then row 1, ..."""
    engine = ArEngine(model, max_batch=3)
    shared = torch.Generator().manual_seed(7)
    reqs = [_request(processor, p) for p in ("a cat", "a dog", "a fox")]
    reqs = [ArRequest(r.input_ids, r.image_grid_thw, attention_mask=r.attention_mask, generator=shared) for r in reqs]
    a = engine.generate_batch(reqs)
    alone, = engine.generate_batch([_reseeded(reqs[0], 7)])
    assert torch.equal(a[0], alone)
    assert not torch.equal(a[1], a[2])


def test_compiled_batched_step_matches_the_eager_one(model, processor):
    """torch.compile of the step with per-row cache slots (the index_put of two index tensors) changes nothing."""
    reqs = [_request(processor, p, h, 64, seed=i) for i, (p, h) in enumerate((("a cat", 64), ("a big dog", 96)))]
    eager = ArEngine(model, max_batch=2).generate_batch(reqs)
    compiled_engine = ArEngine(model, max_batch=2, compile=True)
    compiled = compiled_engine.generate_batch([_reseeded(r, i) for i, r in enumerate(reqs)])
    assert compiled_engine._compiled, "the decode step fell back to eager"
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


def test_idle_rows_change_nothing(model, processor):
    """Three requests decoded in a step of four rows (a caller rounding batch sizes up): the same tokens."""
    reqs = [_request(processor, p, h, 64, seed=i) for i, (p, h) in enumerate((("a cat", 64), ("a dog", 96),
                                                                               ("a fox on a hill", 64)))]
    engine = ArEngine(model, max_batch=4)
    three = engine.generate_batch(reqs)
    four = engine.generate_batch([_reseeded(r, i) for i, r in enumerate(reqs)], rows=4)
    assert len(four) == 3 and 4 in engine._states
    for a, b in zip(three, four):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_batch"):
        engine.generate_batch(reqs, rows=5)


def test_batch_limits_reserve_and_free(model, processor):
    engine = ArEngine(model, max_batch=1)
    reqs = [_request(processor, "a cat", seed=0), _request(processor, "a dog", seed=1)]
    with pytest.raises(ValueError, match="max_batch"):
        engine.generate_batch(reqs)
    engine.reserve(2)
    assert engine.max_batch == 2 and engine._cache is None
    out = engine.generate_batch(reqs)
    assert engine._cache.keys[0].shape[0] == 2
    engine.reserve(1)  # never shrinks
    assert engine.max_batch == 2
    engine.free()
    assert engine._cache is None and engine._states == {}
    assert torch.equal(engine.generate_batch([_reseeded(r, i) for i, r in enumerate(reqs)])[1], out[1])
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        engine.generate_batch([ArRequest(torch.zeros(2, 5, dtype=torch.long), reqs[0].image_grid_thw)])
