"""Nothing is used that fails its own check: sample and nll verify the weights they load against the
checkpoint's manifest (sha256), fall back to the newest good checkpoint with one warning naming both, or
stop with one line when the bad checkpoint was asked for by name (issue: 'never use what fails its check')."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from train_helpers import TINY, TINY_SET, difflab_cmd, run_cli, sets, subprocess_env, tree_hashes

from difflab.build import load_run
from difflab.train.checkpoint import list_checkpoints, load_weights

pytestmark = pytest.mark.usefixtures("single_thread")


def _flip_one_byte(path):
    """Change a byte inside the tensor data (not the header): the size is kept, only the sha256 differs."""
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def run(tmp_path):
    out = tmp_path / "run"
    run_cli("train", str(TINY), "--out", str(out), "--max-steps", "8", "--quiet", *sets(*TINY_SET))
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_0000004", "ckpt_0000008"]
    return out


def test_a_corrupt_latest_ema_falls_back_to_the_newest_good_checkpoint(run, tmp_path):
    good = load_weights(run / "ckpt_0000004", "ema_0.99")
    _flip_one_byte(run / "ckpt_0000008" / "ema_0.99.safetensors")
    with pytest.warns(UserWarning, match=r"ckpt_0000008/ema_0\.99\.safetensors: corrupt .*instead: .*ckpt_0000004"):
        _, net, _ = load_run(run, ema=0.99)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in good.items())
    # through the CLI: exit 0, exactly one warning line naming both checkpoints, images written
    npz = tmp_path / "s.npz"
    p = subprocess.run(difflab_cmd("sample", str(run), "--n", "2", "--steps", "2", "--npz", str(npz), "--quiet"),
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflab: warning: ") and "ckpt_0000004" in lines[0], p.stderr
    assert np.load(npz)["arr_0"].shape == (2, 8, 8, 1)


def test_a_corrupt_file_asked_for_by_name_is_one_line_and_nothing_written(run, tmp_path):
    _flip_one_byte(run / "ckpt_0000008" / "model.safetensors")
    before = tree_hashes(run)
    pick = ["--checkpoint", "8", "--ema", "model"]
    for cmd in (["sample", str(run), *pick, "--n", "2", "--npz", str(tmp_path / "x.npz")],
                ["nll", str(run), *pick, "--n", "2", "--steps", "2"]):
        p = subprocess.run(difflab_cmd(*cmd), env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (cmd, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "model.safetensors: corrupt (sha256" in lines[0], p.stderr
    assert tree_hashes(run) == before and not (tmp_path / "x.npz").exists()


def test_every_checkpoint_bad_is_an_error(run):
    for ckpt in ("ckpt_0000004", "ckpt_0000008"):
        _flip_one_byte(run / ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"ckpt_0000008/model\.safetensors: corrupt"):
        load_run(run)
