"""The noisy classifier on the one training loop: killed with SIGKILL and resumed it equals an
uninterrupted run bit for bit (weights, EMAs, optimiser, log), and two gloo processes equal one."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import ROOT, run_cli, sets, torchrun, train_killed_at, weights

from difflab.train.checkpoint import latest_checkpoint, list_checkpoints
from difflab.train.classifier import load_classifier
from difflab.train.metrics import read_metrics

CLF = ROOT / "configs" / "digits-classifier.yaml"
# two EMAs, warm-up, log lines that straddle checkpoints, micro-batches
KNOBS = ["train.max_steps=60", "train.save_every=10", "train.log_every=3", "train.ema_rates=[0.99, 0.9]",
         "train.warmup_steps=5", "train.microbatch=16", "train.batch_size=32", "export_ema=0.99"]


def _no_time(path):
    return [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(path / "metrics.jsonl")]


def test_classifier_resume_after_sigkill_is_bit_identical(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_cli("train", str(CLF), "--out", str(whole), "--quiet", *sets(*KNOBS))
    train_killed_at(killed / "ckpt_0000020" / "manifest.json", str(CLF), "--out", str(killed), "--quiet", *sets(*KNOBS))
    steps_left = [int(p.name.split("_")[1]) for p in list_checkpoints(killed)]
    assert steps_left and max(steps_left) < 60, "the kill came too late to test anything"
    assert not (killed / "classifier.safetensors").exists()  # written at the end of a train call
    run_cli("train", "--resume", str(killed), "--quiet")

    for which in ("model", "ema_0.99", "ema_0.9"):
        a, b = weights(whole, which), weights(killed, which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{which} differs after resume"
    opt_a, opt_b = (torch.load(latest_checkpoint(r) / "optimizer.pt", weights_only=True) for r in (whole, killed))
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    assert all(torch.equal(v, opt_b["state"][i][k]) for i in opt_a["state"] for k, v in opt_a["state"][i].items())
    rows = _no_time(whole)
    assert rows == _no_time(killed) and [r["step"] for r in rows] == list(range(3, 61, 3))
    assert {"loss", "accuracy", "grad_norm", "lr"} <= rows[0].keys()
    # the exported weights are the EMA export_ema (0.99), and the accuracy tables agree
    clf = load_classifier(killed)
    ema = weights(killed, "ema_0.99")
    assert all(torch.equal(v, ema[k]) for k, v in clf.state_dict().items() if k in ema)
    report = [json.loads((r / "accuracy_by_noise.json").read_text()) for r in (whole, killed)]
    assert report[0]["accuracy"] == report[1]["accuracy"] and report[0]["steps"] == 60


def test_two_process_classifier_run_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    knobs = ["train.max_steps=6", "train.batch_size=32", "train.microbatch=8", "train.log_every=2"]
    run_cli("train", str(CLF), "--out", str(one), "--quiet", *sets(*knobs))
    torchrun("train", str(CLF), "--out", str(two), "--quiet", *sets(*knobs))
    # Float tolerance: the ranks' gradients are summed in another order, and Adam's m / sqrt(v) turns the
    # rounding of near-zero gradient elements into differences of the update; Adam moves a weight by at
    # most about lr per step, so bound every difference by 1% of lr * steps (measured: 0.3%), and the whole
    # parameter vector by a relative 1e-5 (measured: 3.7e-6).
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    bound = 0.01 * 4e-3 * 6  # configs/digits-classifier.yaml: lr 4e-3; 6 steps
    for k in a:
        assert float((b[k] - a[k]).abs().max()) < bound, f"{k} differs by {float((b[k] - a[k]).abs().max()):.2g}"
    flat = [torch.cat([v.flatten() for v in w.values()]) for w in (a, b)]
    assert float((flat[1] - flat[0]).norm() / flat[0].norm()) < 1e-5
    assert [r["loss"] for r in read_metrics(two / "metrics.jsonl")] == pytest.approx(
        [r["loss"] for r in read_metrics(one / "metrics.jsonl")], rel=1e-5)
