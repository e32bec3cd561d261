"""Drawing images from a trained denoiser with a run's sample settings (``difflab sample``).

Images are drawn in batches; batch k uses noise from a generator seeded with (seed, k), so the
samples do not depend on the number of processes: under ``torchrun`` the batches are dealt out
round-robin to the ranks and gathered back in order (:func:`~difflab.train.distributed.all_gather_uneven`).
Class-conditional runs draw label ``label`` for every image, or labels 0, 1, ..., K-1, 0, ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import numpy as np
import torch

from difflab.build import module_device
from difflab.config import Config
from difflab.denoiser import Denoiser
from difflab.hardware import resolve_bf16
from difflab.process import Process
from difflab.train import distributed as dist_utils


def sampler_names() -> list[str]:
    """The sampler names ``difflab sample --sampler`` takes."""
    return list(_registry())


def _registry() -> dict[str, Callable]:
    try:
        from difflab.samplers import SAMPLERS
    except ImportError:  # an older tree without the registry
        from difflab.samplers import sample_ancestral, sample_ddim

        return {"ancestral": sample_ancestral, "ddim": sample_ddim}
    return dict(SAMPLERS)


def get_sampler(name: str) -> Callable:
    """The sampler function called ``name``; ValueError listing the valid names otherwise."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(registry)}")
    return registry[name]


def _batch_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _labels(num_classes: int | None, n: int, label: int | str | None) -> torch.Tensor | None:
    """Labels [n] of the samples: all ``label``, or 0, 1, ..., K-1, 0, ... for None / ``"all"``.

    ``num_classes`` is that of the class-conditional model, or of the guiding classifier; None
    (an unconditional model alone) takes no label.
    """
    explicit_all = False
    if isinstance(label, str):
        text = label.strip().lower()
        if text != "all" and not text.lstrip("-").isdigit():
            raise ValueError(f"--label must be a class index or 'all', got {label!r}")
        explicit_all = text == "all"
        label = None if explicit_all else int(text)
    if num_classes is None:
        if label is not None or explicit_all:
            raise ValueError("--label needs a class-conditional run or a classifier (this model is unconditional)")
        return None
    if label is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside the classes; valid labels are 0..{num_classes - 1} or 'all'")
    if label is not None:
        return torch.full((n,), int(label), dtype=torch.long)
    return torch.arange(n, dtype=torch.long) % num_classes


def _captions(cfg: Config, prompts) -> list[str] | None:
    """The prompt list of a text-conditional run (checked), None for any other run."""
    if not cfg.is_text:
        if prompts is not None:
            raise ValueError("--prompt / --prompts: this run is not text-conditional (no model.text)")
        return None
    if prompts is None or isinstance(prompts, str) or not len(prompts):
        raise ValueError("a text-conditional run samples from captions: give --prompt TEXT (repeatable) or "
                         "--prompts FILE (one caption a line)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[0]!r}")
    return list(prompts)


class _TextCondition:
    """``tokens`` / ``mask`` of each batch's captions, and the empty caption's as the guidance null."""

    def __init__(self, cfg: Config, captions: list[str], n: int) -> None:
        from difflab.build import build_tokenizer
        from difflab.text import tokenize_batch

        ctx = cfg.model.text.text_ctx
        tokenizer = build_tokenizer(cfg)
        distinct = list(dict.fromkeys(captions))
        tokens, mask = tokenize_batch(tokenizer, distinct, ctx)
        index = torch.tensor([distinct.index(captions[i % len(captions)]) for i in range(n)])
        self.tokens, self.mask = tokens[index], mask[index]
        null_tokens, null_mask = tokenize_batch(tokenizer, [""], ctx)
        self.null = {"tokens": null_tokens, "mask": null_mask}

    def kwargs(self, lo: int, hi: int, device) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[lo:hi].to(device), "mask": self.mask[lo:hi].to(device)}


def _guided(denoiser: Denoiser, cfg: Config, guidance_scale: float, classifier, classifier_scale: float,
            null_cond=None):
    """The denoiser with classifier-free (w) and/or classifier (s) guidance, or ValueError saying why not."""
    from difflab.guidance import guided_denoiser

    for what, value in (("guidance scale w", guidance_scale), ("classifier scale s", classifier_scale)):
        if not 0 <= value < float("inf"):
            raise ValueError(f"the {what} must be a finite number >= 0, got {value}")
    num_classes = getattr(cfg.model, "num_classes", None)
    if cfg.unclip_kind:
        if classifier is not None:
            raise ValueError(f"--classifier: classifier guidance of an unCLIP {cfg.unclip_kind} is not supported")
        trained = cfg.diffusion.p_uncond > 0 or getattr(cfg.model, "clip_emb_drop", 0) > 0
        if guidance_scale > 0 and not trained:
            raise ValueError(f"--guidance W needs an unCLIP {cfg.unclip_kind} trained with condition dropout "
                             "(diffusion.p_uncond > 0 or model.clip_emb_drop > 0)")
        if guidance_scale > 0 and null_cond is None:
            raise ValueError(f"guiding an unCLIP {cfg.unclip_kind} needs its null conditioning (null_cond)")
        return guided_denoiser(denoiser, guidance_scale=guidance_scale, null_cond=null_cond) if guidance_scale \
            else denoiser
    if cfg.is_text:
        if classifier is not None:
            raise ValueError("--classifier: classifier guidance of a text-conditional run is not supported; use "
                             "--guidance W (classifier-free, the empty caption as the null)")
        if guidance_scale > 0 and cfg.diffusion.p_uncond <= 0:
            raise ValueError("--guidance W needs a text run trained with caption dropout (diffusion.p_uncond > 0); "
                             "this run never learned the unconditional model")
        return guided_denoiser(denoiser, guidance_scale=guidance_scale, null_cond=null_cond) if guidance_scale \
            else denoiser
    if guidance_scale > 0:
        if num_classes is None:
            raise ValueError(
                "--guidance W (classifier-free) needs a class-conditional run trained with diffusion.p_uncond > 0; "
                "this model is unconditional: guide it with a noisy classifier (--classifier CLF --classifier-scale S)"
            )
        if cfg.diffusion.p_uncond <= 0 or not getattr(cfg.model, "class_null", False):
            raise ValueError(
                "--guidance W (classifier-free) needs a run trained with label dropout (diffusion.p_uncond > 0, "
                "model.class_null: true); this run never learned the unconditional model"
            )
    if classifier_scale > 0 and classifier is None:
        raise ValueError("--classifier-scale S needs a noisy classifier (--classifier CLF)")
    if not guidance_scale and classifier is None:
        return denoiser
    return guided_denoiser(denoiser, guidance_scale=guidance_scale, classifier=classifier,
                           classifier_scale=classifier_scale, conditional_model=num_classes is not None)


def draw_samples(
    denoiser: Denoiser,
    cfg: Config,
    *,
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    label: int | str | None = None,
    seed: int | None = None,
    batch: int | None = None,
    guidance_scale: float | None = None,
    classifier=None,
    classifier_scale: float | None = None,
    bf16: bool | None = None,
    low_res: torch.Tensor | None = None,
    aug_level: int | None = None,
    low_res_noised: bool = False,
    truncate_at: int = 0,
    prompts=None,
    inpaint_image: torch.Tensor | None = None,
    inpaint_mask: torch.Tensor | None = None,
    inpaint_rule: str | None = None,
    distributed: bool = True,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    clip=None,
    clip_scale: float | None = None,
    cond: dict[str, torch.Tensor] | None = None,
    null_cond: dict[str, torch.Tensor] | None = None,
    x_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples ``[n, C, S, S]`` (float32, CPU, in [-1, 1]) and their labels (None if unconditional).

    Every argument left ``None`` takes the run's ``sample`` section. ``steps`` respaces the process
    (ancestral / DDIM) or sets the solver's step count; ``eta`` applies to samplers that take it.
    ``label``: a class index, or None / ``"all"`` for labels cycling over the classes (of the model, or
    of ``classifier`` for an unconditional model). Guidance (:func:`difflab.guidance.guided_denoiser`):
    ``guidance_scale`` w is classifier-free (a run trained with p_uncond > 0); ``classifier`` (a loaded
    noisy classifier, e.g. :func:`difflab.train.classifier.load_classifier`) with ``classifier_scale``
    s > 0 is ADM classifier guidance, checked against the model's schedule and image size.
    ``bf16`` runs the networks under bf16 autocast (the samplers' arithmetic stays float32).
    With ``distributed`` and an initialised process group, the batches are split across ranks and
    every rank returns all ``n`` samples.

    A text-conditional run (``model.text``, GLIDE) takes ``prompts``, a list of captions: sample i gets
    ``prompts[i % len(prompts)]`` (``n`` defaults to their number); classifier-free guidance w then uses the
    empty caption as the null (GLIDE).

    A super-resolution stage (``model.low_res_channels > 0``) takes ``low_res`` [n, C, s, s] in [-1, 1],
    the images it upsamples (CDM). With noise augmentation (``augment.kind: noise``) it is told the level
    ``aug_level`` (default ``sample.aug_level``): ``low_res`` is z_0, noised here to z_s ~ q(z_s | z_0)
    with each batch's generator (non-truncated), or, with ``low_res_noised``, already z_s (the output of
    a chain truncated at s). ``truncate_at`` = s > 0 stops this model's own chain at level s instead of
    x_0 (:func:`difflab.augment.sample_truncated`; ancestral and ddim), for a next stage's truncated
    conditioning.

    Inpainting (:mod:`difflab.inpaint`, docs/inpainting.md): ``inpaint_image`` [n or 1, C, S, S] in [-1, 1] and
    ``inpaint_mask`` [n or 1, 1, S, S] of 0 / 1 (1 = known) keep the known region by ``inpaint_rule``:
    ``"glide"`` (an inpainting model, ``model.inpaint``: the inputs go to the network and x0^ is pasted,
    GLIDE's notebook) or ``"replace"`` (any model: x_t's known region replaced by q(x_t | image) before each
    network call, the image pasted into the final x_0); None picks ``"glide"`` for an inpainting model.

    CLIP guidance (GLIDE; :mod:`difflab.clip_guidance`, docs/clip.md): ``clip`` (a loaded noised CLIP or its
    folder / run / file) with ``clip_scale`` s (default 1) steers sample i towards ``prompts[i % len(prompts)]``:
    mu + Sigma g (ancestral) or eps - sqrt(1 - abar_t) g (DDIM / ODE samplers), g = s grad exp(logit_scale)
    z_t . z_i(x_t, t) at the original step t. Any run takes prompts with a CLIP; the CLIP must see the model's
    sampling side and have been trained on its schedule.

    ``callback`` (progress, previews, cancelling: ``difflab serve``) receives after every sampler step the
    sampler's ``{"i", "t", "x", "pred_xstart"}`` of the batch plus ``"batch"`` (its index k), ``"batches"``
    (their number) and ``"steps"`` (the batch's step count); an exception it raises stops the sampling. It
    sees the state and never changes it: the samples are those drawn without it.

    Conditioning made elsewhere (unCLIP's pipelines, :mod:`difflab.pipelines.unclip`): ``cond`` holds tensors
    [n, ...], sample i getting row i (the prior's CLIP text features; the decoder's image embedding and text
    features); ``null_cond`` [1, ...] is what classifier-free guidance puts in the unconditional half in their place.
    ``x_T`` [n, ...] replaces the start noise (DDIM-inverted latents for variations and interpolations); the steps'
    noise still comes from each batch's generator. A prior's samples are vectors [n, clip_dim].
    """
    sc = cfg.sample
    guidance_scale = sc.guidance_scale if guidance_scale is None else float(guidance_scale)
    classifier_scale = sc.classifier_scale if classifier_scale is None else float(classifier_scale)
    from difflab.clip_guidance import clip_prompts

    guide_prompts = clip_prompts(clip, clip_scale, prompts)  # CLIP guidance's captions, or None
    captions = _captions(cfg, prompts) if guide_prompts is None or cfg.is_text else None
    n = (len(captions) if captions is not None else len(guide_prompts) if guide_prompts else sc.n) if n is None else n
    batch = sc.batch if batch is None else batch
    seed = sc.seed if seed is None else seed
    name = sc.sampler if sampler is None else sampler
    for what, value in (("n", n), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{what} must be >= 1, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    fn = get_sampler(name)
    steps = _check_steps(sc.steps if steps is None else steps, cfg.diffusion.steps)
    kwargs = {} if sc.clip_denoised is None else {"clip_denoised": sc.clip_denoised}
    if steps is not None:
        kwargs["steps"] = steps
    if "eta" in inspect.signature(fn).parameters:
        kwargs["eta"] = sc.eta if eta is None else eta
    elif eta is not None:
        raise ValueError(f"sampler {name!r} takes no eta")
    device = module_device(denoiser.net)
    bf16 = resolve_bf16(sc.bf16 if bf16 is None else bf16, device)[0]
    num_classes = getattr(cfg.model, "num_classes", None)
    if num_classes is None and classifier is not None:
        info = getattr(classifier, "diffusion_info", None)
        num_classes = info.num_classes if info is not None else classifier.config.out_channels
    labels = _labels(num_classes, n, label)
    condition = _LowRes(cfg, low_res, n, cfg.sample.aug_level if aug_level is None else aug_level, low_res_noised)
    if truncate_at:
        from difflab.augment import sample_truncated

        if "end" not in inspect.signature(fn).parameters:
            raise ValueError(f"a chain truncated at level {truncate_at} needs the ancestral or ddim sampler, "
                             f"not {name!r}")
        fn = functools.partial(sample_truncated, fn, s=truncate_at)
    text = _TextCondition(cfg, captions, n) if captions is not None else None
    denoiser = _guided(denoiser, cfg, guidance_scale, classifier, classifier_scale,
                       null_cond=text.null if text is not None else null_cond)
    side = condition.out_side if condition.low_res is not None else cfg.data.sample_size
    shape = (cfg.model.clip_dim,) if cfg.unclip_kind == "prior" else (cfg.model.in_channels, side, side)
    for name, value in (cond or {}).items():
        if not isinstance(value, torch.Tensor) or value.shape[:1] != (n,):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"cond[{name!r}] must be a tensor [n={n}, ...]; got {got}")
    if x_T is not None and tuple(x_T.shape) != (n, *shape):
        raise ValueError(f"x_T must have shape {[n, *shape]}; got {list(x_T.shape)}")
    guide = None
    if guide_prompts is not None:
        from difflab.clip_guidance import ClipGuide

        guide = ClipGuide(clip, clip_scale, guide_prompts, n, denoiser, side, device)
    known = None
    if inpaint_image is not None or inpaint_mask is not None or inpaint_rule is not None:
        from difflab.inpaint import InpaintCondition

        if truncate_at:
            raise ValueError("inpainting draws whole chains: truncate_at must be 0")
        known = InpaintCondition(cfg, inpaint_image, inpaint_mask, inpaint_rule, n, shape)
    rank, world = (dist_utils.get_rank(), dist_utils.get_world_size()) if distributed else (0, 1)
    mine = []
    for k in range(rank, -(-n // batch), world):
        lo, hi = k * batch, min(n, (k + 1) * batch)
        g = torch.Generator(device).manual_seed(_batch_seed(seed, k))
        start = torch.randn((hi - lo, *shape), generator=g, device=device)
        if sc.temperature != 1:  # GLIDE's upsample_temp: the start only, never the steps' noise
            start = start * sc.temperature
        if x_T is not None:  # a given latent (a DDIM inversion) is used as it is, never scaled by the temperature
            start = x_T[lo:hi].to(device=device, dtype=start.dtype)
        model_kwargs = {"y": labels[lo:hi].to(device)} if labels is not None else {}
        model_kwargs.update({k: v[lo:hi].to(device) for k, v in (cond or {}).items()})
        model_kwargs.update(condition.kwargs(lo, hi, g, device))
        if text is not None:
            model_kwargs.update(text.kwargs(lo, hi, device))
        batch_denoiser, batch_kwargs = denoiser, kwargs
        if known is not None:  # the known region: network inputs, a denoised_fn or a wrapper (difflab.inpaint)
            model_kwargs.update(known.model_kwargs(lo, hi, device))
            batch_denoiser = known.wrap(denoiser, lo, hi, _batch_seed(seed, k), device)
            batch_kwargs = {**kwargs, **known.sampler_kwargs(lo, hi, device)}
        if guide is not None:  # GLIDE's CLIP guidance: the batch's captions
            batch_denoiser = guide.wrap(batch_denoiser, lo, hi)
        if callback is not None:
            batch_kwargs = {**batch_kwargs, "callback": _batch_callback(callback, k, -(-n // batch), truncate_at)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = fn(batch_denoiser, start, generator=g, model_kwargs=model_kwargs or None, progress=progress,
                   **batch_kwargs)
        if known is not None:
            x = known.finish(x, lo, hi)
        mine.append((k, x.float().cpu()))
    return _gather(mine, n, shape, world), labels


def _batch_callback(callback: Callable[[dict], None], k: int, batches: int, truncate_at: int) -> Callable[[dict], None]:
    """A sampler callback handing ``callback`` the step's dict with the batch and its step count: every sampler
    reports ``i`` (0, 1, ...) and ``t``, the respaced index (K-1, ..., end), so a chain has i + t + 1 - end steps
    (end = 1 for a truncated chain, :func:`difflab.augment.sample_truncated`)."""
    end = 1 if truncate_at else 0

    def report(info: dict) -> None:
        callback({**info, "batch": k, "batches": batches, "steps": int(info["i"]) + int(info["t"]) + 1 - end})

    return report


def _check_steps(steps: int | str | None, T: int) -> int | str | None:
    """``steps``: K in [1, T] or a respacing rule that fits T ("100", "ddim50", "fast27", "10,10,3")."""
    if steps is None:
        return None
    if isinstance(steps, str) and steps.strip().isdigit():
        steps = int(steps)
    if isinstance(steps, str):
        from difflab.schedules import space_timesteps

        space_timesteps(T, steps)  # its own error names the rule and the valid forms
        return steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (diffusion.steps), got {steps}")
    return steps


class _LowRes:
    """A super-resolution stage's low-res conditioning, batch by batch (see :func:`draw_samples`)."""

    def __init__(self, cfg: Config, low_res: torch.Tensor | None, n: int, level: int, noised: bool) -> None:
        channels = getattr(cfg.model, "low_res_channels", 0)
        self.cfg, self.low_res, self.level, self.noised = cfg, low_res, int(level), noised
        if not channels:
            if low_res is not None:
                raise ValueError("this model takes no low-res input (it is not a super-resolution stage)")
            return
        d = cfg.data
        side = d.sample_low_res_size
        if low_res is None:
            raise ValueError(f"this super-resolution stage needs low-res images ({channels}x{side}x{side}, e.g. "
                             "--low-res FILE.npz or a cascade)")
        # the side it samples at, or the training side (a model trained on crops: the trainer's grids)
        sides = {side: d.sample_size, d.low_res_size: d.image_size}
        if tuple(low_res.shape[:2]) != (n, channels) or low_res.shape[-1] != low_res.shape[-2] \
                or low_res.shape[-1] not in sides:
            raise ValueError(f"low-res images are {list(low_res.shape)}, this stage takes {[n, channels, side, side]} "
                             f"(n, model.low_res_channels, low-res side, low-res side)")
        self.out_side = sides[low_res.shape[-1]]
        kind = cfg.augment.kind
        if self.level and kind != "noise":
            raise ValueError(f"aug_level {self.level} needs a stage trained with noise augmentation "
                             f"(augment.kind: noise); this one has augment.kind {kind!r}")
        if not 0 <= self.level <= cfg.augment.steps:
            raise ValueError(f"aug_level must be in 0..{cfg.augment.steps} (augment.steps), got {self.level}")
        self.process = Process.named(cfg.augment.schedule, cfg.augment.steps) if kind == "noise" else None

    def kwargs(self, lo: int, hi: int, g: torch.Generator, device) -> dict[str, torch.Tensor]:
        if self.low_res is None:
            return {}
        from difflab.augment import level_embedding, noise_augment

        z = self.low_res[lo:hi].to(device=device, dtype=torch.float32)
        if self.process is None:
            return {"low_res": z}
        if self.level and not self.noised:
            z = noise_augment(z, self.level, self.process, generator=g)
        s = torch.full((hi - lo,), self.level, dtype=torch.long, device=device)
        return {"low_res": z, "cond": level_embedding(s, self.cfg.model.cond_dim).to(device)}


def _gather(mine: list[tuple[int, torch.Tensor]], n: int, shape: tuple[int, ...], world: int) -> torch.Tensor:
    """Every rank's batches back in batch order (single process: just concatenated)."""
    local = torch.cat([x for _, x in mine]) if mine else torch.empty((0, *shape))
    if world == 1:
        return local
    ids = torch.cat([torch.full((len(x),), k, dtype=torch.long) for k, x in mine]) if mine else torch.empty(0).long()
    xs = dist_utils.all_gather_uneven(local)
    ks = dist_utils.all_gather_uneven(ids)
    order = torch.argsort(ks, stable=True)
    return xs[order][:n]


def sample_and_evaluate(run_dir, *, ref=None, features: str | None = None, inception_weights=None,
                        eval_batch_size: int = 250, **sample_kwargs) -> tuple[list, dict]:
    """``difflab sample --eval``: :func:`sample_run` (``sample_kwargs`` are its arguments), then the
    metrics of the drawn images (uint8 at the data's native size, with their labels when the run is
    class-conditional or classifier-guided) from :func:`difflab.eval.report.evaluate`, the feature
    extraction sharded across ranks under torchrun.

    ``ref`` (default ``"mnist5k-test"``), ``features`` (default ``"mnist"``), ``inception_weights``:
    as in :func:`~difflab.eval.report.evaluate`. The extractor and the reference are loaded, and the
    image size is checked against the feature space, before anything is drawn, so bad input costs no
    sampling. Returns ``(paths written (rank 0; [] elsewhere), metrics (every rank))``.
    """
    from difflab.eval.report import DEFAULT_FEATURES, DEFAULT_REF

    evaluate = {"ref": DEFAULT_REF if ref is None else ref,
                "features": DEFAULT_FEATURES if features is None else features,
                "inception_weights": inception_weights, "batch_size": eval_batch_size}
    return sample_run(run_dir, evaluate=evaluate, **sample_kwargs)


def sample_run(
    run_dir,
    *,
    n: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    label: int | str | None = None,
    seed: int | None = None,
    batch: int | None = None,
    guidance_scale: float | None = None,
    classifier=None,
    classifier_scale: float | None = None,
    bf16: bool | None = None,
    grid=None,
    npz=None,
    ema: str | float | None = None,
    checkpoint=None,
    low_res=None,
    aug_level: int | None = None,
    prompts=None,
    progress: bool = False,
    evaluate: dict | None = None,
    clip=None,
    clip_scale: float | None = None,
) -> tuple[list, dict | None]:
    """``difflab sample``: load a run, draw samples (split across ranks under torchrun), and write a
    PNG grid and/or an ``.npz`` at the data's native size (rank 0). Returns ``(paths written, metrics)``:
    the paths on rank 0 ([] elsewhere); with ``evaluate`` (keyword arguments of
    :func:`difflab.eval.report.make_evaluator`) the metrics of the samples on every rank, else None.

    ``label`` (an index or ``"all"``), ``guidance_scale`` w, ``classifier`` (a classifier file or run
    folder; default ``sample.classifier``), ``classifier_scale`` s and ``bf16``: see :func:`draw_samples`.
    ``clip`` (a noised CLIP's folder, run or file) and ``clip_scale``: CLIP guidance towards ``prompts``.
    Without ``grid`` and ``npz`` both are written to ``RUN/samples/<sampler>_<n>[_w<w>][_s<s>][_clip<s>].{png,npz}``.
    A super-resolution run takes ``low_res``, an ``.npz`` of the images to upsample (e.g. a base run's
    samples; ``n`` defaults to their number), at conditioning level ``aug_level`` (see :func:`draw_samples`).
    """
    from pathlib import Path

    from difflab.build import load_run, load_run_config, resolve_ema
    from difflab.images import to_uint8

    info = dist_utils.init_distributed()
    cfg = load_run_config(run_dir)
    name = sampler or cfg.sample.sampler
    get_sampler(name)  # a bad name is an error before any work
    check_output_files(grid=grid, npz=npz)
    evaluator = None
    if evaluate is not None:  # every evaluation choice is checked before sampling
        from difflab.eval.report import make_evaluator

        evaluator = make_evaluator(**evaluate)
        n_check = min(max(cfg.sample.n if n is None else n, 0), 2)  # what the samples' shape will be
        side = cfg.data.sample_size
        evaluator.check(to_uint8(torch.zeros(n_check, cfg.model.in_channels, side, side), cfg.data))
    classifier = classifier if classifier is not None else cfg.sample.classifier
    if classifier is not None:
        from difflab.train.classifier import load_classifier

        classifier = load_classifier(classifier, device=info.device)
    if clip is not None or clip_scale is not None:  # checked, and the CLIP loaded, before the run's weights
        from difflab.clip_guidance import clip_prompts, load_noised_clip

        clip_prompts(clip, clip_scale, prompts)
        clip = load_noised_clip(clip, device=info.device) if not isinstance(clip, torch.nn.Module) else clip
    if low_res is not None:
        from difflab.data import load_npz, uint8_to_float

        low_res = uint8_to_float(load_npz(low_res)[0])
        n = len(low_res) if n is None else n
        if n != len(low_res):
            raise ValueError(f"--n {n} but the low-res file holds {len(low_res)} images (one sample each)")
    cfg, _, denoiser = load_run(run_dir, ema=resolve_ema(cfg, ema), checkpoint=checkpoint, device=info.device)
    x, labels = draw_samples(denoiser, cfg, n=n, sampler=name, steps=steps, eta=eta, label=label, seed=seed,
                             batch=batch, guidance_scale=guidance_scale, classifier=classifier,
                             classifier_scale=classifier_scale, bf16=bf16, low_res=low_res, aug_level=aug_level,
                             prompts=prompts, clip=clip, clip_scale=clip_scale,
                             progress=progress and info.rank == 0)
    images = to_uint8(x, cfg.data) if info.rank == 0 or evaluator is not None else None
    labels = labels.numpy() if labels is not None else None
    written = []
    if info.rank == 0:
        if grid is None and npz is None:
            w = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
            s = cfg.sample.classifier_scale if classifier_scale is None else classifier_scale
            tags = (f"_w{w:g}" if w else "") + (f"_s{s:g}" if s and classifier is not None else "")
            tags += f"_clip{1.0 if clip_scale is None else clip_scale:g}" if clip is not None else ""
            grid, npz = _free_names(Path(run_dir) / "samples" / f"{name}_{len(x)}{tags}")
        check_output_files(grid=grid, npz=npz)  # again: something may have appeared while sampling
        written += _save(images, labels, grid, npz)
    # the files are on disk before the (possibly long) evaluation; every rank takes part in it
    metrics = evaluator(images, labels) if evaluator is not None else None
    return written, metrics


def sample_cascade_file(path, *, n: int | None = None, seed: int | None = None, label=None, batch: int | None = None,
                        grid=None, npz=None, stages_dir=None, prompts=None, progress: bool = False) -> list:
    """``difflab sample CASCADE.yaml``: every stage of :mod:`difflab.pipelines.cascade` in turn (sharded
    under torchrun), the last stage's images to ``grid`` / ``npz`` (default ``<cascade>.png`` / ``.npz``
    beside the file) and, with ``stages_dir``, each stage's to ``stage_K.{png,npz}`` there (rank 0;
    refused if they exist). Returns the paths written."""
    from pathlib import Path

    from difflab.images import to_uint8
    from difflab.pipelines.cascade import build_cascade, load_cascade, sample_cascade

    info = dist_utils.init_distributed()
    cascade = load_cascade(path, n=n, seed=seed, label=label, batch=batch)
    if grid is None and npz is None:
        grid, npz = Path(path).with_suffix(".png"), Path(path).with_suffix(".npz")
    check_output_files(grid=grid, npz=npz)
    if stages_dir is not None:
        if Path(stages_dir).exists() and not Path(stages_dir).is_dir():
            raise ValueError(f"--stages {stages_dir} is a file, not a folder")
        for k in range(len(cascade.stages)):
            check_output_files(grid=Path(stages_dir) / f"stage_{k}.png", npz=Path(stages_dir) / f"stage_{k}.npz")
    stages = build_cascade(cascade, device=info.device)
    results = sample_cascade(cascade, stages, prompts=prompts, progress=progress and info.rank == 0)
    written = []
    if info.rank == 0:
        outputs = []
        if stages_dir is not None:
            outputs += [(k, Path(stages_dir) / f"stage_{k}.png", Path(stages_dir) / f"stage_{k}.npz")
                        for k in range(len(stages))]
        outputs.append((len(stages) - 1, grid, npz))
        for k, png, arrays in outputs:
            x, labels = results[k]
            images = to_uint8(x, stages[k].cfg.data)
            written += _save(images, labels.numpy() if labels is not None else None, png, arrays)
    return written


def check_output_files(**files) -> None:
    """Refuse output files that cannot be written or would overwrite something, before any sampling:
    ``grid=`` (or ``out=``, ``difflab inpaint``) must name a ``.png``, ``npz=`` an ``.npz``; neither may exist,
    be a folder, or lie in a "folder" that is a file. ValueError in one line, naming the option."""
    from pathlib import Path

    for option, file in files.items():
        if file is None:
            continue
        path, suffix, flag = Path(file), ".png" if option in ("grid", "out") else f".{option}", f"--{option}"
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; name a {suffix} file (e.g. {path / ('samples' + suffix)})")
        if path.suffix.lower() != suffix:
            raise ValueError(f"{flag} {path}: expected a {suffix} file name")
        if path.exists():
            raise ValueError(f"{flag} {path} already exists; name a new file (difflab never overwrites results)")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")


def _free_names(stem):
    """``stem.png`` / ``stem.npz``, or ``stem-2``, ``stem-3``, ... where those exist (default sample names)."""
    k, base = 1, stem
    while stem.with_suffix(".png").exists() or stem.with_suffix(".npz").exists():
        k += 1
        stem = base.with_name(f"{base.name}-{k}")
    return stem.with_suffix(".png"), stem.with_suffix(".npz")


def _save(images, labels, grid, npz) -> list:
    """Write a PNG grid and / or an ``.npz`` of uint8 images; the paths written."""
    from pathlib import Path

    from difflab.images import save_grid, save_npz

    written = []
    if grid is not None:
        save_grid(images, grid)
        written.append(Path(grid))
    if npz is not None:
        save_npz(images, labels, npz)
        written.append(Path(npz))
    return written
