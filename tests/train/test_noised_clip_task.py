"""GLIDE's noised CLIP on the one training loop: the loss is CLIP's symmetric InfoNCE on noised images, a few steps
lower it, stopped and resumed it equals an uninterrupted run bit for bit, and the exported file loads for
guidance."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import ROOT, weights

from difflab.clip_guidance import load_noised_clip
from difflab.config import NoisedCLIPRunConfig, load_config
from difflab.nn.clip import NoisedCLIP
from difflab.process import q_sample
from difflab.train.metrics import read_metrics
from difflab.train.tasks import make_task
from difflab.train.tasks.noised_clip import NoisedCLIPTask
from difflab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = ROOT / "configs" / "scenes-clip16.yaml"
# one block per tower, 16 patches, 24 scenes, batch 8 in micro-batches of 4, log lines that straddle checkpoints
TINY = ["clip.n_xf_blocks_image=1", "clip.n_xf_blocks_text=1", "clip.patch_size=4", "data.num_scenes=24",
        "train.batch_size=8", "train.microbatch=4", "train.max_steps=6", "train.warmup_steps=2", "train.log_every=2",
        "train.save_every=4", "eval_examples=16"]


def _cfg(*extra: str) -> NoisedCLIPRunConfig:
    return load_config(CONFIG, [*TINY, *extra])


def _no_time(run):
    return [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(run / "metrics.jsonl")]


def test_the_loss_is_symmetric_info_nce_on_noised_images():
    task = make_task(_cfg())
    assert isinstance(task, NoisedCLIPTask) and task.process.num_timesteps == 1000
    batch = task.build_source(rank=0, world=1, local_batch=8).batch(0)
    draws = task.draws(8, batch, {"timesteps": torch.Generator().manual_seed(0),
                                  "noise": torch.Generator().manual_seed(1)})
    torch.manual_seed(0)
    model = task.build_model().eval()
    terms = task.losses(model, batch, draws)
    # by hand: x_t = q_sample(x0, t, eps), logits = exp(logit_scale) z_i z_t^T, (CE rows + CE columns) / 2
    x_t = q_sample(task.process, batch["x0"], draws["t"], draws["noise"])
    tokens, lens = task.tokens(batch["caption"], torch.device("cpu"))
    z_i, z_t = model.image_embeddings(x_t, draws["t"]), model.text_embeddings(tokens, lens)
    scale = task.cfg.clip.logit_scale
    logits = scale * z_i @ z_t.t()
    target = torch.arange(8)
    expected = (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target,
                                                                                    reduction="none")) / 2
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(terms["accuracy"], (logits.argmax(1) == target).float())
    torch.testing.assert_close(terms["logit_scale"], torch.full((8,), scale), rtol=1e-6, atol=0)


def test_a_few_steps_lower_the_contrastive_loss():
    """80 AdamW steps on one batch of 8 pairs (t < 200 and eps drawn anew each step) take the loss at fixed draws
    from chance, ln 8 = 2.08, to well below it: the towers match captions to images, they do not just forget them
    (a collapse to equal features stays at ln 8). The one-block towers start from exp(logit_scale) = 5: from CLIP's
    1 / 0.07 they leave that plateau later (the full configs/scenes-clip16.yaml learns as fast from either)."""
    task = make_task(_cfg("clip.logit_scale=5"))
    batch = task.build_source(rank=0, world=1, local_batch=8).batch(0)
    gens = {"timesteps": torch.Generator().manual_seed(0), "noise": torch.Generator().manual_seed(1)}
    fixed = task.draws(8, batch, gens)
    fixed["t"] = fixed["t"] % 200  # little noise: the captions are readable
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = task.losses(model, batch, fixed)["loss"].mean().item()
    for _ in range(80):
        draws = task.draws(8, batch, gens)
        draws["t"] = draws["t"] % 200
        task.losses(model, batch, draws)["loss"].mean().backward()
        opt.step()
        opt.zero_grad()
    after = task.losses(model, batch, fixed)["loss"].mean().item()
    assert before > 1.8 and after < 0.6 * math.log(8), (before, after)


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(cfg, whole, quiet=True).train()
    assert Trainer(cfg, parts, quiet=True).train(max_steps=3).step == 3  # mid-window, before the first save
    assert Trainer(cfg, parts, resume=True, quiet=True).train().step == 6
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = weights(whole, "ema_0.995"), weights(parts, "ema_0.995")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    rows = _no_time(whole)
    assert rows == _no_time(parts) and [r["step"] for r in rows] == [2, 4, 6]
    assert {"loss", "accuracy", "logit_scale", "grad_norm", "lr"} <= rows[0].keys()

    # the export is the EMA (export_ema: 0.995) with the run's tokenizer, ready for guidance
    clip = load_noised_clip(parts)
    assert isinstance(clip, NoisedCLIP) and not clip.training and clip.config == cfg.clip
    assert all(torch.equal(v, ema_b[k]) for k, v in clip.state_dict().items())
    assert clip.tokenizer.encode("a red 7") == [clip.tokenizer.ids[w] for w in ("a", "red", "7")]
    reports = [json.loads((r / "clip_accuracy.json").read_text()) for r in (whole, parts)]
    assert reports[0]["accuracy"] == reports[1]["accuracy"] and reports[1]["split"] == "test"
    assert reports[1]["n"] == 16 and len(reports[1]["accuracy"]) == 10
    assert all(0 <= a <= 1 for a in reports[1]["accuracy"]) and all(v > 0 for v in reports[1]["loss"])


def test_config_checks():
    with pytest.raises(ValueError, match="data.image_size: is 32 but clip.image_size is 16"):
        _cfg("data.image_size=32")
    with pytest.raises(ValueError, match="data.captions: must be true"):
        _cfg("data.captions=false")
    with pytest.raises(ValueError, match="clip.patch_size"):
        _cfg("clip.patch_size=3")
    with pytest.raises(ValueError, match="export_ema"):
        _cfg("export_ema=0.5")
    preset = load_config(CONFIG, ["clip={preset: glide/clip, image_size: 16}"])
    assert preset.clip.n_head_image == 12 and preset.clip.image_size == 16
    task = make_task(_cfg("clip.n_vocab=8"))
    with pytest.raises(ValueError, match="set clip.n_vocab >= "):
        task.build_model()
