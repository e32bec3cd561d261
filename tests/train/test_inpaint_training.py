"""GLIDE inpainting on the one trainer and through ``difflab inpaint``: each example's batch carries its mask and
masked image, the loss is finite, stop + resume equals an uninterrupted run (the masks included), the CLI keeps
the known region of the input image exactly (both rules, an MNIST run's padded frame too), and bad input is one
line and exit 2 with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import ROOT, TINY, sets, tree_hashes, weights

from difflab.cli import main
from difflab.config import load_config
from difflab.data.scenes import render_scene
from difflab.inpaint import random_masks
from difflab.train.metrics import read_metrics
from difflab.train.tasks.diffusion import DiffusionTask
from difflab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIG = ROOT / "configs" / "scenes-inpaint16.yaml"
SMALL = ["model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8", "model.text.xf_width=16",
         "model.text.xf_layers=1", "train.batch_size=8", "train.max_steps=4", "train.save_every=2",
         "train.log_every=1", "data.num_scenes=64", "diffusion.steps=100", "sample.steps=5"]
SCENE = render_scene("test", 0, 3)  # "a small red 7 in the bottom left"


def _cfg(*extra):
    return load_config(CONFIG, [*SMALL, *extra])


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    Trainer(_cfg(), root / "run", quiet=True).train()
    return root / "run"


@pytest.fixture
def files(tmp_path):
    keep = np.full((16, 16), 255, np.uint8)
    keep[8:16, 0:8] = 0  # fill in the digit's box (bottom left), keep the rest
    return {"image": _png(tmp_path / "scene.png", SCENE.image16), "mask": _png(tmp_path / "mask.png", keep),
            "keep": keep == 255}


def test_batches_carry_the_mask_and_the_masked_image():
    cfg = _cfg()
    task = DiffusionTask(cfg)
    assert "inpaint" in task.generator_names and cfg.model.inpaint and cfg.model.input_channels == 7
    source = task.build_source(rank=0, world=1, local_batch=8)
    batch = source.batch(0)
    gens = {name: torch.Generator().manual_seed(i) for i, name in enumerate(task.generator_names)}
    draws = task.draws(8, batch, gens)
    mask = draws["inpaint_mask"]
    assert mask.shape == (8, 1, 16, 16) and set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert 0 < float(mask.mean()) < 1 and len({m.numpy().tobytes() for m in mask}) == 8
    kw = task.model_kwargs(batch, draws)
    assert torch.equal(kw["inpaint_mask"], mask) and torch.equal(kw["inpaint_image"], batch["x0"] * mask)
    torch.manual_seed(0)
    model = task.build_model()
    seen = []
    model.input_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    loss = task.losses(model, batch, draws)["loss"]
    assert loss.shape == (8,) and bool(torch.isfinite(loss).all())
    # the first conv sees [x_t, x0 * mask, mask] (GLIDE's 7 channels)
    (h,) = seen
    assert h.shape == (8, 7, 16, 16)
    assert torch.equal(h[:, 3:6], batch["x0"] * mask) and torch.equal(h[:, 6:], mask)


def test_stop_and_resume_equals_uninterrupted(run, tmp_path):
    parts = tmp_path / "parts"
    assert Trainer(_cfg(), parts, quiet=True).train(max_steps=2).step == 2
    assert Trainer(_cfg(), parts, resume=True, quiet=True).train().step == 4
    a, b = weights(run), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(run / "metrics.jsonl")]
    assert rows == [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(parts / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)


def test_the_cli_keeps_the_known_region_of_the_image(run, files, tmp_path):
    keep = files["keep"]
    for rule in ("glide", "replace"):
        out = tmp_path / f"{rule}.npz"
        assert main(["inpaint", str(run), "--image", files["image"], "--mask", files["mask"], "--rule", rule,
                     "--prompt", SCENE.caption, "--n", "3", "--guidance", "1", "--npz", str(out), "--quiet"]) == 0
        images = np.load(out)["arr_0"]
        assert images.shape == (3, 16, 16, 3)
        err = images[:, keep].astype(float) - SCENE.image16[keep]
        assert not err.any()  # PSNR on the known region: infinite
        assert (images[:, ~keep] != SCENE.image16[~keep]).any()  # the filled region is drawn, not copied
    # the PNG grid holds the same pixels (1 image: 2-pixel black frame), and default names never overwrite
    grid = tmp_path / "one.png"
    assert main(["inpaint", str(run), "--image", files["image"], "--mask", files["mask"], "--prompt", "a large red 7",
                 "--out", str(grid), "--quiet"]) == 0
    png = np.array(Image.open(grid))[2:18, 2:18]
    assert np.array_equal(png[keep], SCENE.image16[keep])
    for _ in range(2):
        assert main(["inpaint", str(run), "--image", files["image"], "--mask", files["mask"], "--prompt", "a 7",
                     "--n", "1", "--quiet"]) == 0
    names = sorted(p.name for p in (run / "samples").glob("inpaint_*"))
    assert names == ["inpaint_glide_1_w2-2.npz", "inpaint_glide_1_w2-2.png", "inpaint_glide_1_w2.npz",
                     "inpaint_glide_1_w2.png"]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """An unconditional MNIST run in its 32x32 frame (the data padded from 28): no text, no inpainting input."""
    path = tmp_path_factory.mktemp("mnist") / "run"
    assert main(["train", str(TINY), "--out", str(path), "--quiet", *sets(
        "data.source=mnist5k", "data.image_size=32", "model.image_size=32", "train.batch_size=4",
        "train.max_steps=1", "train.save_every=1", "sample.steps=3")]) == 0
    return path


def test_replacement_inpaints_any_run_and_the_padded_frame_stays_known(mnist, tmp_path):
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255  # a "1"
    keep = np.full((28, 28), 255, np.uint8)
    keep[:, 14:] = 0
    out = tmp_path / "m.npz"
    assert main(["inpaint", str(mnist), "--image", _png(tmp_path / "d.png", digit), "--mask",
                 _png(tmp_path / "k.png", keep), "--n", "2", "--npz", str(out), "--quiet"]) == 0
    images = np.load(out)["arr_0"]
    assert images.shape == (2, 28, 28, 1)
    assert all(np.array_equal(im[keep == 255, 0], digit[keep == 255]) for im in images)
    # --invert-mask: the same file now says "fill in the left half"
    out2 = tmp_path / "inv.npz"
    assert main(["inpaint", str(mnist), "--image", str(tmp_path / "d.png"), "--mask", str(tmp_path / "k.png"),
                 "--invert-mask", "--n", "1", "--npz", str(out2), "--quiet"]) == 0
    assert np.array_equal(np.load(out2)["arr_0"][0, keep == 0, 0], digit[keep == 0])


def _fails(capsys, args, *needles):
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2, args
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


def test_bad_input_is_one_line_and_writes_nothing(run, mnist, files, tmp_path, capsys):
    before = tree_hashes(run), tree_hashes(mnist)
    image, mask = files["image"], files["mask"]
    grey = np.full((16, 16), 255, np.uint8)
    grey[0, 3] = 128
    rgba = np.dstack([np.full((16, 16, 3), 255, np.uint8), np.full((16, 16), 100, np.uint8)])
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 255
    bad = {
        "big": _png(tmp_path / "big.png", np.zeros((32, 32), np.uint8)),
        "grey": _png(tmp_path / "grey.png", grey),
        "colour": _png(tmp_path / "colour.png", colour),
        "white": _png(tmp_path / "white.png", np.full((16, 16), 255, np.uint8)),
        "clear": _png(tmp_path / "clear.png", rgba),
        "gray_image": _png(tmp_path / "gray_image.png", SCENE.image16[..., 0]),
        "big_image": _png(tmp_path / "big_image.png", SCENE.image32),
    }
    (tmp_path / "text.png").write_text("not an image")
    base = ["inpaint", run, "--prompt", SCENE.caption, "--quiet"]
    cases = [
        (["--image", image, "--mask", bad["big"]], "--mask", "is 32x32", "16x16"),
        (["--image", image, "--mask", bad["grey"]], "not black and white", "128 at row 0, column 3"),
        (["--image", image, "--mask", bad["colour"]], "has colours"),
        (["--image", image, "--mask", bad["white"]], "all white", "nothing to fill in"),
        (["--image", image, "--mask", bad["clear"]], "transparent"),
        (["--image", bad["gray_image"], "--mask", mask], "greyscale image", "RGB (3-channel)"),
        (["--image", bad["big_image"], "--mask", mask], "--image", "is 32x32"),
        (["--image", tmp_path / "none.png", "--mask", mask], "--image: file not found"),
        (["--image", image, "--mask", tmp_path / "text.png"], "not an image file"),
        (["--image", image, "--mask", mask, "--out", tmp_path / "x.jpg"], ".png"),
        (["--image", image, "--mask", mask, "--out", files["image"]], "already exists"),
    ]
    for extra, *needles in cases:
        _fails(capsys, [*base, *extra], *needles)
    _fails(capsys, ["inpaint", run, "--image", image, "--mask", mask, "--quiet"], "--prompt TEXT")
    digit, keep = np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)
    keep[:4] = 0
    args = ["inpaint", mnist, "--image", _png(tmp_path / "d.png", digit), "--mask", _png(tmp_path / "k.png", keep)]
    _fails(capsys, [*args, "--prompt", "a 7"], "not text-conditional")
    _fails(capsys, [*args, "--rule", "glide"], "--rule glide needs an inpainting run", "--rule replace")
    _fails(capsys, [*args[:3], image, *args[4:]], "--image", "is 16x16", "28x28")
    assert (tree_hashes(run), tree_hashes(mnist)) == before
    assert not list(tmp_path.glob("*.npz"))


def test_the_training_grid_inpaints_the_first_batch(tmp_path):
    cfg = _cfg("train.max_steps=1", "train.sample_every=1")
    trainer = Trainer(cfg, tmp_path / "g", quiet=True)
    trainer.train()
    grid = np.array(Image.open(tmp_path / "g" / "samples" / "step_0000001.png"))
    first = trainer.source.batch(0)["x0"][:8]
    keep = random_masks(range(8), 16)[:, 0].numpy() == 1
    truth = ((first.permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    tiles = np.stack([grid[2 + 18 * (i // 3):18 + 18 * (i // 3), 2 + 18 * (i % 3):18 + 18 * (i % 3)] for i in range(8)])
    # GLIDE's rule: the known pixels come back (float_to_uint8 truncates: within 1 of the image)
    assert np.abs(tiles[keep].astype(float) - truth[keep]).max() <= 1.0


@pytest.mark.slow
def test_the_benchmark_script_runs_and_resumes_in_miniature(tmp_path):
    """benchmarks/inpaint_scenes.py with tiny models (~1 min): both rules keep the known region exactly, the
    rows and files are there, and a second call with more minutes resumes the runs instead of retraining."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("inpaint_scenes", ROOT / "benchmarks" / "inpaint_scenes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = [a for s in SMALL if not s.startswith(("train.max_steps", "sample.steps")) for a in ("--set", s)]
    args = ["--n", "6", "--steps", "2", "--batch", "6", "--work", str(tmp_path / "w"), *small]
    assert bench.main(["--minutes", "0.05", "--out-dir", str(tmp_path / "r1"), *args]) == 0
    result = json.loads((tmp_path / "r1" / "inpaint.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    for method in ("glide (inpainting model)", "replace (plain text model)"):
        assert rows[method]["known_psnr_db"] is None and rows[method]["known_max_abs_err"] == 0.0
        assert rows[method]["kept_object_correct"] == rows["real scenes"]["kept_object_correct"]
    assert (tmp_path / "r1" / "inpaint.md").is_file() and (tmp_path / "r1" / "inpaint-grid.png").is_file()
    steps = {k: v["steps"] for k, v in result["trained"].items()}
    more = max(v["minutes"] for v in result["trained"].values()) + 0.05  # the minutes count start-up too
    assert bench.main(["--minutes", str(more), "--out-dir", str(tmp_path / "r2"), *args]) == 0
    again = json.loads((tmp_path / "r2" / "inpaint.json").read_text())["trained"]
    assert all(again[k]["steps"] > steps[k] and again[k]["minutes"] >= more for k in steps)
