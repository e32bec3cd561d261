"""Bad input to train / sample / nll / info: one line on stderr, exit 2, and nothing already written lost."""

from __future__ import annotations

import pytest
from PIL import Image
from train_helpers import TINY, TINY_SET, sets, tree_hashes

from difflab.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (checkpoints at steps 4 and 6)."""
    run = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", str(TINY), "--out", str(run), "--max-steps", "6", "--quiet", *sets(*TINY_SET)]) == 0
    return run


def _fails(capsys, args, *needles):
    """Run the CLI; check exit 2, one stderr line starting 'difflab: error:' containing every needle."""
    capsys.readouterr()
    assert main(args) == 2, f"difflab {' '.join(map(str, args))} did not exit 2"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def test_missing_run_folder(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    for cmd in (["sample", missing], ["nll", missing], ["info", missing], ["train", "--resume", missing]):
        _fails(capsys, cmd, "not found", "nope")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    _fails(capsys, ["sample", str(not_a_run)], "config.yaml")


def test_bad_config_values_and_keys(trained, tmp_path, capsys):
    before = tree_hashes(trained)
    out = str(tmp_path / "new")
    _fails(capsys, ["train", str(TINY), "--out", out, "--set", "train.lrr=1"], "train.lrr", "did you mean 'train.lr'")
    _fails(capsys, ["train", str(TINY), "--out", out, "--max-steps", "-5"], "train.max_steps", ">= 0")
    _fails(capsys, ["train", str(TINY), "--out", out, "--max-minutes", "-1"], "max_minutes")
    _fails(capsys, ["train", str(TINY), "--out", out, "--set", "diffusion.schedule=cosin"], "'linear', 'cosine'")
    _fails(capsys, ["train", str(tmp_path / "missing.yaml")], "config file not found")
    _fails(capsys, ["train", str(TINY), "--out", str(trained)], "already holds a run", "--resume")
    _fails(capsys, ["sample", str(trained), "--steps", "-1"], "steps", "[1, 100]")
    _fails(capsys, ["sample", str(trained), "--n", "0"], "n must be >= 1")
    _fails(capsys, ["sample", str(trained), "--sampler", "euler-a"], "unknown sampler", "ancestral")
    _fails(capsys, ["sample", str(trained), "--ema", "0.5"], "no EMA at rate 0.5", "0.99")
    _fails(capsys, ["sample", str(trained), "--label", "3"], "class-conditional")
    _fails(capsys, ["sample", str(trained), "--grid", str(tmp_path / "g.jpg")], ".png")
    _fails(capsys, ["sample", str(trained), "--checkpoint", "5"], "no checkpoint for step 5", "ckpt_0000004")
    _fails(capsys, ["nll", str(trained), "--n", "100000"], "n must be in [1, 355]")
    _fails(capsys, ["nll", str(trained), "--steps", "0"], "steps")
    assert not (tmp_path / "new").exists()
    assert tree_hashes(trained) == before


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    model = run / "ckpt_0000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    before = tree_hashes(run)
    _fails(capsys, ["sample", str(run), "--checkpoint", "6"], "ckpt_0000006", "model.safetensors", "corrupt")
    older = run / "ckpt_0000004" / "model.safetensors"
    older.write_bytes(older.read_bytes()[:1000])
    before = tree_hashes(run)
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        _fails(capsys, ["sample", str(run)], "no complete checkpoint")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        _fails(capsys, ["train", "--resume", str(run)], "no complete checkpoint")
    assert tree_hashes(run) == before  # nothing deleted, nothing rewritten


def test_weights_that_do_not_fit_the_config(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "changed"
    shutil.copytree(trained, run)
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("model_channels: 16", "model_channels: 32"))
    before = tree_hashes(run)
    _fails(capsys, ["sample", str(run)], "does not fit the configured network", "wrong shape")
    _fails(capsys, ["train", "--resume", str(run)], "does not fit the configured network")
    assert tree_hashes(run) == before


def test_image_folder_with_a_broken_file(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder_set = ["data.source=folder", f"data.path={folder}", "data.split=null", "data.on_broken=raise",
                  "train.batch_size=2"]
    out = tmp_path / "run"
    _fails(capsys, ["train", str(TINY), "--out", str(out), *sets(*TINY_SET, *folder_set)], "broken.png")
    assert not out.exists()
    # the default skips it with a warning and trains on the 4 good images
    skip = [s for s in folder_set if not s.startswith("data.on_broken")]
    with pytest.warns(UserWarning, match="broken.png"):
        code = main(["train", str(TINY), "--out", str(out), "--max-steps", "2", "--quiet", *sets(*TINY_SET, *skip)])
    assert code == 0
