"""Checkpoints: atomic writes, crash leftovers, keep-last-k, corruption, exact RNG resume."""

import hashlib
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from difflab.fileio import atomic_write_text
from difflab.train.checkpoint import (
    TrainingState,
    capture_rng_state,
    check_weights_only_safe,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from difflab.train.ema import EMA


def _state(step, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    ema = EMA(net, [0.9999, 0.99])
    ema.update(net)
    extra = {"rng": capture_rng_state({"noise": torch.Generator().manual_seed(3)}),
             "data": {"batches_consumed": step * 2}, "sampler": {"loss_history": torch.ones(4, 10)}}
    return net, TrainingState(step=step, model=net.state_dict(), ema={r: ema.state_dict(r, net) for r in ema.rates},
                              optimizer=opt.state_dict(), extra=extra)


def test_save_load_round_trip(tmp_path):
    net, st = _state(100)
    path = save_checkpoint(tmp_path, st)
    assert path.name == "ckpt_0000100"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema_0.99.safetensors", "ema_0.9999.safetensors", "manifest.json", "model.safetensors",
        "optimizer.pt", "state.pt"]
    back = load_checkpoint(path)
    assert back.step == 100 and set(back.ema) == {0.9999, 0.99}
    for k, v in st.model.items():
        assert torch.equal(back.model[k], v)
    for r in st.ema:
        assert all(torch.equal(back.ema[r][k], v) for k, v in st.ema[r].items())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    opt.load_state_dict(back.optimizer)  # optimizer state survives weights_only loading
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], st.optimizer["state"][0]["exp_avg"])
    assert back.extra["data"]["batches_consumed"] == 200
    assert torch.equal(back.extra["sampler"]["loss_history"], torch.ones(4, 10))
    # every .pt loads with weights_only=True directly
    torch.load(path / "state.pt", weights_only=True)
    torch.load(path / "optimizer.pt", weights_only=True)
    assert torch.equal(load_weights(tmp_path, "ema_0.99")["0.weight"], st.ema[0.99]["0.weight"])
    with pytest.raises(ValueError, match="no 'ema_0.5' weights; it has .*ema_0.99"):
        load_weights(path, "ema_0.5")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _, st1 = _state(1)
    save_checkpoint(tmp_path, st1)
    _, st2 = _state(2, seed=1)

    import difflab.train.checkpoint as ck

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ck.torch, "save", crash)  # dies after the safetensors files, before the rename
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, st2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "ckpt_0000001"
    # a hard kill leaves the temp dir behind: simulate one with files in it, never renamed
    leftover = tmp_path / ".tmp-ckpt_0000002-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "ckpt_0000001"
    assert load_checkpoint(tmp_path).step == 1  # a run folder loads its latest complete checkpoint
    save_checkpoint(tmp_path, st2, keep_last=5)
    assert latest_checkpoint(tmp_path).name == "ckpt_0000002" and not leftover.exists()


def test_half_renamed_or_corrupt_checkpoints_are_skipped_and_named(tmp_path):
    _, st = _state(1)
    save_checkpoint(tmp_path, st)
    # a ckpt_ directory without a manifest (e.g. copied by hand, half-finished)
    (tmp_path / "ckpt_0000009").mkdir()
    (tmp_path / "ckpt_0000009" / "model.safetensors").write_bytes(b"x")
    # a complete checkpoint whose file later got truncated
    bad = save_checkpoint(tmp_path, _state(5)[1])
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        assert latest_checkpoint(tmp_path).name == "ckpt_0000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000001"]
    with pytest.raises(ValueError, match=r"ckpt_0000005/model\.safetensors: corrupt \(size"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match=r"ckpt_0000009/manifest\.json: missing"):
        load_checkpoint(tmp_path / "ckpt_0000009")


def test_same_size_corruption_caught_by_hash_and_unsafe_pickle_rejected(tmp_path):
    path = save_checkpoint(tmp_path, _state(3)[1])
    data = bytearray((path / "optimizer.pt").read_bytes())
    data[-40] ^= 0xFF
    (path / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"optimizer\.pt: corrupt \(sha256"):
        load_checkpoint(path)
    # a pickle of an arbitrary object is refused by weights_only, reported with the file name
    path2 = save_checkpoint(tmp_path / "b", _state(4)[1])
    evil = pickle.dumps({"step": 4, "f": os.getcwd}, protocol=2)  # a global: refused by weights_only
    (path2 / "state.pt").write_bytes(evil)
    manifest = json.loads((path2 / "manifest.json").read_text())  # forged to match, as an attacker would
    manifest["files"]["state.pt"] = {"bytes": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    (path2 / "manifest.json").write_text(json.dumps(manifest))
    refused = r"state\.pt: it holds a pickled Python object \(posix\.getcwd\), not only tensors"
    with pytest.raises(ValueError, match=refused) as info:
        load_checkpoint(path2)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


def test_keep_last_k(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, _state(step)[1], keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000040", "ckpt_0000050"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000040", "ckpt_0000050"]
    save_checkpoint(tmp_path, _state(50, seed=9)[1], keep_last=2)  # re-saving a step replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000040", "ckpt_0000050"]
    assert prune_checkpoints(tmp_path, 1)[0].name == "ckpt_0000040"
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, 0)


def _draws(gen):
    return (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
            torch.randn(3, generator=gen), torch.randint(0, 10, (4,)))


def test_rng_round_trip_resumes_identical_draws(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    gen = torch.Generator().manual_seed(4)
    _draws(gen)
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    _, st = _state(7)
    st.extra["rng"] = capture_rng_state({"noise": gen})
    save_checkpoint(tmp_path, st)
    uninterrupted = _draws(gen) + (np.random.randn(), random.gauss(0, 1))

    # "kill" and restart: scramble every generator, then restore from disk
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    gen2 = torch.Generator().manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path).extra["rng"], {"noise": gen2})
    resumed = _draws(gen2) + (np.random.randn(), random.gauss(0, 1))
    for a, b in zip(uninterrupted, resumed, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="no state for generator 'other'"):
        restore_rng_state(st.extra["rng"], {"other": torch.Generator()})


def test_unsafe_state_rejected_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['hist'\]: ndarray cannot be loaded with weights_only"):
        check_weights_only_safe({"hist": np.zeros(3)}, "extra")
    _, st = _state(1)
    st.extra["bad"] = {1, 2}
    with pytest.raises(TypeError, match="set cannot be loaded"):
        save_checkpoint(tmp_path, st)
    assert latest_checkpoint(tmp_path) is None and not any(tmp_path.iterdir())


def test_atomic_text_write(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [q.name for q in tmp_path.iterdir()] == ["a.txt"]
