"""train.lr_schedule: linear warm-up, then constant (the default: every run as before) or a half cosine to 0."""

from __future__ import annotations

import math

import pytest
from train_helpers import TINY, TINY_SET, sets

from difflab.cli import main
from difflab.config import load_config
from difflab.train.metrics import read_metrics
from difflab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def _trainer(tmp_path, *overrides: str) -> Trainer:
    return Trainer(load_config(TINY, list(overrides)), tmp_path / "run", quiet=True)


def test_constant_is_the_default_and_unchanged(tmp_path):
    t = _trainer(tmp_path, "train.lr=0.002", "train.warmup_steps=4", "train.max_steps=10")
    assert t.cfg.train.lr_schedule == "constant"
    assert [t.lr_at(s) for s in (1, 2, 4, 5, 10, 11)] == [0.0005, 0.001, 0.002, 0.002, 0.002, 0.002]


def test_cosine_decays_from_lr_after_warmup_to_zero_at_max_steps(tmp_path):
    t = _trainer(tmp_path, "train.lr=0.002", "train.warmup_steps=4", "train.max_steps=12",
                 "train.lr_schedule=cosine")
    assert [t.lr_at(s) for s in (1, 2, 3, 4)] == pytest.approx([0.0005, 0.001, 0.0015, 0.002])
    # 8 steps of decay: lr (1 + cos(pi k / 8)) / 2 at step 4 + k
    expected = [0.002 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(1, 9)]
    assert [t.lr_at(s) for s in range(5, 13)] == pytest.approx(expected, abs=1e-15)
    assert t.lr_at(8) == pytest.approx(0.001) and t.lr_at(12) == pytest.approx(0.0, abs=1e-18)
    assert t.lr_at(13) == pytest.approx(0.0, abs=1e-18)  # past max_steps (a run extended by --resume): 0
    # no warm-up: the decay starts at step 0 (lr), so step 1 is already below lr
    t0 = _trainer(tmp_path / "b", "train.lr=0.002", "train.max_steps=4", "train.lr_schedule=cosine")
    assert [t0.lr_at(s) for s in (1, 2, 3, 4)] == pytest.approx(
        [0.002 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)], abs=1e-15)


def test_the_loop_uses_the_schedule(tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--out", str(run), "--max-steps", "6", "--quiet",
                 *sets(*TINY_SET, "train.warmup_steps=2", "train.lr=0.002", "train.log_every=1",
                       "train.lr_schedule=cosine")]) == 0
    expected = [0.001, 0.002, *(0.002 * (1 + math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4))]
    assert [r["lr"] for r in read_metrics(run / "metrics.jsonl")] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="train.lr_schedule: must be one of .constant., .cosine.; got .linear."):
        load_config(TINY, ["train.lr_schedule=linear"])
