"""Guidance: classifier guidance (ADM, Dhariwal & Nichol 2021) and classifier-free guidance (Ho & Salimans 2021).

Notation (code -> paper):
    cond_fn(x_t, t, **cond)   s * grad_{x_t} log p_phi(y | x_t, t)   (already times the scale s; t as the network
                              sees it: the original index, or timestep_map[t] * 1000 / T under rescale_timesteps,
                              as guided-diffusion's _WrappedModel hands cond_fn the model's t)
    scale                     s, the classifier scale (ADM Sec. 4)
    guidance_scale            w, the classifier-free weight (CFG eq. 6): eps~ = (1 + w) eps_c - w eps_u
    null_label                the label that stands for "no class" (the unconditional model)

Classifier guidance, two uses of the same gradient g = s grad log p(y | x_t) (taken at x_t, as the code does):
    condition_mean   ancestral sampling: mu <- mu + Sigma g                                  (ADM Alg. 1)
    condition_score  DDIM / ODEs: eps <- eps - sqrt(1 - abar_t) g, then x0^ and mu from it   (ADM Alg. 2)

:class:`ClassifierGuidance` wraps any denoiser so that every sampler is guided without a
``cond_fn`` argument: its ``PMeanVar.mean`` is the Alg. 1 mean (read by ancestral samplers) and
its ``pred_xstart`` / ``eps`` are the Alg. 2 ones (read by DDIM and ODE samplers). One gradient
per call serves both. GLIDE's CLIP guidance is this wrapper with a noised CLIP's ``cond_fn``
(:mod:`difflab.clip_guidance`).

:class:`ClassifierFreeGuidance` wraps a class-conditional *network*: one batched forward over
[x; x] with labels [y; null], the mean channels combined as (1 + w) c - w u and the variance
channels of the conditional half passed through (as GLIDE does). For eps, x0 and v predictions
this affine combination (weights summing to 1) is the same guidance, because each is affine in
the others at fixed x_t. Wrap a whole denoiser with :func:`classifier_free_denoiser`.

:func:`drop_labels` is the training side of CFG: labels replaced by the null label with
probability p_uncond.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from difflab.denoiser import Denoiser
from difflab.prediction import PMeanVar
from difflab.process import Process, predict_eps_from_x0, predict_x0_from_eps, q_posterior_mean_variance

Tensor = torch.Tensor
CondFn = Callable[..., Tensor]

__all__ = [
    "CondFn", "condition_mean", "condition_score", "network_t", "shift_mean", "shift_score",
    "ClassifierInfo", "classifier_grad_fn", "ClassifierGuidance",
    "ClassifierFreeGuidance", "classifier_free_denoiser", "guided_denoiser", "drop_labels", "check_labels",
]


# ---------------------------------------------------------------------------------------- ADM Algs. 1-2


def shift_mean(p: PMeanVar, gradient: Tensor) -> PMeanVar:
    """ADM Alg. 1: mu + Sigma g. ``gradient`` g [N, C, ...] = s grad log p(y | x_t)."""
    return p._replace(mean=p.mean + p.variance * gradient.to(p.mean.dtype))


def shift_score(process: Process, p: PMeanVar, x_t: Tensor, t: Tensor, gradient: Tensor) -> PMeanVar:
    """ADM Alg. 2: eps' = eps(x0^) - sqrt(1 - abar_t) g; x0^' and the posterior mean mu~(x0^', x_t) follow.

    eps is recomputed from the (possibly clipped) x0^ first, and x0^' is not clipped again (official code).
    """
    eps = predict_eps_from_x0(process, x_t, t, p.pred_xstart)
    eps = eps - process.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * gradient.to(x_t.dtype)
    x0 = predict_x0_from_eps(process, x_t, t, eps)
    mean, _, _ = q_posterior_mean_variance(process, x0, x_t, t)
    return p._replace(mean=mean, pred_xstart=x0, eps=eps)


def network_t(denoiser: Any, t: Tensor) -> Tensor:
    """The t the network sees at steps ``t`` [N] of ``denoiser``'s process, which ``cond_fn`` receives too:
    guided-diffusion wraps ``cond_fn`` in the same ``_WrappedModel`` as the model, so under
    ``rescale_timesteps`` both get ``timestep_map[t] * 1000 / T`` (float32), else the original index."""
    fn = getattr(denoiser, "network_t", None)
    return fn(t) if fn is not None else denoiser.process.original_t(t)


def condition_mean(denoiser: Denoiser, cond_fn: CondFn, p: PMeanVar, x_t: Tensor, t: Tensor, **cond) -> PMeanVar:
    """Shift the mean of p(x_{t-1}|x_t) by Sigma * cond_fn(x_t, t) (ADM Alg. 1). The gradient is taken at x_t."""
    return shift_mean(p, cond_fn(x_t, network_t(denoiser, t), **cond))


def condition_score(denoiser: Denoiser, cond_fn: CondFn, p: PMeanVar, x_t: Tensor, t: Tensor, **cond) -> PMeanVar:
    """Shift the score: eps' = eps - sqrt(1 - abar_t) cond_fn(x_t, t); x0^ and the mean follow (ADM Alg. 2)."""
    return shift_score(denoiser.process, p, x_t, t, cond_fn(x_t, network_t(denoiser, t), **cond))


# ---------------------------------------------------------------------------------------- labels


def _num_classes_of(obj: Any, attr: str = "num_classes") -> int | None:
    """``obj.num_classes`` or ``obj.config.<attr>`` when present (UNet: num_classes; Classifier: out_channels)."""
    n = getattr(obj, "num_classes", None)
    if n is None:
        n = getattr(getattr(obj, "config", None), attr, None)
    return n


def check_labels(y: Tensor | None, num_classes: int | None, n: int, what: str = "guidance") -> Tensor:
    """Validate class labels: an integer tensor [n] with values in [0, num_classes). Returns ``y``."""
    if y is None:
        raise ValueError(f"{what} needs class labels: pass y (an integer tensor of shape [{n}])")
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        got = f"{type(y).__name__} {getattr(y, 'dtype', '')}"
        raise ValueError(f"{what}: labels y must be an integer tensor, got {got}")
    if y.shape != (n,):
        raise ValueError(f"{what}: labels y must have shape ({n},), got {tuple(y.shape)}")
    if num_classes is not None and n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise ValueError(
            f"{what}: label {int(bad[0])} is outside the classes; valid labels are 0..{num_classes - 1}"
        )
    return y


def drop_labels(
    y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Classifier-free training (CFG Alg. 1): each label [N] becomes ``null_label`` with probability p_uncond.

    The draw uses ``generator`` (on its device), so a run resumed with the same generator state
    drops the same labels. Returns a new tensor; ``y`` is unchanged.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if y.dim() != 1 or y.dtype.is_floating_point:
        raise ValueError(f"labels y must be an integer tensor of shape [N], got {tuple(y.shape)} {y.dtype}")
    device = generator.device if generator is not None else y.device
    drop = torch.rand(y.shape, generator=generator, device=device).to(y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


# ---------------------------------------------------------------------------------------- the classifier


@dataclass(frozen=True)
class ClassifierInfo:
    """What a noisy classifier was trained on; saved with it, checked before it guides a model.

    A classifier of p(y | x_t, t) is only meaningful on the x_t distribution it was trained on,
    so it carries the noise levels it saw: ``alphas_cumprod[i]`` is abar at original step
    ``timesteps[i]`` (the steps it was called with), at images of side ``image_size``.

    Fields:
        timesteps: original step indices the classifier was trained on (usually 0..T-1).
        alphas_cumprod: abar at those steps (float64).
        image_size: side of the square training images.
        num_classes: number of classes (logits).
        schedule: an informative name ("cosine/1000"), used in messages only.
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    image_size: int
    num_classes: int
    schedule: str | None = None

    @classmethod
    def from_process(cls, process: Process, image_size: int, num_classes: int, schedule: str | None = None):
        """The info of a classifier trained on ``process`` (respaced or not) at ``image_size``."""
        return cls(
            tuple(int(s) for s in process.timestep_map.tolist()),
            tuple(float(a) for a in process.alphas_cumprod.tolist()),
            int(image_size), int(num_classes), schedule,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"timesteps": list(self.timesteps), "alphas_cumprod": list(self.alphas_cumprod),
                "image_size": self.image_size, "num_classes": self.num_classes, "schedule": self.schedule}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierInfo:
        return cls(tuple(int(s) for s in d["timesteps"]), tuple(float(a) for a in d["alphas_cumprod"]),
                   int(d["image_size"]), int(d["num_classes"]), d.get("schedule"))

    def check_fits(self, process: Process, image_size: int | None = None, rtol: float = 1e-6) -> None:
        """Raise ValueError unless every step of ``process`` is a noise level the classifier was trained on
        (same original index and abar to ``rtol``), and ``image_size`` (if given) is the training size."""
        name = f" ({self.schedule})" if self.schedule else ""
        if image_size is not None and int(image_size) != self.image_size:
            raise ValueError(
                f"the classifier was trained on {self.image_size}x{self.image_size} images but the diffusion model "
                f"makes {image_size}x{image_size}; train a classifier at the model's resolution"
            )
        known = dict(zip(self.timesteps, self.alphas_cumprod, strict=True))
        steps = [int(s) for s in process.timestep_map.tolist()]
        unseen = [s for s in steps if s not in known]
        if unseen:
            raise ValueError(
                f"the classifier was trained on another noise schedule{name}: it never saw step {unseen[0]} "
                f"(it knows original steps {min(self.timesteps)}..{max(self.timesteps)}, "
                f"{len(self.timesteps)} in all); train it with the diffusion model's schedule"
            )
        for orig, abar in zip(steps, process.alphas_cumprod.tolist(), strict=True):
            mine = known[orig]
            if not math.isclose(mine, abar, rel_tol=rtol, abs_tol=1e-12):
                raise ValueError(
                    f"the classifier was trained on another noise schedule{name}: at step {orig} its alpha_bar is "
                    f"{mine:.6g} but the diffusion model's is {abar:.6g}; train it with the model's schedule"
                )


def classifier_grad_fn(
    classifier: Callable[[Tensor, Tensor], Tensor],
    scale: float = 1.0,
    *,
    num_classes: int | None = None,
) -> CondFn:
    """cond_fn(x_t, t, y, **ignored) = s grad_{x_t} log softmax(classifier(x_t, t))[y] (ADM Sec. 4.1).

    ``classifier(x_t, t)`` returns logits [N, K] (t: what the model sees, see :func:`network_t`); the
    gradient [N, C, ...] is taken under ``torch.enable_grad()`` on a detached copy of x_t, so it works
    inside the samplers' ``no_grad`` loops (as guided-diffusion's ``classifier_sample.py``). ``num_classes`` defaults to
    the classifier's ``config.out_channels``; labels outside [0, K) raise ValueError.
    """
    if num_classes is None:
        num_classes = _num_classes_of(classifier, "out_channels")

    def cond_fn(x_t: Tensor, t: Tensor, y: Tensor | None = None, **_: Any) -> Tensor:
        check_labels(y, num_classes, x_t.shape[0], "classifier guidance")
        with torch.enable_grad():
            x_in = x_t.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            if logits.dim() != 2 or logits.shape[0] != x_t.shape[0]:
                raise ValueError(f"the classifier must return logits [N, K], got {tuple(logits.shape)}")
            if num_classes is None and int(y.max()) >= logits.shape[1]:
                raise ValueError(
                    f"classifier guidance: label {int(y.max())} is outside the classes; "
                    f"valid labels are 0..{logits.shape[1] - 1}"
                )
            log_probs = torch.log_softmax(logits, dim=-1)
            selected = log_probs[torch.arange(len(y), device=log_probs.device), y.to(log_probs.device)]
            grad = torch.autograd.grad(selected.sum(), x_in)[0]
        return grad * scale

    return cond_fn


def _net_num_classes(denoiser: Any) -> tuple[bool, int | None]:
    """(known, num_classes) of the network behind ``denoiser``: known=False for a plain callable without config."""
    net = getattr(denoiser, "net", denoiser)
    cfg = getattr(net, "config", None)
    if hasattr(net, "num_classes"):
        return True, net.num_classes
    if cfg is not None and hasattr(cfg, "num_classes"):
        return True, cfg.num_classes
    return False, None


def _net_image_size(denoiser: Any) -> int | None:
    net = getattr(denoiser, "net", denoiser)
    return getattr(getattr(net, "config", None), "image_size", None)


class WrappedDenoiser:
    """The Denoiser interface of a wrapper around ``self.denoiser`` (guidance, inpainting's replacement): its
    process, parameterization, net, step count and network steps are the wrapped denoiser's."""

    denoiser: Any

    @property
    def process(self) -> Process:
        return self.denoiser.process

    @property
    def parameterization(self):
        return self.denoiser.parameterization

    @property
    def net(self):
        return self.denoiser.net

    @property
    def num_timesteps(self) -> int:
        return self.denoiser.num_timesteps

    def network_t(self, t: Tensor) -> Tensor:
        """What the network (and the classifier) sees at steps ``t``: see :func:`network_t`."""
        return network_t(self.denoiser, t)


class ClassifierGuidance(WrappedDenoiser):
    """A denoiser guided by a noisy classifier (ADM Algs. 1 and 2); same interface as :class:`Denoiser`.

    ``wrapper(x_t, t, clip_denoised=..., denoised_fn=..., y=labels, **cond) -> PMeanVar`` with
        mean         = mu + Sigma g                          (Alg. 1: ancestral samplers read ``.mean``)
        eps          = eps(x0^) - sqrt(1 - abar_t) g          (Alg. 2: DDIM / ODE samplers read these)
        pred_xstart  = x0 from that eps
    where g = s grad_{x_t} log p(y | x_t, t) at the original step of t, computed once per call.
    ``respace(spec)`` returns the guided respaced denoiser, and the classifier always sees the
    network's t: original step indices, or under ``rescale_timesteps`` the same rescaled float t as
    the model (:func:`network_t`, as guided-diffusion). The returned ``pred_xstart`` is the guided one (the official
    ``p_sample`` reports the unguided x0^; the sample itself is the same).

    Args:
        denoiser: the model (unconditional or class-conditional).
        classifier: logits ``classifier(x_t, t) -> [N, K]``; its gradient is scaled by ``scale``.
        scale: s. s = 0 returns the unguided denoiser's output unchanged.
        cond_fn: instead of a classifier, a ready gradient function (official ``cond_fn``, already scaled).
        conditional_model: pass the labels ``y`` on to the model. None = from the network's
            ``config.num_classes`` (an error if that is unknown and labels are given).
        info: what the classifier was trained on (default: ``classifier.diffusion_info``), checked
            against the model's process and image size; a classifier without it is used unchecked
            (with a warning).
        original_t: hand ``cond_fn`` the original step index ``timestep_map[t]`` (int64) even where the
            network sees rescaled float steps: a noised CLIP looks its step up in a table (GLIDE's w_t;
            :mod:`difflab.clip_guidance`). False: the network's t (:func:`network_t`, as guided-diffusion).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
        scale: float = 1.0,
        *,
        cond_fn: CondFn | None = None,
        conditional_model: bool | None = None,
        info: ClassifierInfo | None = None,
        original_t: bool = False,
        _checked: bool = False,
    ):
        if (classifier is None) == (cond_fn is None):
            raise ValueError(
                "classifier guidance needs exactly one of a classifier (logits = classifier(x_t, t)) or a cond_fn"
            )
        try:
            self.scale = float(scale)
        except (TypeError, ValueError):
            self.scale = math.nan
        if not math.isfinite(self.scale):
            raise ValueError(f"the classifier scale s must be a finite number, got {scale!r}")
        self.denoiser = denoiser
        self.classifier = classifier
        self.original_t = bool(original_t)
        self.info = info if info is not None else getattr(classifier, "diffusion_info", None)
        known, model_classes = _net_num_classes(denoiser)
        if conditional_model is None and known:
            conditional_model = model_classes is not None
        self.conditional_model = conditional_model
        self.num_classes = None
        if classifier is not None:
            self.num_classes = (self.info.num_classes if self.info is not None
                                else _num_classes_of(classifier, "out_channels"))
            if model_classes is not None and self.num_classes is not None and model_classes != self.num_classes:
                raise ValueError(
                    f"the classifier has {self.num_classes} classes but the class-conditional model has "
                    f"{model_classes}; they must label the same classes"
                )
            if not _checked:
                if self.info is not None:
                    self.info.check_fits(denoiser.process, _net_image_size(denoiser))
                else:
                    warnings.warn(
                        "the classifier carries no ClassifierInfo (schedule, image size): its fit to the diffusion "
                        "model is not checked", stacklevel=2,
                    )
            cond_fn = classifier_grad_fn(classifier, self.scale, num_classes=self.num_classes)
        self.cond_fn = cond_fn


    def respace(self, spec) -> ClassifierGuidance:
        """The guided denoiser on a respaced process (the classifier still sees original steps)."""
        if spec is None:
            return self
        inner = self.denoiser.respace(spec)
        out = ClassifierGuidance(inner, self.classifier, self.scale, cond_fn=None if self.classifier else self.cond_fn,
                                 conditional_model=self.conditional_model, info=self.info,
                                 original_t=self.original_t, _checked=True)
        if self.info is not None:
            self.info.check_fits(inner.process)
        return out

    def _model_cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        if "y" not in cond or cond["y"] is None:
            return cond
        if self.conditional_model is None:
            raise ValueError(
                "cannot tell whether the model takes the labels y: pass conditional_model=True (class-conditional "
                "model) or False (unconditional model guided by the classifier alone)"
            )
        return cond if self.conditional_model else {k: v for k, v in cond.items() if k != "y"}

    def model_output(self, x_t: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Raw (unguided) network output; guidance acts on p(x_{t-1} | x_t), not on the raw output."""
        return self.denoiser.model_output(x_t, t, **self._model_cond(cond))

    def __call__(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        **cond: Any,
    ) -> PMeanVar:
        """Guided p(x_{t-1} | x_t): Alg. 1 mean, Alg. 2 eps and pred_xstart. x_t [N, C, ...], t [N]."""
        if self.info is not None and x_t.dim() == 4 and x_t.shape[-1] != self.info.image_size:
            raise ValueError(
                f"the classifier was trained on {self.info.image_size}x{self.info.image_size} images, got "
                f"x_t of size {x_t.shape[-2]}x{x_t.shape[-1]}"
            )
        if self.num_classes is not None:
            check_labels(cond.get("y"), self.num_classes, x_t.shape[0], "classifier guidance")
        p = self.denoiser(x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, **self._model_cond(cond))
        if self.scale == 0.0 and self.classifier is not None:
            return p
        cond_t = self.process.original_t(t) if self.original_t else network_t(self.denoiser, t)
        gradient = self.cond_fn(x_t, cond_t, **cond)
        guided = shift_score(self.process, p, x_t, t, gradient)
        return guided._replace(mean=shift_mean(p, gradient).mean)


# ---------------------------------------------------------------------------------------- classifier-free


class ClassifierFreeGuidance:
    """A class-conditional network guided without a classifier (Ho & Salimans 2021, eq. 6; GLIDE's ``model_fn``).

    ``cfg(x_t, t, y=labels, **cond)`` runs the wrapped network ONCE on the batch [x_t; x_t] [2N, ...]
    with labels [y; null] (other tensor conditions of batch N are repeated) and returns [N, ...]:
        out[:, :C]  = (1 + w) c - w u      the mean prediction (eps, x0 or v), C = x_t.shape[1]
        out[:, C:]  = c                    the variance channels, from the conditional half (GLIDE)
    With w = 0 the network is called once on [x_t] with y alone, so the output equals the
    conditional model exactly. Use it as the ``net`` of a :class:`Denoiser` (see
    :func:`classifier_free_denoiser`); respacing keeps it, since respacing reuses the network.

    Args:
        net: ``net(x_t, t, y=..., **cond)`` trained with label dropout (:func:`drop_labels`).
        guidance_scale: w >= 0 (GLIDE's scale is 1 + w).
        null_label: the dropped label. Default: ``num_classes`` on a U-Net built with ``class_null``.
        num_classes: the number of real classes; default from ``net.config.num_classes``.
        null_cond: a text model's null instead of a label: ``{"tokens": [1, L], "mask": [1, L]}`` of the empty
            caption (GLIDE), put in the unconditional half in place of the caption's tokens; any conditioning
            tensors work the same way (unCLIP's prior: the empty caption's CLIP features; its decoder also
            ``y_drop`` [1] True, the learned null image embedding, with ``y`` kept as conditioning).
    """

    def __init__(self, net: Callable[..., Tensor], guidance_scale: float, null_label: int | None = None,
                 *, num_classes: int | None = None, null_cond: dict[str, Tensor] | None = None):
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale w must be a finite number >= 0, got {guidance_scale!r}")
        self.null_cond = null_cond
        if null_cond is not None:  # a text model (GLIDE): the null is the empty caption's tokens, not a label
            self.net, self.guidance_scale, self.config = net, float(guidance_scale), getattr(net, "config", None)
            self.null_label, self.num_classes = None, None
            return
        known, model_classes = _net_num_classes(net)
        if known and model_classes is None:
            raise ValueError(
                "classifier-free guidance needs a class-conditional model (num_classes) trained with label dropout; "
                "this model is unconditional: guide it with a noisy classifier (ClassifierGuidance) instead"
            )
        if num_classes is None:
            num_classes = model_classes
        if null_label is None:
            cfg = getattr(net, "config", None)
            if cfg is not None and getattr(cfg, "class_null", False):
                null_label = cfg.num_classes
            else:
                raise ValueError(
                    "classifier-free guidance needs the null label the model was trained with (null_label=...); "
                    "a U-Net built with class_null=True uses num_classes"
                )
        self.net = net
        self.guidance_scale = float(guidance_scale)
        self.null_label = int(null_label)
        self.num_classes = num_classes
        self.config = getattr(net, "config", None)  # lets wrappers above see num_classes / image_size

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        n = x_t.shape[0]
        if self.null_cond is not None:
            return self._text(x_t, t, y, cond)
        check_labels(y, self.num_classes, n, "classifier-free guidance")
        if self.num_classes is None and bool((y == self.null_label).any()):
            raise ValueError(f"classifier-free guidance: y holds the null label {self.null_label}; pass real classes")
        if self.guidance_scale == 0.0:
            return self.net(x_t, t, y=y, **cond)
        null = torch.full_like(y, self.null_label)
        both = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
                for k, v in cond.items()}
        out = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]), **both)
        return self._combine(out, x_t.shape)

    def _text(self, x_t: Tensor, t: Tensor, y: Tensor | None, cond: dict[str, Any]) -> Tensor:
        """The text form: the unconditional half takes ``null_cond`` (each [1, ...], broadcast to N) in place
        of the caption's tokens; GLIDE's ``model_fn`` with the empty caption."""
        if y is not None and "y_drop" in self.null_cond:  # unCLIP's decoder: y is the CLIP image embedding
            cond = {**cond, "y": y}
        elif y is not None:
            raise ValueError("classifier-free guidance of a text model takes captions (tokens), not labels y")
        if self.guidance_scale == 0.0:
            return self.net(x_t, t, **cond)
        n = x_t.shape[0]
        missing = sorted(set(self.null_cond) - set(cond))
        if missing:
            raise ValueError(f"classifier-free guidance of a text model: {missing} not given")
        both = {}
        for k, v in cond.items():
            if k in self.null_cond:
                both[k] = torch.cat([v, self.null_cond[k].to(v.device).expand(n, *v.shape[1:])])
            else:
                both[k] = torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
        return self._combine(self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), **both), x_t.shape)

    def _combine(self, out: Tensor, shape: torch.Size) -> Tensor:
        """[c; u] of batch 2N -> (1 + w) c - w u on the mean channels, c's variance channels (GLIDE)."""
        n, ch = shape[0], shape[1]
        c, u = out[:n], out[n:]
        w = self.guidance_scale
        mean = (1 + w) * c[:, :ch] - w * u[:, :ch]
        return torch.cat([mean, c[:, ch:]], dim=1) if c.shape[1] > ch else mean


def classifier_free_denoiser(denoiser: Denoiser, guidance_scale: float, null_label: int | None = None,
                             *, num_classes: int | None = None, null_cond: dict[str, Tensor] | None = None
                             ) -> Denoiser:
    """``denoiser`` with its network wrapped in :class:`ClassifierFreeGuidance` (same process and parameterization)."""
    net = ClassifierFreeGuidance(denoiser.net, guidance_scale, null_label, num_classes=num_classes,
                                 null_cond=null_cond)
    return denoiser.with_net(net)


def guided_denoiser(
    denoiser: Denoiser,
    *,
    guidance_scale: float = 0.0,
    null_label: int | None = None,
    classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
    classifier_scale: float = 0.0,
    conditional_model: bool | None = None,
    null_cond: dict[str, Tensor] | None = None,
) -> Denoiser | ClassifierGuidance:
    """The denoiser a sampling command wants: classifier-free (w > 0), then classifier-guided.

    A given ``classifier`` always wraps the result in :class:`ClassifierGuidance`, even at s = 0
    (the identity): its fit to the model is checked and an unconditional model gets no labels, so
    a sweep over s starts from the same labelled, unguided samples.
    Raises ValueError for guidance that cannot be done: s > 0 without a classifier, or w > 0 on an
    unconditional model (which needs a classifier instead).
    """
    if classifier_scale and classifier is None:
        raise ValueError(f"classifier_scale={classifier_scale} needs a classifier")
    out: Denoiser | ClassifierGuidance = denoiser
    if guidance_scale:
        out = classifier_free_denoiser(denoiser, guidance_scale, null_label, null_cond=null_cond)
    if classifier is not None:
        out = ClassifierGuidance(out, classifier, classifier_scale, conditional_model=conditional_model)
    return out
