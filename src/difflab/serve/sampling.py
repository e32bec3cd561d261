"""The work of one ``difflab serve`` job: draw through :func:`difflab.generate.draw_samples` (or
:func:`difflab.pipelines.cascade.sample_cascade`) exactly as ``difflab sample`` / ``difflab inpaint`` would with
the same settings, report progress and x0^ previews through draw_samples' per-step ``callback`` (which also
stops a cancelled job), and put the result in the gallery with the command that draws the same pixels.
There is no sampling loop here.
"""

from __future__ import annotations

import base64
import io
import shlex
import time
from typing import Any

import numpy as np
import torch
import yaml

from difflab.serve.jobs import Job
from difflab.serve.validate import Plan

__all__ = ["Progress", "run_plan", "command_for"]


def _png_data_url(images: np.ndarray) -> str:
    from PIL import Image

    from difflab.images import make_grid

    grid = make_grid(images)
    pil = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Progress:
    """draw_samples' callback for a job: step counts, the ETA, an x0^ preview every few steps, and the
    cancellation check (:meth:`Job.check_cancelled` raises, which stops the sampler)."""

    def __init__(self, job: Job, data_cfgs: list, previews: int = 8, min_interval: float = 0.2) -> None:
        self.job, self.data_cfgs, self.previews, self.min_interval = job, data_cfgs, previews, min_interval
        self.stage_start = time.monotonic()
        self.stage = 0
        self.last_preview = 0.0

    def __call__(self, info: dict[str, Any]) -> None:
        from difflab.images import to_uint8

        self.job.check_cancelled()
        stage, stages = int(info.get("stage", 0)), int(info.get("stages", 1))
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.stage_start = stage, now
        steps, batches, k, i = int(info["steps"]), int(info["batches"]), int(info["batch"]), int(info["i"])
        done, total = k * steps + i + 1, batches * steps
        elapsed = now - self.stage_start
        eta = elapsed / done * (total - done)
        fields: dict[str, Any] = {"progress": {
            "step": i + 1, "steps": steps, "batch": k + 1, "batches": batches, "stage": stage + 1, "stages": stages,
            "done": done, "total": total, "fraction": done / total, "elapsed_s": round(elapsed, 3),
            "eta_s": round(eta, 3), "eta_exact": stages == 1 or stage == stages - 1}}
        every = max(1, steps // self.previews)
        if i == 0 or i == steps - 1 or (i % every == 0 and now - self.last_preview >= self.min_interval):
            cfg = self.data_cfgs[min(stage, len(self.data_cfgs) - 1)]
            x0 = info["pred_xstart"][:16].detach().float().clamp(-1, 1).cpu()  # a batch's first 16 at most
            fields["preview"] = _png_data_url(to_uint8(x0, cfg))
            self.last_preview = now
        self.job.update(**fields)


def run_plan(plan: Plan, gallery, job: Job) -> dict[str, Any]:
    """Draw ``plan``'s images (on the model's worker thread), save them in the gallery; the entry."""
    entry_id = gallery.new_id()
    start = time.monotonic()
    if plan.stages is not None:
        images, labels, files, meta = _draw_cascade(plan, job, gallery.folder(entry_id))
    else:
        images, labels, files, meta = _draw_run(plan, job)
    job.check_cancelled()  # cancelled during the last step: nothing is written
    seconds = time.monotonic() - start
    model = plan.model
    entry = {"model": model.name, "kind": model.kind, "path": str(model.path), "created": time.time(),
             "seconds": round(seconds, 3), "settings": {**plan.settings, **meta}, "side": int(images.shape[1]),
             "channels": int(images.shape[-1]),
             "command": command_for(plan, {**plan.settings, **meta}, gallery.folder(entry_id))}
    return gallery.add(entry_id, images, labels, entry, files)


def _draw_run(plan: Plan, job: Job):
    from difflab.build import resolve_ema
    from difflab.generate import draw_samples
    from difflab.hardware import resolve_bf16
    from difflab.images import to_uint8

    cfg, denoiser, step = plan.model.load()
    s = plan.settings
    bf16 = resolve_bf16(cfg.sample.bf16, torch.device("cpu"))[0]
    classifier = plan.classifier.load() if plan.classifier is not None else None
    kwargs: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    inp = plan.inpaint
    if inp is not None:
        kwargs = _inpaint_inputs(cfg, inp)
        files = {"image": inp["image"].read_bytes(), "mask": inp["mask"].read_bytes()}
    x, labels = draw_samples(denoiser, cfg, n=s["n"], sampler=s["sampler"], steps=s["steps"], eta=s["eta"],
                             label=s["label"], seed=s["seed"], batch=s["batch"], guidance_scale=s["guidance"],
                             classifier=classifier, classifier_scale=s["classifier_scale"], bf16=bf16,
                             prompts=[s["prompt"]] if s["prompt"] is not None else None, distributed=False,
                             callback=Progress(job, [cfg.data]), **kwargs)
    images = to_uint8(x, cfg.data)
    if inp is not None:  # the known pixels are the file's own bytes, as difflab inpaint writes them
        keep = inp["mask_tensor"][0, 0].numpy() == 1
        images[:, keep] = inp["pixels"][keep]
    meta = {"checkpoint": step, "ema": resolve_ema(cfg, None), "bf16": bf16}
    return images, labels.numpy() if labels is not None else None, \
        {f"{k}.png": v for k, v in files.items()}, meta


def _inpaint_inputs(cfg, inp: dict[str, Any]) -> dict[str, Any]:
    """draw_samples' inpainting arguments from the checked upload, as :func:`difflab.pipelines.inpaint.inpaint_run`
    builds them: a built-in source padded back to its training frame (the frame is known background)."""
    from difflab.data import pad_to, uint8_to_float

    x = uint8_to_float(inp["pixels"][None])
    m = inp["mask_tensor"]
    side = cfg.data.sample_size
    if x.shape[-1] != side:
        x, m = pad_to(x, side, value=-1.0), pad_to(m, side, value=1.0)
    return {"inpaint_image": x, "inpaint_mask": m, "inpaint_rule": inp["rule"]}


def _cascade_dict(plan: Plan) -> dict[str, Any]:
    s = plan.settings
    stages = []
    for st in s["stages"]:
        stage = {k: v for k, v in st.items() if v is not None and not (k == "truncated" and not v)}
        stages.append(stage)
    out = {"n": s["n"], "batch": s["batch"], "seed": s["seed"], "stages": stages}
    if s["label"] is not None:
        out["label"] = s["label"]
    return out


def _draw_cascade(plan: Plan, job: Job, folder):
    from difflab.images import to_uint8
    from difflab.pipelines.cascade import CascadeConfig, Stage, sample_cascade

    loaded = plan.model.load()
    s = plan.settings
    stages = [Stage(spec, st.cfg, st.denoiser, st.name) for spec, st in zip(plan.stages, loaded, strict=True)]
    cascade = CascadeConfig(stages=tuple(plan.stages), n=s["n"], batch=s["batch"], seed=s["seed"], label=s["label"])
    results = sample_cascade(cascade, stages, prompts=[s["prompt"]] if s["prompt"] is not None else None,
                             distributed=False, callback=Progress(job, [st.cfg.data for st in stages]))
    x, labels = results[-1]
    images = to_uint8(x, stages[-1].cfg.data)
    text = "# difflab serve: the settings of this result (difflab sample THIS_FILE draws the same images)\n"
    text += yaml.safe_dump(_cascade_dict(plan), sort_keys=False)
    return images, labels.numpy() if labels is not None else None, {"cascade.yaml": text.encode()}, {}


def command_for(plan: Plan, s: dict[str, Any], folder) -> str:
    """The ``difflab`` command that draws the same pixels into ``out.npz``."""
    q = shlex.quote
    if plan.stages is not None:
        parts = ["difflab", "sample", q(str(folder / "cascade.yaml"))]
        if s.get("prompt") is not None:
            parts += ["--prompt", q(s["prompt"])]
        return " ".join(parts + ["--npz", "out.npz"])
    inpaint = plan.inpaint is not None
    parts = ["difflab", "inpaint" if inpaint else "sample", q(str(plan.model.path))]
    if inpaint:
        parts += ["--image", q(str(folder / "image.png")), "--mask", q(str(folder / "mask.png")),
                  "--rule", s["inpaint_rule"]]
    parts += ["--n", str(s["n"]), "--seed", str(s["seed"]), "--batch", str(s["batch"]), "--sampler", s["sampler"],
              "--steps", q(str(s["steps"]))]
    if s.get("eta") is not None:
        parts += ["--eta", repr(float(s["eta"]))]
    if s.get("label") is not None:
        parts += ["--label", str(s["label"])]
    if s.get("prompt") is not None:
        parts += ["--prompt", q(s["prompt"])]
    parts += ["--guidance", repr(float(s["guidance"]))]
    if plan.classifier is not None:
        parts += ["--classifier", q(str(plan.classifier.path)),
                  "--classifier-scale", repr(float(s["classifier_scale"]))]
    elif not inpaint:
        parts += ["--classifier-scale", "0"]
    if s.get("checkpoint") is not None:
        parts += ["--checkpoint", str(s["checkpoint"])]
    parts += ["--bf16" if s.get("bf16") else "--no-bf16", "--npz", "out.npz"]
    return " ".join(parts)
