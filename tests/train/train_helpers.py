"""Helpers shared by the trainer tests: the tiny config, CLI calls in a subprocess, run-folder reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "mnist-tiny.yaml"
# 8x8 digits, batch 16, a line every 2 steps, a checkpoint every 4
TINY_SET = ["train.batch_size=16", "train.log_every=2", "train.save_every=4", "train.keep_last=2"]


def sets(*items: str) -> list[str]:
    """``--set`` arguments for the CLI."""
    return [a for item in items for a in ("--set", item)]


def subprocess_env() -> dict[str, str]:
    """One thread per process (the machine is shared; results must not depend on thread counts)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def difflab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "difflab", *args]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m difflab ARGS`` in a single-threaded subprocess; fails the test on a non-zero exit."""
    p = subprocess.run(difflab_cmd(*args), env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    assert p.returncode == 0, f"difflab {' '.join(args)} failed:\n{p.stderr[-3000:]}"
    return p


def weights(run: Path, which: str = "model") -> dict:
    """A set of weights of a run's latest checkpoint."""
    from difflab.train.checkpoint import latest_checkpoint

    return safetensors.torch.load_file(latest_checkpoint(run) / f"{which}.safetensors")


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to show that nothing was changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait until ``path`` exists while ``proc`` runs (fail if it ends first or the time runs out)."""
    import time

    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path.name} appeared:\n{proc.stderr.read()}"
        assert time.monotonic() < end, f"{path.name} did not appear"
        time.sleep(0.02)


def torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> None:
    """``torchrun --standalone --nproc_per_node N -m difflab ARGS`` (gloo on the CPU), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "difflab", *args]
    p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, f"torchrun difflab {' '.join(args)} failed:\n{p.stderr[-4000:]}"


def train_killed_at(path: Path, *args: str) -> None:
    """``difflab train ARGS`` in a subprocess, SIGKILLed as soon as ``path`` exists (a checkpoint's manifest,
    the run's config.yaml): a crash at that point of the run."""
    import signal

    proc = subprocess.Popen(difflab_cmd("train", *args), env=subprocess_env(), stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        wait_for(path, proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
