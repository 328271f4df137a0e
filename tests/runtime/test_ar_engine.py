"""ArEngine against upstream ``GlmImageForConditionalGeneration.generate`` on the tiny model (CPU, fp32).

Parity is checked token for token (greedy), position for position (the M-RoPE ids each step feeds the
rotary module) and logit for logit against a float64 reference: the engine's fp32 error may be at most twice
the error of upstream's own fp32 ``generate`` on the same forced token sequence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from glmq.runtime.ar_engine import ArEngine, GridPlan, prior_tokens_from_generated
from glmq.runtime.sampling import sample_tokens, top_k_filter, top_p_filter

EOS = 16385


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(vision_vocab_size: int | None = None, seed: int = 0):
    from glmq.testing import tiny_ar

    return tiny_ar(vision_vocab_size, seed)


@pytest.fixture(scope="module")
def model():
    return _build()


@pytest.fixture(scope="module")
def processor():
    from glmq.models.build import build_processor

    return build_processor()


def _t2i(processor, prompts=("a cat",), h=64, w=None, **kw):
    msgs = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts]
    return processor.apply_chat_template(msgs, tokenize=True, target_h=h, target_w=w or h, return_dict=True,
                                         return_tensors="pt", **kw)


@pytest.fixture(scope="module")
def inputs(processor):
    return _t2i(processor)


def _hf_generate(model, inputs, n, **kw):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


class _ForceTokens:
    """A logits processor that makes HF generate follow a given token sequence (teacher forcing)."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids, scores):
        k = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, self.tokens[:, k : k + 1], 0.0)


def _assert_logits_close(model, inputs, tokens, logits, hf_logits):
    """Engine fp32 logits vs a float64 run of upstream generate forced along the same tokens: the engine's
    error may be at most twice upstream fp32 generate's own. (HF hands its logits back cast to fp32, 0.5 ulp
    ~ 6e-8 relative: far below fp32 arithmetic error, so the reference is good enough for this bound.)"""
    model64 = copy.deepcopy(model).double()
    force = _ForceTokens(tokens, inputs["input_ids"].shape[1])
    _, ref = _hf_generate(model64, inputs, tokens.shape[1], logits_processor=[force])
    err_engine = (logits.double() - ref).abs().max().item()
    err_hf = (hf_logits.double() - ref).abs().max().item()
    print(f"max |logit - fp64 ref| over {tokens.shape[1]} steps: engine {err_engine:.3e}, "
          f"upstream generate {err_hf:.3e}")
    assert 0 < err_engine <= 2 * err_hf


def _record_positions(model):
    seen = []

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(pos.expand(3, -1, -1).clone())

    return seen, model.model.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------------------------- plans


@pytest.mark.parametrize(("h", "w"), [(1024, 1024), (1152, 864), (768, 1344), (2048, 2048), (64, 64)])
def test_plan_matches_processor_and_pipeline(processor, h, w):
    from diffusers import GlmImagePipeline

    inp = _t2i(processor, h=h, w=w)
    plan = GridPlan.for_image(h, w)
    assert GridPlan.from_grids(inp["image_grid_thw"], 0) == plan
    n_new, offset, th, tw = GlmImagePipeline._compute_generation_params(inp["image_grid_thw"], True)
    assert plan.max_new_tokens == n_new and plan.target_slice.start == offset and plan.grids[-1] == (th, tw)


def test_plan_1024_without_running_the_model(model, processor):
    inp = _t2i(processor, h=1024)
    plan = GridPlan.for_image(1024, 1024)
    assert plan.grids == ((16, 16), (32, 32))
    assert plan.grid_tokens == (256, 1024) and plan.max_new_tokens == 1281
    assert plan.target_slice == slice(256, 1280)
    engine = ArEngine(model)
    assert engine.plan(inp["input_ids"], inp["image_grid_thw"], inp["images_per_sample"]) == plan
    # Upstream get_rope_index (no forward pass): one decode position per new token, grids laid out 2-D.
    prefill, decode = engine._positions(inp["input_ids"], inp["image_grid_thw"], inp["images_per_sample"], None)
    assert prefill.shape == (3, 1, inp["input_ids"].shape[1]) and decode.shape == (3, 1, 1281)
    start = inp["input_ids"].shape[1]
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(decode[1, 0, :256], start + rows.flatten())
    assert torch.equal(decode[2, 0, :256], start + cols.flatten())
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    assert torch.equal(decode[1, 0, 256:1280], start + 16 + rows.flatten())
    assert torch.equal(decode[0, 0, 256:1280], torch.full((1024,), start + 16))
    assert model.model._cached_decode_position_ids is None  # the engine leaves upstream's state alone


@pytest.mark.parametrize("is_t2i", [True, False])
def test_prior_tokens_match_pipeline(is_t2i):
    from diffusers import GlmImagePipeline

    grids = torch.tensor([[1, 32, 32], [1, 16, 16]]) if is_t2i else torch.tensor([[1, 24, 40], [1, 20, 28]])
    n_new, offset, th, tw = GlmImagePipeline._compute_generation_params(grids, is_t2i)
    tokens = torch.randint(0, 16384, (2, n_new), generator=torch.Generator().manual_seed(0))
    got = prior_tokens_from_generated(tokens, grids, is_t2i)
    for b in range(2):
        ref = GlmImagePipeline._extract_large_image_tokens(tokens[b : b + 1], 0, offset, th * tw)
        assert torch.equal(got[b : b + 1], GlmImagePipeline._upsample_token_ids(ref, th, tw))
    assert got.shape == (2, 4 * th * tw)


# ----------------------------------------------------------------------------------------------- parity


def test_greedy_tokens_positions_logits_match_upstream(model, inputs):
    seen_hf, handle = _record_positions(model)
    try:
        hf_tokens, hf_logits = _hf_generate(model, inputs, 261)
    finally:
        handle.remove()
    engine = ArEngine(model)
    seen_engine, handle = _record_positions(model)
    try:
        tokens, logits = engine.generate(**inputs, greedy=True, output_logits=True)
    finally:
        handle.remove()
    assert tokens.shape == (1, 261)
    assert torch.equal(tokens, hf_tokens)
    assert len(seen_engine) == len(seen_hf) == 261
    for step, (a, b) in enumerate(zip(seen_engine, seen_hf)):
        assert torch.equal(a, b), f"position ids differ at step {step}"

    _assert_logits_close(model, inputs, tokens, logits, hf_logits)


def test_swapped_submodules_are_what_runs(model, inputs):
    """The engine calls the layers' own submodules: a wrapped q_proj is used for every token."""

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    attn = model.model.language_model.layers[1].self_attn
    original = attn.q_proj
    attn.q_proj = Counting(original)
    try:
        tokens = ArEngine(model).generate(**inputs, greedy=True, max_new_tokens=7)
        assert attn.q_proj.calls == 7  # prefill + 6 decode steps
    finally:
        attn.q_proj = original
    assert torch.equal(tokens, ArEngine(model).generate(**inputs, greedy=True, max_new_tokens=7))


def test_left_padded_batch_matches_upstream(model, processor):
    processor.tokenizer.padding_side = "left"
    inp = _t2i(processor, prompts=("a cat", "a big red dog"), padding=True)
    assert not bool(inp["attention_mask"].all())
    hf_tokens, _ = _hf_generate(model, inp, 261)
    tokens = ArEngine(model, max_batch=2).generate(**inp, greedy=True)
    assert torch.equal(tokens, hf_tokens)


def test_image_to_image_matches_upstream(model, processor):
    """Reference-image tokens in the prompt; only the target grid is generated (grid + EOS)."""
    from diffusers import GlmImagePipeline

    image = (torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    # The release chat template wraps each reference image as <image start><|image|><image end>.
    text = "<|dit_token_16384|><|image|><|dit_token_16385|>a cat"
    inp = processor(text=[text], images=[image], target_h=64, target_w=64, return_tensors="pt")
    engine = ArEngine(model)
    plan = engine.plan(inp["input_ids"], inp["image_grid_thw"], inp["images_per_sample"])
    assert plan.grids == ((2, 2),) and plan.max_new_tokens == 5
    hf_tokens, hf_logits = _hf_generate(model, inp, plan.max_new_tokens)
    tokens, logits = engine.generate(**inp, greedy=True, output_logits=True)
    assert torch.equal(tokens, hf_tokens)
    _assert_logits_close(model, inp, tokens, logits, hf_logits)
    n_new, offset, th, tw = GlmImagePipeline._compute_generation_params(inp["image_grid_thw"], False)
    ref = GlmImagePipeline._upsample_token_ids(tokens[0, offset : offset + th * tw], th, tw)
    assert torch.equal(prior_tokens_from_generated(tokens, inp["image_grid_thw"], False), ref)


# ----------------------------------------------------------------------------------------------- sampling


def test_sampled_decoding_is_reproducible_and_stays_in_vocab(model, inputs):
    engine = ArEngine(model)
    run = lambda seed, **kw: engine.generate(**inputs, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() > 20  # really sampling, not collapsing on one id
    limited = run(1, valid_vocab=40)
    assert int(limited[:, :260].max()) < 40  # grid tokens only from the allowed ids
    torch.manual_seed(5)
    d = engine.generate(**inputs)
    torch.manual_seed(5)
    assert torch.equal(d, engine.generate(**inputs))  # no generator: torch's global CPU RNG


@pytest.mark.parametrize("mode, kind", [(None, "compiled per layer"), ("layers", "compiled per layer"),
                                        ("step", "compiled")])
def test_compiled_step_matches_the_eager_step(model, inputs, monkeypatch, mode, kind):
    """compile=True really compiles (no silent fallback) and changes nothing: same sampled tokens, logits
    within fp32 rounding of the eager step's (Inductor reorders float sums), and a seed still reproduces; with
    GLMQ_AR_COMPILE unset it compiles one layer for all (the default), "step" the whole step."""
    if mode is None:
        monkeypatch.delenv("GLMQ_AR_COMPILE", raising=False)
    else:
        monkeypatch.setenv("GLMQ_AR_COMPILE", mode)
    eager, compiled = ArEngine(model), ArEngine(model, compile=True)
    run = lambda eng: eng.generate(**inputs, generator=torch.Generator().manual_seed(3), output_logits=True)  # noqa: E731
    (ref, ref_logits), (got, got_logits), (again, _) = run(eager), run(compiled), run(compiled)
    assert compiled._compiled, "the decode step fell back to eager"
    assert (compiled.step_kind, eager.step_kind) == (kind, "eager")  # what bench records as ran.ar_step
    assert torch.equal(got, ref) and torch.equal(again, got)
    # fp32 rounding of reordered sums: ~100 ulps (eps 1.2e-7) of the largest logit, far below any real change.
    assert (got_logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()


def test_rigged_head_cannot_escape_the_grid():
    """lm_head rigged so the invalid ids and EOS win every argmax: grids still fill with valid ids."""
    model = _build(vision_vocab_size=16512, seed=1)

    class Rigged(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear, self.out_features = linear, linear.out_features
            bias = torch.zeros(linear.out_features)
            bias[128:] = 30.0  # ids the (128-entry) codebook cannot embed
            bias[EOS] = 60.0
            self.register_buffer("bias", bias)

        def forward(self, x):
            return self.linear(x) + self.bias

    model.lm_head = Rigged(model.lm_head)
    from glmq.models.build import build_processor

    inputs = _t2i(build_processor())
    hf_tokens, _ = _hf_generate(model, inputs, 261)
    assert hf_tokens.tolist() == [[EOS]]  # stock generate stops at once: the pipeline would crash

    engine = ArEngine(model)
    assert engine.valid_vocab == 128 and engine.vocab_size == 16512
    for tokens in (engine.generate(**inputs, greedy=True),
                   engine.generate(**inputs, generator=torch.Generator().manual_seed(0))):
        assert int(tokens[:, :260].max()) < 128
        assert int(tokens[0, 260]) == EOS  # after the last grid token every id is allowed again
    longer = engine.generate(**inputs, greedy=True, max_new_tokens=264)
    assert longer[0, 261:].tolist() == [engine.pad_token_id] * 3  # past EOS: padding, as HF does


@pytest.mark.parametrize("top_p", [0.75, 0.3, 0.999])
def test_top_p_and_top_k_match_hf_warpers(top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1037, generator=gen) * 3
    logits[0, :500] = float("-inf")  # already-masked ids, as inside a grid
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    got = top_p_filter(logits, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(ref)])
    assert torch.equal(top_k_filter(logits, 37), TopKLogitsWarper(37)(None, logits.clone()))


def test_inverse_cdf_draw_follows_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2, -0.4, 0.9, 3.0])
    filtered = top_p_filter(logits[None] / 0.9, 0.75)[0]
    probs = filtered.softmax(-1)
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    draws = sample_tokens(logits.expand(n, -1), vocab_limit=torch.tensor([11]), uniform=u)
    freq = torch.bincount(draws, minlength=11).double() / n
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    print("max |freq - p| / sigma:", ((freq - probs.double()).abs() / sigma.clamp_min(1e-12)).max().item())
    assert torch.all(freq[probs == 0] == 0)
    assert torch.all((freq - probs.double()).abs() <= 5 * sigma + 1e-12)
    edge = sample_tokens(logits.expand(2, -1), vocab_limit=torch.tensor([11]),
                         uniform=torch.tensor([0.0, 1 - 1e-7]))
    assert bool((probs[edge] > 0).all())
    limited = sample_tokens(logits.expand(3, -1), vocab_limit=torch.tensor([4]), uniform=torch.rand(3), greedy=True)
    assert limited.tolist() == [0, 0, 0]  # argmax among ids < 4


def test_a_draw_does_not_follow_rounding_across_a_near_tie():
    """A batched decode step's logits differ from the one-row step's by fp32 rounding (~1e-6 here). Two
    tokens whose logits are that close may swap places in a sort; the draw must not follow the swap (it did
    when the inverse CDF ran in sorted order: a batched image then sampled other tokens than the same image
    made alone)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, generator=gen)
    logits[3], logits[7] = 1.5, 1.5 + 1e-6  # a near-tie, then the same two with the rounding the other way
    swapped = logits.clone()
    swapped[3], swapped[7] = 1.5 + 1e-6, 1.5
    n = 20000
    u = torch.rand(n, generator=gen)
    kw = dict(vocab_limit=torch.tensor([64]), uniform=u, temperature=0.9, top_p=0.999)
    a = sample_tokens(logits.expand(n, -1), **kw)
    b = sample_tokens(swapped.expand(n, -1), **kw)
    assert int((a == 3).sum()) > 100 and int((a == 7).sum()) > 100  # the tied pair is drawn, often
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- errors


def test_limits_are_checked(model, inputs):
    with pytest.raises(ValueError, match="max_batch"):
        ArEngine(model).generate(torch.cat([inputs["input_ids"]] * 2), image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="max_cache_len"):
        ArEngine(model, max_cache_len=64).generate(**inputs)
    with pytest.raises(ValueError, match="valid_vocab"):
        ArEngine(model).generate(**inputs, valid_vocab=10**6)


@pytest.mark.parametrize("mode, compiled", [("step", "_step"), ("layers", "_layer")])
def test_a_step_that_fails_to_compile_says_so(model, inputs, monkeypatch, mode, compiled):
    """A compiler failure (of the whole step, or of the one compiled layer) falls back to the eager step with the
    same tokens, and ``step_kind`` (bench's ``ran.ar_step``) says it fell back, so a compiled bench row cannot
    hide an eager AR."""
    monkeypatch.setenv("GLMQ_AR_COMPILE", mode)
    engine = ArEngine(model, compile=True)

    def broken(*args, **kwargs):
        raise NotImplementedError("NYI TritonSplitDimKernel reductions")

    monkeypatch.setattr(engine, compiled, broken)
    with pytest.warns(RuntimeWarning, match="failed"):
        got = engine.generate(**inputs, generator=torch.Generator().manual_seed(3))
    assert engine.step_kind == "eager after a failed compile"
    assert torch.equal(got, ArEngine(model).generate(**inputs, generator=torch.Generator().manual_seed(3)))


def test_the_draw_has_no_reduction_for_inductor_to_fuse_into_its_scan():
    """The sampled path's graph holds the cumulative sums and binary searches, and no reduction over the
    vocabulary beside softmax's own: Inductor (torch 2.11, CUDA) fused an argmax into the split scan of the
    vocabulary-long (16512) cumsum, failed, and the decode step silently ran eager on the H200. The failure needs CUDA, so
    this checks the structure that avoids it (the argmax/any version fails here)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from glmq.runtime.sampling import sample_tokens

    def draw(logits, limit, u):
        return sample_tokens(logits, vocab_limit=limit, uniform=u, temperature=0.9, top_p=0.75)

    graph = make_fx(draw)(torch.randn(2, 64), torch.tensor([60]), torch.rand(2)).graph
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    reductions = {op for op in ops if op.startswith("aten.") and op.split(".")[1] in
                  ("argmax", "argmin", "any", "all", "sum", "max", "min", "amax", "amin", "prod")}
    assert "aten.cumsum.default" in ops and any("searchsorted" in op for op in ops), ops
    assert reductions == set(), reductions


def test_compiling_one_layer_serves_every_layer(model, inputs, monkeypatch):
    """GLMQ_AR_COMPILE=layers: one decoder layer compiled, and that one graph runs every layer (a layer index
    reaching the compiled code would compile one graph per layer); the tokens are the eager engine's, and a seed
    reproduces (a compiler failure: test_a_step_that_fails_to_compile_says_so)."""
    from torch._dynamo.utils import counters

    assert len(model.model.language_model.layers) >= 2  # else one graph per layer would look like one
    monkeypatch.setenv("GLMQ_AR_COMPILE", "layers")
    torch._dynamo.reset()  # an earlier test's graph of the same layer function would be reused, counting none
    engine = ArEngine(model, compile=True)
    run = lambda eng: eng.generate(**inputs, generator=torch.Generator().manual_seed(3))  # noqa: E731
    before = counters["stats"]["unique_graphs"]
    got = run(engine)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert engine.step_kind == "compiled per layer"
    assert torch.equal(got, run(ArEngine(model))) and torch.equal(run(engine), got)
