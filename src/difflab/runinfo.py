"""A run folder at a glance (``difflab info``): config summary, size, progress, last loss, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difflab.build import build_model, load_run_config
from difflab.train.checkpoint import list_checkpoints, verify_checkpoint
from difflab.train.metrics import METRICS_NAME, read_metrics


def run_info(run_dir: str | os.PathLike) -> dict:
    """What a run folder holds, as plain data (reads only the folder; builds the network on the meta
    device to count its parameters)."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg).parameters())
    ckpts = [{"name": p.name, "step": int(verify_checkpoint(p, hashes=False)["step"])} for p in list_checkpoints(run)]
    rows = read_metrics(run / METRICS_NAME)
    last = rows[-1] if rows else {}
    m, d, data, tc = cfg.model, cfg.diffusion, cfg.data, cfg.train
    return {
        "run": str(run),
        "model": f"{type(m).__name__}: {m.model_channels} ch, mult {list(m.channel_mult)}, "
                 f"{m.num_res_blocks} res blocks, attention at ds {list(m.attention_resolutions)}",
        "parameters": params,
        "diffusion": f"T={d.steps} {d.schedule}, predicts {d.mean_type}, variance {d.var_type}, loss {d.loss_type}, "
                     f"t ~ {d.timestep_sampler}" + (f", p_uncond {d.p_uncond}" if d.p_uncond else ""),
        "data": f"{data.source}" + (f" {data.path}" if data.path else "") + f" {data.split or ''} "
                f"{data.image_size}x{data.image_size}"
                + (f" crops of {data.render_size}x{data.render_size}" if data.render_size else "")
                + (" class-conditional" if data.class_cond else ""),
        "train": f"AdamW lr {tc.lr} (warm-up {tc.warmup_steps}), batch {tc.batch_size}, EMA {list(tc.ema_rates)}, "
                 f"{tc.max_steps} steps",
        "steps_done": ckpts[-1]["step"] if ckpts else 0,
        "last_loss": last.get("loss"),
        "last_logged_step": last.get("step"),
        "img_per_s": last.get("img/s"),
        "checkpoints": [c["name"] for c in ckpts],
    }


def format_run_info(info: dict) -> str:
    """The lines ``difflab info`` prints."""
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v)) or "none"
        elif isinstance(v, float):
            v = f"{v:.5g}"
        elif k == "parameters":
            v = f"{v:,}"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
