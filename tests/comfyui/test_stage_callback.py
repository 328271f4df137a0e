"""The pipeline's ``callback`` hook, which the ComfyUI nodes use for progress bars and cancel."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    import glmq

    return glmq.load(tiny_dir, device="cpu")


def _run(pipe, callback, steps=3, seed=0):
    return pipe("a 'sign'", height=64, width=96, num_inference_steps=steps, guidance_scale=1.5,
                generator=torch.Generator().manual_seed(seed), output_type="pt", callback=callback)


def test_callback_reports_every_stage_token_and_step(pipe):
    calls = []
    image = _run(pipe, lambda stage, done, total: calls.append((stage, done, total)))
    assert image.shape == (1, 3, 64, 96)
    stages = [c[0] for c in calls]
    assert stages == sorted(stages, key=["AR", "glyph", "DiT", "VAE"].index)  # in pipeline order
    ar = [c for c in calls if c[0] == "AR"]
    n_tokens = pipe.last_times.ar_tokens
    assert ar[0] == ("AR", 0, 1) and [c[1] for c in ar[1:]] == list(range(1, n_tokens + 1))
    assert {c[2] for c in ar[1:]} == {n_tokens}
    assert [c for c in calls if c[0] == "DiT"] == [("DiT", i, 3) for i in range(4)]
    assert [c for c in calls if c[0] == "VAE"] == [("VAE", 0, 1), ("VAE", 1, 1)]


class Stop(Exception):
    pass


@pytest.mark.parametrize("stage,at", [("AR", 5), ("DiT", 2)])
def test_an_exception_from_the_callback_stops_generation(pipe, stage, at):
    seen = []

    def cancel(s, done, total):
        seen.append((s, done))
        if s == stage and done == at:
            raise Stop

    with pytest.raises(Stop):
        _run(pipe, cancel, steps=6)
    assert seen[-1] == (stage, at)  # nothing ran after the raise
    # The pipeline is still usable, and reproducible, after a cancelled run.
    a, b = _run(pipe, None, seed=4), _run(pipe, None, seed=4)
    assert torch.equal(a, b)
