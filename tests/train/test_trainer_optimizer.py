"""The trainer's optimiser: PyTorch's fused AdamW, which is AdamW (Loshchilov & Hutter, decoupled weight decay,
bias-corrected moments) to float rounding, and a run with it resumes from its checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import TINY

from difflab.config import load_config
from difflab.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def adamw_reference(params, grads_per_step, lr, betas, eps, weight_decay):
    """AdamW written out (Algorithm 2 of Loshchilov & Hutter, as torch.optim.AdamW states it), in float64."""
    b1, b2 = betas
    theta = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            theta[i] = theta[i] * (1 - lr * weight_decay)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            theta[i] = theta[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return theta


def test_the_trainer_uses_fused_adamw(tmp_path):
    tr = Trainer(load_config(TINY, []), tmp_path / "run", quiet=True)
    assert isinstance(tr.opt, torch.optim.AdamW) and tr.opt.defaults["fused"] is True


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_adamw_is_adamw(weight_decay):
    """30 steps on random gradients: float64 to 1e-12 of the written-out update, float32 to 1e-6 of it."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(30)]
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    ref = adamw_reference(params, grads, **hp)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        ps = [p.detach().clone().to(dtype).requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(ps, fused=True, **hp)
        for step in grads:
            for p, gr in zip(ps, step, strict=True):
                p.grad = gr.to(dtype)
            opt.step()
        for p, r in zip(ps, ref, strict=True):
            err = ((p.detach().double() - r).abs().max() / r.abs().max()).item()
            assert err < tol, (dtype, err)
        assert not math.isnan(err)
