"""Two gloo processes on the CPU (torchrun) equal one process with the same global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import TINY, TINY_SET, run_cli, sets, torchrun, weights

from difflab.train.metrics import read_metrics


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def test_two_process_gloo_run_equals_one_process(tmp_path):
    # Global batch 16 = 2 ranks x 8, each accumulated over micro-batches of 4; flips and label dropout
    # drawn for the global batch. No dropout layers: their masks are per process.
    knobs = [*TINY_SET, "train.max_steps=8", "train.microbatch=4", "data.random_flip=true",
             "data.class_cond=true", "model.num_classes=10", "model.class_null=true", "diffusion.p_uncond=0.25"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", str(TINY), "--out", str(one), "--quiet", *sets(*knobs))
    torchrun("train", str(TINY), "--out", str(two), "--quiet", *sets(*knobs))

    # Float tolerance: the ranks' gradients are summed in another order, and Adam divides each update by
    # sqrt(v), which turns the rounding of near-cancelling gradient elements into relative differences
    # of the update; measured here ~7e-6 for the worst tensor after 8 steps, 6e-8 over all weights.
    for which in ("model", "ema_0.99"):
        a, b = weights(one, which), weights(two, which)
        assert a.keys() == b.keys()
        for k in a:
            assert _rel(b[k], a[k]) < 2e-5, f"{which}: {k} differs by {_rel(b[k], a[k]):.2g} (relative norm)"
        flat = [torch.cat([v.flatten() for v in w.values()]) for w in (a, b)]
        assert _rel(flat[1], flat[0]) < 1e-6
    loss_one = [r["loss"] for r in read_metrics(one / "metrics.jsonl")]
    loss_two = [r["loss"] for r in read_metrics(two / "metrics.jsonl")]
    assert len(loss_one) == 4 and loss_two == pytest.approx(loss_one, rel=1e-5)

    # sampling split across the ranks and gathered: the same images as one process
    # (torchrun's own parser would take --n for an abbreviation of its options: --num-samples)
    request = ["sample", str(one), "--num-samples", "5", "--batch", "2", "--steps", "3", "--quiet", "--npz"]
    run_cli(*request, str(tmp_path / "a.npz"))
    torchrun(*request, str(tmp_path / "b.npz"))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (5, 8, 8, 1)
    assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # same math, maybe another rounding
