"""Fixtures of the ``difflab serve`` tests: tiny trained runs (a class-conditional digits run with label
dropout, a GLIDE-style text inpainting run on the scenes, a two-stage digits cascade, a noisy classifier) and one
server on loopback serving them, started as ``python -m difflab serve ... --port 0`` in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "mnist-tiny.yaml"
INPAINT = ROOT / "configs" / "scenes-inpaint16.yaml"
QUICK = ["train.max_steps=4", "train.batch_size=16", "train.save_every=4", "train.log_every=2"]
DIGITS = ["data.class_cond=true", "model.num_classes=10", "model.class_null=true", "diffusion.p_uncond=0.3",
          "sample.steps=10", *QUICK]
SMALL_INPAINT = ["model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8",
                 "model.text.xf_width=16", "model.text.xf_layers=1", "train.batch_size=8", "train.max_steps=4",
                 "train.save_every=4", "train.log_every=2", "data.num_scenes=64", "diffusion.steps=100",
                 "sample.steps=5"]

pytest.importorskip("fastapi", reason="difflab serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="difflab serve needs the serve extra: pip install -e '.[serve]'")


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _train(config, out, extra):
    from difflab.cli import main

    assert main(["train", str(config), "--out", str(out), "--quiet", *_sets(extra)]) == 0


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    from difflab.data import float_to_uint8, load_digits8, uint8_to_float
    from difflab.images import save_npz

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve-runs")
    out = {"root": root, "digits": root / "digits", "scenes": root / "scenes"}
    _train(TINY, out["digits"], DIGITS)
    _train(INPAINT, out["scenes"], SMALL_INPAINT)
    out["clf"] = root / "clf"  # a noisy classifier on the same schedule (cosine, T = 100), offered as guidance
    _train(ROOT / "configs" / "digits-classifier.yaml", out["clf"], ["train.max_steps=4"])
    # a cascade 4x4 -> 8x8 of class-conditional digits (as tests/train/test_cascade.py)
    images, labels = load_digits8("train")
    small = torch.nn.functional.interpolate(uint8_to_float(images[..., None]), size=4, mode="area")
    save_npz(float_to_uint8(small), labels, root / "digits4.npz")
    cond = ["data.class_cond=true", "model.num_classes=10", "train.max_steps=2", "train.batch_size=8",
            "train.save_every=2"]
    _train(TINY, root / "base4", ["data.source=npz", f"data.path={root / 'digits4.npz'}", "data.split=null",
                                  "data.image_size=4", "model.image_size=4", *cond])
    _train(TINY, root / "sr8", [*cond, "data.low_res_size=4", "model.low_res_channels=1", "augment.kind=noise",
                                "augment.steps=100", "augment.schedule=cosine", "model.cond_dim=32"])
    out["cascade"] = root / "pipeline.cascade.yaml"
    out["cascade"].write_text(yaml.safe_dump({"n": 4, "batch": 4, "seed": 0, "stages": [
        {"run": "base4", "sampler": "ddim", "steps": 5}, {"run": "sr8", "sampler": "ddim", "steps": 5,
                                                          "aug_level": 20}]}))
    torch.set_num_threads(before)
    return out


def server_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


class Server:
    """``difflab serve`` in a subprocess; ``url`` is where it listens."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "difflab", "serve", *args, "--port", "0"],
                                     env=server_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"http://[^/\s]+/", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"difflab serve did not start: {line}{self.proc.stderr.read()}")
        self.url = match.group(0).rstrip("/")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture(scope="session")
def server(runs, tmp_path_factory):
    """One server for the API, browser and load tests (each checks what it changes, not absolute counts)."""
    work = tmp_path_factory.mktemp("serve-cwd")
    srv = Server([str(runs["digits"]), str(runs["scenes"]), str(runs["cascade"]), str(runs["clf"]), "--gallery",
                  str(work / "gallery")], cwd=work)
    srv.gallery = work / "gallery"
    yield srv
    srv.stop()
