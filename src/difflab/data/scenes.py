"""Captioned MNIST scenes: the embedded default data of text-to-image (BENCHMARKS.md, "Captioned MNIST scenes").

A scene is a pure function of ``(split, seed, index)``: one or two MNIST-5k digits, each coloured with
a palette colour and placed in a fixed box of a black RGB canvas, and a lower-case caption naming
them. Nothing is stored; the ground truth of every attribute is known. The spec, kept exactly:

* **Canvas** RGB, black, rendered at 64x64 and block-averaged to 32x32 and 16x16. Boxes are given
  in 32x32 units (:data:`BOXES`, top-left corner ``(x, y)`` and side ``S``; doubled at 64x64).
* **Object** a 28x28 MNIST stroke ``a = image / 255`` resized to the box; pixel = ``a * RGB(colour)``.
  Sizes ``small`` (S = 16) and ``large`` (S = 28).
* **Layouts** one small digit in a quadrant (40%), one large digit (20%), two small digits side by
  side (20%) or stacked (20%).
* **Draws** ``rng = numpy.random.default_rng(numpy.random.SeedSequence([split_id, seed, index]))``
  (split_id 0 = train, 1 = test); ``layout = rng.choice(4, p=[0.4, 0.2, 0.2, 0.2])``; for one small
  digit ``rng.integers(4)`` picks the quadrant; then per object, left / top first: ``digit =
  rng.integers(10)``, ``k = rng.integers(n)`` (the k-th image of that digit in the split, file
  order; n = 400 train, 100 test), ``colour = rng.integers(6)``, ``word = rng.random() < 0.5`` (the
  digit is written as a word, else as a numeral).
* **Pixels** the stroke goes straight from 28x28 to 2S x 2S on the 64x64 canvas through
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (no antialias), is
  clipped to [0, 1], multiplied by the RGB triple and rounded to uint8 with ``numpy.rint``; the
  32x32 and 16x16 renders are the 2x2 and 4x4 block means of that uint8 image, rounded the same way.
  The arithmetic is float64 throughout (``image / 255`` in numpy is float64; interpolation runs on
  that float64 tensor), so every rounding is that of the exact value to within 1e-15.

Coordinates: an object's ``box`` is ``(x, y, S)`` in 32x32 units, ``x`` the column and ``y`` the row
of its top-left corner; at resolution R it covers rows ``y*R/32 .. (y+S)*R/32`` and columns
``x*R/32 .. (x+S)*R/32`` (:func:`box_slices`). Boxes never overlap, and they sit on multiples of 4
pixels at 64x64, so the block means never mix two boxes: every pixel outside every box is exactly 0
at all three resolutions.

Main entry points: :func:`render_scene` (one scene, all three renders), :func:`render_scenes`
(vectorised, many scenes), :func:`describe_scene` (the draws only: caption and attributes, no
pixels), :func:`parse_caption` (a caption back to its objects and boxes), :class:`SceneDataset`
(map-style, what ``data.source: scenes`` builds), :func:`reference_scenes` / :func:`reference_captions`
/ :func:`write_prompt_list` (the 1,000 test scenes of seed 0 and the benchmark prompt list).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from difflab.data.images import MNIST_TRAIN_PER_CLASS, _ImageDataset, load_mnist5k, random_crops, uint8_to_float

__all__ = [
    "PALETTE", "COLOURS", "NUMBER_WORDS", "SIZES", "LAYOUTS", "LAYOUT_PROBS", "BOXES", "SCENE_SIZES",
    "SPLIT_IDS", "DIGITS_PER_CLASS", "DEFAULT_NUM_SCENES", "REFERENCE_SPLIT", "REFERENCE_SEED", "REFERENCE_SIZE",
    "SceneObject", "SceneDescription", "Scene", "SceneBatch", "describe_scene", "describe_scenes", "caption_of",
    "parse_caption", "box_slices", "render_objects", "render_scene", "render_scenes", "downsample", "SceneDataset",
    "reference_scenes", "reference_captions", "write_prompt_list", "SCENE_WORDS",
]

# ----------------------------------------------------------------------------------------- the spec

# Palette in draw order (colour = rng.integers(6) indexes this).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "magenta": (240, 50, 230),
    "white": (255, 255, 255),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
_RGB = np.array(list(PALETTE.values()), dtype=np.float64)  # [6, 3]
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZES: dict[str, int] = {"small": 16, "large": 28}  # box side S in 32x32 units
# Layouts in draw order (layout = rng.choice(4, p=LAYOUT_PROBS)).
LAYOUTS: tuple[str, ...] = ("one_small", "one_large", "side_by_side", "stacked")
LAYOUT_PROBS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
# Every box a caption can name: position phrase -> (x, y) top-left corner in 32x32 units. The phrase
# of the large digit is None (its caption has no position).
BOXES: dict[str | None, tuple[int, int]] = {
    "top left": (0, 0), "top right": (16, 0), "bottom left": (0, 16), "bottom right": (16, 16),  # one small
    None: (2, 2),  # one large
    "left": (0, 8), "right": (16, 8),  # side by side
    "top": (8, 0), "bottom": (8, 16),  # stacked
}
_QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # rng.integers(4) indexes this
_LAYOUT_POSITIONS: dict[str, tuple[str | None, ...]] = {
    "side_by_side": ("left", "right"), "stacked": ("top", "bottom"), "one_large": (None,),
}
SCENE_SIZES: tuple[int, ...] = (64, 32, 16)  # renders: 64x64 truth, 2x2 and 4x4 block means
CANVAS = 64
#: every word a scene caption can hold (the miniature tokenizer's vocabulary of ``text.vocab: scenes``)
SCENE_WORDS: tuple[str, ...] = tuple(sorted({
    "a", "small", "large", "in", "the", "top", "bottom", "left", "right", "on", "and", "at",
    *COLOURS, *NUMBER_WORDS, *(str(d) for d in range(10))}))
SPLIT_IDS: dict[str, int] = {"train": 0, "test": 1}
DIGITS_PER_CLASS: dict[str, int] = {"train": MNIST_TRAIN_PER_CLASS, "test": 500 - MNIST_TRAIN_PER_CLASS}
DEFAULT_NUM_SCENES: dict[str, int] = {"train": 20_000, "test": 1_000}
# The reference set: 1,000 test scenes of seed 0, indices 0..999; their captions are the prompt list.
REFERENCE_SPLIT, REFERENCE_SEED, REFERENCE_SIZE = "test", 0, 1_000


def _check_scene_split(split: str) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"scene split must be 'train' or 'test' (the MNIST-5k digits they draw from), got {split!r}")


def _check_size(size: int, what: str = "image size") -> int:
    if size not in SCENE_SIZES:
        raise ValueError(f"scenes are rendered at 64, 32 or 16 pixels; {what} {size!r} is not one of them")
    return int(size)


# ----------------------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class SceneObject:
    """One digit of a scene (or named by a caption).

    ``digit`` 0..9; ``colour`` a :data:`PALETTE` name; ``size`` ``"small"`` / ``"large"``; ``position``
    the caption's phrase (a :data:`BOXES` key: ``"top left"``, ..., ``"left"``, ``"top"``, ...; None for
    the large digit); ``box`` ``(x, y, S)`` in 32x32 units; ``word`` whether the caption writes the
    digit as a word; ``mnist_index`` k, the k-th image of that digit in the split (None for an object
    parsed from a caption).
    """

    digit: int
    colour: str
    size: str
    position: str | None
    box: tuple[int, int, int]
    word: bool
    mnist_index: int | None = None

    @property
    def phrase(self) -> str:
        """The digit and colour as the caption writes them, e.g. ``"red 7"`` or ``"red seven"``."""
        return f"{self.colour} {NUMBER_WORDS[self.digit] if self.word else self.digit}"


def _object(digit: int, colour: str, position: str | None, word: bool, mnist_index: int | None = None) -> SceneObject:
    size = "large" if position is None else "small"
    x, y = BOXES[position]
    return SceneObject(int(digit), colour, size, position, (x, y, SIZES[size]), bool(word), mnist_index)


def caption_of(layout: str, objects: Sequence[SceneObject]) -> str:
    """The caption of a layout and its objects (left / top first), by the four templates."""
    if layout == "one_small":
        return f"a small {objects[0].phrase} in the {objects[0].position}"
    if layout == "one_large":
        return f"a large {objects[0].phrase}"
    if layout in ("side_by_side", "stacked"):
        a, b = objects
        sep = "on the" if layout == "side_by_side" else "at the"
        return f"a {a.phrase} {sep} {a.position} and a {b.phrase} {sep} {b.position}"
    raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")


@dataclass(frozen=True)
class SceneDescription:
    """What the draws of one scene decide: ``layout`` (a :data:`LAYOUTS` name), ``objects`` (left / top
    first) and ``caption``; no pixels."""

    split: str
    seed: int
    index: int
    layout: str
    objects: tuple[SceneObject, ...]
    caption: str


@dataclass(frozen=True)
class Scene(SceneDescription):
    """A rendered scene: the description plus uint8 RGB images ``image64`` [64, 64, 3],
    ``image32`` [32, 32, 3] and ``image16`` [16, 16, 3]."""

    image64: np.ndarray | None = None
    image32: np.ndarray | None = None
    image16: np.ndarray | None = None

    def image(self, size: int) -> np.ndarray:
        """The render at ``size`` (64, 32 or 16)."""
        return getattr(self, f"image{_check_size(size)}")


def describe_scene(split: str, seed: int, index: int) -> SceneDescription:
    """The draws of scene ``(split, seed, index)`` in the spec's order (see the module docstring)."""
    _check_scene_split(split)
    if index < 0 or seed < 0:
        raise ValueError(f"scene seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([SPLIT_IDS[split], int(seed), int(index)]))
    layout = LAYOUTS[int(rng.choice(4, p=LAYOUT_PROBS))]
    positions = (_QUADRANTS[int(rng.integers(4))],) if layout == "one_small" else _LAYOUT_POSITIONS[layout]
    n = DIGITS_PER_CLASS[split]
    objects = []
    for position in positions:
        digit = int(rng.integers(10))
        k = int(rng.integers(n))
        colour = COLOURS[int(rng.integers(6))]
        word = bool(rng.random() < 0.5)
        objects.append(_object(digit, colour, position, word, k))
    objects = tuple(objects)
    return SceneDescription(split, int(seed), int(index), layout, objects, caption_of(layout, objects))


def describe_scenes(split: str, seed: int, indices: Sequence[int] | np.ndarray) -> list[SceneDescription]:
    """:func:`describe_scene` of each index."""
    return [describe_scene(split, seed, int(i)) for i in np.asarray(indices).reshape(-1)]


# ----------------------------------------------------------------------------------------- captions

_DIGIT_RE = r"(\d|" + "|".join(NUMBER_WORDS) + r")"
_COLOUR_RE = "(" + "|".join(COLOURS) + ")"
_C, _D = _COLOUR_RE, _DIGIT_RE
_TEMPLATES: tuple[tuple[str, re.Pattern], ...] = (
    ("one_small", re.compile(rf"a small {_C} {_D} in the (top left|top right|bottom left|bottom right)")),
    ("one_large", re.compile(rf"a large {_C} {_D}")),
    ("side_by_side", re.compile(rf"a {_C} {_D} on the left and a {_C} {_D} on the right")),
    ("stacked", re.compile(rf"a {_C} {_D} at the top and a {_C} {_D} at the bottom")),
)
TEMPLATES_HELP = ("'a small {colour} {digit} in the {top left|top right|bottom left|bottom right}', "
                  "'a large {colour} {digit}', 'a {colour} {digit} on the left and a {colour} {digit} on the right', "
                  "'a {colour} {digit} at the top and a {colour} {digit} at the bottom' (colour: "
                  + ", ".join(COLOURS) + "; digit: 0..9 or zero..nine)")


def _digit_of(token: str) -> tuple[int, bool]:
    return (int(token), False) if token.isdigit() else (NUMBER_WORDS.index(token), True)


def parse_caption(caption: str) -> tuple[str, tuple[SceneObject, ...]]:
    """A caption back to ``(layout, objects)``: the inverse of :func:`caption_of`.

    Case and runs of whitespace are normalised (``" ".join(caption.lower().split())``); anything else
    outside the four templates is a ``ValueError`` naming the caption and the templates. The objects
    carry digit, colour, size, position, box and word; ``mnist_index`` is None.
    """
    text = " ".join(str(caption).lower().split())
    for layout, pattern in _TEMPLATES:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if layout == "one_small":
            positions, pairs = (g[2],), [(g[0], g[1])]
        elif layout == "one_large":
            positions, pairs = (None,), [(g[0], g[1])]
        else:
            positions, pairs = _LAYOUT_POSITIONS[layout], [(g[0], g[1]), (g[2], g[3])]
        objects = []
        for (colour, token), position in zip(pairs, positions, strict=True):
            d, w = _digit_of(token)
            objects.append(_object(d, colour, position, w))
        return layout, tuple(objects)
    raise ValueError(f"caption {caption!r} matches none of the scene templates: {TEMPLATES_HELP}")


def box_slices(box: tuple[int, int, int], size: int) -> tuple[slice, slice]:
    """``(rows, cols)`` slices of a box ``(x, y, S)`` (32x32 units) on a ``size`` x ``size`` render."""
    x, y, s = box
    f = _check_size(size) / 32
    return slice(round(y * f), round((y + s) * f)), slice(round(x * f), round((x + s) * f))


# ----------------------------------------------------------------------------------------- pixels


@functools.lru_cache(maxsize=2)
def _split_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(strokes float64 [N, 28, 28] = image / 255, rows [10, n])``: rows[d, k] is the k-th image of
    digit d in the split, in file order."""
    images, labels = load_mnist5k(split)
    rows = np.stack([np.flatnonzero(labels == d) for d in range(10)])
    strokes = images / 255.0
    strokes.setflags(write=False)
    return strokes, rows


def downsample(images64: np.ndarray, size: int) -> np.ndarray:
    """The spec's lower-resolution renders: block means of uint8 ``[..., 64, 64, 3]`` over
    ``64 / size`` pixels, rounded with ``numpy.rint`` (``size`` 64 returns the input)."""
    f = CANVAS // _check_size(size)
    if f == 1:
        return images64
    lead = images64.shape[:-3]
    blocks = images64.reshape(*lead, size, f, size, f, 3).astype(np.float64)
    return np.rint(blocks.mean(axis=(-4, -2))).astype(np.uint8)


def render_objects(split: str, scenes: Sequence[Sequence[SceneObject]]) -> np.ndarray:
    """The 64x64 uint8 canvases ``[len(scenes), 64, 64, 3]`` of lists of objects (each with its
    ``mnist_index``); all strokes of one size are resized in one interpolate call."""
    _check_scene_split(split)
    strokes, rows = _split_digits(split)
    canvas = np.zeros((len(scenes), CANVAS, CANVAS, 3), dtype=np.uint8)
    placed = [(i, o) for i, objs in enumerate(scenes) for o in objs]
    for side in sorted({o.box[2] for _, o in placed}):
        group = [(i, o) for i, o in placed if o.box[2] == side]
        if any(o.mnist_index is None for _, o in group):
            raise ValueError("render_objects needs objects with their mnist_index (objects from describe_scene)")
        ids = np.array([rows[o.digit, o.mnist_index] for _, o in group])
        a = torch.nn.functional.interpolate(torch.from_numpy(strokes[ids])[:, None], size=(2 * side, 2 * side),
                                            mode="bilinear", align_corners=False)[:, 0].numpy().clip(0.0, 1.0)
        rgb = _RGB[[COLOURS.index(o.colour) for _, o in group]]  # [n, 3]
        pixels = np.rint(a[..., None] * rgb[:, None, None, :]).astype(np.uint8)
        for (i, o), p in zip(group, pixels, strict=True):
            r, c = box_slices(o.box, CANVAS)
            canvas[i, r, c] = p
    return canvas


class SceneBatch:
    """Many rendered scenes: ``images[size]`` uint8 ``[N, size, size, 3]`` for each size asked for,
    ``descriptions`` (list of :class:`SceneDescription`) and ``captions`` (list of str)."""

    def __init__(self, images: dict[int, np.ndarray], descriptions: list[SceneDescription]) -> None:
        self.images = images
        self.descriptions = descriptions

    @property
    def captions(self) -> list[str]:
        return [d.caption for d in self.descriptions]

    def __len__(self) -> int:
        return len(self.descriptions)


def render_scenes(split: str, seed: int, indices: Sequence[int] | np.ndarray,
                  sizes: Sequence[int] = SCENE_SIZES) -> SceneBatch:
    """Scenes ``(split, seed, i)`` for each ``i`` in ``indices``, rendered at ``sizes`` (vectorised:
    equal to :func:`render_scene` image by image)."""
    sizes = tuple(_check_size(s) for s in sizes)
    descriptions = describe_scenes(split, seed, indices)
    canvas = render_objects(split, [d.objects for d in descriptions])
    return SceneBatch({s: downsample(canvas, s) for s in sizes}, descriptions)


def render_scene(split: str, seed: int, index: int) -> Scene:
    """Scene ``(split, seed, index)``: caption, objects and its uint8 renders at 64, 32 and 16."""
    d = describe_scene(split, seed, index)
    canvas = render_objects(split, [d.objects])[0]
    return Scene(d.split, d.seed, d.index, d.layout, d.objects, d.caption,
                 image64=canvas, image32=downsample(canvas, 32), image16=downsample(canvas, 16))


# ----------------------------------------------------------------------------------------- reference set


@functools.lru_cache(maxsize=3)
def _reference(size: int) -> SceneBatch:
    batch = render_scenes(REFERENCE_SPLIT, REFERENCE_SEED, np.arange(REFERENCE_SIZE), sizes=(size,))
    batch.images[size].setflags(write=False)
    return batch


def reference_scenes(size: int = 32) -> SceneBatch:
    """The reference set: the 1,000 test scenes of seed 0 (indices 0..999) rendered at ``size``
    (cached per process; the images are read-only)."""
    return _reference(_check_size(size))


def reference_captions() -> list[str]:
    """The benchmark prompt list: the captions of the 1,000 reference scenes, in index order."""
    return [d.caption for d in describe_scenes(REFERENCE_SPLIT, REFERENCE_SEED, np.arange(REFERENCE_SIZE))]


def write_prompt_list(path: str | os.PathLike, captions: Sequence[str] | None = None) -> Path:
    """Write the prompt list (default: :func:`reference_captions`), one caption per line, UTF-8."""
    from difflab.fileio import atomic_path

    captions = reference_captions() if captions is None else list(captions)
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- dataset


class SceneDataset(_ImageDataset):
    """Scenes ``(split, seed, 0 .. num_scenes-1)`` as a map-style dataset of RGB images.

    ``get_items(indices, epoch)`` gives ``{"x0": float32 [B, 3, S, S] in [-1, 1], "y": int64 [B],
    "caption": list of B str}`` with ``S = image_size`` (64, 32 or 16: the spec's render at that size,
    never resized otherwise). ``y`` is the digit of the first object (the left / top one, the only one
    of single-digit scenes), so ``num_classes = 10`` and a class-conditional run on scenes is
    conditioned on that digit. :meth:`attributes` gives a scene's :class:`SceneDescription`.

    Renders are made on first use and kept in memory (``cache=True``: at most ``num_scenes * R * R * 3``
    bytes, 61 MB for 20,000 scenes at R = 32). Random flips are refused: a mirrored scene contradicts
    its caption (left / right).

    ``render_size`` R (default ``image_size``) renders the scenes larger than the training side: with
    ``random_crop`` each image is then an ``image_size`` window of the R x R render, its corner a pure
    function of ``(crop_seed, epoch, index)`` (super-resolution on patches, as unCLIP trains its
    upsamplers on crops of a quarter of the target area); the caption stays the whole scene's.
    """

    channels = 3
    num_classes = 10

    def __init__(self, split: Literal["train", "test"] = "train", *, seed: int = 0, num_scenes: int | None = None,
                 image_size: int = 32, random_flip: bool = False, cache: bool = True,
                 render_size: int | None = None, random_crop: bool = False, crop_seed: int = 0) -> None:
        if random_flip:
            raise ValueError("random_flip is not allowed for scenes: a mirrored scene contradicts its caption "
                             "('on the left' / 'on the right'); set data.random_flip to false")
        _check_scene_split(split)
        render = int(image_size) if render_size is None else int(render_size)
        _check_size(render, "render_size" if render_size is not None else "image_size")
        if random_crop and not (1 <= image_size <= render):
            raise ValueError(f"random crops of image_size={image_size} need 1 <= image_size <= render_size={render}")
        if not random_crop and render != image_size:
            raise ValueError(f"render_size={render} differs from image_size={image_size}: scenes are never resized "
                             "otherwise; set random_crop to take image_size windows of the larger renders")
        n = DEFAULT_NUM_SCENES[split] if num_scenes is None else int(num_scenes)
        if n < 1 or seed < 0:
            raise ValueError(f"num_scenes must be >= 1 and seed >= 0, got num_scenes={n}, seed={seed}")
        super().__init__(image_size=int(image_size), random_flip=False, flip_seed=int(crop_seed))
        self.split, self.seed, self.num_scenes = split, int(seed), n
        self.cache, self.render_size, self.random_crop = cache, render, bool(random_crop)
        self._descriptions: dict[int, SceneDescription] = {}
        self._images = np.empty((n, render, render, 3), dtype=np.uint8) if cache else None
        self._done = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return self.num_scenes

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} scenes")
        return idx % len(self)

    def attributes(self, i: int) -> SceneDescription:
        """Layout, objects (digit, colour, size, position, box, mnist_index) and caption of scene ``i``."""
        i = int(self._check_indices([i])[0])
        if i not in self._descriptions:
            self._descriptions[i] = describe_scene(self.split, self.seed, i)
        return self._descriptions[i]

    def captions(self, indices) -> list[str]:
        return [self.attributes(i).caption for i in self._check_indices(indices)]

    def _labels_of(self, idx: np.ndarray) -> np.ndarray:
        return np.array([self.attributes(i).objects[0].digit for i in idx], dtype=np.int64)

    def _raw(self, indices: np.ndarray) -> torch.Tensor:
        idx = self._check_indices(indices)
        todo = np.unique(idx[~self._done[idx]]) if self.cache else idx
        if len(todo):
            canvas = render_objects(self.split, [self.attributes(i).objects for i in todo])
            images = downsample(canvas, self.render_size)
            if not self.cache:
                return torch.from_numpy(images)
            self._images[todo] = images
            self._done[todo] = True
        return torch.from_numpy(self._images[idx])

    def images(self, indices) -> np.ndarray:
        """uint8 renders ``[B, R, R, 3]`` of scenes ``indices`` (R = ``render_size``, uncropped)."""
        return self._raw(np.asarray(indices)).numpy()

    def _raw_at(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        raw = self._raw(indices)
        if not self.random_crop:
            return raw
        return torch.from_numpy(random_crops(raw.numpy(), self.image_size, seed=self.flip_seed, epoch=epoch,
                                             indices=self._check_indices(indices)))

    def get_batch(self, indices, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32 [B, 3, S, S] in [-1, 1], y int64 [B] = first object's digit)``; ``epoch`` picks
        the crops under ``random_crop`` and changes nothing otherwise (no flips)."""
        idx = self._check_indices(indices)
        e = self.epoch if epoch is None else int(epoch)
        return uint8_to_float(self._raw_at(idx, e)), torch.from_numpy(self._labels_of(idx))

    def get_items(self, indices, epoch: int | None = None) -> dict[str, Any]:
        """``{"x0", "y", "caption"}`` of scenes ``indices`` (see the class docstring)."""
        idx = self._check_indices(indices)
        x, y = self.get_batch(idx, epoch)
        return {"x0": x, "y": y, "caption": [self.attributes(i).caption for i in idx]}
