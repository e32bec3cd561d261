"""The reliability sweep, by class: nothing overwritten, nothing changed on resume that shaped the checkpoint,
one line for every mistake. Each refusal: exit 2, exactly one stderr line, and every byte on disk as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from train_helpers import TINY, TINY_SET, sets, tree_hashes

from difflab.cli import main
from difflab.config import RESUME_CHANGEABLE

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run, a converted checkpoint folder and a folder of someone else's files."""
    root = tmp_path_factory.mktemp("sweep")
    run = root / "run"
    assert main(["train", str(TINY), "--out", str(run), "--max-steps", "4", "--quiet", *sets(*TINY_SET)]) == 0
    from difflab.nn.presets import build_network, get_preset

    pt = root / "official.pt"
    torch.manual_seed(0)
    torch.save(build_network(get_preset("mnist-tiny")).state_dict(), pt)
    converted = root / "converted"
    assert main(["convert", str(pt), "--preset", "mnist-tiny", "--out", str(converted)]) == 0
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not difflab's\n")
    a_file = root / "a_file.txt"
    a_file.write_text("keep me\n")
    return {"root": root, "run": run, "pt": pt, "converted": converted, "foreign": foreign, "file": a_file}


def refused(capsys, root, args, *needles):
    """``difflab ARGS`` exits 2 with one 'difflab: error:' line naming every needle; no byte under root changed."""
    before = tree_hashes(root)
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2, f"difflab {' '.join(map(str, args))} did not exit 2"
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), captured.err
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in: {err}"
    assert tree_hashes(root) == before
    return err


# ----------------------------------------------------------------------------------------- 1. never overwrite
def test_convert_never_writes_into_a_folder_it_did_not_start(world, capsys):
    for target in ("run", "converted", "foreign"):
        refused(capsys, world["root"], ["convert", world["pt"], "--preset", "mnist-tiny", "--out", world[target]],
                "--out", world[target], "already holds")
    refused(capsys, world["root"], ["convert", world["pt"], "--preset", "mnist-tiny", "--out", world["file"]],
            "is a file")


def test_train_never_writes_into_a_folder_it_did_not_start(world, capsys):
    train = ["train", TINY, "--quiet", "--max-steps", "2", "--out"]
    refused(capsys, world["root"], [*train, world["run"]], "already holds a run", "--resume")
    refused(capsys, world["root"], [*train, world["converted"]], "already holds a run")
    refused(capsys, world["root"], [*train, world["foreign"]], "notes.txt", "already holds")
    refused(capsys, world["root"], [*train, world["file"]], "is a file")


def test_sample_outputs_are_checked_before_sampling_and_never_overwritten(world, capsys, monkeypatch):
    import difflab.generate as generate

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started before the output names were checked")

    monkeypatch.setattr(generate, "draw_samples", no_sampling)
    run, root = world["run"], world["root"]
    refused(capsys, root, ["sample", run, "--n", "2", "--grid", world["foreign"]], "--grid", "is a folder")
    refused(capsys, root, ["sample", run, "--n", "2", "--npz", world["foreign"]], "--npz", "is a folder")
    png = world["foreign"] / "x.png"
    png.write_bytes(b"an earlier grid")
    refused(capsys, root, ["sample", run, "--n", "2", "--grid", png], "--grid", "already exists")
    refused(capsys, root, ["sample", run, "--n", "2", "--npz", world["file"] / "x.npz"], "is a file, not a folder")
    png.unlink()


def test_default_sample_names_never_replace_earlier_samples(world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for _ in range(2):
        assert main(["sample", str(run), "--n", "2", "--steps", "2", "--quiet"]) == 0
    names = sorted(p.name for p in (run / "samples").iterdir() if p.name.startswith("ancestral"))
    assert names == ["ancestral_2-2.npz", "ancestral_2-2.png", "ancestral_2.npz", "ancestral_2.png"]


# ------------------------------------------------------------------------------------- resume: what may change
@pytest.mark.parametrize("override,needles", [
    ("train.lr=.inf", ["train.lr", "finite", "from --set train.lr=.inf"]),
    ("train.lr=-1", ["train.lr", "> 0", "from --set train.lr=-1"]),
    ("diffusion.timestep_sampler=loss_second_moment", ["diffusion.timestep_sampler", "cannot change on resume"]),
    ("model.model_channels=24", ["model.model_channels", "cannot change on resume", "train.max_steps"]),
    ("train.seed=3", ["train.seed", "cannot change on resume"]),
    ("data.random_flip=true", ["data.random_flip", "cannot change on resume"]),
])
def test_resume_refuses_what_shaped_the_checkpoint(world, capsys, override, needles):
    refused(capsys, world["root"], ["train", "--resume", world["run"], "--quiet", "--set", override], *needles)


def test_resume_takes_the_changeable_keys(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert "train.log_every" in RESUME_CHANGEABLE and "sample." in RESUME_CHANGEABLE
    assert main(["train", "--resume", str(run), "--quiet", "--max-steps", "6",
                 *sets("train.log_every=1", "sample.steps=7", "train.keep_last=3")]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["train"]["log_every"], saved["sample"]["steps"]) == (6, 1, 7)


def test_a_hand_edited_timestep_sampler_is_refused_at_load(world, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["diffusion"]["timestep_sampler"] = "loss_second_moment"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    refused(capsys, tmp_path, ["train", "--resume", run, "--quiet", "--max-steps", "6"],
            "timestep_sampler=uniform")


# ------------------------------------------------------------------------------------- 3. one line, every time
def test_bad_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1.0e-3\n  batch_size: [16\n")
    err = refused(capsys, tmp_path, ["train", bad, "--out", tmp_path / "r"], bad, "line 4", "not valid YAML")
    assert "<unicode string>" not in err
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("# caf\u00e9\ntrain:\n  lr: 1.0e-3\n".encode("latin-1"))
    refused(capsys, tmp_path, ["train", latin, "--out", tmp_path / "r"], latin, "line 1", "not UTF-8")
    cascade = tmp_path / "c.yaml"
    cascade.write_text("stages:\n  - run: a\n   bad: indent\n")
    refused(capsys, tmp_path, ["sample", cascade], "line 3")


def test_set_errors_name_the_override_not_the_file(tmp_path, capsys):
    err = refused(capsys, tmp_path, ["train", TINY, "--out", tmp_path / "r", "--set", "train.batch_size=0"],
                  "train.batch_size", "from --set train.batch_size=0")
    assert "mnist-tiny.yaml" not in err
    refused(capsys, tmp_path, ["train", TINY, "--out", tmp_path / "r", "--set", "sample.eta=-1"],
            "from --set sample.eta=-1")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,needles", [
    ([], ["required: COMMAND", "see 'difflab --help'"]),
    (["trian"], ["invalid choice: 'trian'", "'train'"]),
    (["train", "--max-steps", "ten"], ["--max-steps", "'ten'", "see 'difflab train --help'"]),
    (["sample"], ["RUN", "see 'difflab sample --help'"]),
    (["sample", "x", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["nll", "x", "--split", "val"], ["invalid choice: 'val'"]),
    (["data"], ["ACTION"]),
])
def test_argparse_mistakes_are_one_line_with_a_hint(tmp_path, capsys, args, needles):
    before = tree_hashes(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "usage:" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert tree_hashes(tmp_path) == before


def test_refused_pickles_say_what_and_never_how_to_allow_them(tmp_path, capsys):
    import argparse

    pt = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": argparse.Namespace(a=1)}, pt)
    objects = tmp_path / "objects.npz"
    np.savez(objects, arr_0=np.array([{"a": 1}], dtype=object))
    for args, what in ((["convert", pt, "--preset", "mnist-tiny", "--out", tmp_path / "o"], "argparse.Namespace"),
                       (["eval", objects], "object arrays")):
        err = refused(capsys, tmp_path, args, what)
        for advice in ("weights_only=False", "allow_pickle", "trust"):
            assert advice not in err
