"""The scene evaluator: how well text-to-image samples of captioned MNIST scenes follow their captions.

BENCHMARKS.md, "Metrics for text-to-image". Given uint8 RGB samples ``[N, R, R, 3]`` (R = 16, 32 or
64) and one caption per sample (the templates of :mod:`difflab.data.scenes`), :func:`evaluate_scenes`
reports

* **attribute accuracy**, per object a caption names, read in the box the caption names:

  - *bright* pixels: largest channel >= :data:`BRIGHT` (48 of 255, a quarter of the dimmest palette
    colour's peak, blue's 200: a 16x16 render keeps its strokes above it);
  - *present*: at least :data:`MIN_FILL` of the box's pixels are bright and their centre of mass
    (weighted by brightness) lies within :data:`MAX_OFFSET` x S of the box centre (an MNIST digit is
    centred by its mass; a digit drawn in a neighbouring box is off centre);
  - *colour*: the palette colour nearest to the mean of the box's bright pixels after matching
    brightness (``min_c min_s |mean - s * RGB_c|``: a stroke's mean is a darker copy ``a * RGB``, so
    plain nearest-RGB would call a dim red magenta-ish); credited only when present;
  - *digit*: difflab's MNIST classifier (:func:`difflab.eval.features.load_mnist_classifier`) on the
    box's grey stroke (largest channel over its maximum in the box) resized to 28x28 (bicubic,
    antialiased when shrinking; at 16x16, whose 4x4 block means leave the strokes grey, its contrast
    is then stretched, [0.2, 0.6] -> [0, 1], :data:`STRETCH_16`); credited only when present;
  - *position*: present, and at most :data:`MAX_OUTSIDE` of the image's bright pixels lie outside
    every box the caption names.

  ``digit``, ``colour``, ``position`` are shares of named objects; ``all_correct`` the share of
  captions with every attribute of every object right.
* **binding** (two-object captions only): both objects present with their own digit and colour;
  ``colour_swaps`` is the share of two-object captions (whose two colours differ) where each box
  holds the other object's colour.
* **FD, precision / recall** (k = 3) in the **scene feature space**: the 128-d penultimate layer of
  :class:`SceneFeatureNet`, a small CNN trained only on train-split scenes to read the layout and the
  digits and colours of both objects (``benchmarks/train_scene_features.py``; weights shipped in
  ``eval/weights/scene_features.safetensors``, accuracies in ``scene_features.json``), against the
  1,000 reference scenes rendered at the samples' resolution (``ref="scenes-test"``).
* **diversity**: for every caption with two or more samples, the mean pairwise Euclidean distance of
  their scene features; ``diversity`` is the mean over those captions (None when no caption repeats).

Bad input (caption count != image count, an unparseable caption, a size other than 16 / 32 / 64, not
uint8 RGB) is a ``ValueError`` with one line naming the problem. ``difflab eval SAMPLES.npz
--captions CAPTIONS.txt`` (or ``--captions scenes-test``) prints the JSON (docs/scenes.md).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difflab.data.scenes import (
    COLOURS,
    LAYOUTS,
    PALETTE,
    REFERENCE_SEED,
    REFERENCE_SIZE,
    SCENE_SIZES,
    box_slices,
    parse_caption,
    reference_captions,
    reference_scenes,
    render_scenes,
)
from difflab.eval.features import (
    WEIGHTS_DIR,
    _load_into,
    check_float_images,
    load_mnist_classifier,
    load_state_dict_file,
)

__all__ = [
    "BRIGHT", "MIN_FILL", "MAX_OFFSET", "MAX_OUTSIDE", "STRETCH_16", "SCENE_REFS", "SCENE_WEIGHTS", "SCENE_INFO",
    "SceneFeatureNet", "load_scene_features", "scene_features_info", "scene_features", "SceneReadout",
    "read_attributes", "attribute_metrics", "diversity", "evaluate_scenes", "evaluate_scenes_npz", "read_captions",
    "layout_class", "NUM_LAYOUT_CLASSES",
]

BRIGHT = 48
MIN_FILL = 0.02
MAX_OFFSET = 0.2
MAX_OUTSIDE = 0.05
# 16x16 samples: the resized stroke's contrast is stretched, [0.2, 0.6] -> [0, 1] (chosen on train-split scenes:
# small-digit reading 0.52 -> 0.93 there)
STRETCH_16 = (0.2, 0.6)
SCENE_REFS = ("scenes-test", "scenes-train")
SCENE_WEIGHTS = WEIGHTS_DIR / "scene_features.safetensors"
SCENE_INFO = WEIGHTS_DIR / "scene_features.json"
_RGB = np.array(list(PALETTE.values()), dtype=np.float64)  # [6, 3]


def _check_scene_images(images, what: str = "samples") -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB images [N, R, R, 3] in 0..255, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{what} must be uint8 RGB images [N, R, R, 3] (R = 16, 32 or 64), got shape {images.shape}")
    if images.shape[1] not in SCENE_SIZES:
        raise ValueError(f"{what} are {images.shape[1]}x{images.shape[2]}; scene images are 64x64, 32x32 or 16x16")
    if len(images) == 0:
        raise ValueError(f"{what}: no images (N = 0)")
    return np.ascontiguousarray(images)


# ----------------------------------------------------------------------------------------- feature space

# Layout classes the feature network reads: the four quadrants of one small digit, one large digit,
# side by side, stacked.
_LAYOUT_CLASSES = ("top left", "top right", "bottom left", "bottom right", "one_large", "side_by_side", "stacked")
NUM_LAYOUT_CLASSES = len(_LAYOUT_CLASSES)


def layout_class(layout: str, objects) -> int:
    """The feature network's layout class (0..6) of a scene: quadrant of one small digit, or the layout."""
    return _LAYOUT_CLASSES.index(objects[0].position if layout == "one_small" else layout)


class SceneFeatureNet(nn.Module):
    """Small CNN over scenes: the feature space of scene FD, precision / recall and diversity.

    Input float NCHW in [-1, 1], 3 channels, 16, 32 or 64 pixels, brought to 32x32 first (64: 2x2
    average pool, the float form of the render rule; 16: bilinear 2x upsampling). Layout:
    conv3x3-BN-ReLU 32 at 32x32 -> maxpool -> 2x conv 64 at 16x16 -> maxpool -> 2x conv 128 at 8x8 ->
    maxpool -> flatten 128x4x4 (position is kept: no global pool) -> linear 128 -> ReLU (= the
    features) -> heads: layout (7), first object's digit (10) and colour (6), second object's digit and
    colour with a "none" class (11, 7). About 0.55M parameters.
    """

    num_features = 128
    heads = {"layout": NUM_LAYOUT_CLASSES, "digit1": 10, "colour1": 6, "digit2": 11, "colour2": 7}

    def __init__(self, width: int = 32, num_features: int = 128):
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.feature = nn.Linear(4 * w * 16, num_features)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(num_features, sum(self.heads.values()))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Check float (N, 3, R, R) in [-1, 1], R in 16, 32, 64, and bring it to 32x32."""
        check_float_images(x, channels=(3,))
        r = x.shape[-1]
        if x.shape[-2] != r or r not in SCENE_SIZES:
            raise ValueError(f"the scene feature network takes 16, 32 or 64 pixel square scenes, got "
                             f"{tuple(x.shape[-2:])}")
        if r == 64:
            return F.avg_pool2d(x, 2)
        if r == 16:
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (N, 3, R, R) in [-1, 1] -> (features (N, 128), {head name: logits})."""
        h = F.relu(self.feature(self.body(self.prepare(x))))
        logits = self.head(self.dropout(h))
        return h, dict(zip(self.heads, logits.split(list(self.heads.values()), dim=1), strict=True))


def load_scene_features(path: str | Path | None = None, device: str | torch.device = "cpu") -> SceneFeatureNet:
    """difflab's scene feature network (the shipped weights unless ``path`` is given), eval mode."""
    path = SCENE_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene feature weights not found at {path}; train them with "
                                "`python benchmarks/train_scene_features.py`")
    model = SceneFeatureNet()
    _load_into(model, load_state_dict_file(path), "scene feature network")
    return model.eval().requires_grad_(False).to(device)


def scene_features_info() -> dict:
    """The JSON shipped beside the weights: train / test accuracy per head, command, seed."""
    return json.loads(SCENE_INFO.read_text())


@functools.lru_cache(maxsize=1)
def _shipped_classifier():
    return load_mnist_classifier()


@functools.lru_cache(maxsize=1)
def _shipped_net() -> SceneFeatureNet:
    return load_scene_features()


@torch.no_grad()
def scene_features(images, model: SceneFeatureNet | None = None, batch_size: int = 250) -> np.ndarray:
    """Scene features ``(N, 128)`` float64 of uint8 RGB images ``[N, R, R, 3]`` (R = 16, 32, 64)."""
    from difflab.data import uint8_to_float

    images = _check_scene_images(images, "images")
    model = _shipped_net() if model is None else model
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(uint8_to_float(np.array(images[i:i + batch_size])))[0].double())  # a writable copy
    return torch.cat(out).numpy()


@functools.lru_cache(maxsize=2 * len(SCENE_REFS) * len(SCENE_SIZES))
def _named_reference(ref: str, size: int) -> np.ndarray:
    if ref == "scenes-test":
        images = reference_scenes(size).images[size]
    else:  # the train-split twin of the reference set: the floor of FD / precision / recall
        images = render_scenes("train", REFERENCE_SEED, np.arange(REFERENCE_SIZE), sizes=(size,)).images[size]
    feats = scene_features(images)
    feats.setflags(write=False)
    return feats


def _reference_features(ref, size: int) -> tuple[str, np.ndarray]:
    if isinstance(ref, str) and ref in SCENE_REFS:
        return ref, _named_reference(ref, size)
    path = Path(ref)
    if path.suffix != ".npz":
        raise ValueError(f"scene ref must be one of {', '.join(SCENE_REFS)} or an .npz of scene images; got {ref!r}")
    from difflab.data import load_npz

    images, _ = load_npz(path)
    images = _check_scene_images(images, f"reference {path} arr_0")
    if images.shape[1] != size:
        raise ValueError(f"reference {path} holds {images.shape[1]}x{images.shape[1]} scenes but the samples are "
                         f"{size}x{size}; compare at the same resolution")
    return str(path), scene_features(images)


# ----------------------------------------------------------------------------------------- attributes


@dataclass
class SceneReadout:
    """What :func:`read_attributes` reads, one row per named object (``caption`` says whose), plus
    per-caption ``outside`` (share of bright pixels outside every named box) and ``layouts``."""

    caption: np.ndarray  # int [M]: index of the caption / image of each named object
    layouts: list[str]  # [N]
    names: list[tuple]  # [M]: (digit, colour, box) the caption names
    present: np.ndarray  # bool [M]
    digit_pred: np.ndarray  # int [M] (-1: absent)
    colour_pred: np.ndarray  # int [M] index into COLOURS (-1: absent)
    digit_ok: np.ndarray  # bool [M]
    colour_ok: np.ndarray  # bool [M]
    position_ok: np.ndarray  # bool [M]
    outside: np.ndarray  # float [N]


def _nearest_colour(mean: np.ndarray) -> int:
    """The palette colour nearest to ``mean`` after matching brightness: argmin_c min_{s>=0} |mean - s RGB_c|."""
    s = np.maximum(_RGB @ mean / (_RGB * _RGB).sum(1), 0.0)
    return int(np.argmin(((s[:, None] * _RGB - mean) ** 2).sum(1)))


def _parse_all(captions) -> list[tuple[str, tuple]]:
    parsed = []
    for i, c in enumerate(captions):
        try:
            parsed.append(parse_caption(c))
        except ValueError as e:
            raise ValueError(f"caption {i + 1}: {e}") from None
    return parsed


def read_attributes(images, captions, *, classifier=None) -> SceneReadout:
    """Read every named object of every caption in its image (see the module docstring for the rules).

    Args:
        images: uint8 ``[N, R, R, 3]``, R = 16, 32 or 64. captions: N strings of the scene templates.
        classifier: the MNIST classifier (default: the shipped one).
    """
    images = _check_scene_images(images)
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images; give exactly one caption per image")
    parsed = _parse_all(captions)
    size = images.shape[1]
    value = images.max(-1)  # [N, R, R] brightness: the largest channel
    bright = value >= BRIGHT
    rows, names, present, colour_pred, strokes = [], [], [], [], []
    outside = np.zeros(len(images))
    for i, (_, objects) in enumerate(parsed):
        named = np.zeros((size, size), dtype=bool)
        for o in objects:
            r, c = box_slices(o.box, size)
            named[r, c] = True
            b = bright[i, r, c]
            v = np.where(b, value[i, r, c], 0).astype(np.float64)
            n = b.shape[0]
            ok = b.mean() >= MIN_FILL
            if ok:
                centre = (np.arange(n) + 0.5) / n - 0.5
                cy, cx = v.sum(1) @ centre / v.sum(), v.sum(0) @ centre / v.sum()
                ok = max(abs(cy), abs(cx)) <= MAX_OFFSET
            rows.append(i)
            names.append((o.digit, o.colour, o.box))
            present.append(bool(ok))
            colour_pred.append(_nearest_colour(images[i, r, c][b].astype(np.float64).mean(0)) if b.any() else -1)
            g = value[i, r, c].astype(np.float32)
            strokes.append(torch.from_numpy(g / max(float(g.max()), 1.0)))
        total = bright[i].sum()
        outside[i] = (bright[i] & ~named).sum() / total if total else 0.0
    # Digits: one classifier pass over all strokes, resized per box side.
    classifier = _shipped_classifier() if classifier is None else classifier
    digit_pred = np.full(len(rows), -1)
    for side in sorted({s.shape[0] for s in strokes}):
        idx = [j for j, s in enumerate(strokes) if s.shape[0] == side]
        x = torch.stack([strokes[j] for j in idx])[:, None]
        if side != 28:
            x = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False, antialias=side > 28)
        if size == 16:  # 4x4 block means leave grey strokes: stretch them back towards MNIST's saturated ones
            lo, hi = STRETCH_16
            x = (x - lo) / (hi - lo)
        with torch.no_grad():
            pred = classifier(x.clamp(0, 1) * 2 - 1)[1].argmax(1).numpy()
        digit_pred[idx] = pred
    rows = np.array(rows)
    present = np.array(present)
    colour_pred = np.array(colour_pred)
    digit_ok = present & (digit_pred == np.array([d for d, _, _ in names]))
    colour_ok = present & (colour_pred == np.array([COLOURS.index(c) for _, c, _ in names]))
    position_ok = present & (outside[rows] <= MAX_OUTSIDE)
    digit_pred = np.where(present, digit_pred, -1)
    return SceneReadout(rows, [lay for lay, _ in parsed], names, present, digit_pred, colour_pred, digit_ok,
                        colour_ok, position_ok, outside)


def attribute_metrics(readout: SceneReadout) -> dict:
    """Attribute accuracy, all-correct, binding and colour swaps of a :class:`SceneReadout` (with the
    all-correct share per layout)."""
    n = len(readout.layouts)
    ok = readout.digit_ok & readout.colour_ok & readout.position_ok
    all_ok = np.ones(n, dtype=bool)
    np.logical_and.at(all_ok, readout.caption, ok)
    two = np.array([lay in ("side_by_side", "stacked") for lay in readout.layouts])
    out = {
        "n_objects": int(len(readout.caption)),
        "digit": float(readout.digit_ok.mean()),
        "colour": float(readout.colour_ok.mean()),
        "position": float(readout.position_ok.mean()),
        "all_correct": float(all_ok.mean()),
        "n_two_object": int(two.sum()),
        "binding": None,
        "colour_swaps": None,
    }
    if two.any():
        first = np.flatnonzero(np.r_[True, readout.caption[1:] != readout.caption[:-1]])  # first row per caption
        pairs = [(j, j + 1) for j in first if two[readout.caption[j]]]
        bound = [readout.digit_ok[a] & readout.colour_ok[a] & readout.digit_ok[b] & readout.colour_ok[b]
                 for a, b in pairs]
        out["binding"] = float(np.mean(bound))
        swaps = []
        for a, b in pairs:
            ca, cb = COLOURS.index(readout.names[a][1]), COLOURS.index(readout.names[b][1])
            if ca != cb:
                swaps.append(readout.present[a] and readout.present[b] and readout.colour_pred[a] == cb
                             and readout.colour_pred[b] == ca)
        out["colour_swaps"] = float(np.mean(swaps)) if swaps else None
    out["all_correct_by_layout"] = {lay: float(all_ok[[x == lay for x in readout.layouts]].mean())
                                    for lay in LAYOUTS if lay in readout.layouts}
    return out


def diversity(features: np.ndarray, captions) -> tuple[float | None, int]:
    """Mean over captions with >= 2 samples of the mean pairwise Euclidean feature distance among
    that caption's samples; returns ``(diversity or None, number of such captions)``."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(" ".join(str(c).lower().split()), []).append(i)
    values = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        f = torch.from_numpy(np.asarray(features[idx], dtype=np.float64))
        d = torch.cdist(f, f)
        m = len(idx)
        values.append(float(d.sum() / (m * (m - 1))))
    return (float(np.mean(values)) if values else None), len(values)


# ----------------------------------------------------------------------------------------- evaluation


def read_captions(source, n: int | None = None) -> tuple[str, list[str]]:
    """``(name, captions)`` of ``source``: ``"scenes-test"`` (the benchmark prompt list), a text file
    with one caption per line (blank lines at the end ignored), or a list of str. ``n``: the number
    of images they must match."""
    if isinstance(source, (list, tuple)):
        name, captions = "list", [str(c) for c in source]
    elif str(source) == "scenes-test":
        name, captions = "scenes-test", reference_captions()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"captions file not found: {path} (give a text file with one caption per line, "
                                    "or 'scenes-test' for the benchmark prompt list)")
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        name, captions = str(path), lines
    if n is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions in {name} for {n} images; give exactly one caption per image, "
                         "in sample order")
    return name, captions


def evaluate_scenes(images, captions, ref: str | Path = "scenes-test", *, k: int = 3) -> dict:
    """Attribute accuracy, binding, FD / precision / recall (scene features, against ``ref``) and
    diversity of scene samples; see the module docstring.

    Args:
        images: uint8 ``[N, R, R, 3]``, R = 16, 32 or 64, N >= 2.
        captions: N captions, a text file of them, or ``"scenes-test"`` (the 1,000 benchmark prompts).
        ref: ``"scenes-test"`` (the 1,000 reference scenes at R), ``"scenes-train"`` (1,000 train scenes
            at R: the floor) or an ``.npz`` of scene images at R.
    Returns:
        ``{"n", "size", "captions", "ref", "n_ref", "digit", "colour", "position", "all_correct",
        "n_objects", "n_two_object", "binding", "colour_swaps", "all_correct_by_layout", "fd",
        "precision", "recall", "diversity", "n_diversity_captions"}``.
    """
    images = _check_scene_images(images)
    if len(images) < 2:
        raise ValueError(f"samples: need at least 2 images for feature statistics, got {len(images)}")
    name, captions = read_captions(captions, len(images))
    size = images.shape[1]
    readout = read_attributes(images, captions)
    ref_name, ref_feats = _reference_features(ref, size)
    from difflab.eval.metrics import feature_statistics, frechet_distance, precision_recall

    feats = scene_features(images)
    fd = frechet_distance(*feature_statistics(feats), *feature_statistics(ref_feats))
    precision, recall = precision_recall(ref_feats, feats, k=k)
    div, n_div = diversity(feats, captions)
    return {"n": int(len(images)), "size": int(size), "captions": name, "ref": ref_name, "n_ref": int(len(ref_feats)),
            **attribute_metrics(readout), "fd": fd, "precision": precision, "recall": recall, "diversity": div,
            "n_diversity_captions": n_div}


def evaluate_scenes_npz(path: str | Path, captions, **kwargs) -> dict:
    """:func:`evaluate_scenes` on an ``.npz`` of samples (``arr_0`` uint8 ``[N, R, R, 3]``)."""
    from difflab.data import load_npz

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    images, _ = load_npz(path)
    return evaluate_scenes(images, captions, **kwargs)
