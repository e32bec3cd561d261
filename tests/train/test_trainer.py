"""The trainer through the CLI: a tiny run end to end, exact resume after SIGKILL, NaN stops, warm-up."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_helpers import (
    TINY,
    TINY_SET,
    run_cli,
    sets,
    train_killed_at,
    tree_hashes,
    weights,
)

from difflab.cli import main
from difflab.train.checkpoint import list_checkpoints
from difflab.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tiny_run_trains_checkpoints_samples_and_scores(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--out", str(run), "--max-steps", "10", "--quiet",
                 *sets(*TINY_SET, "train.sample_every=5")]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_0000008", "ckpt_0000010"]  # keep_last 2, final save
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000005.png", "step_0000010.png"]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    for r in rows:
        assert {"loss", "mse", "vb", "lr", "grad_norm", "img/s"} <= set(r)
        assert math.isclose(r["loss"], r["mse"] + r["vb"], rel_tol=1e-6)  # hybrid: mse + rescaled vb
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "config.yaml").is_file()

    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "6", "--steps", "5", "--batch", "4", "--grid", str(grid),
                 "--npz", str(npz), "--quiet"]) == 0
    arrays = np.load(npz)
    assert arrays["arr_0"].shape == (6, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    from PIL import Image

    assert Image.open(grid).size == (2 + 3 * 10, 2 + 2 * 10)  # 3 x 2 tiles of 8 px with 2 px gaps
    # the same seed gives the same images whatever the batch size (noise is seeded per batch of the request)
    npz2 = tmp_path / "s2.npz"
    assert main(["sample", str(run), "--n", "6", "--steps", "5", "--batch", "4", "--npz", str(npz2), "--quiet"]) == 0
    assert np.array_equal(np.load(npz2)["arr_0"], arrays["arr_0"])

    capsys.readouterr()
    assert main(["nll", str(run), "--n", "8", "--batch", "8", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["steps"] == 100 and result["dims"] == 64 and result["split"] == "test"
    assert 0.5 < result["bpd"] < 12.0  # a barely trained model: worse than data, far from nonsense
    assert math.isclose(result["bpd"], result["prior_bpd"] + result["vb_bpd"] + result["decoder_bpd"], rel_tol=1e-6)
    assert 0 <= result["prior_bpd"] < 1e-3 and result["decoder_bpd"] > 0 and result["vb_bpd"] > 0

    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps_done"] == 10 and info["parameters"] == sum(v.numel() for v in weights(run).values())
    assert info["checkpoints"] == ["ckpt_0000008", "ckpt_0000010"] and info["last_loss"] == rows[-1]["loss"]


def test_class_conditional_with_label_dropout_samples_the_asked_label(tmp_path):
    run = tmp_path / "cond"
    cond = ["data.class_cond=true", "model.num_classes=10", "model.class_null=true", "diffusion.p_uncond=0.3"]
    assert main(["train", str(TINY), "--out", str(run), "--max-steps", "2", "--quiet", *sets(*TINY_SET, *cond)]) == 0
    npz = tmp_path / "three.npz"
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--label", "3", "--npz", str(npz), "--quiet"]) == 0
    arrays = np.load(npz)
    assert arrays["arr_1"].dtype == np.int64 and arrays["arr_1"].tolist() == [3, 3, 3]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    # Everything that draws randomness: dropout (torch global RNG), flips, label dropout, importance
    # sampling of t with its loss history (T = 20 warms it up quickly), micro-batches, two EMAs, and
    # log lines that straddle checkpoints (running sums in the checkpoint).
    knobs = [*TINY_SET, "train.save_every=10", "train.log_every=3", "train.max_steps=60", "train.microbatch=8",
             "train.ema_rates=[0.99, 0.9]", "train.warmup_steps=5", "model.dropout=0.1", "data.random_flip=true",
             "data.class_cond=true", "model.num_classes=10", "model.class_null=true", "diffusion.p_uncond=0.2",
             "diffusion.timestep_sampler=loss_second_moment", "diffusion.steps=20", "sample.steps=5"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_cli("train", str(TINY), "--out", str(whole), "--quiet", *sets(*knobs))

    train_killed_at(killed / "ckpt_0000010" / "manifest.json", str(TINY), "--out", str(killed), "--quiet",
                    *sets(*knobs))
    steps_left = [int(p.name.split("_")[1]) for p in list_checkpoints(killed)]
    assert steps_left and max(steps_left) < 60, "the kill came too late to test anything"

    run_cli("train", "--resume", str(killed), "--quiet")
    for which in ("model", "ema_0.99", "ema_0.9"):
        a, b = weights(whole, which), weights(killed, which)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{which} differs after resume"
    drop_time = [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(whole / "metrics.jsonl")]
    assert drop_time == [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(killed / "metrics.jsonl")]
    assert [r["step"] for r in drop_time] == list(range(3, 61, 3))  # lines straddle checkpoints


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import difflab.train.tasks.diffusion as diffusion_task

    real, calls = diffusion_task.training_losses, []

    def poisoned(*args, **kwargs):  # finite for the first 3 steps, then NaN
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > 3:
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        return terms

    monkeypatch.setattr(diffusion_task, "training_losses", poisoned)
    run = tmp_path / "run"
    code = main(["train", str(TINY), "--out", str(run), "--max-steps", "8", "--quiet",
                 *sets(*TINY_SET, "train.save_every=2")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "diverged" in err and "nan" in err and "step 4" in err
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_0000002"]  # nothing of steps 3-4 saved
    before = tree_hashes(run)
    # resuming hits the same NaN at the same step and again writes nothing
    assert main(["train", "--resume", str(run), "--quiet"]) == 1
    assert tree_hashes(run) == before


def test_warmup_is_linear(tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--out", str(run), "--max-steps", "4", "--quiet",
                 *sets(*TINY_SET, "train.warmup_steps=4", "train.lr=0.002", "train.log_every=1")]) == 0
    assert [r["lr"] for r in read_metrics(run / "metrics.jsonl")] == pytest.approx([0.0005, 0.001, 0.0015, 0.002])


def test_bf16_autocast_on_cpu_tracks_float32(tmp_path):
    """train.bf16 runs the network under CPU bf16 autocast: the losses differ from float32 (the arithmetic
    changed) yet track it step by step, and the weights and EMA stay float32."""
    losses = {}
    for bf16 in ("false", "true"):
        run = tmp_path / f"bf16-{bf16}"
        assert main(["train", str(TINY), "--out", str(run), "--max-steps", "6", "--quiet",
                     *sets(*TINY_SET, "train.log_every=1", f"train.bf16={bf16}")]) == 0
        losses[bf16] = [r["mse"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses["true"] != losses["false"]
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=0.03)
    for which in ("model", "ema_0.99"):
        assert {v.dtype for v in weights(tmp_path / "bf16-true", which).values()} == {torch.float32}

    # difflab sample --bf16: the same seeded ancestral path lands on nearly the same images. (Not DDIM: after 6
    # steps its clipped x0 saturates 99.8% of the pixels, which leaves the bf16 difference no pixel to show in.)
    images = {}
    for flag in ([], ["--bf16"]):
        npz = tmp_path / f"s{len(flag)}.npz"
        assert main(["sample", str(tmp_path / "bf16-true"), "--n", "64", "--sampler", "ancestral", "--steps", "5",
                     "--npz", str(npz), "--quiet", *flag]) == 0
        images[len(flag)] = np.load(npz)["arr_0"].astype(np.int32)
    diff = np.abs(images[1] - images[0])
    assert diff.max() > 0 and diff.mean() < 0.5  # uint8 levels


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """train.compile gives the eager run's losses to float tolerance (inductor reorders float arithmetic)."""
    losses = {}
    for compiled in ("false", "true"):
        run = tmp_path / f"compile-{compiled}"
        assert main(["train", str(TINY), "--out", str(run), "--max-steps", "4", "--quiet",
                     *sets(*TINY_SET, "train.log_every=1", f"train.compile={compiled}")]) == 0
        losses[compiled] = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=1e-4)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_zero(tmp_path):
    """Only config.yaml (and maybe some log lines) exist: --resume starts again from step 0 with the saved
    config and ends equal to an uninterrupted run."""
    knobs = [*TINY_SET, "train.save_every=1000", "train.max_steps=30", "data.random_flip=true"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_cli("train", str(TINY), "--out", str(whole), "--quiet", *sets(*knobs))
    train_killed_at(killed / "config.yaml", str(TINY), "--out", str(killed), "--quiet", *sets(*knobs))
    assert not list_checkpoints(killed)
    run_cli("train", "--resume", str(killed), "--quiet")
    a, b = weights(whole), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop_time = [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(whole / "metrics.jsonl")]
    assert drop_time == [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(killed / "metrics.jsonl")]


def test_a_cpu_time_budget_stops_on_this_process_cpu_time(tmp_path):
    """--max-cpu-minutes counts time.process_time (the process's CPU time), not the wall clock: the run stops
    at the first step whose CPU time reaches the budget, checkpointed, and resumes from there."""
    import time

    from difflab.train.trainer import Trainer, resolve_train_config

    cfg, run = resolve_train_config(str(TINY), list(TINY_SET), out=tmp_path / "run", max_steps=100000)
    trainer = Trainer(cfg, run, quiet=True)
    cpu0 = time.process_time()
    result = trainer.train(max_cpu_minutes=0.01)  # 0.6 s of CPU
    used = time.process_time() - cpu0
    assert result.stopped == "max_cpu_minutes" and 0 < result.step < 100000
    assert used >= 0.6 and [p.name for p in list_checkpoints(run)][-1] == f"ckpt_{result.step:07d}"
    with pytest.raises(ValueError, match="max_cpu_minutes must be > 0"):
        trainer.train(max_cpu_minutes=float("nan"))
