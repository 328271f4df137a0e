"""Two-GPU pipelines run as two CPU processes on gloo (the tiny model, fp32): the same images as one process,
worker errors and killed workers reaching the caller as one error without hanging it.

The figures these tests print (pixel differences, seconds) are recorded with
``benchmarks/record_test_figures.py`` in ``benchmarks/results/parallel_tiny_cpu2.json``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import glmq
from glmq.errors import GlmqError
from glmq.runtime.parallel.pipeline import ParallelError, from_builder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tp_builders  # noqa: E402

KW = dict(height=64, width=64, num_inference_steps=4)
PROMPTS = ["a 'glmq' sign", "a red cube on a table", "two words: 'tensor' and 'parallel'"]


@pytest.fixture(scope="module")
def workers_env():
    """Workers import the test builders (tp_builders) and run one thread each, as this process does while
    it computes the one-process references: thread counts can change a CPU matmul's rounding."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        mp.setenv("OMP_NUM_THREADS", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- throughput
@pytest.fixture(scope="module")
def throughput(tiny_dir, workers_env):
    with glmq.load(tiny_dir, device="cpu", gpus=2, parallel="throughput") as pipe:
        yield pipe


@pytest.fixture(scope="module")
def one(tiny_dir, workers_env):
    return glmq.load(tiny_dir, device="cpu")


def test_throughput_images_are_one_process_images_bit_for_bit_and_in_order(throughput, one):
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    out = throughput(PROMPTS, generator=gens, output_type="pt", **KW)
    assert out.shape == (len(PROMPTS), 3, 64, 64)
    for i, prompt in enumerate(PROMPTS):
        g = torch.Generator().manual_seed(10 + i)
        ref = one(prompt, generator=g, output_type="pt", **KW)
        diff = (out[i:i + 1] - ref).abs().max().item()
        print(f"throughput image {i}: max pixel difference to one process {diff}")
        assert torch.equal(out[i:i + 1], ref)
        assert torch.equal(gens[i].get_state(), g.get_state())  # each generator left where one call leaves it
    assert torch.equal(throughput.last_prior_token_ids, one.last_prior_token_ids)


def test_throughput_with_one_generator_draws_like_successive_one_process_calls(throughput, one):
    import numpy as np

    g = torch.Generator().manual_seed(7)
    pil = throughput(PROMPTS, generator=g, **KW)
    g_ref = torch.Generator().manual_seed(7)
    for i, prompt in enumerate(PROMPTS):
        assert np.array_equal(np.asarray(pil[i]), np.asarray(one(prompt, generator=g_ref, **KW)[0]))
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert len(pil.images) == len(PROMPTS)


def test_throughput_runs_the_next_ar_while_the_previous_dit_runs(throughput):
    # A DiT of 400 steps (1.5-2.5 s here) outlasts the next image's AR (0.2-0.7 s): with the stages
    # overlapped, rank 0 reports the AR of image n+1 before rank 1 returns image n.
    throughput(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt",
               **{**KW, "num_inference_steps": 400})
    call = throughput.last_call
    when = {(kind, index): t for t, _, kind, index in call["timeline"]}
    print("throughput timeline (s, rank, kind, image):", call["timeline"])
    print(f"throughput: {call['images']} images in {call['wall_s']:.2f} s; AR s {call['ar_s']}; "
          f"DiT+VAE s {call['total_s']}")
    assert when[("ar", 1)] < when[("image", 0)]
    assert when[("ar", 2)] < when[("image", 1)]
    assert throughput.last_times.extra["parallel"] == "throughput"


def test_bad_arguments_are_refused_before_work_and_leave_the_pipeline_usable(throughput):
    from PIL import Image

    with pytest.raises(GlmqError, match="image-to-image runs on one GPU"):
        throughput("x", image=Image.new("RGB", (64, 64)), **KW)
    with pytest.raises(GlmqError, match="multiples of 32"):
        throughput("x", height=50, width=64)
    with pytest.raises(GlmqError, match="2 generators for 3 images"):
        throughput(PROMPTS, generator=[torch.Generator(), torch.Generator()], **KW)
    assert throughput("x", generator=torch.Generator().manual_seed(0), output_type="latent", **KW).shape[0] == 1


def test_a_callback_that_raises_cancels_the_rest_of_the_call_and_the_pipeline_goes_on(throughput, one):
    class Cancel(Exception):
        pass

    seen = []

    def cancel(stage, done, total):
        seen.append(stage)
        if stage == "DiT" and done == 2:
            raise Cancel

    t0 = time.monotonic()
    with pytest.raises(Cancel):
        throughput(PROMPTS * 3, callback=cancel, **{**KW, "num_inference_steps": 100})
    took = time.monotonic() - t0
    print(f"cancelled at the first image's DiT step 2 of 100: the call returned after {took:.2f} s "
          f"({len(PROMPTS) * 3} images asked; the images in flight finish, the rest are skipped)")
    assert not throughput.closed and all(p.poll() is None for p in throughput._procs)
    # The next call runs normally and still makes the one-process image.
    out = throughput(PROMPTS[0], generator=torch.Generator().manual_seed(4), output_type="pt", **KW)
    assert torch.equal(out, one(PROMPTS[0], generator=torch.Generator().manual_seed(4), output_type="pt", **KW))


# ---------------------------------------------------------------------------------------------- latency
ARGS = {"seed": 0}


@pytest.fixture(scope="module")
def latency(workers_env):
    pipe = from_builder("tp_builders:tiny_pipeline", ARGS, device="cpu", parallel="latency")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def references(workers_env):
    """The same quantized tiny model in this process: in fp32, and in float64 (the exact reference)."""
    return tp_builders.tiny_pipeline("cpu", **ARGS), tp_builders.tiny_pipeline("cpu", dtype="float64", **ARGS)


def test_latency_shards_quantized_layers_at_their_groups_unevenly(latency):
    r0, r1 = (info["shard"] for info in latency.worker_info)
    assert (r0["heads"], r1["heads"]) == ([0, 2], [2, 4]) and (r0["kv_heads"], r1["kv_heads"]) == ([0, 1], [1, 2])
    # down_proj: int4 with 3 groups of 32 columns: 2 groups on rank 0, 1 on rank 1
    assert (r0["mlp_first_layer"], r1["mlp_first_layer"]) == ([0, 64], [64, 96])


@pytest.mark.parametrize("seed", [0, 1])
def test_latency_same_seed_same_tokens_and_pixels_within_twice_one_process_error(latency, references, seed):
    """Tokens: equal to one process. Pixels: the sharded AR only changes the order of additions (its tokens
    are equal, checked first), and each guidance pass runs as a batch of one; both change the rounding, not
    the result. Bound: against a float64 run of the same quantized model from the same tokens and noise, the
    two-process image is at most twice as far as the one-process fp32 image is (STYLE.md's rule for a float
    path against an fp32 reference)."""
    one, exact = references
    prompt = PROMPTS[0]
    out = latency(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **KW)
    ref = one(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **KW)
    tokens_equal = torch.equal(latency.last_prior_token_ids, one.last_prior_token_ids)
    g = torch.Generator().manual_seed(seed)
    prior = one.generate_prior_tokens(prompt, KW["height"], KW["width"], generator=g)[0]
    noise = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32)  # as the fp32 call drew it after the AR
    truth = exact(prompt, prior_token_ids=prior, latents=noise.double(), output_type="pt", **KW).double()
    err_two = (out.double() - truth).abs().max().item()
    err_one = (ref.double() - truth).abs().max().item()
    diff = (out - ref).abs().max().item()
    print(f"latency seed {seed}: AR tokens equal {tokens_equal}; max pixel difference to one process {diff:.3g}; "
          f"to float64: two processes {err_two:.3g}, one process {err_one:.3g}")
    assert tokens_equal
    assert err_two <= 2 * err_one


def test_latency_cancel_stops_both_ranks_before_the_next_image(latency):
    def cancel(stage, done, total):
        if stage == "DiT" and done == 1:
            raise KeyError("cancelled by the host")

    with pytest.raises(KeyError, match="cancelled by the host"):
        latency(PROMPTS, callback=cancel, **KW)
    assert not latency.closed  # both ranks skipped the other images together: nothing is left waiting
    assert latency(PROMPTS[1], output_type="latent", **KW).shape[0] == 1


def test_a_killed_worker_fails_the_call_at_once_and_stops_the_other(latency):
    procs = list(latency._procs)
    killed = {}

    def kill_rank1(stage, done, total):
        if stage == "DiT" and done == 1 and not killed:
            killed["t"] = time.monotonic()
            os.kill(procs[1].pid, signal.SIGKILL)

    with pytest.raises(ParallelError, match=r"rank 1 exited during generation \(killed by SIGKILL\)") as err:
        latency(PROMPTS[0], generator=torch.Generator().manual_seed(0), callback=kill_rank1,
                **{**KW, "num_inference_steps": 400})
    waited = time.monotonic() - killed["t"]
    print(f"killed rank 1 during the DiT: the caller raised after {waited:.2f} s: {err.value}")
    assert waited < 10
    assert all(p.poll() is not None for p in procs)  # rank 0, stuck in a collective, was stopped as well
    with pytest.raises(GlmqError, match="closed"):
        latency(PROMPTS[0], **KW)


# ------------------------------------------------------------------------------------------------ errors
def test_a_worker_error_mid_generation_is_one_error_and_stops_both(workers_env):
    pipe = from_builder("tp_builders:tiny_pipeline", {**ARGS, "fail_rank": 1}, device="cpu", parallel="latency")
    procs = list(pipe._procs)
    t0 = time.monotonic()
    with pytest.raises(ParallelError, match="rank 1 failed during generation: RuntimeError: injected failure") as err:
        pipe(PROMPTS[0], **KW)  # rank 0 waits for rank 1's half of the guidance in an all-gather meanwhile
    print(f"worker error reached the caller after {time.monotonic() - t0:.2f} s: {err.value}")
    assert "\n" not in str(err.value) and "injected failure" in err.value.worker_traceback
    assert err.value.rank == 1
    assert all(p.poll() is not None for p in procs)
    assert pipe.closed


def test_load_refuses_what_two_gpus_do_not_take(tiny_dir):
    with pytest.raises(GlmqError, match="needs gpus=2"):
        glmq.load(tiny_dir, device="cpu", parallel="latency")
    with pytest.raises(GlmqError, match="exactly 2 GPUs"):
        glmq.load(tiny_dir, device="cpu", gpus=3)
    with pytest.raises(GlmqError, match="unknown parallel mode"):
        glmq.load(tiny_dir, device="cpu", gpus=2, parallel="fast")
    with pytest.raises(GlmqError, match="vram_budget_gb and mode apply to one GPU"):
        glmq.load(tiny_dir, device="cpu", gpus=2, vram_budget_gb=16)
    with pytest.raises(GlmqError, match="not a GLM-Image|does not exist|no such|missing"):
        glmq.load(tiny_dir / "nope", device="cpu", gpus=2)
