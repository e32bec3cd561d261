"""Checking a sampling request of ``difflab serve`` before it is queued: its JSON against a closed schema
(unknown fields refused), its values against the bounds of :class:`~difflab.serve.models.Limits` and against
what the chosen model takes. Every problem is a :class:`RequestError` with one message naming the field,
the value and what is valid; the web app answers it as ``{"error": message}`` with its status (422).

Models, classifiers and uploads are named by the server's names and ids, never by paths.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from difflab.serve.models import Limits, Registry, ServedCascade, ServedRun, eta_samplers

__all__ = ["RequestError", "SampleRequest", "Plan", "parse_request", "plan_request"]

_RULE = re.compile(r"^(ddim|fast|time|logsnr|karras)?\d{1,5}(,\d{1,5}){0,15}$")


class RequestError(Exception):
    """A request the server refuses: ``status`` (422, 413, ...) and one message."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageOptions(_Closed):
    """One cascade stage's settings (null = the cascade file's)."""

    sampler: str | None = Field(None, max_length=32)
    steps: int | str | None = None
    eta: float | None = None
    guidance: float | None = None
    aug_level: int | None = None


class InpaintOptions(_Closed):
    image: str = Field(max_length=64)
    mask: str = Field(max_length=64)
    rule: Literal["glide", "replace"] | None = None


class SampleRequest(_Closed):
    model: str = Field(max_length=200)
    n: int = 1
    seed: int = Field(0, ge=0, le=2**63 - 1)
    sampler: str | None = Field(None, max_length=32)
    steps: int | str | None = None
    eta: float | None = None
    label: int | str | None = None
    prompt: str | None = None
    guidance: float | None = None
    classifier: str | None = Field(None, max_length=200)
    classifier_scale: float | None = None
    stages: list[StageOptions] | None = Field(None, max_length=16)
    inpaint: InpaintOptions | None = None


def parse_request(data: Any) -> SampleRequest:
    """The request's JSON as a :class:`SampleRequest`; RequestError naming the first bad field."""
    try:
        return SampleRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        if err["type"] == "extra_forbidden":
            raise RequestError(f"unknown field {where!r}; valid fields: {', '.join(SampleRequest.model_fields)}") \
                from None
        got = err.get("input")
        shown = repr(got) if not isinstance(got, str) or len(got) < 80 else repr(got[:77] + "...")
        msg = err["msg"][0].lower() + err["msg"][1:]
        raise RequestError(f"{where}: {msg} (got {shown})" if "input" in err and err["type"] != "missing"
                           else f"{where}: {msg}") from None


@dataclass
class Plan:
    """A checked request: the model and every setting resolved (what the job runs and the gallery records)."""

    model: ServedRun | ServedCascade
    settings: dict[str, Any]
    classifier: Any = None
    inpaint: dict[str, Any] | None = None  # image / mask paths (the server's upload files) and the rule
    stages: list | None = None  # a cascade's (StageConfig, cfg) with the request's settings
    extra: dict[str, Any] = field(default_factory=dict)


def _in(what: str, value, lo, hi, why: str = "") -> None:
    if not (lo <= value <= hi):
        raise RequestError(f"{what} must be in {lo}..{hi}{why}, got {value}")


def _number(what: str, value: float | None, hi: float) -> None:
    if value is not None and not (0 <= value <= hi):  # nan fails both
        raise RequestError(f"{what} must be a number in 0..{hi:g}, got {value}")


def _steps(value, T: int, limits: Limits, what: str = "steps") -> int | str:
    """An int K in 1..min(T, max_steps), or a respacing rule whose step count is within the same bound."""
    hi = min(T, limits.max_steps)
    why = f" (this model's diffusion.steps is {T}" + (f", the server allows {limits.max_steps}" if
                                                      limits.max_steps < T else "") + ")"
    if isinstance(value, bool):
        raise RequestError(f"{what} must be a number of steps or a respacing rule, got {value}")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        elif not _RULE.match(text):
            raise RequestError(f"{what} must be a number of steps or a respacing rule such as ddim50, fast27 or "
                               f"10,10,3, got {value[:40]!r}")
        else:
            count = sum(int(p) for p in re.sub(r"^[a-z]+", "", text).split(","))
            _in(what, count, 1, hi, why)
            if not text[0].isalpha() or text.startswith(("ddim", "fast")):
                from difflab.generate import _check_steps

                try:
                    _check_steps(text, T)
                except ValueError as e:
                    raise RequestError(f"{what}: {e}") from None
            return text
    _in(what, value, 1, hi, why)
    return int(value)


def _sampler(name: str | None, default: str, what: str = "sampler") -> str:
    from difflab.generate import sampler_names

    name = default if name is None else name
    if name not in sampler_names():
        raise RequestError(f"unknown {what} {name!r}; valid: {', '.join(sampler_names())}")
    return name


def _eta(sampler: str, eta: float | None, limits: Limits, what: str = "eta") -> float | None:
    if eta is None:
        return None
    if sampler not in eta_samplers():
        raise RequestError(f"{what}: sampler {sampler!r} takes no eta (only {', '.join(eta_samplers())})")
    _number(what, eta, limits.max_eta)
    return float(eta)


def _prompt(text: str | None, is_text: bool, limits: Limits, name: str) -> str | None:
    if not is_text:
        if text is not None:
            raise RequestError(f"prompt: model {name!r} is not text-conditional; it takes no prompt")
        return None
    if text is None:
        raise RequestError(f"prompt: model {name!r} draws from a caption; give a prompt")
    if len(text) > limits.max_prompt:
        raise RequestError(f"prompt is {len(text)} characters; the limit is {limits.max_prompt}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RequestError("prompt: control characters (newlines, tabs, ...) are not allowed")
    return text


def _label(label, num_classes: int | None, name: str) -> int | str | None:
    if label is None:
        return "all" if num_classes is not None else None
    if num_classes is None:
        raise RequestError(f"label: model {name!r} is unconditional (and no classifier guides it); it takes no label")
    if isinstance(label, str):
        if label.strip().lower() == "all":
            return "all"
        if not label.strip().isdigit():
            raise RequestError(f"label must be a class index 0..{num_classes - 1} or 'all', got {label[:40]!r}")
        label = int(label)
    if isinstance(label, bool) or not 0 <= label < num_classes:
        raise RequestError(f"label must be a class index 0..{num_classes - 1} or 'all', got {label}")
    return int(label)


def plan_request(req: SampleRequest, registry: Registry, limits: Limits, gallery) -> Plan:
    """Check ``req`` against the limits and the model it names; RequestError otherwise."""
    try:
        model = registry.model(req.model)
    except KeyError as e:
        raise RequestError(e.args[0]) from None
    _in("n", req.n, 1, limits.max_n, " (images per job)")
    side = model.output_side
    if req.n * side * side > limits.max_pixels:
        raise RequestError(f"n: {req.n} images of {side}x{side} exceed the server's {limits.max_pixels} pixels per "
                           f"job; at most {max(1, limits.max_pixels // (side * side))} of this model")
    if isinstance(model, ServedCascade):
        return _plan_cascade(req, model, limits)
    return _plan_run(req, model, registry, limits, gallery)


def _plan_run(req: SampleRequest, model: ServedRun, registry: Registry, limits: Limits, gallery) -> Plan:
    cfg, sc, name = model.cfg, model.cfg.sample, model.name
    if req.stages is not None:
        raise RequestError(f"stages: model {name!r} is a single run, not a cascade")
    if model.low_res:
        raise RequestError(f"model {name!r} is a super-resolution stage: it upsamples images and cannot draw alone; "
                           "serve a cascade file that starts with a base model")
    sampler = _sampler(req.sampler, sc.sampler)
    steps = _steps(req.steps if req.steps is not None else (sc.steps or cfg.diffusion.steps),
                   cfg.diffusion.steps, limits)
    eta = _eta(sampler, req.eta, limits)
    if eta is None and sampler in eta_samplers():
        eta = float(sc.eta)
    prompt = _prompt(req.prompt, cfg.is_text, limits, name)
    guidance = 0.0 if req.guidance is None else req.guidance
    _number("guidance", guidance, limits.max_guidance)
    if guidance > 0 and not model.guidance_ok:
        raise RequestError(f"guidance: model {name!r} was not trained with condition dropout (diffusion.p_uncond > "
                           "0 and a null label or the empty caption); classifier-free guidance needs it")
    classifier = None
    clf_scale = 0.0 if req.classifier_scale is None else req.classifier_scale
    _number("classifier_scale", clf_scale, limits.max_classifier_scale)
    num_classes = model.num_classes
    if req.classifier is not None:
        if cfg.is_text:
            raise RequestError("classifier: classifier guidance of a text-conditional model is not supported; use "
                               "guidance (classifier-free)")
        try:
            classifier = registry.classifier(req.classifier)
        except KeyError as e:
            raise RequestError(e.args[0]) from None
        if num_classes is None:
            num_classes = _classifier_classes(classifier)
    elif clf_scale > 0:
        raise RequestError("classifier_scale needs a classifier (one of the served classifiers)")
    label = _label(req.label, num_classes, name)
    settings = {"n": req.n, "seed": req.seed, "sampler": sampler, "steps": steps, "eta": eta, "label": label,
                "prompt": prompt, "guidance": guidance, "classifier": req.classifier,
                "classifier_scale": clf_scale if classifier is not None else 0.0, "batch": sc.batch}
    inpaint = None
    if req.inpaint is not None:
        if model.describe([])["inpaint"] is None:
            raise RequestError(f"inpaint: model {name!r} cannot inpaint")
        if classifier is not None:
            raise RequestError("inpaint: classifier guidance is not offered with inpainting (difflab inpaint has "
                               "no --classifier)")
        inpaint = _plan_inpaint(req.inpaint, model, gallery)
        settings["inpaint_rule"] = inpaint["rule"]
    return Plan(model, settings, classifier=classifier, inpaint=inpaint)


def _classifier_classes(classifier) -> int:
    clf = classifier.load()
    info = getattr(clf, "diffusion_info", None)
    return info.num_classes if info is not None else clf.config.out_channels


def _plan_inpaint(opts: InpaintOptions, model: ServedRun, gallery) -> dict[str, Any]:
    from difflab.pipelines.inpaint import _image_pixels, read_mask_file

    cfg = model.cfg
    paths = {}
    for what in ("image", "mask"):
        try:
            paths[what] = gallery.upload_path(getattr(opts, what))
        except KeyError as e:
            raise RequestError(f"inpaint.{what}: {e.args[0]}") from None
    side, channels = model.output_side, cfg.model.in_channels
    try:
        pixels = _image_pixels(paths["image"], channels, side)
        mask = read_mask_file(paths["mask"], side)
    except ValueError as e:
        text = str(e)
        for what, path in paths.items():
            text = text.replace(f"--{what} {path}", f"the uploaded {what}").replace(str(path), f"the uploaded {what}")
        raise RequestError(f"inpaint: {text}") from None
    is_inpaint_model = bool(getattr(cfg.model, "inpaint", False))
    rule = opts.rule or ("glide" if is_inpaint_model else "replace")
    if rule == "glide" and not is_inpaint_model:
        raise RequestError(f"inpaint.rule: 'glide' needs an inpainting model (model.inpaint: true); {model.name!r} "
                           "is not one: use 'replace'")
    return {"image": paths["image"], "mask": paths["mask"], "pixels": pixels, "mask_tensor": mask, "rule": rule}


def _plan_cascade(req: SampleRequest, model: ServedCascade, limits: Limits) -> Plan:
    from difflab.pipelines.cascade import Stage, check_chain

    for what in ("sampler", "steps", "eta", "guidance", "classifier", "classifier_scale", "inpaint"):
        if getattr(req, what) is not None:
            raise RequestError(f"{what}: model {model.name!r} is a cascade; set the sampler, steps, eta and guidance "
                               "per stage (stages: [{...}, ...])")
    options = req.stages if req.stages is not None else [StageOptions() for _ in model.cascade.stages]
    if len(options) != len(model.cascade.stages):
        raise RequestError(f"stages: the cascade {model.name!r} has {len(model.cascade.stages)} stages, the request "
                           f"gives {len(options)}")
    specs, stages = [], []
    for k, (opt, spec, cfg) in enumerate(zip(options, model.cascade.stages, model.stage_cfgs, strict=True)):
        sc, where = cfg.sample, f"stages.{k}"
        sampler = _sampler(opt.sampler, spec.sampler or sc.sampler, f"{where}.sampler")
        default_steps = spec.steps if spec.steps is not None else (sc.steps or cfg.diffusion.steps)
        steps = _steps(opt.steps if opt.steps is not None else default_steps, cfg.diffusion.steps, limits,
                       f"{where}.steps")
        eta = _eta(sampler, opt.eta if opt.eta is not None else spec.eta, limits, f"{where}.eta") \
            if sampler in eta_samplers() or opt.eta is not None else None
        guidance = opt.guidance if opt.guidance is not None else spec.guidance
        _number(f"{where}.guidance", guidance, limits.max_guidance)
        if guidance and not (cfg.diffusion.p_uncond > 0 and (cfg.is_text or getattr(cfg.model, "class_null", False))):
            raise RequestError(f"{where}.guidance: stage {k} was not trained with condition dropout; classifier-free "
                               "guidance needs it")
        aug = opt.aug_level if opt.aug_level is not None else spec.aug_level
        if aug is not None:
            if k == 0 and aug:
                raise RequestError("stages.0.aug_level: the base stage has no low-res input")
            if aug and cfg.augment.kind != "noise":
                raise RequestError(f"{where}.aug_level: stage {k} was trained with augment.kind "
                                   f"{cfg.augment.kind!r}, not noise: it takes no level")
            _in(f"{where}.aug_level", aug, 0, cfg.augment.steps, f" (stage {k}'s augment.steps)")
        new = dataclasses.replace(spec, sampler=sampler, steps=steps, eta=eta, guidance=guidance, aug_level=aug)
        specs.append(new)
        stages.append(Stage(new, cfg, None, f"stage {k} ({Path(spec.run).name})"))
    label = _label(req.label, model.num_classes, model.name)
    try:
        check_chain(stages, label)
    except ValueError as e:
        raise RequestError(f"stages: {e}") from None
    prompt = _prompt(req.prompt, model.text, limits, model.name)
    settings = {"n": req.n, "seed": req.seed, "label": label, "prompt": prompt, "batch": model.cascade.batch,
                "stages": [{"run": s.run, "sampler": s.sampler, "steps": s.steps, "eta": s.eta, "guidance": s.guidance,
                            "aug_level": s.aug_level, "truncated": s.truncated, "ema": s.ema, "bf16": s.bf16}
                           for s in specs]}
    return Plan(model, settings, stages=specs)
