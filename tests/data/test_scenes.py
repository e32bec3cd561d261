"""Captioned MNIST scenes: the BENCHMARKS.md spec checked case by case, against an independent reading of it."""

import numpy as np
import pytest
import torch

from difflab.config import DataConfig
from difflab.data import build_dataset, load_mnist5k
from difflab.data.scenes import (
    BOXES,
    COLOURS,
    NUMBER_WORDS,
    PALETTE,
    SceneDataset,
    box_slices,
    describe_scene,
    describe_scenes,
    parse_caption,
    reference_captions,
    reference_scenes,
    render_scene,
    render_scenes,
    write_prompt_list,
)

# The spec's tables, written out again here (not imported) so that a change of either is caught.
SPEC_RGB = {"red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200), "yellow": (255, 225, 25),
            "magenta": (240, 50, 230), "white": (255, 255, 255)}
SPEC_SMALL = {"top left": (0, 0), "top right": (16, 0), "bottom left": (0, 16), "bottom right": (16, 16)}


def spec_draws(split, seed, index):
    """The draw order of BENCHMARKS.md, step by step: (layout, [(digit, k, colour, word), ...], quadrant)."""
    rng = np.random.default_rng(np.random.SeedSequence([{"train": 0, "test": 1}[split], seed, index]))
    layout = int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))
    quadrant = int(rng.integers(4)) if layout == 0 else None
    n = 400 if split == "train" else 100
    objs = []
    for _ in range(2 if layout >= 2 else 1):
        objs.append((int(rng.integers(10)), int(rng.integers(n)), int(rng.integers(6)), bool(rng.random() < 0.5)))
    return layout, objs, quadrant


def spec_canvas(split, layout, objs, quadrant):
    """The 64x64 render by the spec's pixel rule, one object at a time."""
    images, labels = load_mnist5k(split)
    if layout == 0:
        corners, side = [list(SPEC_SMALL.values())[quadrant]], 16
    elif layout == 1:
        corners, side = [(2, 2)], 28
    elif layout == 2:
        corners, side = [(0, 8), (16, 8)], 16
    else:
        corners, side = [(8, 0), (8, 16)], 16
    canvas = np.zeros((64, 64, 3), dtype=np.uint8)
    for (digit, k, colour, _), (x, y) in zip(objs, corners, strict=True):
        stroke = images[labels == digit][k] / 255
        a = torch.nn.functional.interpolate(torch.tensor(stroke)[None, None], size=(2 * side, 2 * side),
                                            mode="bilinear", align_corners=False)[0, 0].numpy().clip(0, 1)
        rgb = np.array(list(SPEC_RGB.values())[colour], dtype=np.float64)
        canvas[2 * y:2 * (y + side), 2 * x:2 * (x + side)] = np.rint(a[..., None] * rgb).astype(np.uint8)
    return canvas


def block_mean(img, f):
    """Block means by an explicit loop over the blocks (not a reshape)."""
    s = img.shape[0] // f
    out = np.zeros((s, s, 3), dtype=np.uint8)
    for i in range(s):
        for j in range(s):
            out[i, j] = np.rint(img[i * f:(i + 1) * f, j * f:(j + 1) * f].astype(np.float64).mean(axis=(0, 1)))
    return out


@pytest.mark.parametrize("split,seed,index", [("test", 0, 0), ("test", 0, 1), ("train", 0, 7), ("train", 3, 12345),
                                              ("test", 5, 999), ("train", 0, 2)])
def test_draws_and_pixels_follow_the_spec(split, seed, index):
    layout, objs, quadrant = spec_draws(split, seed, index)
    scene = render_scene(split, seed, index)
    assert scene.layout == ("one_small", "one_large", "side_by_side", "stacked")[layout]
    assert [(o.digit, o.mnist_index, COLOURS.index(o.colour), o.word) for o in scene.objects] == objs
    assert np.array_equal(scene.image64, spec_canvas(split, layout, objs, quadrant))
    assert np.array_equal(scene.image32, block_mean(scene.image64, 2))
    assert np.array_equal(scene.image16, block_mean(scene.image64, 4))
    assert scene.image64.dtype == np.uint8 and scene.image32.shape == (32, 32, 3) and scene.image16.shape == (16, 16, 3)


def test_deterministic_and_distinct():
    a, b = render_scene("train", 0, 11), render_scene("train", 0, 11)
    assert a.caption == b.caption and np.array_equal(a.image64, b.image64)
    batch = render_scenes("train", 0, np.arange(40))
    other_seed = render_scenes("train", 1, np.arange(40))
    other_split = render_scenes("test", 0, np.arange(40))
    assert batch.captions != other_seed.captions and batch.captions != other_split.captions
    # vectorised rendering = one scene at a time
    for i in (0, 11, 39):
        s = render_scene("train", 0, i)
        assert batch.captions[i] == s.caption
        for size in (64, 32, 16):
            assert np.array_equal(batch.images[size][i], s.image(size))


def _expected_caption(layout, objs, quadrant):
    def phrase(o):
        digit, _, colour, word = o
        return f"{COLOURS[colour]} {NUMBER_WORDS[digit] if word else digit}"

    if layout == 0:
        return f"a small {phrase(objs[0])} in the {list(SPEC_SMALL)[quadrant]}"
    if layout == 1:
        return f"a large {phrase(objs[0])}"
    if layout == 2:
        return f"a {phrase(objs[0])} on the left and a {phrase(objs[1])} on the right"
    return f"a {phrase(objs[0])} at the top and a {phrase(objs[1])} at the bottom"


def test_captions_name_the_attributes():
    for i in range(300):
        layout, objs, quadrant = spec_draws("test", 0, i)
        d = describe_scene("test", 0, i)
        assert d.caption == _expected_caption(layout, objs, quadrant)
        assert d.caption == d.caption.lower() and "  " not in d.caption and d.caption.isascii()
        for o in d.objects:
            assert (NUMBER_WORDS[o.digit] if o.word else str(o.digit)) in d.caption.split()
            assert o.box[:2] == BOXES[o.position] and o.box[2] == {"small": 16, "large": 28}[o.size]
        assert parse_caption(d.caption)[0] == d.layout
        parsed = parse_caption(d.caption)[1]
        assert [(o.digit, o.colour, o.box, o.word) for o in parsed] == [(o.digit, o.colour, o.box, o.word)
                                                                         for o in d.objects]


def test_layout_word_and_colour_frequencies():
    ds = describe_scenes("train", 0, np.arange(4000))
    n = len(ds)
    layouts = np.array([["one_small", "one_large", "side_by_side", "stacked"].index(d.layout) for d in ds])
    freq = np.bincount(layouts, minlength=4) / n
    for f, p in zip(freq, [0.4, 0.2, 0.2, 0.2], strict=True):
        assert abs(f - p) < 4 * np.sqrt(p * (1 - p) / n)  # 4 sigma: ~0.03 / 0.025
    objs = [o for d in ds for o in d.objects]
    words = np.mean([o.word for o in objs])
    assert abs(words - 0.5) < 4 * np.sqrt(0.25 / len(objs))
    colours = np.bincount([COLOURS.index(o.colour) for o in objs], minlength=6) / len(objs)
    digits = np.bincount([o.digit for o in objs], minlength=10) / len(objs)
    assert np.abs(colours - 1 / 6).max() < 0.03 and np.abs(digits - 0.1).max() < 0.025
    quadrants = [d.objects[0].position for d in ds if d.layout == "one_small"]
    assert {q: quadrants.count(q) for q in SPEC_SMALL} == pytest.approx({q: len(quadrants) / 4 for q in SPEC_SMALL},
                                                                        rel=0.15)
    assert max(o.mnist_index for o in objs) == 399 and min(o.mnist_index for o in objs) == 0


def test_pixels_inside_boxes_carry_the_colour_and_outside_are_black():
    batch = render_scenes("test", 0, np.arange(200))
    rgb = {c: np.array(v, dtype=np.float64) for c, v in SPEC_RGB.items()}
    for i, d in enumerate(batch.descriptions):
        for size in (64, 32, 16):
            img = batch.images[size][i].astype(np.float64)
            outside = np.ones(img.shape[:2], dtype=bool)
            for o in d.objects:
                r, c = box_slices(o.box, size)
                outside[r, c] = False
                px = img[r, c].reshape(-1, 3)
                bright = px[px.max(1) >= 48]  # a quarter of the dimmest colour's peak (blue: 200)
                assert len(bright) >= 3
                # every bright pixel is a scaled palette colour: a * RGB up to rounding
                col = rgb[o.colour]
                scale = bright @ col / (col @ col)
                assert np.abs(bright - scale[:, None] * col).max() <= 1.5
                # and its nearest palette colour (after scaling) is the object's
                dists = {n: np.abs(bright - (bright @ v / (v @ v))[:, None] * v).max(1) for n, v in rgb.items()}
                nearest = np.array(list(dists.values())).argmin(0)
                assert (nearest == list(rgb).index(o.colour)).all()
            assert img[outside].max(initial=0) == 0


def test_strokes_are_the_named_mnist_digits():
    """Attributes match pixels: a box's stroke divided by its colour is the named MNIST image resized."""
    images, labels = load_mnist5k("test")
    for i in (3, 4, 6):
        s = render_scene("test", 0, i)
        for o in s.objects:
            r, c = box_slices(o.box, 64)
            a_img = s.image64[r, c].max(-1) / max(PALETTE[o.colour])
            mnist = images[labels == o.digit][o.mnist_index] / 255
            a_ref = torch.nn.functional.interpolate(torch.tensor(mnist)[None, None], size=a_img.shape,
                                                    mode="bilinear", align_corners=False)[0, 0].numpy()
            assert np.abs(a_img - a_ref.clip(0, 1)).max() <= 0.5 / max(PALETTE[o.colour]) + 1e-12


def test_large_digit_box_corner():
    d = next(describe_scene("test", 0, i) for i in range(50) if describe_scene("test", 0, i).layout == "one_large")
    s = render_scene("test", 0, d.index)
    rows, cols = np.nonzero(s.image64.max(-1))
    assert rows.min() >= 4 and cols.min() >= 4 and rows.max() < 60 and cols.max() < 60


def test_scene_dataset_items_and_cache():
    ds = SceneDataset("test", seed=0, num_scenes=50, image_size=32)
    assert len(ds) == 50 and ds.channels == 3 and ds.num_classes == 10
    items = ds.get_items([3, 0, 3, -1], epoch=5)
    assert items["x0"].shape == (4, 3, 32, 32) and items["x0"].dtype == torch.float32
    assert items["x0"].min() >= -1 and items["x0"].max() <= 1 and items["x0"].min() == -1
    assert items["caption"] == [describe_scene("test", 0, i).caption for i in (3, 0, 3, 49)]
    assert items["y"].tolist() == [describe_scene("test", 0, i).objects[0].digit for i in (3, 0, 3, 49)]
    ref = render_scenes("test", 0, [3, 0, 3, 49]).images[32]
    assert np.array_equal(((items["x0"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), ref)
    assert ds._done.sum() == 3  # rendered once each, kept
    again = ds.get_items([3, 0, 3, -1])
    assert torch.equal(again["x0"], items["x0"])
    x, y = ds[3]
    assert torch.equal(x, items["x0"][0]) and y == items["y"][0]
    assert ds.attributes(3) == describe_scene("test", 0, 3)
    for size in (16, 64):
        small = SceneDataset("test", num_scenes=5, image_size=size).get_items([1])["x0"]
        assert small.shape == (1, 3, size, size)
        assert np.array_equal(((small[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(),
                              render_scene("test", 0, 1).image(size))
    with pytest.raises(IndexError):
        ds.get_items([50])


def test_scene_dataset_bad_input():
    with pytest.raises(ValueError, match="64, 32 or 16"):
        SceneDataset("train", image_size=28)
    with pytest.raises(ValueError, match="random_flip is not allowed"):
        SceneDataset("train", random_flip=True)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        SceneDataset("all")


def test_build_dataset_scenes():
    ds = build_dataset(DataConfig(source="scenes", image_size=16, split="test", scene_seed=2))
    assert isinstance(ds, SceneDataset) and len(ds) == 1000 and ds.seed == 2 and ds.image_size == 16
    assert len(build_dataset(DataConfig(source="scenes"))) == 20_000
    assert len(build_dataset(DataConfig(source="scenes", num_scenes=123))) == 123
    with pytest.raises(ValueError, match="valid for source 'scenes': 64, 32, 16"):
        build_dataset(DataConfig(source="scenes", image_size=28))
    with pytest.raises(ValueError, match="random_flip"):
        build_dataset(DataConfig(source="scenes", random_flip=True))
    with pytest.raises(ValueError, match="split='all'"):
        build_dataset(DataConfig(source="scenes", split="all"))
    with pytest.raises(ValueError, match="RGB"):
        build_dataset(DataConfig(source="scenes", channels=1))


def test_reference_set_and_prompt_list(tmp_path):
    captions = reference_captions()
    assert len(captions) == 1000 and captions[0] == describe_scene("test", 0, 0).caption
    assert captions[999] == describe_scene("test", 0, 999).caption
    ref = reference_scenes(16)
    assert ref.images[16].shape == (1000, 16, 16, 3) and ref.captions == captions
    assert np.array_equal(ref.images[16][[10, 500]], render_scenes("test", 0, [10, 500], sizes=(16,)).images[16])
    path = write_prompt_list(tmp_path / "prompts.txt")
    assert path.read_text(encoding="utf-8").splitlines() == captions
    with pytest.raises(ValueError, match="64, 32 or 16"):
        reference_scenes(28)


def test_parse_caption_errors():
    assert parse_caption("  A Small RED 7 in the  top left ")[1][0].digit == 7
    for bad in ("a small red 7", "a large purple 7", "a small red 12 in the top left", "a red 7 on the left",
                "a large red 7 in the top left", ""):
        with pytest.raises(ValueError, match="matches none of the scene templates"):
            parse_caption(bad)


def test_scene_dataset_random_crops_of_larger_renders():
    """render_size 64 + random_crop: 32x32 windows of the 64x64 renders, the corner a function of
    (seed, epoch, index), the caption the whole scene's; the low-res pair is the crop's area mean."""
    from difflab.config import DataConfig
    from difflab.data import build_dataset

    cfg = DataConfig(source="scenes", captions=True, image_size=32, render_size=64, random_crop=True,
                     low_res_size=16, num_scenes=20)
    ds = build_dataset(cfg, seed=3)
    a, b = ds.get_items([0, 5, 5], epoch=0), ds.get_items([0, 5, 5], epoch=1)
    assert a["x0"].shape == (3, 3, 32, 32) and a["low_res"].shape == (3, 3, 16, 16)
    assert torch.equal(a["x0"][1], a["x0"][2]) and not torch.equal(a["x0"], b["x0"])
    assert torch.equal(ds.get_items([0, 5], epoch=0)["x0"], a["x0"][:2])  # reproducible
    assert a["caption"][0] == describe_scene("train", 0, 0).caption
    full = render_scenes("train", 0, [0, 5]).images[64]
    for k, i in enumerate((0, 5)):
        crop = ((a["x0"][k] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert any(np.array_equal(full[k][r:r + 32, c:c + 32], crop) for r in range(33) for c in range(33)), i
    assert torch.allclose(a["low_res"], a["x0"].reshape(3, 3, 16, 2, 16, 2).mean((3, 5)), atol=1e-6)
    assert build_dataset(cfg, seed=4).get_items([0, 5], epoch=0)["x0"].ne(a["x0"][:2]).any()
    assert cfg.sample_size == 64 and cfg.sample_low_res_size == 32


@pytest.mark.parametrize("changes, message", [
    ({"random_crop": True}, "needs data.render_size"),
    ({"render_size": 64}, "random_crop is false"),
    ({"render_size": 48, "random_crop": True}, "not a scene render size"),
])
def test_scene_crops_bad_config(changes, message):
    from difflab.config import DataConfig
    from difflab.data import build_dataset

    with pytest.raises(ValueError, match=message):
        build_dataset(DataConfig(source="scenes", image_size=32, num_scenes=4, **changes))
