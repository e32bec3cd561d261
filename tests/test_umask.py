"""Every file and folder difflab writes honours the umask (issue 12, item 6).

Atomic writes used to go through ``tempfile.mkstemp``, which creates 0o600 files whatever the umask:
other users could not read a run's results. Each case sets a umask and checks the exact mode bits
(0o666 & ~umask for files, 0o777 & ~umask for folders), as ``open(path, "w")`` / ``mkdir`` give them.
"""

import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difflab.config import Config, save_config
from difflab.fileio import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_with,
    honour_umask,
    make_temp_file,
    new_file_mode,
)
from difflab.train.checkpoint import TrainingState, save_checkpoint

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")

UMASKS = [0o022, 0o027, 0o002, 0o077]


@pytest.fixture(params=UMASKS, ids=[f"umask{u:03o}" for u in UMASKS])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    atomic_write_bytes(tmp_path / "a.bin", b"abc")
    atomic_write_text(tmp_path / "b.txt", "abc")
    atomic_write_with(tmp_path / "c.safetensors", lambda p: save_file({"w": torch.zeros(2)}, str(p)))
    atomic_write_with(tmp_path / "d.npz", lambda p: np.savez(open(p, "wb"), arr_0=np.zeros(2)))
    with atomic_path(tmp_path / "e.pt") as tmp:
        torch.save({"w": torch.ones(1)}, tmp)
    for name in ("a.bin", "b.txt", "c.safetensors", "d.npz", "e.pt"):
        assert mode(tmp_path / name) == want, (name, oct(mode(tmp_path / name)), oct(want))
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_replacing_a_file_gives_the_umask_mode(tmp_path, umask):
    """A 0o600 file left by an older difflab is replaced by one with the umask's mode."""
    path = tmp_path / "config.yaml"
    path.write_text("old")
    os.chmod(path, 0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o666 & ~umask


def test_make_temp_file_is_new_empty_and_umasked(tmp_path, umask):
    paths = {make_temp_file(tmp_path, ".tmp-x.") for _ in range(20)}
    assert len(paths) == 20
    for p in paths:
        assert p.parent == tmp_path and p.name.startswith(".tmp-x.") and p.stat().st_size == 0
        assert mode(p) == 0o666 & ~umask


def test_config_and_checkpoint_files_honour_the_umask(tmp_path, umask):
    save_config(Config(model={"preset": "mnist-tiny"}), tmp_path / "config.yaml")
    assert mode(tmp_path / "config.yaml") == 0o666 & ~umask
    state = TrainingState(step=3, model={"w": torch.arange(4.0)}, ema={0.9: {"w": torch.zeros(4)}},
                          optimizer={"state": {}, "param_groups": []}, extra={"k": 1})
    ckpt = save_checkpoint(tmp_path / "run", state)
    assert mode(tmp_path / "run") == 0o777 & ~umask
    assert mode(ckpt) == 0o777 & ~umask
    files = sorted(p for p in ckpt.iterdir())
    assert files, "the checkpoint holds files"
    for p in files:
        assert mode(p) == 0o666 & ~umask, (p.name, oct(mode(p)))


def test_new_file_mode_reads_the_umask_without_changing_it(tmp_path, umask):
    open(tmp_path / "plain", "w").close()
    assert new_file_mode() == mode(tmp_path / "plain") == 0o666 & ~umask
    assert os.umask(umask) == umask  # unchanged by the call


def test_honour_umask_resets_a_private_file(tmp_path, umask):
    p = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(3)}, str(p))  # safetensors 0.8 writes 0o600 whatever the umask
    honour_umask(p)
    assert mode(p) == 0o666 & ~umask
