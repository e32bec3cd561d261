"""unCLIP's training tasks on the one loop: the CLIP (task: clip) learns by CLIP's symmetric InfoNCE, logs its held-out
retrieval and exports a file load_clip reads; the prior regresses the scaled CLIP image embedding from the caption's
CLIP features (dropped captions -> ""); the decoder's image-embedding dropout swaps y for the learned cf_param, and
its classifier-free guidance with the decoder's null is (1 + w) c - w u."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from train_helpers import ROOT, sets, weights

from difflab.build import build_model
from difflab.cli import main
from difflab.clip_features import CLIP_WEIGHTS, CLIPEmbedder, load_clip
from difflab.clip_guidance import clip_tokens
from difflab.config import CLIPRunConfig, ConfigError, load_config
from difflab.guidance import ClassifierFreeGuidance
from difflab.nn.clip_unet import DecoderUNet
from difflab.nn.openai_clip import CLIP
from difflab.process import q_sample
from difflab.train.tasks import make_task
from difflab.train.tasks.clip import RETRIEVAL_LOG, CLIPTask
from difflab.train.tasks.diffusion import DiffusionTask

pytestmark = pytest.mark.usefixtures("single_thread")

CLIP_CFG = ROOT / "configs" / "scenes-unclip-clip16.yaml"
PRIOR_CFG = ROOT / "configs" / "scenes-unclip-prior16.yaml"
DECODER_CFG = ROOT / "configs" / "scenes-unclip-decoder16.yaml"
# a 16-wide CLIP with one block per tower and 16 patches of 4x4; 4 steps, retrieval every 2, the trained weights out
TINY_CLIP = ["clip.embed_dim=16", "clip.transformer_width=16", "clip.transformer_heads=2", "clip.transformer_layers=1",
             "clip.vision_width=16", "clip.vision_layers=1", "clip.vision_patch_size=4", "clip.vision_heads=2",
             "data.num_scenes=24", "train.batch_size=8", "train.max_steps=4", "train.warmup_steps=2",
             "train.sample_every=2", "train.log_every=2", "train.save_every=4", "export_ema=null", "eval_examples=8"]
# the prior and the decoder at the tiny CLIP's width (16) on 100 steps
TINY_COMMON = ["model.clip_dim=16", "data.num_scenes=24", "train.batch_size=8", "diffusion.steps=100"]
TINY_PRIOR = ["model.xf_width=16", "model.xf_layers=1", "model.xf_heads=2", "sample.steps=10"]
TINY_DECODER = ["model.model_channels=16", "model.num_head_channels=8", "model.num_groups=8", "model.xf_width=16",
                "sample.steps=10"]
CAPTIONS = ["a large red 7", "a small blue two in the top left", "a large white 2", "a small green three"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("unclip") / "clip"
    assert main(["train", str(CLIP_CFG), "--out", str(run), "--quiet", *sets(*TINY_CLIP)]) == 0
    return run


@pytest.fixture(scope="module")
def embedder(clip_run):
    return CLIPEmbedder(load_clip(clip_run))


def _prior_cfg(clip_run, *extra):
    return load_config(PRIOR_CFG, [f"clip.run={clip_run}", *TINY_COMMON, *TINY_PRIOR, *extra])


def _decoder_cfg(clip_run, *extra):
    return load_config(DECODER_CFG, [f"clip.run={clip_run}", *TINY_COMMON, *TINY_DECODER, *extra])


def _perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The net with every parameter moved by N(0, 0.05^2): the U-Net's zero-initialised output conv would make every
    output 0, and every equality between outputs trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


# ---------------------------------------------------------------------------------------------- 1. configs


def test_config_checks(tmp_path):
    cfg = load_config(CLIP_CFG, TINY_CLIP)
    assert isinstance(cfg, CLIPRunConfig) and cfg.clip.embed_dim == 16 and cfg.export_ema is None
    with pytest.raises(ConfigError, match=r"data.image_size: is 32 but clip.image_resolution is 16"):
        load_config(CLIP_CFG, [*TINY_CLIP, "data.image_size=32"])
    with pytest.raises(ConfigError, match=r"data.captions: must be true"):
        load_config(CLIP_CFG, [*TINY_CLIP, "data.captions=false"])
    for config in (PRIOR_CFG, DECODER_CFG):  # the shipped files name the CLIP; without it they are refused
        assert load_config(config).clip.run == "runs/unclip/clip16"
        with pytest.raises(ConfigError, match=r"^clip.run: an unCLIP (prior|decoder) reads CLIP embeddings"):
            load_config(config, ["clip.run=null"])
    with pytest.raises(ConfigError, match=r"^clip.run: only an unCLIP prior .* set clip.run: null"):
        load_config(ROOT / "configs" / "mnist-tiny.yaml", [f"clip.run={tmp_path}"])


# ---------------------------------------------------------------------------------------------- 2. the CLIP task


def test_the_clip_loss_is_symmetric_info_nce():
    task = make_task(load_config(CLIP_CFG, TINY_CLIP))
    assert isinstance(task, CLIPTask)
    batch = task.build_source(rank=0, world=1, local_batch=8).batch(0)
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert isinstance(model, CLIP)
    terms = task.losses(model, batch, task.draws(8, batch, {}))
    # by hand: logits = CLIP.forward(x, tokens, lens), (CE over rows + CE over columns) / 2 with the diagonal targets
    tokens, lens = clip_tokens(task.tokenizer(), list(batch["caption"]), 16)
    logits = model(batch["x0"], tokens, lens)
    target = torch.arange(8)
    expected = (F.cross_entropy(logits, target, reduction="none")
                + F.cross_entropy(logits.t(), target, reduction="none")) / 2
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    assert terms["loss"].shape == (8,) and float(terms["loss"].detach().std()) > 0  # per example, not one repeated
    torch.testing.assert_close(terms["logit_scale"], torch.full((8,), 1 / 0.07), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="captioned data"):
        task.losses(model, {"x0": batch["x0"]}, {})


def test_clip_run_logs_retrieval_and_exports_the_trained_weights(clip_run):
    rows = [json.loads(line) for line in (clip_run / RETRIEVAL_LOG).read_text().splitlines()]
    assert [r["steps"] for r in rows] == [2, 4]  # one line per train.sample_every=2 of max_steps=4
    for r in rows:
        assert r["n"] == 8 and r["chance"] == 1 / 8 and r["split"] == "test"
        assert 0 <= r["image_to_text"] <= 1 and 0 <= r["text_to_image"] <= 1 and r["loss"] > 0
    final = json.loads((clip_run / "clip_accuracy.json").read_text())
    assert final["image_to_text"] == rows[-1]["image_to_text"] and final["steps"] == 4  # the same net at the end

    clip = load_clip(clip_run)
    assert load_clip(clip_run / CLIP_WEIGHTS).config == clip.config  # the folder or the file
    assert isinstance(clip, CLIP) and not clip.training and clip.config == load_config(CLIP_CFG, TINY_CLIP).clip
    trained = weights(clip_run)  # export_ema null: the trained weights of the last checkpoint, not the EMA
    state = clip.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)
    ema = weights(clip_run, "ema_0.995")
    assert any(not torch.equal(state[k], ema[k]) for k in state)
    # a CLIP built from the exported weights gives the same outputs
    reference = CLIP(clip.config).eval().requires_grad_(False)  # as load_clip leaves it (MHA's fast path alike)
    reference.load_state_dict(trained)
    assert clip.tokenizer.encode("a red 7") == [clip.tokenizer.ids[w] for w in ("a", "red", "7")]
    tokens, lens = clip_tokens(clip.tokenizer, CAPTIONS, 16)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(clip(x, tokens, lens), reference(x, tokens, lens))
    assert torch.equal(clip.encode_text(tokens, lens)[1], reference.encode_text(tokens, lens)[1])


def test_a_resumed_clip_run_writes_each_retrieval_line_once(tmp_path):
    """A run killed after step 3's retrieval line but before its step-4 checkpoint, resumed from step 2, scores step 3
    again: retrieval.jsonl keeps one line per scored step (it used to append a second step-3 line), as metrics.jsonl."""
    run = tmp_path / "clip"
    extra = ["train.sample_every=3", "train.save_every=2", "train.keep_last=4"]
    assert main(["train", str(CLIP_CFG), "--out", str(run), "--quiet", *sets(*TINY_CLIP, *extra)]) == 0
    first = (run / RETRIEVAL_LOG).read_text()
    assert [json.loads(line)["steps"] for line in first.splitlines()] == [3]
    shutil.rmtree(run / "ckpt_0000004")  # as if killed before the last checkpoint
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert (run / RETRIEVAL_LOG).read_text() == first  # the same line once: the resume is exact


# ---------------------------------------------------------------------------------------------- 3. the prior


def test_the_prior_loss_is_the_embedding_regression(clip_run, embedder):
    cfg = _prior_cfg(clip_run)
    task = DiffusionTask(cfg)
    assert task.unclip == "prior" and not task.has_grid
    torch.manual_seed(0)
    model = task.build_model().eval()
    batch = {"x0": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1,
             "caption": CAPTIONS}
    gens = {name: torch.Generator().manual_seed(i) for i, name in enumerate(task.generator_names)}
    draws = task.draws(4, batch, gens)
    assert draws["noise"].shape == (4, 16) and draws["t"].shape == (4,)  # vectors [B, clip_dim], not images
    assert draws["drop"].shape == (4,) and draws["drop"].dtype == torch.bool  # p_uncond 0.1: caption dropout coins
    draws["drop"] = torch.tensor([False, True, False, True])
    terms = task.losses(model, batch, draws)

    # by hand: e_i = embed_scale * normalize(f(x)), x_t = q(e_i, t, eps), L_i = mean_d (x0^ - e_i)^2, with the
    # prior told the CLIP features of the captions and of "" where dropped
    clip = embedder.clip
    e_i = math.sqrt(16) * F.normalize(clip.encode_image(batch["x0"]), dim=-1)
    x_t = q_sample(task._denoiser(model).process, e_i, draws["t"], draws["noise"])
    kept = ["a large red 7", "", "a large white 2", ""]
    cond = embedder.prior_cond(kept)
    x0_hat = model(x_t, draws["t"], **cond)
    expected = ((x0_hat - e_i) ** 2).mean(-1)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    # the dropped rows differ from what the captions would give: the "" really is what the prior saw
    undropped = ((model(x_t, draws["t"], **embedder.prior_cond(CAPTIONS)) - e_i) ** 2).mean(-1)
    assert torch.equal(undropped[[0, 2]], expected[[0, 2]])
    assert (undropped[[1, 3]] - expected[[1, 3]]).abs().min() > 1e-4
    # and the embedding's norm is embed_scale (sqrt(embed_dim) by default)
    torch.testing.assert_close(e_i.norm(dim=-1), torch.full((4,), 4.0))


# ---------------------------------------------------------------------------------------------- 4. the decoder


def test_decoder_y_drop_is_cf_param(clip_run, embedder):
    cfg = _decoder_cfg(clip_run)
    torch.manual_seed(0)
    net = _perturbed(build_model(cfg))
    assert isinstance(net, DecoderUNet)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([5, 50, 90, 99])
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    cond = embedder.decoder_cond(CAPTIONS, embedder.image(images))
    assert not cond["y_drop"].any()
    with torch.no_grad():
        full = net(x, t, **{k: v for k, v in cond.items() if k != "y_drop"})
        assert torch.equal(net(x, t, **cond), full)  # all-False y_drop = no y_drop
        drop = torch.tensor([True, False, False, True])
        dropped = net(x, t, **{**cond, "y_drop": drop})
        null = net(x, t, **{**cond, "y": None, "y_drop": None})  # y=None: cf_param for every row
    torch.testing.assert_close(dropped[drop], null[drop], rtol=0, atol=1e-6)
    assert torch.equal(dropped[~drop], full[~drop])
    assert (dropped[drop] - full[drop]).abs().max() > 1e-3  # the embedding mattered


def test_decoder_task_drops_embeddings_by_its_coins(clip_run, embedder):
    task = DiffusionTask(_decoder_cfg(clip_run))
    assert task.unclip == "decoder" and "clip_drop" in task.generator_names and task.has_grid
    task.build_model()
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    batch = {"x0": x0, "caption": CAPTIONS}
    gens = {name: torch.Generator().manual_seed(i) for i, name in enumerate(task.generator_names)}
    draws = task.draws(4, batch, gens)
    assert draws["clip_drop"].shape == (4,) and draws["clip_drop"].dtype == torch.bool
    # many coins at clip_emb_drop 0.1: about 10% True (3 sigma of 4000 coins is 1.4%)
    many = task.draws(4000, {"x0": x0.repeat(1000, 1, 1, 1)}, gens)
    assert abs(many["clip_drop"].float().mean().item() - 0.1) < 0.015
    assert abs(many["drop"].float().mean().item() - 0.5) < 0.025  # the decoder's caption dropout p_uncond 0.5
    draws["clip_drop"] = torch.tensor([True, False, True, False])
    draws["drop"] = torch.tensor([False, False, True, True])
    kw = task.model_kwargs(batch, draws)
    assert torch.equal(kw["y_drop"], draws["clip_drop"])
    torch.testing.assert_close(kw["y"], embedder.image(x0), rtol=0, atol=1e-6)
    text = embedder.decoder_cond(["a large red 7", "a small blue two in the top left", "", ""], None)
    for k in ("txt_feat", "txt_feat_seq", "mask"):
        assert torch.equal(kw[k], text[k]), k


def test_decoder_guidance_is_one_plus_w_c_minus_w_u(clip_run, embedder):
    cfg = _decoder_cfg(clip_run)
    torch.manual_seed(1)
    net = _perturbed(build_model(cfg), seed=1)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([1, 30, 60, 99])
    cond = embedder.decoder_cond(CAPTIONS, embedder.image(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1))
    null = embedder.decoder_null()
    assert bool(null["y_drop"].all()) and null["y_drop"].shape == (1,) and "y" not in null
    w = 1.5
    with torch.no_grad():
        guided = ClassifierFreeGuidance(net, w, null_cond=null)(x, t, **cond)
        c = net(x, t, **cond)
        blank = embedder.decoder_cond([""] * 4, None)  # the empty caption and cf_param for every row
        u = net(x, t, y=None, txt_feat=blank["txt_feat"], txt_feat_seq=blank["txt_feat_seq"], mask=blank["mask"])
    assert guided.shape == (4, 6, 16, 16)
    torch.testing.assert_close(guided[:, :3], (1 + w) * c[:, :3] - w * u[:, :3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided[:, 3:], c[:, 3:], rtol=1e-4, atol=1e-5)  # variance from the conditional half
    assert (c[:, :3] - u[:, :3]).abs().max() > 1e-3  # the halves differ: guidance does something
