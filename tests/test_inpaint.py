"""Inpainting (difflab.inpaint): training masks are pure functions of their seeds at the stated rates; GLIDE's rule
keeps the known region in x0^ exactly; the replacement rule equals replacing x_{t-1}'s known region after every
step and ends on the image exactly, for every sampler; bad masks and rules are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.build import build_denoiser, build_model
from difflab.config import load_config
from difflab.generate import draw_samples, sampler_names
from difflab.inpaint import (
    MASK_KINDS,
    MASK_PROBS,
    InpaintCondition,
    ReplaceKnown,
    check_mask,
    glide_denoised_fn,
    mask_kind,
    mask_seeds,
    paste_known,
    random_mask,
    random_masks,
)
from difflab.process import q_sample
from difflab.samplers import ddim_sample, sample_ddim

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "mnist-tiny.yaml"


def _is_rectangle(erased: np.ndarray) -> tuple[bool, int, int]:
    rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    return bool(erased.sum() == h * w), int(h), int(w)


def test_masks_are_pure_functions_of_their_seeds():
    a, b = random_masks([3, 11, 2**62 - 1], 16), random_masks([3, 11, 2**62 - 1], 16)
    assert a.shape == (3, 1, 16, 16) and a.dtype == torch.float32 and torch.equal(a, b)
    assert set(torch.unique(a).tolist()) <= {0.0, 1.0}
    assert torch.equal(random_mask(11, 16), a[1])
    assert not torch.equal(random_mask(4, 16), random_mask(5, 16))
    # the seeds a training step draws come from its generator: the same generator state, the same seeds
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    first = mask_seeds(32, g)
    g.set_state(state)
    assert torch.equal(mask_seeds(32, g), first) and int(first.min()) >= 0
    with pytest.raises(ValueError, match="mask seeds"):
        random_mask(-1, 16)


def test_mask_kinds_come_at_the_stated_rates_and_look_as_stated():
    n, size = 2000, 16
    kinds = [mask_kind(s) for s in range(n)]
    for kind, p in zip(MASK_KINDS, MASK_PROBS, strict=True):
        share = kinds.count(kind) / n
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), (kind, share, p)  # within 4 sigma
    box_sides, stroke_fill = [], []
    for s in range(300):
        erased = random_mask(s, size)[0].numpy() == 0
        kind = mask_kind(s)
        if kind == "all":
            assert erased.all()
            continue
        assert erased.any() and not erased.all(), (s, kind)
        rect, h, w = _is_rectangle(erased)
        if kind == "box":
            assert rect and 4 <= h <= 12 and 4 <= w <= 12, (s, h, w)
            box_sides += [h, w]
        else:
            stroke_fill.append(erased.mean())
    assert min(box_sides) == 4 and max(box_sides) == 12  # the whole stated range of sides occurs
    assert 0.05 < np.mean(stroke_fill) < 0.6 and np.std(stroke_fill) > 0.03  # strokes: varied, never everything


def test_paste_and_the_glide_rule_keep_the_known_region_exactly():
    torch.manual_seed(0)
    x0, image = torch.randn(4, 3, 8, 8) * 3, torch.rand(4, 3, 8, 8) * 2 - 1
    mask = random_masks([1, 2, 3, 4], 8)
    out = glide_denoised_fn(image, mask)(x0)
    known = mask.expand_as(x0) == 1
    assert torch.equal(out[known], image[known]) and torch.equal(out[~known], x0[~known])
    # through a denoiser: x0^ of every call keeps the image on the known region, whatever the network says
    cfg = load_config(TINY)
    torch.manual_seed(1)
    denoiser = build_denoiser(cfg, build_model(cfg).eval())
    img = torch.rand(4, 1, 8, 8) * 2 - 1
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([99, 60, 10, 0])
    with torch.no_grad():
        p = denoiser(x_t, t, clip_denoised=True, denoised_fn=glide_denoised_fn(img, mask))
    k = mask.expand_as(img) == 1
    assert torch.equal(p.pred_xstart[k], img[k]) and not torch.equal(p.pred_xstart[~k], img[~k])


def _tiny():
    cfg = load_config(TINY)
    torch.manual_seed(2)
    return cfg, build_denoiser(cfg, build_model(cfg).eval())


def test_the_replacement_rule_ends_on_the_image_for_every_sampler():
    cfg, denoiser = _tiny()
    image = torch.rand(1, 1, 8, 8) * 2 - 1
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 0
    known = mask.expand(3, 1, 8, 8) == 1
    for name in sampler_names():
        x, _ = draw_samples(denoiser, cfg, n=3, sampler=name, steps=4, seed=5, inpaint_image=image,
                            inpaint_mask=mask, distributed=False)
        assert torch.equal(x[known], image.expand(3, 1, 8, 8)[known]), name
        assert not torch.equal(x[~known], image.expand(3, 1, 8, 8)[~known])
        again, _ = draw_samples(denoiser, cfg, n=3, sampler=name, steps=4, seed=5, inpaint_image=image,
                                inpaint_mask=mask, distributed=False)
        assert torch.equal(x, again), name  # the replacement noise is seeded too


def test_replacement_equals_replacing_the_state_after_every_step():
    """DDIM recomputes eps from the sampler's own x_t: only the unknown region of the state matters, so the
    wrapper equals a loop that overwrites the known region of x_{t-1} with q_sample(image, t-1) after each step."""
    _, denoiser = _tiny()
    torch.manual_seed(3)
    image, x_T = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    mask = random_masks([1, 9], 8)
    ours = paste_known(sample_ddim(ReplaceKnown(denoiser, image, mask, torch.Generator().manual_seed(4)), x_T,
                                   steps=5), image, mask)
    d, g, x = denoiser.respace(5), torch.Generator().manual_seed(4), x_T
    with torch.no_grad():
        for step in range(d.num_timesteps - 1, -1, -1):
            t = torch.full((2,), step)
            x = paste_known(x, q_sample(d.process, image, t, generator=g), mask)  # the state itself replaced
            x = ddim_sample(d, x, t)["sample"]
    reference = paste_known(x, image, mask)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_bad_masks_and_rules_are_one_line_errors():
    cfg, _ = _tiny()
    image, mask = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        check_mask(torch.full((1, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        check_mask(torch.ones(1, 3, 8, 8))
    cases = [
        (dict(image=image, mask=mask, rule="glide"), "needs an inpainting model"),
        (dict(image=image, mask=mask, rule="paste"), "valid: glide, replace"),
        (dict(image=image, mask=None, rule=None), "both inpaint_image and inpaint_mask"),
        (dict(image=torch.zeros(1, 3, 8, 8), mask=mask, rule=None), "this model takes"),
        (dict(image=image, mask=torch.ones(1, 1, 4, 4), rule=None), "the image's side"),
        (dict(image=image + 3, mask=mask, rule=None), r"in \[-1, 1\]"),
        (dict(image=torch.zeros(2, 1, 8, 8), mask=mask, rule=None), "give 1"),
    ]
    for kw, needle in cases:
        with pytest.raises(ValueError, match=needle):
            InpaintCondition(cfg, kw["image"], kw["mask"], kw["rule"], 3, (1, 8, 8))
    assert InpaintCondition(cfg, image, mask, None, 3, (1, 8, 8)).rule == "replace"  # a plain model's default


def test_an_inpainting_upsampler_takes_the_low_res_image_and_the_known_region():
    """GLIDE's upsample-inpaint: [x_t, image * mask, mask, up(low_res)] (10 channels); the known region exact."""
    cfg = load_config(ROOT / "configs" / "scenes-sr16-32.yaml", [
        "model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8", "model.text.xf_width=16",
        "model.text.xf_layers=1", "diffusion.steps=100", "augment.steps=100", "augment.max_level=50",
        "model.inpaint=true"])
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    seen = []
    net.input_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    image, low = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.ones(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 0
    x, _ = draw_samples(build_denoiser(cfg, net), cfg, n=2, steps=2, low_res=low, aug_level=0, prompts=["a 7"],
                        inpaint_image=image, inpaint_mask=mask, distributed=False)
    known = mask.expand(2, 3, 32, 32) == 1
    assert torch.equal(x[known], image.expand(2, 3, 32, 32)[known])
    h = seen[0]
    assert h.shape == (2, 10, 32, 32) and torch.equal(h[:, 3:6], (image * mask).expand(2, 3, 32, 32))
    assert torch.equal(h[:, 6:7], mask.expand(2, 1, 32, 32))
