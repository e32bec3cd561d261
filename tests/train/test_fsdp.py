"""FSDP (train.parallel: fsdp) on the CPU: two gloo processes equal one process, a sharded run resumes
exactly, and its sharded checkpoints gather into whole weights that sample like any run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from train_helpers import TINY, TINY_SET, run_cli, sets, torchrun, weights

from difflab.cli import main
from difflab.train.checkpoint import checkpoint_shards, latest_checkpoint, load_weights, verify_checkpoint
from difflab.train.metrics import read_metrics

# micro-batches (no reduce-scatter before the last), two EMAs, label dropout drawn for the global batch
KNOBS = [*TINY_SET, "train.parallel=fsdp", "train.microbatch=4", "train.ema_rates=[0.99, 0.9]",
         "data.random_flip=true", "data.class_cond=true", "model.num_classes=10", "model.class_null=true",
         "diffusion.p_uncond=0.25"]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    one, two, split = root / "one", root / "two", root / "split"
    run_cli("train", str(TINY), "--out", str(one), "--quiet", *sets(*KNOBS, "train.max_steps=8"))
    torchrun("train", str(TINY), "--out", str(two), "--quiet", *sets(*KNOBS, "train.max_steps=8"))
    torchrun("train", str(TINY), "--out", str(split), "--quiet", *sets(*KNOBS, "train.max_steps=4"))
    torchrun("train", "--resume", str(split), "--max-steps", "8", "--quiet")
    return {"one": one, "two": two, "split": split, "root": root}


def test_two_process_fsdp_run_equals_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert checkpoint_shards(latest_checkpoint(two)) == 2 and checkpoint_shards(latest_checkpoint(one)) == 0
    # the same float tolerance as DDP (tests/train/test_ddp.py): gradients summed in another order
    for which in ("model", "ema_0.99", "ema_0.9"):
        a, b = weights(one, which), load_weights(two, which)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape, k
            assert _rel(b[k], a[k]) < 2e-5, f"{which}: {k} differs by {_rel(b[k], a[k]):.2g} (relative norm)"
    loss_one = [r["loss"] for r in read_metrics(one / "metrics.jsonl")]
    loss_two = [r["loss"] for r in read_metrics(two / "metrics.jsonl")]
    assert len(loss_one) == 4 and loss_two == pytest.approx(loss_one, rel=1e-5)


def test_sharded_run_resumes_exactly(runs):
    two, split = latest_checkpoint(runs["two"]), latest_checkpoint(runs["split"])
    assert two.name == split.name == "ckpt_0000008"
    files = sorted(p.name for p in two.iterdir())
    assert "model.shard-00000-of-00002.safetensors" in files and "optimizer.shard-00001-of-00002.pt" in files
    for name in files:
        if name.endswith(".safetensors"):
            a, b = safetensors.torch.load_file(two / name), safetensors.torch.load_file(split / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        elif name.startswith("optimizer"):
            a, b = (torch.load(d / name, weights_only=True) for d in (two, split))
            assert a["param_groups"] == b["param_groups"]
            for i in a["state"]:
                for k, v in a["state"][i].items():
                    assert torch.equal(v, b["state"][i][k]), f"{name}: state {i} {k}"
    keep = [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(runs["two"] / "metrics.jsonl")]
    assert keep == [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(runs["split"] / "metrics.jsonl")]


def test_gathered_checkpoint_is_the_whole_weights_and_samples(runs, tmp_path, capsys):
    ckpt = latest_checkpoint(runs["two"])
    in_memory = load_weights(ckpt, "ema_0.99")
    assert main(["gather", str(runs["two"])]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert sorted(p.name for p in written) == ["ema_0.9.safetensors", "ema_0.99.safetensors", "model.safetensors"]
    assert checkpoint_shards(ckpt) == 2 and verify_checkpoint(ckpt)["files"].keys() >= {p.name for p in written}
    assert main(["gather", str(runs["one"])]) == 2  # a whole checkpoint: one line, nothing written
    assert "is not sharded" in capsys.readouterr().err
    on_disk = safetensors.torch.load_file(ckpt / "ema_0.99.safetensors")
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in in_memory)
    # the shards are chunks of dim 0: a weight's two shards concatenate to the whole
    shards = [safetensors.torch.load_file(ckpt / f"model.shard-0000{r}-of-00002.safetensors") for r in (0, 1)]
    key = next(k for k in shards[0] if shards[0][k].dim() == 4)
    whole = load_weights(ckpt, "model")[key]
    assert shards[0][key].shape[0] == -(-whole.shape[0] // 2)
    assert torch.equal(torch.cat([s[key] for s in shards]), whole)
    npz = tmp_path / "s.npz"
    run_cli("sample", str(runs["two"]), "--n", "3", "--steps", "2", "--label", "4", "--npz", str(npz), "--quiet")
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 1)
