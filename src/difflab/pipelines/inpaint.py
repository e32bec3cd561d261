"""``difflab inpaint``: fill in the masked region of one image with a trained run (GLIDE, Sec. 4.3).

A composition of what exists: the image and mask PNGs are read and checked here, then
:func:`difflab.generate.draw_samples` draws with ``inpaint_image`` / ``inpaint_mask`` and one of the rules of
:mod:`difflab.inpaint` (``"glide"`` for an inpainting model, ``"replace"`` for any diffusion model), with the
run's sampler, steps, prompts and guidance. No sampling loop lives here.

Files (docs/inpainting.md):

* ``--image``: the picture, at the size the run's samples have (``difflab sample``'s output: 28x28 for an
  MNIST run, whose 32x32 training frame is padded back on here), RGB for a 3-channel run, greyscale for a
  1-channel one (an RGB file whose three channels are equal is read as grey; an alpha channel must be opaque).
* ``--mask``: the same size; **white (255) = keep, black (0) = fill in** (GLIDE's mask, 1 = known, drawn as a
  picture; ``invert_mask`` for the opposite, diffusers' convention). Only 0 and 255 are accepted: a grey pixel
  (an antialiased edge, a JPEG) is refused rather than thresholded, since it would be a guess which side it
  belongs to.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_image_file", "read_mask_file", "inpaint_run"]

_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def _read_pixels(path: str | os.PathLike, flag: str) -> np.ndarray:
    """uint8 ``[H, W, 1 or 3]`` of an 8-bit image file (alpha checked opaque and dropped); one-line errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in _MODES:
                raise ValueError(f"{flag} {path}: image mode {mode} is not read here; save it as an 8-bit grey or "
                                 "RGB PNG")
            im = im.convert("RGBA" if mode == "P" else "L" if mode == "1" else mode)
            arr = np.array(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError(f"{flag} {path}: not an image file PIL can read") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape[-1] in (2, 4):  # LA / RGBA
        if not bool((arr[..., -1] == 255).all()):
            raise ValueError(f"{flag} {path}: has transparent pixels; difflab reads opaque images only (white = "
                             "keep, black = fill in for a mask)")
        arr = arr[..., :-1]
    return arr


def _is_grey(rgb: np.ndarray) -> bool:
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def _check_side(arr: np.ndarray, side: int, path, flag: str) -> None:
    h, w = arr.shape[:2]
    if (h, w) != (side, side):
        raise ValueError(f"{flag} {path} is {w}x{h}; this run's images are {side}x{side}")


def read_image_file(path: str | os.PathLike, channels: int, side: int, flag: str = "--image") -> torch.Tensor:
    """The image to inpaint (or vary): float32 ``[1, channels, side, side]`` in [-1, 1] (x / 127.5 - 1); ValueError
    naming ``flag`` if its size or channels do not fit."""
    from difflab.data import uint8_to_float

    return uint8_to_float(_image_pixels(path, channels, side, flag)[None])


def _image_pixels(path: str | os.PathLike, channels: int, side: int, flag: str = "--image") -> np.ndarray:
    """uint8 ``[side, side, channels]`` of the image file (see :func:`read_image_file`)."""
    arr = _read_pixels(path, flag)
    _check_side(arr, side, path, flag)
    if channels == 1 and arr.shape[-1] == 3:
        if not _is_grey(arr):
            raise ValueError(f"{flag} {path} is a colour (RGB) image; this run makes greyscale (1-channel) images")
        arr = arr[..., :1]
    if channels == 3 and arr.shape[-1] == 1:
        raise ValueError(f"{flag} {path} is a greyscale image; this run makes RGB (3-channel) images")
    if arr.shape[-1] != channels:
        raise ValueError(f"{flag} {path} has {arr.shape[-1]} channels; this run makes {channels}-channel images")
    return arr


def read_mask_file(path: str | os.PathLike, side: int, *, invert: bool = False) -> torch.Tensor:
    """The mask: float32 ``[1, 1, side, side]``, 1 = known. In the file white (255) = keep and black (0) = fill
    in (``invert``: the opposite); any other value, or colour, is a ValueError naming the first such pixel."""
    arr = _read_pixels(path, "--mask")
    _check_side(arr, side, path, "--mask")
    if arr.shape[-1] == 3 and not _is_grey(arr):
        raise ValueError(f"--mask {path} has colours; a mask is black and white (white = keep, black = fill in)")
    grey = arr[..., 0]
    bad = (grey != 0) & (grey != 255)
    if bool(bad.any()):
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"--mask {path} is not black and white: {int(bad.sum())} pixels are neither 0 nor 255 (e.g. "
                         f"{int(grey[r, c])} at row {r}, column {c}); white = keep, black = fill in, nothing between")
    keep = grey == (0 if invert else 255)
    if bool(keep.all()):
        colour = "black" if invert else "white"
        raise ValueError(f"--mask {path} is all {colour} (keep): nothing to fill in (white = keep, black = fill in"
                         f"{'; --invert-mask swaps them' if invert else ''})")
    return torch.from_numpy(keep.astype(np.float32))[None, None]


def inpaint_run(
    run_dir,
    image,
    mask,
    *,
    prompts=None,
    n: int | None = None,
    sampler: str | None = None,
    steps: int | str | None = None,
    eta: float | None = None,
    label: int | str | None = None,
    seed: int | None = None,
    batch: int | None = None,
    guidance_scale: float | None = None,
    rule: str | None = None,
    invert_mask: bool = False,
    out=None,
    npz=None,
    ema: str | float | None = None,
    checkpoint=None,
    bf16: bool | None = None,
    progress: bool = False,
) -> list[Path]:
    """``difflab inpaint``: ``n`` fillings of ``mask``'s black region of ``image`` (PNG paths, see the module
    docstring) by the run in ``run_dir``, written as a PNG grid ``out`` and / or an ``.npz`` (uint8 NHWC, at the
    run's output size); with neither, both to ``RUN/samples/inpaint_<rule>_<n>[_w<w>].{png,npz}`` (never over an
    existing file). ``rule``: ``"glide"`` / ``"replace"`` / None (see :mod:`difflab.inpaint`); the rest as
    :func:`difflab.generate.sample_run`. Everything is checked before the weights are loaded. Returns the paths
    written (rank 0)."""
    from difflab.build import load_run, load_run_config, resolve_ema
    from difflab.data import pad_to, uint8_to_float
    from difflab.generate import _free_names, _save, check_output_files, draw_samples, get_sampler
    from difflab.images import to_output_size, to_uint8
    from difflab.inpaint import INPAINT_RULES
    from difflab.train import distributed as dist_utils

    info = dist_utils.init_distributed()
    cfg = load_run_config(run_dir)
    name = sampler or cfg.sample.sampler
    get_sampler(name)
    check_output_files(out=out, npz=npz)
    if rule is not None and rule not in INPAINT_RULES:
        raise ValueError(f"--rule {rule!r}: valid rules are {', '.join(INPAINT_RULES)}")
    if getattr(cfg.model, "low_res_channels", 0):
        raise ValueError("difflab inpaint draws with base models; a super-resolution stage also takes low-res images: "
                         "call difflab.generate.draw_samples(low_res=..., inpaint_image=..., inpaint_mask=...)")
    side = cfg.data.sample_size
    native = to_output_size(torch.zeros(1, 1, side, side), cfg.data).shape[-1]  # what difflab sample writes
    pixels = _image_pixels(image, cfg.model.in_channels, native)
    m = read_mask_file(mask, native, invert=invert_mask)
    keep = m[0, 0].numpy() == 1
    x = uint8_to_float(pixels[None])
    if native != side:  # a padded built-in source (MNIST 28 -> 32): the frame is known background
        x, m = pad_to(x, side, value=-1.0), pad_to(m, side, value=1.0)
    if rule is None:
        rule = "glide" if getattr(cfg.model, "inpaint", False) else "replace"
    if rule == "glide" and not getattr(cfg.model, "inpaint", False):
        raise ValueError("--rule glide needs an inpainting run (model.inpaint: true); this run is not one: use "
                         "--rule replace (any diffusion model)")
    cfg, _, denoiser = load_run(run_dir, ema=resolve_ema(cfg, ema), checkpoint=checkpoint, device=info.device)
    samples, labels = draw_samples(denoiser, cfg, n=n, sampler=name, steps=steps, eta=eta, label=label, seed=seed,
                                   batch=batch, guidance_scale=guidance_scale, bf16=bf16, prompts=prompts,
                                   inpaint_image=x, inpaint_mask=m, inpaint_rule=rule,
                                   progress=progress and info.rank == 0)
    written = []
    if info.rank == 0:
        if out is None and npz is None:
            w = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
            out, npz = _free_names(Path(run_dir) / "samples" / (f"inpaint_{rule}_{len(samples)}"
                                                                + (f"_w{w:g}" if w else "")))
        check_output_files(out=out, npz=npz)  # again: something may have appeared while sampling
        images = to_uint8(samples, cfg.data)
        # the known pixels are the file's own bytes: float_to_uint8 truncates (OpenAI's image_sample.py), so
        # v / 127.5 - 1 would come back as v - 1 for a quarter of the values v
        images[:, keep] = pixels[keep]
        written += _save(images, labels.numpy() if labels is not None else None, out, npz)
    return written
