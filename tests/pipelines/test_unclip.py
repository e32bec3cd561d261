"""unCLIP's pipeline (difflab.pipelines.unclip) on tiny trained runs: slerp, DDIM inversion round trips (an exact
Gaussian denoiser, and the tiny decoder), variations, best-of-k prior draws, interpolations and text diffs, and the
CLI's one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from difflab.build import build_denoiser, build_process
from difflab.cli import main
from difflab.clip_features import slerp
from difflab.clip_guidance import clip_tokens
from difflab.config import load_config
from difflab.data.sources import build_dataset
from difflab.generate import draw_samples
from difflab.pipelines.unclip import UnCLIP, load_unclip
from difflab.samplers.ddim import ddim_invert, sample_ddim

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# the CLIP, prior and decoder of configs/scenes-unclip-*16.yaml shrunk to width 16 and 4 training steps on 100
# diffusion steps (a few seconds each on one thread)
TINY_CLIP = ["clip.embed_dim=16", "clip.transformer_width=16", "clip.transformer_heads=2", "clip.transformer_layers=1",
             "clip.vision_width=16", "clip.vision_layers=1", "clip.vision_patch_size=4", "clip.vision_heads=2",
             "data.num_scenes=24", "train.batch_size=8", "train.max_steps=4", "train.warmup_steps=2",
             "train.sample_every=0", "train.log_every=2", "train.save_every=4", "eval_examples=8"]
TINY_COMMON = ["model.clip_dim=16", "data.num_scenes=24", "train.batch_size=8", "train.max_steps=4",
               "train.warmup_steps=2", "train.log_every=2", "train.save_every=4", "diffusion.steps=100"]
TINY_PRIOR = ["model.xf_width=16", "model.xf_layers=1", "model.xf_heads=2", "sample.steps=10"]
TINY_DECODER = ["model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8", "model.xf_width=16",
                "sample.steps=10", "train.sample_every=0"]
CAPTIONS = ["a large red 7", "a small blue two in the top left", "a large white 2", "a small green three"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _train(config: str, out: Path, *overrides: str) -> Path:
    assert main(["train", str(CONFIGS / config), "--out", str(out), "--quiet", *_sets(overrides)]) == 0
    return out


def _unclip_file(path: Path, prior: Path, decoder: Path, **extra) -> Path:
    spec = {"prior": {"run": str(prior), "sampler": "ddim", "steps": 10},
            "decoder": {"run": str(decoder), "sampler": "ddim", "steps": 10}, "best_of": 2, "n": 4, "batch": 4,
            "seed": 0, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


def _png(path: Path, x: torch.Tensor) -> Path:
    """One image [C, S, S] in [-1, 1] as a PNG (RGB, or L for one channel)."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny CLIP, a prior and a decoder on it; a second CLIP (another seed) with its own prior; two scene PNGs."""
    root = tmp_path_factory.mktemp("unclip")
    clip = _train("scenes-unclip-clip16.yaml", root / "clip", *TINY_CLIP)
    prior = _train("scenes-unclip-prior16.yaml", root / "prior", f"clip.run={clip}", *TINY_COMMON, *TINY_PRIOR)
    decoder = _train("scenes-unclip-decoder16.yaml", root / "decoder", f"clip.run={clip}", *TINY_COMMON,
                     *TINY_DECODER)
    other_clip = _train("scenes-unclip-clip16.yaml", root / "clip2", *TINY_CLIP, "train.seed=1")
    other_prior = _train("scenes-unclip-prior16.yaml", root / "prior2", f"clip.run={other_clip}", *TINY_COMMON,
                         *TINY_PRIOR)
    cfg = load_config(root / "decoder" / "config.yaml")
    x = build_dataset(cfg.data, seed=0).get_items([0, 1], 0)["x0"]
    a, b = _png(root / "a.png", x[0]), _png(root / "b.png", x[1])
    return {"root": root, "clip": clip, "prior": prior, "decoder": decoder, "other_prior": other_prior,
            "file": _unclip_file(root / "unclip.yaml", prior, decoder), "a": a, "b": b}


@pytest.fixture(scope="module")
def pipe(runs):
    return UnCLIP(load_unclip(runs["file"]))


def _image(pipe, path) -> torch.Tensor:
    from difflab.pipelines.inpaint import read_image_file

    return read_image_file(path, pipe.channels, pipe.side)


# ---------------------------------------------------------------------------------------------- 5. slerp


def test_slerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=1e-12)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-12)
    # equal norms stay on the sphere, and the angle to a grows linearly in th: th * Omega
    a, b = 3 * F.normalize(a, dim=-1), 3 * F.normalize(b, dim=-1)
    omega = torch.arccos((a * b).sum(-1) / 9)
    for th in (0.1, 0.25, 0.5, 0.9):
        c = slerp(a, b, th)
        torch.testing.assert_close(c.norm(dim=-1), torch.full((5,), 3.0, dtype=torch.float64), rtol=1e-12, atol=0)
        angle = torch.arccos(((a * c).sum(-1) / 9).clamp(-1, 1))
        torch.testing.assert_close(angle, th * omega, rtol=1e-9, atol=1e-9)
    # a column of thetas against one pair broadcasts to one row per theta
    th = torch.linspace(0, 1, 4, dtype=torch.float64)[:, None]
    rows = slerp(a[:1], b[:1], th)
    assert rows.shape == (4, 8)
    torch.testing.assert_close(rows[0], a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(rows[-1], b[0], rtol=0, atol=1e-12)
    # parallel and antiparallel pairs: the straight line, never NaN
    for other in (2 * a, -a):
        for th in (0.0, 0.3, 1.0):
            c = slerp(a, other, th)
            assert torch.isfinite(c).all()
            torch.testing.assert_close(c, (1 - th) * a + th * other, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- 6. DDIM inversion


class _Gaussian(nn.Module):
    """The exact x0 predictor for data N(mu, s^2 I): E[x0 | x_t] = mu + s^2 sqrt(abar) (x_t - sqrt(abar) mu) /
    (s^2 abar + 1 - abar), computed in float64 (``t`` the original index)."""

    def __init__(self, abar: torch.Tensor, mu: torch.Tensor, s: float):
        super().__init__()
        self.register_buffer("mu", mu)
        self.abar, self.s2 = abar, s * s

    def forward(self, x_t, t, **cond):
        a = self.abar[t].view(-1, *[1] * (x_t.dim() - 1))
        mu = self.mu.double()
        return (mu + self.s2 * a.sqrt() / (self.s2 * a + 1 - a) * (x_t.double() - a.sqrt() * mu)).float()


def _gaussian_setup(mu, s):
    cfg = load_config(CONFIGS / "mnist-tiny.yaml", [
        "model.learn_sigma=false", "diffusion.var_type=fixed_small", "diffusion.mean_type=x0",
        "diffusion.loss_type=mse", "diffusion.steps=1000", "sample.clip_denoised=false"])
    abar = build_process(cfg.diffusion).alphas_cumprod
    return cfg, build_denoiser(cfg, _Gaussian(abar, mu, s))


def test_ddim_inversion_of_a_standard_gaussian_is_the_analytic_product():
    """For data N(0, I) the exact x0^ is sqrt(abar) x_t and eps^ = sqrt(1 - abar) x_t, so each DDIM step (either
    way) multiplies x by cos(phi_k - phi_{k+1}) = sqrt(a_k a_{k+1}) + sqrt((1 - a_k)(1 - a_{k+1})): the round trip is
    x0 * prod cos^2 (x0 treated as x at the first kept step; the inversion's last step goes to abar = 0 and the
    sampler's last step to x0^ = sqrt(a_0) x). With K = 100 steps that product is 0.9755: DDIM's own first-order
    error, (pi/2)^2 / K, not the code's."""
    K = 100
    cfg, d = _gaussian_setup(torch.zeros(1, 1, 8, 8), 1.0)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_T = ddim_invert(d, x0, steps=K)
    back, _ = draw_samples(d, cfg, n=3, sampler="ddim", steps=K, eta=0.0, x_T=x_T, batch=3, distributed=False)
    a = d.respace(K).process.alphas_cumprod.double()
    pair = (a[:-1] * a[1:]).sqrt() + ((1 - a[:-1]) * (1 - a[1:])).sqrt()
    forward = pair.prod() * (1 - a[-1]).sqrt()
    backward = pair.prod() * a[0].sqrt()
    torch.testing.assert_close(x_T, (forward * x0.double()).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back, (forward * backward * x0.double()).float(), rtol=1e-5, atol=1e-6)
    assert abs(float(forward * backward) - (1 - (math.pi / 2) ** 2 / K)) < 2e-3


def test_ddim_inversion_round_trip_with_an_exact_gaussian_denoiser():
    """Data N(mu, 0.5^2 I): invert with ddim_invert, then DDIM eta = 0 from that x_T through draw_samples' x_T.
    Measured max |x0 - back|: 0.040 at K = 100 steps, 0.016 at K = 250 (first order in 1 / K, as the analytic
    N(0, I) case above); bound 0.06 at K = 100, and the error must shrink by about 250 / 100 at K = 250."""
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.rand(1, 1, 8, 8, generator=g) - 0.25
    cfg, d = _gaussian_setup(mu, 0.5)
    x0 = mu + 0.5 * torch.randn(4, 1, 8, 8, generator=g)
    errors = {}
    for K in (100, 250):
        x_T = ddim_invert(d, x0, steps=K)
        assert 0.6 < float(x_T.std()) < 1.2  # a latent of unit scale, not the image
        back, _ = draw_samples(d, cfg, n=4, sampler="ddim", steps=K, eta=0.0, x_T=x_T, batch=4, distributed=False)
        # draw_samples' x_T is sample_ddim's start, exactly
        assert torch.equal(back, sample_ddim(d, x_T, steps=K, eta=0.0, clip_denoised=False))
        errors[K] = float((back - x0).abs().max())
    # a given x_T is the start as it is: a sampling temperature scales drawn noise only (it once scaled x_T too)
    hot = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, temperature=0.5))
    again, _ = draw_samples(d, hot, n=4, sampler="ddim", steps=K, eta=0.0, x_T=x_T, batch=4, distributed=False)
    assert torch.equal(again, back)
    assert errors[100] < 0.06, errors
    assert 0.3 < errors[250] / errors[100] < 0.5, errors  # first order: 100 / 250 = 0.4
    with pytest.raises(ValueError, match=r"x_T must have shape \[4, 1, 8, 8\]"):
        draw_samples(d, cfg, n=4, sampler="ddim", steps=10, x_T=torch.zeros(4, 1, 4, 4), distributed=False)


def test_variations_of_the_tiny_decoder(pipe, runs):
    image = _image(pipe, runs["a"])
    same = pipe.vary(image, 3, eta=0.0, steps=10)
    assert same.shape == (3, 3, 16, 16) and torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    varied = pipe.vary(image, 3, eta=1.0, steps=10)
    assert varied.shape == (3, 3, 16, 16)
    assert min(float((varied[i] - varied[j]).abs().max()) for i, j in ((0, 1), (0, 2), (1, 2))) > 0.1
    # eta = 0 reconstructs the image: measured max |x - rec| 0.23 / 0.096 / 0.048 at 10 / 25 / 50 DDIM steps (first
    # order in 1 / K), with the decoder's guidance w = 2 in both directions. Bound at 50 steps: 0.1 (2x margin),
    # against a max error of ~4 when the same decoder starts from fresh noise instead of the inverted x_T.
    rec = pipe.vary(image, 1, eta=0.0, steps=50)
    error = float((rec - image).abs().max())
    assert error < 0.1, error
    e_i = pipe.embedder.image(image)
    fresh = pipe.decode(e_i, None, sampler="ddim", steps=50, eta=0.0, guidance=2.0, unclipped=True)
    assert float((fresh - image).abs().max()) > 10 * error


# ---------------------------------------------------------------------------------------------- 7. best of k


def test_best_of_k_keeps_the_candidate_closest_to_the_caption(pipe):
    from difflab.generate import draw_samples as draw

    n, k = len(CAPTIONS), 2
    chosen = pipe.prior_embeddings(CAPTIONS, best_of=k, seed=0)
    assert chosen.shape == (n, 16)
    # the candidates by hand: one draw_samples call of n * k rows with the prior's settings, caption i at rows
    # j * n + i; z_t from the CLIP's own text tower
    spec, embedder = pipe.spec.prior, pipe.embedder
    candidates, _ = draw(pipe.prior.denoiser, pipe.prior.cfg, n=n * k, seed=0, batch=pipe.spec.batch,
                         sampler=spec.sampler, steps=spec.steps, eta=spec.eta, guidance_scale=spec.guidance,
                         distributed=False, cond=embedder.prior_cond(CAPTIONS * k), null_cond=embedder.prior_null())
    candidates = candidates.reshape(k, n, 16)
    tokens, lens = clip_tokens(embedder.clip.tokenizer, CAPTIONS, 16)
    z_t = embedder.clip.text_embeddings(tokens, lens)
    cosine = F.cosine_similarity(candidates, z_t[None], dim=-1)  # [k, n]
    best = cosine.argmax(0)
    # seed 0: each candidate wins for some caption (the choice is tested both ways), by cosine margins >= 2e-4, far
    # above float rounding (the 4-step prior's draws are close together)
    assert set(best.tolist()) == {0, 1} and float((cosine[0] - cosine[1]).abs().min()) > 1e-4, cosine
    assert torch.equal(chosen, candidates[best, torch.arange(n)])
    # best_of=1: no choice, the first candidate set (batch = n, so it is the same first batch of noise)
    assert pipe.spec.batch == n
    assert torch.equal(pipe.prior_embeddings(CAPTIONS, best_of=1, seed=0), candidates[0])
    with pytest.raises(ValueError, match="best_of must be >= 1"):
        pipe.prior_embeddings(CAPTIONS, best_of=0)


# ---------------------------------------------------------------------------------------------- 8. interpolation


def test_interpolation_ends_and_text_diff_at_zero_are_reconstructions(pipe, runs):
    a, b = _image(pipe, runs["a"]), _image(pipe, runs["b"])
    rec_a, rec_b = pipe.vary(a, 1, eta=0.0, steps=10), pipe.vary(b, 1, eta=0.0, steps=10)
    assert float((rec_a - rec_b).abs().max()) > 0.5  # two different images
    path = pipe.interpolate(a, b, 4, latent="slerp", steps=10)
    assert path.shape == (4, 3, 16, 16)
    # th = 0 and 1: e_a / e_b and the inversions of a / b, decoded as vary(eta 0) does (measured: 2.4e-7)
    torch.testing.assert_close(path[0], rec_a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(path[-1], rec_b[0], rtol=0, atol=1e-5)
    assert float((path[1] - path[0]).abs().max()) > 1e-3 and float((path[2] - path[3]).abs().max()) > 1e-3
    fixed = pipe.interpolate(a, b, 3, latent="fixed", steps=10)
    assert fixed.shape == (3, 3, 16, 16) and torch.isfinite(fixed).all()
    with pytest.raises(ValueError, match="latent must be one of fixed, slerp"):
        pipe.interpolate(a, b, 3, latent="linear")
    with pytest.raises(ValueError, match="k >= 2"):
        pipe.interpolate(a, b, 1)
    # a text diff at th = 0 is the image's reconstruction (measured: 1.2e-7)
    diff = pipe.text_diff(a, "a large red 7", "a small blue 2", [0.0, 0.5], steps=10)
    assert diff.shape == (2, 3, 16, 16)
    torch.testing.assert_close(diff[0], rec_a[0], rtol=0, atol=1e-5)


def test_sample_an_unclip_file(runs, tmp_path, capsys):
    grid, npz = tmp_path / "s.png", tmp_path / "s.npz"
    assert main(["sample", str(runs["file"]), "--prompt", "a large red 7", "--prompt", "a small green three",
                 "--n", "3", "--grid", str(grid), "--npz", str(npz)]) == 0
    with np.load(npz) as f:
        images = f["arr_0"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert Image.open(grid).size[0] >= 16


# ---------------------------------------------------------------------------------------------- 9. bad input


def _fails(capsys, args, *needles):
    """Run the CLI; check exit 2, one stderr line starting 'difflab: error:' containing every needle."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2, f"difflab {' '.join(map(str, args))} did not exit 2"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def test_bad_images(runs, tmp_path, capsys):
    f = runs["file"]
    small = _png(tmp_path / "small.png", torch.zeros(3, 8, 8))
    grey = _png(tmp_path / "grey.png", torch.zeros(1, 16, 16))
    _fails(capsys, ["vary", f, small, "--steps", "5"], "small.png")
    _fails(capsys, ["vary", f, grey, "--steps", "5"], "grey.png", "greyscale")
    _fails(capsys, ["interpolate", f, runs["a"], small, "--steps", "5"], "small.png")
    _fails(capsys, ["interpolate", f, small, runs["a"], "--steps", "5"], "small.png")
    _fails(capsys, ["vary", f, tmp_path / "missing.png"], "missing.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "small.png"]  # nothing written


def test_bad_pipelines(runs, tmp_path, capsys):
    other = _unclip_file(tmp_path / "other.yaml", runs["other_prior"], runs["decoder"])
    _fails(capsys, ["vary", other, runs["a"], "--out", tmp_path / "v.png"], "another CLIP")
    swapped = _unclip_file(tmp_path / "swapped.yaml", runs["decoder"], runs["decoder"])
    _fails(capsys, ["vary", swapped, runs["a"], "--out", tmp_path / "v.png"], "prior", str(runs["decoder"]),
           "decoder")
    _fails(capsys, ["sample", swapped, "--prompt", "a large red 7", "--grid", tmp_path / "s.png"], "prior",
           str(runs["decoder"]))
    _fails(capsys, ["sample", runs["file"]], "--prompt")
    _fails(capsys, ["sample", runs["file"], "--steps", "5", "--prompt", "a red 7"], "--steps", "per part")
    assert not (tmp_path / "v.png").exists() and not (tmp_path / "s.png").exists()


def test_outputs_are_never_overwritten(runs, tmp_path, capsys):
    a = shutil.copy(runs["a"], tmp_path / "a.png")
    out = tmp_path / "taken.png"
    out.write_bytes(b"mine")
    _fails(capsys, ["vary", runs["file"], a, "--steps", "5", "--out", out], "taken.png", "already exists")
    _fails(capsys, ["interpolate", runs["file"], a, runs["b"], "--steps", "5", "--out", out], "already exists")
    _fails(capsys, ["sample", runs["file"], "--prompt", "a red 7", "--grid", out], "already exists")
    unclip_file = shutil.copy(runs["file"], tmp_path / "pipeline.yaml")
    (tmp_path / "pipeline.png").write_bytes(b"mine too")  # sample's default output, beside the file
    _fails(capsys, ["sample", unclip_file, "--prompt", "a red 7"], "pipeline.png", "already exists")
    assert out.read_bytes() == b"mine" and (tmp_path / "pipeline.png").read_bytes() == b"mine too"
    assert not (tmp_path / "pipeline.npz").exists()
    # vary's default names step aside from what exists: a_variations.png is kept, a_variations-2.png written
    (tmp_path / "a_variations.png").write_bytes(b"old")
    assert main(["vary", str(runs["file"]), str(a), "--n", "2", "--steps", "5"]) == 0
    assert (tmp_path / "a_variations.png").read_bytes() == b"old"
    with np.load(tmp_path / "a_variations-2.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
    assert (tmp_path / "a_variations-2.png").is_file()
