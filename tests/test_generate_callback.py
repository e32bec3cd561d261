"""draw_samples' per-step ``callback`` (progress, x0^ previews and cancelling in ``difflab serve``): it is told
every step of every batch with the step count, it never changes the samples, and an exception it raises stops
the sampling."""

from pathlib import Path

import pytest
import torch

from difflab.build import build_denoiser, build_model
from difflab.config import load_config
from difflab.generate import draw_samples

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    cfg = load_config(ROOT / "configs" / "mnist-tiny.yaml", ["data.class_cond=true", "model.num_classes=10"])
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    return cfg, build_denoiser(cfg, net)


@pytest.mark.parametrize("sampler,steps,calls", [("ancestral", 4, 4), ("ddim", "ddim5", 5), ("dpmpp-2m-sde", 3, 3),
                                                 ("heun", 3, 3)])
def test_callback_sees_every_step_and_leaves_the_samples_unchanged(model, sampler, steps, calls):
    cfg, denoiser = model
    args = dict(n=5, batch=2, seed=7, sampler=sampler, steps=steps, label="3")
    plain, labels = draw_samples(denoiser, cfg, **args)
    seen = []
    hooked, labels2 = draw_samples(denoiser, cfg, **args, callback=seen.append)
    assert torch.equal(plain, hooked) and torch.equal(labels, labels2)
    assert [(d["batch"], d["i"]) for d in seen] == [(k, i) for k in range(3) for i in range(calls)]
    assert {d["steps"] for d in seen} == {calls} and {d["batches"] for d in seen} == {3}
    sizes = [2, 2, 1]
    for d in seen:
        assert d["pred_xstart"].shape == d["x"].shape == (sizes[d["batch"]], 1, 8, 8)
    # the last step of each batch is x_0 itself for ancestral / DDIM (t = 0)
    last = [d for d in seen if d["i"] == calls - 1]
    assert [d["t"] for d in last] == [0, 0, 0]


def test_truncated_chains_count_their_steps(model):
    cfg, denoiser = model
    seen = []
    draw_samples(denoiser, cfg, n=1, seed=0, sampler="ddim", steps=4, label="2", truncate_at=10, callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and {d["steps"] for d in seen} == {4}
    assert seen[-1]["t"] == 1  # the chain stops at the level of its first kept step (end = 1)


def test_an_exception_in_the_callback_stops_sampling(model):
    cfg, denoiser = model
    seen = []

    class Stop(Exception):
        pass

    def stop_at_third(d):
        seen.append(d["i"])
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        draw_samples(denoiser, cfg, n=2, seed=0, sampler="ancestral", steps=10, label="1", callback=stop_at_third)
    assert seen == [0, 1, 2]
