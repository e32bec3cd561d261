"""U-Net properties: shapes for every switch, checkpointing, zero init, determinism, attention, bad configs."""

import dataclasses
import itertools
import math

import pytest
import torch

from difflab.nn.classifier import ClassifierConfig
from difflab.nn.layers import qkv_attention, timestep_embedding
from difflab.nn.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(2,), num_groups=8, num_heads=2)


def randomize(net, seed=0, std=0.2):
    """Random weights everywhere, so that zero-initialised layers do not hide anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def inputs(cfg, n=2, hw=8, s=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if cfg.num_classes is not None:
        kw["y"] = torch.randint(0, cfg.num_classes, (n,), generator=g)
    if cfg.low_res_channels:
        kw["low_res"] = torch.randn(n, cfg.low_res_channels, hw // 2, hw // 2, generator=g)
    if cfg.cond_dim is not None:
        kw["cond"] = torch.randn(n, cfg.cond_dim, generator=g)
    if cfg.encoder_channels is not None:
        kw["context"] = torch.randn(n, s, cfg.encoder_channels, generator=g)
    if cfg.inpaint:
        kw["inpaint_image"] = torch.randn(n, cfg.in_channels, hw, hw, generator=g)
        kw["inpaint_mask"] = (torch.rand(n, 1, hw, hw, generator=g) > 0.5).float()
    x = torch.randn(n, cfg.in_channels, hw, hw, generator=g)
    return x, torch.tensor([0, 999])[:n], kw


GRID = list(itertools.product(
    [False, True],  # use_scale_shift_norm
    [False, True],  # resblock_updown
    [False, True],  # conv_resample
    [(2, -1, False), (1, 8, True)],  # (num_heads, num_head_channels, use_new_attention_order)
    ["plain", "sigma+class", "superres", "inpaint+cond+context"],
))


@pytest.mark.parametrize("ssn,updown,conv,heads,extra", GRID)
def test_shapes_for_every_switch(ssn, updown, conv, heads, extra):
    num_heads, nhc, new_order = heads
    over = dict(use_scale_shift_norm=ssn, resblock_updown=updown, conv_resample=conv, num_heads=num_heads,
                num_head_channels=nhc, use_new_attention_order=new_order, channel_mult=(1, 2, 2),
                attention_resolutions=(2, 4))
    over.update({
        "plain": {},
        "sigma+class": dict(learn_sigma=True, num_classes=4, class_null=True),
        "superres": dict(low_res_channels=3, learn_sigma=True),
        "inpaint+cond+context": dict(inpaint=True, cond_dim=6, encoder_channels=12),
    }[extra])
    cfg = UNetConfig(**{**SMALL, **over})
    net = randomize(UNet(cfg))
    x, t, kw = inputs(cfg)
    out = net(x, t, **kw)
    assert out.shape == (2, cfg.resolved_out_channels, 8, 8)
    assert torch.isfinite(out).all()
    assert net.input_blocks[0][0].weight.shape[1] == cfg.input_channels


def test_learn_sigma_and_out_channels():
    assert UNetConfig(**SMALL, learn_sigma=True).resolved_out_channels == 6
    assert UNetConfig(**SMALL).resolved_out_channels == 3
    assert UNetConfig(**SMALL, out_channels=5).resolved_out_channels == 5
    assert UNetConfig(**SMALL, inpaint=True, low_res_channels=3).input_channels == 3 + 4 + 3


def test_zero_output_at_construction():
    torch.manual_seed(0)
    cfg = UNetConfig(**SMALL, learn_sigma=True, num_classes=3, use_scale_shift_norm=True, resblock_updown=True)
    net = UNet(cfg)
    x, t, kw = inputs(cfg)
    assert torch.count_nonzero(net(x, t, **kw)) == 0
    # the official zero-initialised convs: out, every ResBlock's last conv, every attention proj_out
    zero = [n for n, p in net.named_parameters() if torch.count_nonzero(p) == 0]
    assert "out.2.weight" in zero and "middle_block.1.proj_out.weight" in zero
    assert "middle_block.0.out_layers.3.weight" in zero


def test_determinism_under_seed():
    cfg = UNetConfig(**SMALL, num_classes=3)
    torch.manual_seed(123)
    a = UNet(cfg).state_dict()
    torch.manual_seed(123)
    b = UNet(cfg).state_dict()
    torch.manual_seed(124)
    c = UNet(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_gradient_checkpointing_same_gradients():
    cfg = UNetConfig(**SMALL, use_scale_shift_norm=True, resblock_updown=True, encoder_channels=4, dropout=0.0)
    nets = [randomize(UNet(dataclasses.replace(cfg, use_checkpoint=c))) for c in (False, True)]
    x, t, kw = inputs(cfg)
    grads = []
    for net in nets:
        xx = x.clone().requires_grad_(True)
        net(xx, t, **kw).square().sum().backward()
        grads.append([xx.grad] + [p.grad for p in net.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_class_null_label():
    cfg = UNetConfig(**SMALL, num_classes=3, class_null=True)
    net = randomize(UNet(cfg))
    assert net.label_emb.weight.shape[0] == 4
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t, y=torch.full((2,), 3)))
        assert not torch.allclose(net(x, t), net(x, t, y=torch.zeros(2, dtype=torch.long)))


def test_cond_vector_changes_output_and_none_is_zero():
    cfg = UNetConfig(**SMALL, cond_dim=5)
    net = randomize(UNet(cfg))
    x, t, _ = inputs(cfg)
    with torch.no_grad():
        net.cond_proj.bias.zero_()
        torch.testing.assert_close(net(x, t), net(x, t, cond=torch.zeros(2, 5)))
        assert not torch.allclose(net(x, t), net(x, t, cond=torch.randn(2, 5)))


def test_context_mask_equals_dropping_tokens():
    """Masked context tokens have no effect: same output as a context without them."""
    cfg = UNetConfig(**SMALL, encoder_channels=6)
    net = randomize(UNet(cfg))
    x, t, kw = inputs(cfg, s=5)
    ctx = kw["context"]
    mask = torch.tensor([True, False, True, True, False])
    with torch.no_grad():
        full = net(x, t, context=ctx, context_mask=mask.expand(2, 5))
        kept = net(x, t, context=ctx[:, mask])
        other = net(x, t, context=ctx)
    torch.testing.assert_close(full, kept, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, other)


def reference_attention(qkv, heads, legacy, enc=None):
    """The official einsum formulation (QKVAttentionLegacy / QKVAttention, GLIDE encoder_kv)."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (z.reshape(bs * heads, ch, length) for z in qkv.chunk(3, dim=1))
    if enc is not None:
        if legacy:
            ek, ev = enc.reshape(bs * heads, ch * 2, -1).split(ch, dim=1)
        else:
            ek, ev = (z.reshape(bs * heads, ch, -1) for z in enc.chunk(2, dim=1))
        k, v = torch.cat([ek, k], -1), torch.cat([ev, v], -1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("with_context", [False, True])
def test_qkv_attention_matches_official_formulation(legacy, with_context):
    g = torch.Generator().manual_seed(0)
    heads, ch, n, length, s = 3, 4, 2, 10, 6
    qkv = torch.randn(n, 3 * heads * ch, length, generator=g, dtype=torch.float64)
    enc = torch.randn(n, 2 * heads * ch, s, generator=g, dtype=torch.float64) if with_context else None
    torch.testing.assert_close(qkv_attention(qkv, heads, legacy, enc), reference_attention(qkv, heads, legacy, enc))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 500, 999])
    for dim in (8, 9):
        e = timestep_embedding(t, dim)
        half = dim // 2
        f = torch.exp(-math.log(10000) * torch.arange(half) / half)
        torch.testing.assert_close(e[:, :half], torch.cos(t[:, None] * f))
        torch.testing.assert_close(e[:, half:2 * half], torch.sin(t[:, None] * f))
        assert e.shape == (4, dim) and (dim % 2 == 0 or torch.all(e[:, -1] == 0))


@pytest.mark.parametrize("field,value,expect", [
    ("channel_mult", (), "channel_mult.*positive"),
    ("attention_resolutions", ("16",), r"attention_resolutions.*integer downsample rates"),
    ("num_heads_upsample", 0, r"num_heads_upsample.*-1 \(= num_heads\) or an integer >= 1"),
    ("num_heads_upsample", 3, "num_heads_upsample.*divisor of every width with attention on the way up"),
    ("num_head_channels", 7, "num_head_channels.*divisor"),
    ("num_head_channels", 0, "num_head_channels.*-1"),
    ("num_heads", 3, "num_heads.*divisor"),
    ("dropout", 1.5, r"dropout.*\[0, 1\)"),
    ("num_groups", 5, "num_groups.*divisor"),
    ("model_channels", 0, "model_channels.*>= 1"),
    ("use_scale_shift_norm", "yes", "use_scale_shift_norm.*True or False"),
    ("class_null", True, "class_null.*num_classes is None"),
    ("low_res_channels", -1, "low_res_channels"),
    ("image_size", 9, "image_size.*multiple of 2"),
])
def test_bad_config_names_field_and_choices(field, value, expect):
    with pytest.raises(ValueError, match=expect):
        UNet(UNetConfig(**{**SMALL, field: value}))


def test_bad_classifier_pool_lists_choices():
    with pytest.raises(ValueError, match="pool='max'.*'attention', 'adaptive', 'spatial', 'spatial_v2'"):
        ClassifierConfig(**SMALL, image_size=8, pool="max").validate()


def test_forward_rejects_wrong_conditioning():
    net = UNet(UNetConfig(**SMALL))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, y=torch.tensor([0]))
    with pytest.raises(ValueError, match="unexpected conditioning.*'tokens'.*valid"):
        net(x, t, tokens=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="pass y"):
        UNet(UNetConfig(**SMALL, num_classes=2))(x, t)
    with pytest.raises(ValueError, match="pass low_res"):
        UNet(UNetConfig(**SMALL, low_res_channels=3))(x, t)
