"""Writing images for people and for evaluators: PNG grids and OpenAI-layout ``.npz`` files.

In memory images are float ``[N, C, H, W]`` in [-1, 1]; on disk a grid is one PNG and a sample set
is an ``.npz`` with ``arr_0`` = uint8 ``[N, H, W, C]`` and ``arr_1`` = int64 labels ``[N]``.
Both are written atomically (a crash never leaves a half-written file under the final name).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from difflab.data import center_crop, float_to_uint8
from difflab.fileio import atomic_write_with

# Native side of the built-in data sources (they are padded up to data.image_size for training).
NATIVE_SIZE = {"mnist5k": 28, "digits": 8}


def to_output_size(x: torch.Tensor, data_cfg) -> torch.Tensor:
    """Undo the training-time padding: built-in sources padded to ``image_size`` are centre-cropped
    back to their native side (32x32 MNIST -> 28x28). Other sources are returned unchanged."""
    native = NATIVE_SIZE.get(data_cfg.source)
    if native is not None and x.shape[-1] > native:
        return center_crop(x, native)
    return x


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 ``[N, H, W, C]`` images into one uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]``
    image on a black background; ``nrow`` images per row (default: a near-square grid)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected non-empty uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = im
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> None:
    """Write uint8 ``[N, H, W, C]`` images as one PNG grid (each pixel enlarged ``scale`` times)."""
    grid = make_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write_with(path, lambda p: pil.save(p, format="PNG"))


def save_npz(images: np.ndarray, labels: np.ndarray | None, path: str | os.PathLike) -> None:
    """Write the OpenAI evaluator layout: ``arr_0`` uint8 NHWC, ``arr_1`` int64 labels (when given)."""
    arrays = {"arr_0": np.asarray(images, dtype=np.uint8)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)

    def write(p):
        with open(p, "wb") as f:
            np.savez(f, **arrays)

    atomic_write_with(path, write)


def to_uint8(x: torch.Tensor, data_cfg) -> np.ndarray:
    """Float ``[N, C, H, W]`` samples in [-1, 1] -> uint8 NHWC at the data's native size."""
    return float_to_uint8(to_output_size(x, data_cfg))
