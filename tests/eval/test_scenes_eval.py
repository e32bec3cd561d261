"""The scene evaluator: captions parse back, real scenes score near 1, wrong captions and broken scenes are caught."""

import itertools
import json

import numpy as np
import pytest

from difflab.cli import main
from difflab.data.scenes import (
    BOXES,
    COLOURS,
    PALETTE,
    _object,
    box_slices,
    caption_of,
    parse_caption,
    reference_captions,
    reference_scenes,
    render_scene,
)
from difflab.eval.scenes import (
    SceneFeatureNet,
    attribute_metrics,
    diversity,
    evaluate_scenes,
    load_scene_features,
    read_attributes,
    scene_features,
    scene_features_info,
)


@pytest.fixture(scope="module")
def ref32():
    return reference_scenes(32).images[32], reference_captions()


def test_captions_round_trip_every_template():
    layouts = [("one_small", [(p,) for p in ("top left", "top right", "bottom left", "bottom right")]),
               ("one_large", [(None,)]), ("side_by_side", [("left", "right")]), ("stacked", [("top", "bottom")])]
    n = 0
    for layout, position_sets in layouts:
        for positions in position_sets:
            for digits in itertools.product(range(10), repeat=len(positions)):
                for colours in itertools.product(COLOURS[::2] if len(positions) == 2 else COLOURS,
                                                 repeat=len(positions)):
                    for words in itertools.product((False, True), repeat=len(positions)):
                        objs = tuple(_object(d, c, p, w) for d, c, p, w in zip(digits, colours, positions, words,
                                                                                strict=True))
                        caption = caption_of(layout, objs)
                        assert parse_caption(caption) == (layout, objs), caption
                        n += 1
    assert n == 4 * 10 * 6 * 2 + 10 * 6 * 2 + 2 * 100 * 9 * 4
    _, objs = parse_caption("a blue two at the top and a white 9 at the bottom")
    assert [(o.digit, o.colour, o.box, o.word) for o in objs] == [(2, "blue", (8, 0, 16), True),
                                                                   (9, "white", (8, 16, 16), False)]
    assert parse_caption("a large green zero")[1][0].box == (2, 2, 28)


def test_real_scenes_score_near_one_and_shuffled_near_chance(ref32):
    images, captions = ref32
    m = attribute_metrics(read_attributes(images, captions))
    assert m["n_objects"] == 1407 and m["n_two_object"] == 407
    assert m["digit"] >= 0.98 and m["colour"] == 1.0 and m["position"] == 1.0
    assert m["all_correct"] >= 0.97 and m["binding"] >= 0.96 and m["colour_swaps"] == 0.0
    perm = np.random.default_rng(0).permutation(len(captions))
    s = attribute_metrics(read_attributes(images, [captions[i] for i in perm]))
    assert s["digit"] < 0.1 and s["colour"] < 1 / 6 and s["position"] < 0.35
    assert s["all_correct"] < 0.02 and s["binding"] < 0.02


def _recolour(image, box, size, colour):
    out = image.copy()
    r, c = box_slices(box, size)
    a = out[r, c].max(-1, keepdims=True) / 255
    out[r, c] = np.rint(a * np.array(PALETTE[colour])).astype(np.uint8)
    return out


def test_wrong_colour_moved_and_extra_objects_are_caught():
    # a small digit in one quadrant
    s = next(render_scene("test", 0, i) for i in range(50) if render_scene("test", 0, i).layout == "one_small")
    o = s.objects[0]
    good = read_attributes(s.image32[None], [s.caption])
    assert good.digit_ok.all() and good.colour_ok.all() and good.position_ok.all()
    other = next(c for c in COLOURS if c != o.colour and c != "white")
    bad = read_attributes(_recolour(s.image32, o.box, 32, other)[None], [s.caption])
    assert not bad.colour_ok[0] and COLOURS[bad.colour_pred[0]] == other and bad.digit_ok[0] and bad.position_ok[0]
    # the same pixels moved to the diagonally opposite quadrant: absent from the named box
    moved = np.zeros_like(s.image32)
    target = {"top left": "bottom right", "bottom right": "top left", "top right": "bottom left",
              "bottom left": "top right"}[o.position]
    r, c = box_slices(o.box, 32)
    r2, c2 = box_slices((*BOXES[target], 16), 32)
    moved[r2, c2] = s.image32[r, c]
    m = read_attributes(moved[None], [s.caption])
    assert not m.present[0] and not m.position_ok[0] and not m.digit_ok[0] and not m.colour_ok[0]
    # ... and caught at the named place of the other caption
    assert read_attributes(moved[None], [s.caption.replace(o.position, target)]).position_ok[0]
    # an extra digit outside the named box: present, but position fails
    extra = s.image32.copy()
    extra[r2, c2] = s.image32[r, c]
    e = read_attributes(extra[None], [s.caption])
    assert e.present[0] and e.digit_ok[0] and not e.position_ok[0] and e.outside[0] == pytest.approx(0.5)
    # a two-object scene with its colours swapped: binding fails, swaps are counted
    t = next(render_scene("test", 0, i) for i in range(80) if render_scene("test", 0, i).layout == "side_by_side"
             and render_scene("test", 0, i).objects[0].colour != render_scene("test", 0, i).objects[1].colour)
    a, b = t.objects
    swapped = _recolour(_recolour(t.image32, a.box, 32, b.colour), b.box, 32, a.colour)
    mt = attribute_metrics(read_attributes(np.stack([t.image32, swapped]), [t.caption] * 2))
    assert mt["binding"] == 0.5 and mt["colour_swaps"] == 0.5


def test_feature_space_and_full_evaluation(ref32):
    images, captions = ref32
    net = load_scene_features()
    assert isinstance(net, SceneFeatureNet)
    info = scene_features_info()
    assert info["accuracy"]["test_32"]["all"] >= 0.8 and info["accuracy"]["test_32"]["layout"] >= 0.99
    out = evaluate_scenes(images, "scenes-test")
    assert out["n"] == out["n_ref"] == 1000 and out["size"] == 32 and out["ref"] == "scenes-test"
    # 0 up to frechet_distance's rank cut-off: it zeroes eigenvalues of sigma^(1/2) sigma sigma^(1/2) below
    # D eps max, i.e. a covariance eigenvalue below ~4e-5 here (a feature alive on a handful of scenes: 1.1e-5)
    # drops out of tr(covmean) but not of tr(sigma), leaving FD = 2 x 1.1e-5
    assert out["fd"] == pytest.approx(0.0, abs=1e-4) and out["precision"] == 1.0 and out["recall"] == 1.0
    repeated = [c for c in set(captions) if captions.count(c) > 1]
    assert out["digit"] >= 0.98 and out["n_diversity_captions"] == len(repeated) > 0 and out["diversity"] > 0
    # the train-split twin of the reference: a floor above 0; 16x16 renders of the same scenes are far closer
    # to the 16x16 reference than shuffled images are to their captions
    floor = evaluate_scenes(images[:500], captions[:500], ref="scenes-train")
    assert 0 < floor["fd"] and floor["precision"] > 0.5 and floor["recall"] > 0.3
    # diversity: mean pairwise distance within a caption, by hand
    feats = scene_features(images[:6])
    caps = ["a large red 7", "a large red 7", "a large red 7", "x", "y", "a small red 7 in the top left"]
    d, n = diversity(feats, caps)
    pair = [np.linalg.norm(feats[i] - feats[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert n == 1 and d == pytest.approx(np.mean(pair), rel=1e-9)


@pytest.mark.filterwarnings("ignore:only 40 samples")
def test_cli_scene_eval_and_bad_input(tmp_path, ref32, capsys):
    images, captions = ref32
    np.savez(tmp_path / "s.npz", images[:40])
    (tmp_path / "c.txt").write_text("\n".join(captions[:40]) + "\n\n")
    assert main(["eval", str(tmp_path / "s.npz"), "--captions", str(tmp_path / "c.txt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 40 and out["ref"] == "scenes-test" and out["position"] == 1.0 and out["colour"] == 1.0
    assert {"digit", "all_correct", "binding", "fd", "precision", "recall", "diversity"} <= set(out)

    def fails(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("difflab: error:") and "\n" not in err and match in err, err

    fails(["eval", str(tmp_path / "s.npz"), "--captions", "scenes-test"], "1000 captions in scenes-test for 40 images")
    (tmp_path / "bad.txt").write_text("\n".join(captions[:3] + ["a purple 7"] + captions[4:40]))
    fails(["eval", str(tmp_path / "s.npz"), "--captions", str(tmp_path / "bad.txt")],
          "caption 4: caption 'a purple 7' matches none of the scene templates")
    fails(["eval", str(tmp_path / "s.npz"), "--captions", str(tmp_path / "c.txt"), "--features", "mnist"],
          "--features: not used with --captions")
    fails(["eval", str(tmp_path / "s.npz"), "--captions", str(tmp_path / "nope.txt")], "captions file not found")
    np.savez(tmp_path / "g.npz", np.zeros((40, 28, 28, 3), np.uint8))
    fails(["eval", str(tmp_path / "g.npz"), "--captions", str(tmp_path / "c.txt")], "scene images are 64x64")
    with pytest.raises(ValueError, match="uint8 RGB"):
        read_attributes(np.zeros((2, 32, 32, 1), np.uint8), captions[:2])
    with pytest.raises(ValueError, match="dtype float32"):
        read_attributes(np.zeros((2, 32, 32, 3), np.float32), captions[:2])
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        read_attributes(images[:3], captions[:2])
    with pytest.raises(ValueError, match="holds 32x32 scenes but the samples are 16x16"):
        np.savez(tmp_path / "r.npz", images[:10])
        evaluate_scenes(reference_scenes(16).images[16][:10], captions[:10], ref=tmp_path / "r.npz")
