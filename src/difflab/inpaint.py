"""Inpainting (GLIDE, Nichol et al. 2021, Sec. 3.3 / 4.3): training masks and the rules that keep a known region.

Mask convention, everywhere in difflab (GLIDE's, glide-text2im ``notebooks/inpaint.ipynb``): a mask is
float ``[N, 1, H, W]`` holding exactly 0 or 1, **1 = known** (kept from the image), **0 = to fill in**. On disk
(``difflab inpaint --mask``) white (255) is known, black (0) is filled in: the mask drawn as a picture.

Notation map (code -> paper / official code):
    image            x, the picture being inpainted, [N, C, H, W] in [-1, 1]
    mask             m, 1 on the known pixels (official ``inpaint_mask``)
    image * mask     the network's ``inpaint_image``: the known pixels, 0 (mid grey) elsewhere
    paste_known      x0 * (1 - m) + x * m: the official notebook's ``denoised_fn`` on x0^

Training (:func:`random_mask`): GLIDE "erase[s] random regions of training examples"; each example here gets one
mask, a pure function of its 63-bit seed: with :data:`MASK_PROBS` an erased box, erased free-form brush strokes,
or nothing known at all (the whole image erased: the same network is then also a plain text-to-image model).

Sampling, two rules (:data:`INPAINT_RULES`), both compositions of the existing samplers (no loop here):

* ``"glide"`` - an inpainting network (``model.inpaint: true``) gets ``inpaint_image`` / ``inpaint_mask`` as
  model inputs, and every x0^ has the known region pasted in (:func:`paste_known` as the samplers'
  ``denoised_fn``, before clipping, as the official ``process_xstart``). The chain's last step returns x0^, so
  the result keeps the known pixels up to the rounding of the last posterior coefficients (~1e-7).
* ``"replace"`` - any diffusion model (:class:`ReplaceKnown`): before every network call at step t the known
  region of x_t is replaced by a fresh draw of q(x_t | image) (DDPM eq. 4), and the final x_0 has the image
  pasted in. Every sampler's update is pixel-wise given the network's output, so this equals replacing the
  known region of each x_{t-1} by q_sample(image, t-1) after each step (Song et al. 2021 imputation; RePaint,
  Lugmayr et al. 2022, *without* its resampling jumps), except that the first network call also sees the known
  region at level T-1 where RePaint leaves x_T pure noise. The final sample equals the image on the known
  region exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from difflab.guidance import WrappedDenoiser
from difflab.process import q_sample

Tensor = torch.Tensor

__all__ = ["MASK_KINDS", "MASK_PROBS", "INPAINT_RULES", "mask_kind", "random_mask", "random_masks", "mask_seeds",
           "paste_known", "glide_denoised_fn", "ReplaceKnown", "check_mask", "InpaintCondition"]

#: what a training mask erases, drawn with :data:`MASK_PROBS`: a box, brush strokes, or everything (none known)
MASK_KINDS: tuple[str, ...] = ("box", "strokes", "all")
MASK_PROBS: tuple[float, ...] = (0.45, 0.45, 0.10)
INPAINT_RULES: tuple[str, ...] = ("glide", "replace")
_SALT = 0x1A9A1  # keeps mask draws apart from any other SeedSequence of the same seed


# ------------------------------------------------------------------------------------------- training masks


def _rng(seed: int) -> np.random.Generator:
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"mask seeds must be in [0, 2**63), got {seed}")
    return np.random.default_rng(np.random.SeedSequence([_SALT, int(seed)]))


def mask_kind(seed: int) -> str:
    """The :data:`MASK_KINDS` entry that :func:`random_mask` draws for ``seed`` (its first draw)."""
    return MASK_KINDS[int(_rng(seed).choice(len(MASK_KINDS), p=MASK_PROBS))]


def _erase_strokes(known: np.ndarray, rng: np.random.Generator) -> None:
    """Erase 1-3 polylines of 1-4 segments with a round brush (free-form masks, Yu et al. 2019's kind)."""
    size = known.shape[0]
    centres = np.arange(size) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(0.75, max(1.0, size / 10))  # >= 0.75: a point always covers a pixel centre
        p = rng.uniform(0, size, 2)  # (row, col)
        for _ in range(int(rng.integers(1, 5))):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 8, size / 2)
            q = np.clip(p + length * np.array([np.sin(angle), np.cos(angle)]), 0, size)
            # distance of every pixel centre to the segment p-q
            d = q - p
            s = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
            dist2 = (yy - p[0] - s * d[0]) ** 2 + (xx - p[1] - s * d[1]) ** 2
            known[dist2 <= radius**2] = 0
            p = q


def random_mask(seed: int, size: int) -> Tensor:
    """The training mask of ``seed``: float32 ``[1, size, size]``, 1 = known, 0 = erased (a pure function).

    Kinds (:func:`mask_kind`, rates :data:`MASK_PROBS`): ``box`` erases one axis-aligned rectangle whose sides
    are uniform in [size/4, 3 size/4] pixels, placed uniformly; ``strokes`` erases 1-3 brush strokes (polylines
    of 1-4 segments of length size/8..size/2, brush radius 0.75..size/10 pixels); ``all`` erases everything.
    """
    if size < 2:
        raise ValueError(f"mask size must be >= 2, got {size}")
    rng = _rng(seed)
    kind = MASK_KINDS[int(rng.choice(len(MASK_KINDS), p=MASK_PROBS))]
    known = np.ones((size, size), dtype=np.float32)
    if kind == "box":
        lo, hi = max(1, size // 4), max(1, (3 * size) // 4)
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        known[top:top + h, left:left + w] = 0
    elif kind == "strokes":
        _erase_strokes(known, rng)
    else:
        known[:] = 0
    return torch.from_numpy(known)[None]


def random_masks(seeds: Sequence[int] | Tensor, size: int) -> Tensor:
    """:func:`random_mask` of each seed, stacked: float32 ``[len(seeds), 1, size, size]``."""
    seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
    if not seeds:
        return torch.ones((0, 1, size, size))
    return torch.stack([random_mask(int(s), size) for s in seeds])


def mask_seeds(n: int, generator: torch.Generator) -> Tensor:
    """``n`` mask seeds (int64 [n], in [0, 2**62)) from ``generator``: what a training step draws, so that a
    checkpoint of the generator state resumes the same masks."""
    return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device, dtype=torch.int64).cpu()


# ------------------------------------------------------------------------------------------- the known region


def paste_known(x: Tensor, image: Tensor, mask: Tensor) -> Tensor:
    """``x * (1 - mask) + image * mask``: ``image`` on the known pixels, ``x`` elsewhere ([N, C, H, W]; mask
    [N or 1, 1, H, W] of 0 / 1). Exact: with a binary mask each pixel is one of the two, unchanged."""
    mask = mask.to(x.dtype)
    return x * (1 - mask) + image.to(x.dtype) * mask


def glide_denoised_fn(image: Tensor, mask: Tensor) -> Callable[[Tensor], Tensor]:
    """GLIDE's ``denoised_fn`` (official inpaint notebook): x0^ -> x0^ with the known region of ``image``."""
    def denoised_fn(x0: Tensor) -> Tensor:
        return paste_known(x0, image, mask)

    return denoised_fn


class ReplaceKnown(WrappedDenoiser):
    """A denoiser whose network sees, at step t, x_t with its known region replaced by q_sample(image, t).

    The ``"replace"`` rule (see the module docstring) for any denoiser, with the :class:`~difflab.denoiser.Denoiser`
    interface (``respace`` keeps the image, the mask and the generator). The sampler's state itself is not
    touched: only the network's input and hence x0^, eps and the mean; call :func:`paste_known` on the final x_0.

    Args:
        denoiser: any denoiser (guided or not).
        image: [N, C, H, W] in [-1, 1]; mask: [N or 1, 1, H, W], 1 = known.
        generator: the source of q_sample's fresh noise (on the image's device).
    """

    def __init__(self, denoiser: Any, image: Tensor, mask: Tensor, generator: torch.Generator | None = None):
        self.denoiser, self.image, self.mask, self.generator = denoiser, image, mask, generator

    def respace(self, spec) -> ReplaceKnown:
        if spec is None:
            return self
        return ReplaceKnown(self.denoiser.respace(spec), self.image, self.mask, self.generator)

    def known_at(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t with the known region replaced by x ~ q(x_t | image) (fresh noise from the generator)."""
        image = self.image.to(device=x_t.device, dtype=x_t.dtype)
        return paste_known(x_t, q_sample(self.process, image, t, generator=self.generator), self.mask.to(x_t.device))

    def model_output(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.denoiser.model_output(self.known_at(x_t, t), t, **cond)

    def __call__(self, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False,
                 denoised_fn: Callable[[Tensor], Tensor] | None = None, **cond: Any):
        return self.denoiser(self.known_at(x_t, t), t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **cond)


def check_mask(mask: Tensor, what: str = "inpaint_mask") -> Tensor:
    """``mask`` as float32 if it is ``[N, 1, H, W]`` and holds only 0 and 1; ValueError saying what is wrong."""
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{what} must be a [N, 1, H, W] tensor of 0 (fill in) and 1 (known), got {got}")
    mask = mask.float()
    bad = ~((mask == 0) | (mask == 1))
    if bool(bad.any()):
        raise ValueError(f"{what} must hold only 0 (fill in) and 1 (known); {int(bad.sum())} values are neither "
                         f"(e.g. {float(mask[bad][0]):g})")
    return mask


# ------------------------------------------------------------------------------------------- draw_samples' part


class InpaintCondition:
    """:func:`difflab.generate.draw_samples`' known region, batch by batch.

    Args:
        cfg: the run config (``model.inpaint`` says whether the network takes the known region).
        image: [n or 1, C, S, S] in [-1, 1]; mask: [n or 1, 1, S, S] of 0 / 1 (1 = known).
        rule: ``"glide"`` (an inpainting model), ``"replace"`` (any model), or None: ``"glide"`` for an
            inpainting model, else ``"replace"``. An inpainting model always gets its ``inpaint_image`` /
            ``inpaint_mask`` inputs; the rule says how the chain keeps the known region.
        n: the number of samples; shape: (C, S, S) of one sample.
    """

    def __init__(self, cfg, image: Tensor | None, mask: Tensor | None, rule: str | None, n: int,
                 shape: tuple[int, ...]) -> None:
        self.inpaint_model = bool(getattr(cfg.model, "inpaint", False))
        if image is None or mask is None:
            given = "inpaint_rule" if image is None and mask is None else "inpaint_image" if mask is None \
                else "inpaint_mask"
            raise ValueError(f"inpainting needs both inpaint_image and inpaint_mask (got only {given})")
        if rule is None:
            rule = "glide" if self.inpaint_model else "replace"
        if rule not in INPAINT_RULES:
            raise ValueError(f"unknown inpainting rule {rule!r}; valid: {', '.join(INPAINT_RULES)}")
        if rule == "glide" and not self.inpaint_model:
            raise ValueError("the 'glide' inpainting rule needs an inpainting model (model.inpaint: true); this run is "
                             "not one: use the 'replace' rule, which works with any diffusion model")
        mask = check_mask(mask)
        if not isinstance(image, Tensor) or image.dim() != 4 or tuple(image.shape[1:]) != tuple(shape):
            got = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"inpaint_image is {got}; this model takes [{n} or 1, {', '.join(map(str, shape))}]")
        if tuple(mask.shape[2:]) != tuple(shape[1:]):
            raise ValueError(f"inpaint_mask is {list(mask.shape)}; this model takes [{n} or 1, 1, "
                             f"{shape[1]}, {shape[2]}] (the image's side)")
        image = image.float()
        if not bool(torch.isfinite(image).all()) or float(image.abs().max()) > 1 + 1e-6:
            raise ValueError("inpaint_image must hold finite values in [-1, 1]")
        for what, t in (("inpaint_image", image), ("inpaint_mask", mask)):
            if len(t) not in (1, n):
                raise ValueError(f"{what} holds {len(t)} images; give 1 (for every sample) or n = {n}")
        self.rule = rule
        self.image, self.mask = image.expand(n, *image.shape[1:]), mask.expand(n, *mask.shape[1:])

    def model_kwargs(self, lo: int, hi: int, device) -> dict[str, Tensor]:
        """The network's ``inpaint_image`` (image * mask) and ``inpaint_mask`` (an inpainting model only)."""
        if not self.inpaint_model:
            return {}
        m = self.mask[lo:hi].to(device)
        return {"inpaint_image": self.image[lo:hi].to(device) * m, "inpaint_mask": m}

    def sampler_kwargs(self, lo: int, hi: int, device) -> dict[str, Any]:
        """``denoised_fn`` of the ``"glide"`` rule; nothing for ``"replace"``."""
        if self.rule != "glide":
            return {}
        return {"denoised_fn": glide_denoised_fn(self.image[lo:hi].to(device), self.mask[lo:hi].to(device))}

    def wrap(self, denoiser, lo: int, hi: int, batch_seed: int, device):
        """The batch's denoiser: :class:`ReplaceKnown` around ``denoiser`` for ``"replace"`` (its noise from a
        generator seeded with (batch_seed, 1)), ``denoiser`` itself for ``"glide"``."""
        if self.rule != "replace":
            return denoiser
        seed = int(np.random.SeedSequence([int(batch_seed), 1]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        g = torch.Generator(device).manual_seed(seed)
        return ReplaceKnown(denoiser, self.image[lo:hi].to(device), self.mask[lo:hi].to(device), g)

    def finish(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """The batch's samples: for ``"replace"`` with the image pasted into the known region (q(x_{-1} | x) is
        the image itself); unchanged for ``"glide"``, whose last step returns x0^ (already pasted)."""
        if self.rule != "replace":
            return x
        return paste_known(x, self.image[lo:hi].to(x.device), self.mask[lo:hi].to(x.device))
