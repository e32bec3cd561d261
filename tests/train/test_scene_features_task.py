"""The scene feature network on the one training loop: stopped and resumed it equals an uninterrupted run bit
for bit; its loss is the sum of the five heads' cross-entropies; its targets and exported files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import ROOT, weights

from difflab.config import SceneFeaturesRunConfig, load_config
from difflab.data.scenes import COLOURS, describe_scene
from difflab.eval.scenes import SceneFeatureNet, layout_class, load_scene_features
from difflab.train.metrics import read_metrics
from difflab.train.tasks import make_task
from difflab.train.tasks.scene_features import HEADS, SceneFeaturesTask, scene_targets
from difflab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = ROOT / "configs" / "scene-features.yaml"
# 48 scenes, batch 12 (4 steps an epoch), micro-batches, warm-up then cosine, log lines that straddle checkpoints
TINY = ["data.num_scenes=48", "train.batch_size=12", "train.microbatch=6", "train.max_steps=8",
        "train.warmup_steps=2", "train.log_every=3", "train.save_every=5", "eval_scenes=24"]


def _cfg(*extra: str) -> SceneFeaturesRunConfig:
    return load_config(CONFIG, [*TINY, *extra])


def _no_time(run):
    return [{k: v for k, v in r.items() if k != "img/s"} for r in read_metrics(run / "metrics.jsonl")]


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    cfg = _cfg()
    assert isinstance(make_task(cfg), SceneFeaturesTask)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    Trainer(cfg, whole, quiet=True).train()
    assert Trainer(cfg, parts, quiet=True).train(max_steps=3).step == 3  # mid-epoch, before the first save_every
    assert Trainer(cfg, parts, resume=True, quiet=True).train().step == 8
    a, b = weights(whole), weights(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm buffers included
    rows = _no_time(whole)
    assert rows == _no_time(parts) and [r["step"] for r in rows] == [3, 6]
    assert {"loss", "grad_norm", "lr", *(f"acc_{h}" for h in HEADS)} <= rows[0].keys()

    # the exported weights are the trained ones, and load as the evaluator's network
    exported = load_file(str(parts / "scene_features.safetensors"))
    assert exported.keys() == {k for k in a if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(v, a[k]) for k, v in exported.items())
    net = load_scene_features(parts / "scene_features.safetensors")
    assert isinstance(net, SceneFeatureNet) and not net.training
    info = [json.loads((r / "scene_features.json").read_text()) for r in (whole, parts)]
    assert info[0]["accuracy"] == info[1]["accuracy"] and info[1]["steps"] == 8 and info[1]["scenes"] == 48
    assert set(info[1]["accuracy"]) == {"train_32", "train_16", "test_64", "test_32", "test_16"}
    assert all(set(acc) == {*HEADS, "all"} and all(0 <= v <= 1 for v in acc.values())
               for acc in info[1]["accuracy"].values())


def test_loss_is_the_sum_of_the_heads_cross_entropies():
    cfg = _cfg("p_noise=1.0")
    task = make_task(cfg)
    source = task.build_source(rank=0, world=1, local_batch=12)
    batch = source.batch(0)
    gens = {"augment": torch.Generator().manual_seed(3)}
    draws = task.draws(12, batch, gens)
    assert draws["low_res"].any() and not draws["low_res"].all() and (draws["sigma"] > 0).all()
    torch.manual_seed(0)
    model = task.build_model().eval()  # no dropout: the same logits twice
    terms = task.losses(model, batch, draws)

    # by hand: the 16x16 render upsampled where low_res, the 32x32 one elsewhere, plus sigma * noise, clipped
    x = batch["x0"].clone()
    low = draws["low_res"]
    x[low] = F.interpolate(batch["x16"][low], scale_factor=2, mode="bilinear", align_corners=False)
    x = (x + draws["sigma"].view(-1, 1, 1, 1) * draws["noise"]).clamp(-1, 1)
    _, logits = model(x)
    y = batch["targets"]
    expected = sum(F.cross_entropy(logits[h], y[:, j], reduction="none") for j, h in enumerate(HEADS))
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-6, atol=1e-6)
    assert terms["loss"].shape == (12,)
    for j, h in enumerate(HEADS):
        assert torch.equal(terms[f"acc_{h}"], (logits[h].argmax(1) == y[:, j]).float())


def test_targets_of_scenes():
    one = next(d for i in range(40) if (d := describe_scene("train", 0, i)).layout == "one_small")
    two = next(d for i in range(40) if (d := describe_scene("train", 0, i)).layout == "stacked")
    a, (b, c) = one.objects[0], two.objects
    assert scene_targets([one, two]).tolist() == [
        [layout_class(one.layout, one.objects), a.digit, COLOURS.index(a.colour), 10, 6],
        [6, b.digit, COLOURS.index(b.colour), c.digit, COLOURS.index(c.colour)],
    ]
    assert list(SceneFeatureNet.heads) == list(HEADS) and SceneFeatureNet.heads["digit2"] == 11
    with pytest.raises(ValueError, match="data.image_size: must be 32"):
        _cfg("data.image_size=16")
    with pytest.raises(ValueError, match="data.source: must be 'scenes'"):
        _cfg("data.source=mnist5k")
