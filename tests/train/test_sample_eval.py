"""`difflab eval` sharded under torchrun, and `difflab sample --eval` (sample, then evaluate in one go)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import ROOT, TINY, sets, subprocess_env

from difflab.cli import main
from difflab.data import load_mnist5k

pytestmark = pytest.mark.usefixtures("single_thread")

# The MNIST features take 28x28 images: the tiny preset on MNIST-5k at 28x28 (28 -> 14), class-conditional
# (so the JSON has an accuracy), two steps of batch 8: an untrained model, which is all these tests need.
MICRO_28 = ["data.source=mnist5k", "data.image_size=28", "model.image_size=28", "data.class_cond=true",
            "model.num_classes=10", "train.batch_size=8", "train.max_steps=2", "train.save_every=2",
            "train.log_every=2"]
SAMPLE = ["--num-samples", "12", "--batch", "6", "--steps", "2", "--quiet"]


def _json(text: str) -> dict:
    """The JSON object at the end of a command's stdout (after any 'wrote ...' lines)."""
    return json.loads(text[text.index("{"):])


def _close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, float):
            assert value == pytest.approx(b[key], rel=rel, abs=1e-12), key
        else:
            assert value == b[key], key


def test_torchrun_sharded_eval_equals_one_process(tmp_path, capsys):
    # 301 real digits (odd: the ranks get 151 and 150) against the named reference and against an
    # images .npz reference (both sharded too)
    images, labels = load_mnist5k("train")
    idx = np.random.default_rng(0).choice(len(images), 301, replace=False)
    np.savez(tmp_path / "s.npz", arr_0=images[idx, :, :, None], arr_1=labels[idx])
    np.savez(tmp_path / "ref.npz", arr_0=images[:200, :, :, None])
    for extra in ([], ["--ref", str(tmp_path / "ref.npz")]):
        args = ["eval", str(tmp_path / "s.npz"), *extra]
        # one job per torchrun: a second process group on the same torchrun store can hang
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "difflab", *args]
        p = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-4000:]
        assert p.stdout.count("{") == 1, f"expected one JSON object (rank 0 only):\n{p.stdout}"
        assert main(args) == 0
        single = json.loads(capsys.readouterr().out)
        assert single["n"] == 301 and single["accuracy"] > 0.97 and 0 < single["recall"] < 1, extra
        _close(json.loads(p.stdout), single, rel=1e-6)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sample_eval") / "run"
    assert main(["train", str(TINY), "--out", str(run), "--quiet", *sets(*MICRO_28)]) == 0
    return run


def test_sample_eval_prints_the_metrics_of_the_written_npz(micro_run, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    with pytest.warns(UserWarning, match="singular"):  # 12 samples, 128-d features
        assert main(["sample", str(micro_run), *SAMPLE, "--npz", str(npz), "--eval"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {npz}\n{{")
    metrics = _json(out)
    with pytest.warns(UserWarning, match="singular"):
        assert main(["eval", str(npz)]) == 0
    _close(metrics, json.loads(capsys.readouterr().out), rel=1e-9)
    assert metrics["n"] == 12 and metrics["ref"] == "mnist5k-test" and "accuracy" in metrics  # labels: 0..9, 0, 1

    # no --grid / --npz: the default files, as without --eval
    with pytest.warns(UserWarning, match="singular"):
        assert main(["sample", str(micro_run), *SAMPLE, "--eval", "--ref", "mnist5k-train"]) == 0
    out = capsys.readouterr().out
    written = [line.removeprefix("wrote ") for line in out.splitlines() if line.startswith("wrote ")]
    assert [p.rsplit("/", 1)[1] for p in written] == ["ancestral_12.png", "ancestral_12.npz"]
    assert _json(out)["ref"] == "mnist5k-train"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sample_eval") / "digits"
    assert main(["train", str(TINY), "--out", str(run), "--quiet", "--max-steps", "1",
                 *sets("train.batch_size=8", "train.save_every=1")]) == 0
    return run


@pytest.mark.parametrize("run, args, needle", [
    ("micro_run", ["--features", "inception"], "--inception-weights"),
    ("micro_run", ["--ref", "mnist-test"], "one of mnist5k-test, mnist5k-train or"),
    ("micro_run", ["--ref", "nope.npz"], "reference file not found"),
    ("digits_run", [], "28x28 or 32x32"),  # 8x8 samples in MNIST features
    ("micro_run", ["--ref", "mnist5k-test"], "--ref: only used with --eval"),  # without --eval
], ids=["noweights", "refname", "refmissing", "size", "noeval"])
def test_sample_eval_bad_input_fails_before_sampling(request, monkeypatch, tmp_path, capsys, run, args, needle):
    import difflab.generate

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled despite bad input")

    monkeypatch.setattr(difflab.generate, "draw_samples", no_sampling)
    run = request.getfixturevalue(run)
    npz, grid = tmp_path / "s.npz", tmp_path / "g.png"
    evaluate = [] if needle.endswith("--eval") else ["--eval"]
    before = sorted(p.name for p in run.rglob("*"))
    assert main(["sample", str(run), *SAMPLE, "--npz", str(npz), "--grid", str(grid), *evaluate, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: ") and needle in err, err
    assert not npz.exists() and not grid.exists() and sorted(p.name for p in run.rglob("*")) == before
