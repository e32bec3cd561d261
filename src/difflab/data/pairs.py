"""Super-resolution pairs: every batch also carries ``low_res``, its ``x0`` area-downsampled.

This is how the official super-resolution training makes its conditioning image
(guided-diffusion ``super_res_train.py``: ``F.interpolate(high_res, small_size, mode="area")``, as
in CDM and GLIDE's upsampler): the pair is made from the one high-resolution image, after its crop
and flip, so the two always agree. When ``s`` divides ``S`` area interpolation is the mean of each
``S/s`` x ``S/s`` block. :class:`LowResPairs` wraps any dataset (``get_items``) or batch source
(``batch``), so pairs work for every data source; ``build_dataset`` / ``build_source`` apply it when
``data.low_res_size`` is set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LowResPairs", "area_downsample"]


def area_downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` [B, C, H, W] -> [B, C, size, size] by area averaging (``F.interpolate(mode="area")``,
    i.e. adaptive average pooling: block means when ``size`` divides H and W)."""
    if x.shape[-1] < size or x.shape[-2] < size:
        raise ValueError(f"cannot area-downsample {x.shape[-2]}x{x.shape[-1]} images to {size}x{size}")
    return F.interpolate(x, size=(size, size), mode="area")


class LowResPairs:
    """``inner`` with ``low_res`` [b, C, size, size] added to each batch dict it gives.

    ``inner`` is a map-style dataset (``get_items(indices, epoch)``) or a
    :class:`~difflab.data.sources.BatchSource` (``batch(step)``); every other attribute is
    ``inner``'s (``len``, ``num_classes``, ``channels``, ``get_batch``, ...).
    """

    def __init__(self, inner: Any, size: int) -> None:
        image_size = getattr(inner, "image_size", None)
        if not isinstance(size, int) or size < 1 or (image_size is not None and size >= image_size):
            raise ValueError(f"data.low_res_size must be an integer in [1, image_size={image_size}), got {size!r}")
        self.inner = inner
        self.low_res_size = size

    def _add(self, items: dict[str, Any]) -> dict[str, Any]:
        return {**items, "low_res": area_downsample(items["x0"], self.low_res_size)}

    def get_items(self, indices, epoch: int | None = None) -> dict[str, Any]:
        return self._add(self.inner.get_items(indices, epoch))

    def batch(self, step: int) -> dict[str, Any]:
        return self._add(self.inner.batch(step))

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
