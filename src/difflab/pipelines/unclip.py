"""unCLIP (DALL-E 2, Ramesh et al. 2022): text -> CLIP image embedding (the prior) -> image (the decoder) ->
upsamplers, and the manipulations of the decoder's latent (z_i, x_T): variations, interpolations, text diffs.

Everything is a composition of what exists (docs/unclip.md): the prior and the decoder are diffusion runs drawn
with :func:`difflab.generate.draw_samples` (their own sampler, steps and classifier-free guidance, conditioning
from :class:`difflab.clip_features.CLIPEmbedder`), DDIM inversion is :func:`difflab.samplers.ddim.ddim_invert`,
the upsamplers are cascade stages. No sampling loop lives here.

Notation map (code -> paper, Sec. 2 and 3; PAPERS.md Sec. 7):
    e_i, e_t [N, E]   embed_scale * z_i, z_t (difflab's embedding space, :mod:`difflab.clip_features`)
    best_of k         the prior draws k embeddings per caption and keeps the one with the largest z_i . z_t (k = 2)
    x_T               the decoder's latent: Gaussian noise, or DDIM inversion of an image given its e_i
    variations        decode(e_i(image), x_T = invert(image)) with DDIM eta > 0 (eta = 0 reconstructs the image)
    interpolation     e = slerp(e_a, e_b, th); x_T fixed (one draw for all th) or slerp(x_T,a, x_T,b, th)
    text diff         z = slerp(z_i, normalise(z_t - z_t0), th): the image moved toward a new caption

An unCLIP file (YAML; ``difflab sample UNCLIP.yaml``, ``difflab vary``, ``difflab interpolate``)::

    prior: {run: runs/unclip/prior16, sampler: ddim, steps: 64, guidance: 1.0}
    decoder: {run: runs/unclip/decoder16, sampler: ancestral, steps: 50, guidance: 2.0}
    upsamplers: []       # cascade stages (docs/cascade.md), each taking the previous images
    best_of: 2
    n: 16
    batch: 16
    seed: 0

The prior and the decoder must read the same CLIP (their ``clip.run``) at the same embed_scale.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.clip_features import CLIPEmbedder, load_clip, slerp
from difflab.config import ConfigError, from_dict, read_yaml
from difflab.pipelines.cascade import StageConfig, rooted, yaml_top_level

Tensor = torch.Tensor
LATENTS = ("fixed", "slerp")

__all__ = ["UnCLIPConfig", "UnCLIP", "is_unclip_file", "load_unclip"]


@dataclass(frozen=True)
class UnCLIPConfig:
    """An unCLIP pipeline (see the module docstring)."""

    # the diffusion prior: a run of model: PriorConfig fields, and how to draw from it
    prior: StageConfig
    # the decoder: a run of model: DecoderUNetConfig fields
    decoder: StageConfig
    # super-resolution stages after the decoder (cascade stages)
    upsamplers: tuple[StageConfig, ...] = ()
    # the prior draws this many embeddings per caption and keeps the one closest to the caption's (paper: 2)
    best_of: int = 2
    # images, images per network call, seed (the prior draws from seed, the decoder seed + 1, upsampler k seed + 2 + k)
    n: int = 16
    batch: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("best_of", "n", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError((name,), f"must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(("seed",), f"must be >= 0, got {self.seed}")


def is_unclip_file(path: str | os.PathLike) -> bool:
    """True for a YAML file with top-level ``prior`` and ``decoder``."""
    data = yaml_top_level(path)
    return data is not None and "prior" in data and "decoder" in data


def load_unclip(path: str | os.PathLike, **overrides: Any) -> UnCLIPConfig:
    """Read an unCLIP file; ``overrides`` (n, batch, seed, best_of) replace its values when not None. Run paths are
    relative to the file's folder unless absolute."""
    p = Path(path)
    try:
        data = read_yaml(p)
    except ConfigError as e:
        raise ValueError(f"not a readable unCLIP file: {e}") from None
    if not isinstance(data, dict) or "prior" not in data or "decoder" not in data:
        raise ValueError(f"{p}: an unCLIP file needs 'prior' and 'decoder' (each {{run: FOLDER, ...}})")
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    data["prior"], data["decoder"] = rooted(data["prior"], p.parent), rooted(data["decoder"], p.parent)
    data["upsamplers"] = [rooted(s, p.parent) for s in data.get("upsamplers") or []]
    try:
        return from_dict(UnCLIPConfig, data)
    except ConfigError as e:
        raise ConfigError(e.path, f"{e.problem} (in {p})") from None


@dataclass
class _Part:
    """A loaded run of the pipeline: its settings, run config and denoiser."""

    spec: StageConfig
    cfg: Any
    denoiser: Any


def _load_part(spec: StageConfig, kind: str | None, device) -> _Part:
    from difflab.build import load_run, load_run_config, resolve_ema

    cfg = load_run_config(spec.run)
    found = getattr(cfg, "unclip_kind", None)
    if kind is not None and found != kind:
        what = f"an unCLIP {found}" if found else f"a {type(getattr(cfg, 'model', cfg)).__name__} run"
        raise ValueError(f"{kind}: {spec.run} is {what}, not an unCLIP {kind}")
    cfg, _, denoiser = load_run(spec.run, ema=resolve_ema(cfg, spec.ema), device=device)
    return _Part(spec, cfg, denoiser)


def _same_clip(a: Any, b: Any) -> bool:
    """Two loaded CLIPs with equal configs and weights."""
    if a.config != b.config:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class UnCLIP:
    """A loaded unCLIP pipeline: the CLIP, the prior, the decoder and the upsamplers (module docstring).

    Raises ValueError when the parts do not fit: a run of the wrong kind, a prior and a decoder that read
    different CLIPs or embedding scales, a CLIP the networks do not fit.
    """

    def __init__(self, spec: UnCLIPConfig, device: str | torch.device = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.prior = _load_part(spec.prior, "prior", device)
        self.decoder = _load_part(spec.decoder, "decoder", device)
        clip = load_clip(self.decoder.cfg.clip.run, device, option=f"decoder {spec.decoder.run}: clip.run")
        prior_clip = load_clip(self.prior.cfg.clip.run, device, option=f"prior {spec.prior.run}: clip.run")
        if not _same_clip(clip, prior_clip):
            raise ValueError(f"the prior reads another CLIP ({self.prior.cfg.clip.run}) than the decoder "
                             f"({self.decoder.cfg.clip.run}): unCLIP's prior makes embeddings of the decoder's CLIP")
        if self.prior.cfg.clip.embed_scale != self.decoder.cfg.clip.embed_scale:
            raise ValueError(f"the prior's clip.embed_scale ({self.prior.cfg.clip.embed_scale}) differs from the "
                             f"decoder's ({self.decoder.cfg.clip.embed_scale})")
        self.embedder = CLIPEmbedder(clip, self.decoder.cfg.clip.embed_scale)
        for part, what in ((self.prior, "prior"), (self.decoder, "decoder")):
            self.embedder.check_network(part.cfg.model.clip_dim, part.cfg.model.text_ctx, what)
        self.upsamplers = [_load_part(s, None, device) for s in spec.upsamplers]
        self.side = self.decoder.cfg.data.sample_size
        self.channels = self.decoder.cfg.model.in_channels
        if clip.config.image_resolution != self.side:
            raise ValueError(f"the decoder makes {self.side}px images but its CLIP reads "
                             f"{clip.config.image_resolution}px")

    # ---------------------------------------------------------------------------------------- the parts
    def _draw(self, part: _Part, n: int, seed: int, *, unclipped: bool = False, **kwargs) -> Tensor:
        """draw_samples of one part with its settings (``kwargs`` not None override them); ``unclipped``: x0^ never
        clipped (as DDIM inversion runs)."""
        from difflab.generate import draw_samples

        s, cfg = part.spec, part.cfg
        if unclipped:
            cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, clip_denoised=False))
        args = {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "guidance_scale": s.guidance, "bf16": s.bf16}
        args.update({k: v for k, v in kwargs.items() if v is not None})
        x, _ = draw_samples(part.denoiser, cfg, n=n, seed=seed, batch=self.spec.batch, distributed=False, **args)
        return x

    def prior_embeddings(self, captions: Sequence[str], *, seed: int | None = None, best_of: int | None = None,
                         guidance: float | None = None) -> Tensor:
        """e_i [n, E] for n captions: ``best_of`` draws each (sample j of caption i at row j * n + i of one
        draw_samples call), keeping the one with the largest cosine to the caption's z_t (unCLIP Sec. 2.1)."""
        captions = list(captions)
        n, k = len(captions), self.spec.best_of if best_of is None else int(best_of)
        if k < 1:
            raise ValueError(f"best_of must be >= 1, got {k}")
        seed = self.spec.seed if seed is None else seed
        cond = self.embedder.prior_cond(captions * k)
        e = self._draw(self.prior, n * k, seed, cond=cond, null_cond=self.embedder.prior_null(),
                       guidance_scale=guidance).reshape(k, n, -1)
        if k == 1:
            return e[0]
        e_t = self.embedder.unit(cond["text_emb"][:n]).cpu()
        score = (self.embedder.unit(e) * e_t[None]).sum(-1)  # [k, n]
        return e[score.argmax(0), torch.arange(n)]

    def decoder_kwargs(self, e_i: Tensor, captions: Sequence[str] | None) -> dict[str, Any]:
        """The decoder's ``cond`` / ``null_cond`` for embeddings e_i [n, E] and captions (None: "" for every image,
        the embedding alone, as the manipulations use)."""
        captions = [""] * len(e_i) if captions is None else list(captions)
        if len(captions) != len(e_i):
            raise ValueError(f"{len(e_i)} embeddings but {len(captions)} captions")
        return {"cond": self.embedder.decoder_cond(captions, e_i.to(self.device)),
                "null_cond": self.embedder.decoder_null()}

    def decode(self, e_i: Tensor, captions: Sequence[str] | None = None, *, x_T: Tensor | None = None,
               seed: int | None = None, sampler: str | None = None, steps: int | str | None = None,
               eta: float | None = None, guidance: float | None = None, unclipped: bool = False) -> Tensor:
        """Images [n, C, S, S] in [-1, 1] from embeddings e_i [n, E] (and the latent x_T [n, C, S, S], if given)."""
        seed = (self.spec.seed if seed is None else seed) + 1
        return self._draw(self.decoder, len(e_i), seed, x_T=x_T, sampler=sampler, steps=steps, eta=eta,
                          guidance_scale=guidance, unclipped=unclipped, **self.decoder_kwargs(e_i, captions))

    def upsample(self, images: Tensor, captions: Sequence[str] | None, *, seed: int | None = None) -> list[Tensor]:
        """Each upsampler's images in turn (each taking the previous ones), as the cascade hands them on."""
        from difflab.pipelines.cascade import _as_images

        seed = self.spec.seed if seed is None else seed
        out, x = [], images
        for k, part in enumerate(self.upsamplers):
            prompts = list(captions) if part.cfg.is_text and captions is not None else None
            x = self._draw(part, len(x), seed + 2 + k, low_res=_as_images(x, rounded=part.cfg.is_text),
                           aug_level=part.spec.aug_level, prompts=prompts)
            out.append(x)
        return out

    def text_to_image(self, prompts: Sequence[str], n: int | None = None, *, seed: int | None = None) -> list[Tensor]:
        """[decoder images, upsampler 1 images, ...] for ``n`` samples cycling over ``prompts``."""
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("unCLIP draws images of captions: give --prompt TEXT (repeatable) or --prompts FILE")
        n = self.spec.n if n is None else n
        captions = [prompts[i % len(prompts)] for i in range(n)]
        e_i = self.prior_embeddings(captions, seed=seed)
        x = self.decode(e_i, captions, seed=seed)
        return [x, *self.upsample(x, captions, seed=seed)]

    # ---------------------------------------------------------------------------------------- manipulations
    def check_images(self, images: Tensor, what: str = "image") -> Tensor:
        """ValueError unless ``images`` is [N, C, S, S] at the decoder's size and channels."""
        shape = (self.channels, self.side, self.side)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"the {what} must be [N, {self.channels}, {self.side}, {self.side}] (the decoder's "
                             f"images); got {list(images.shape)}")
        return images.to(self.device).float()

    def _inversion_denoiser(self, guidance: float | None):
        from difflab.guidance import guided_denoiser

        w, d = self._guidance(guidance), self.decoder.denoiser
        return guided_denoiser(d, guidance_scale=w, null_cond=self.embedder.decoder_null()) if w else d

    def _guidance(self, guidance: float | None) -> float:
        """The decoder's w: the argument, else the file's, else the run's sample.guidance_scale."""
        w = self.decoder.spec.guidance if guidance is None else guidance
        return float(self.decoder.cfg.sample.guidance_scale if w is None else w)

    @torch.no_grad()
    def invert(self, images: Tensor, e_i: Tensor | None = None, *, steps: int | str | None = None,
               guidance: float | None = None) -> Tensor:
        """x_T [N, C, S, S]: DDIM inversion of ``images`` by the decoder given their e_i and the empty caption, with
        the decoder's guidance, in ``steps`` respaced steps (default: the decoder's), no clipping (unCLIP Sec. 3)."""
        from difflab.samplers.ddim import ddim_invert

        images = self.check_images(images)
        e_i = self.embedder.image(images) if e_i is None else e_i
        steps = self._ddim_steps(steps)
        cond = self.decoder_kwargs(e_i, None)["cond"]
        return ddim_invert(self._inversion_denoiser(guidance), images, steps=steps, model_kwargs=cond).float().cpu()

    def _ddim_steps(self, steps):
        s = steps if steps is not None else self.decoder.spec.steps
        return s if s is not None else self.decoder.cfg.sample.steps

    def _regenerate(self, e_i: Tensor, x_T: Tensor, *, eta: float, steps, seed, guidance) -> Tensor:
        """DDIM from the inverted x_T given e_i and the empty caption, unclipped, as :meth:`invert` ran."""
        return self.decode(e_i, None, x_T=x_T, seed=seed, sampler="ddim", steps=self._ddim_steps(steps), eta=eta,
                           guidance=self._guidance(guidance), unclipped=True)

    def vary(self, image: Tensor, n: int, *, eta: float = 1.0, steps: int | str | None = None,
             seed: int | None = None, guidance: float | None = None) -> Tensor:
        """``n`` variations [n, C, S, S] of one image [1, C, S, S]: its e_i and DDIM-inverted x_T, decoded by DDIM
        with ``eta`` (0 reconstructs the image; > 0 adds fresh noise each step, unCLIP Sec. 3.1)."""
        image = self.check_images(image)
        if len(image) != 1:
            raise ValueError(f"vary takes one image; got {len(image)}")
        e_i = self.embedder.image(image)
        x_T = self.invert(image, e_i, steps=steps, guidance=guidance)
        return self._regenerate(e_i.expand(n, -1), x_T.expand(n, -1, -1, -1), eta=eta, steps=steps, seed=seed,
                                guidance=guidance)

    def interpolate(self, a: Tensor, b: Tensor, k: int, *, latent: str = "fixed", steps: int | str | None = None,
                    seed: int | None = None, guidance: float | None = None) -> Tensor:
        """``k`` images [k, C, S, S] between images a and b [1, C, S, S]: e = slerp(e_a, e_b, th) for th = 0..1,
        with x_T one fixed draw (``latent`` "fixed") or slerp of their DDIM inversions ("slerp"); unCLIP Sec. 3.2."""
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {', '.join(LATENTS)}; got {latent!r}")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"interpolating images of different sizes: {list(a.shape)} and {list(b.shape)}")
        if k < 2:
            raise ValueError(f"an interpolation needs k >= 2 images (both ends); got {k}")
        a, b = self.check_images(a, "first image"), self.check_images(b, "second image")
        th = torch.linspace(0, 1, k)[:, None]
        e_a, e_b = self.embedder.image(a).cpu(), self.embedder.image(b).cpu()
        e = slerp(e_a, e_b, th)
        seed = self.spec.seed if seed is None else seed
        if latent == "fixed":
            g = torch.Generator().manual_seed(seed)
            x_T = torch.randn((1, self.channels, self.side, self.side), generator=g).expand(k, -1, -1, -1)
        else:
            x_a = self.invert(a, e_a.to(self.device), steps=steps, guidance=guidance).flatten(1)
            x_b = self.invert(b, e_b.to(self.device), steps=steps, guidance=guidance).flatten(1)
            x_T = slerp(x_a, x_b, th).reshape(k, self.channels, self.side, self.side)
        return self._regenerate(e, x_T, eta=0.0, steps=steps, seed=seed, guidance=guidance)

    def text_diff(self, image: Tensor, caption: str, target: str, thetas: Sequence[float], *,
                  steps: int | str | None = None, seed: int | None = None, guidance: float | None = None) -> Tensor:
        """Images [len(thetas), C, S, S] of one image moved toward ``target``: z = slerp(z_i, normalise(z_t(target)
        - z_t(caption)), th), decoded from the image's inverted x_T (unCLIP Sec. 3.3; th up to 0.25-0.5)."""
        image = self.check_images(image)
        if len(image) != 1:
            raise ValueError(f"a text diff takes one image; got {len(image)}")
        e_i = self.embedder.image(image)
        x_T = self.invert(image, e_i, steps=steps, guidance=guidance)
        z_i = self.embedder.unit(e_i).cpu()
        e_t = self.embedder.text([caption, target])[0].cpu()
        d = self.embedder.unit(e_t[1] - e_t[0])[None]
        th = torch.tensor([float(t) for t in thetas])[:, None]
        z = self.embedder.unit(slerp(z_i, d, th))
        m = len(th)
        return self._regenerate(self.embedder.scale * z, x_T.expand(m, -1, -1, -1), eta=0.0, steps=steps, seed=seed,
                                guidance=guidance)


# ---------------------------------------------------------------------------------------- commands


def _outputs(grid, npz, default_stem: Path) -> tuple[Any, Any]:
    """The files a command writes (default ``<stem>.png`` / ``.npz``), refused before any work if they exist."""
    from difflab.generate import _free_names, check_output_files

    if grid is None and npz is None:
        grid, npz = _free_names(default_stem)
    check_output_files(grid=grid, npz=npz)
    return grid, npz


def _write(images: Tensor, cfg: Any, grid, npz) -> list[Path]:
    from difflab.generate import _save, check_output_files
    from difflab.images import to_uint8

    check_output_files(grid=grid, npz=npz)  # again: something may have appeared meanwhile
    return _save(to_uint8(images, cfg.data), None, grid, npz)


def _unclip(path, device=None, **overrides) -> UnCLIP:
    from difflab.train import distributed as dist_utils

    device = dist_utils.init_distributed().device if device is None else device
    return UnCLIP(load_unclip(path, **overrides), device=device)


def sample_unclip_file(path, prompts, *, n=None, seed=None, batch=None, best_of=None, grid=None, npz=None,
                       stages_dir=None) -> list[Path]:
    """``difflab sample UNCLIP.yaml --prompt ...``: the last stage's images to ``grid`` / ``npz`` (default
    ``<file>.png`` / ``.npz``), each stage's to ``stages_dir/stage_K.{png,npz}`` (stage 0 = the decoder)."""
    from difflab.generate import check_output_files

    if grid is None and npz is None:
        grid, npz = Path(path).with_suffix(".png"), Path(path).with_suffix(".npz")
    check_output_files(grid=grid, npz=npz)
    pipe = _unclip(path, n=n, seed=seed, batch=batch, best_of=best_of)
    parts = [pipe.decoder, *pipe.upsamplers]
    if stages_dir is not None:
        for k in range(len(parts)):
            check_output_files(grid=Path(stages_dir) / f"stage_{k}.png", npz=Path(stages_dir) / f"stage_{k}.npz")
    results = pipe.text_to_image(prompts)
    written = []
    if stages_dir is not None:
        for k, (x, part) in enumerate(zip(results, parts, strict=True)):
            written += _write(x, part.cfg, Path(stages_dir) / f"stage_{k}.png", Path(stages_dir) / f"stage_{k}.npz")
    return written + _write(results[-1], parts[-1].cfg, grid, npz)


def _read(pipe: UnCLIP, image, flag: str) -> Tensor:
    from difflab.pipelines.inpaint import read_image_file

    return read_image_file(image, pipe.channels, pipe.side, flag=flag)


def vary_file(path, image, *, n: int = 8, eta: float = 1.0, steps=None, seed=None, guidance=None, grid=None,
              npz=None) -> list[Path]:
    """``difflab vary UNCLIP.yaml IMAGE``: ``n`` variations (default ``<image>_variations.png`` / ``.npz``)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not 0 <= eta < float("inf"):
        raise ValueError(f"--eta must be a finite number >= 0, got {eta}")
    grid, npz = _outputs(grid, npz, Path(image).with_name(f"{Path(image).stem}_variations"))
    pipe = _unclip(path, seed=seed)
    x = pipe.vary(_read(pipe, image, "IMAGE"), n, eta=eta, steps=steps, guidance=guidance)
    return _write(x, pipe.decoder.cfg, grid, npz)


def interpolate_file(path, a, b, *, k: int = 8, latent: str = "fixed", steps=None, seed=None, guidance=None,
                     grid=None, npz=None) -> list[Path]:
    """``difflab interpolate UNCLIP.yaml A B``: ``k`` images from A to B (default ``<A>_to_<B>.png`` / ``.npz``)."""
    if latent not in LATENTS:
        raise ValueError(f"--latent must be one of {', '.join(LATENTS)}; got {latent!r}")
    grid, npz = _outputs(grid, npz, Path(a).with_name(f"{Path(a).stem}_to_{Path(b).stem}"))
    pipe = _unclip(path, seed=seed)
    first, second = _read(pipe, a, "A"), _read(pipe, b, "B")
    x = pipe.interpolate(first, second, k, latent=latent, steps=steps, guidance=guidance)
    return _write(x, pipe.decoder.cfg, grid, npz)
