"""Before and after for each CPU fast path of difflab's U-Net: training img/s with one path reverted at a time.

The fast paths (src/difflab/nn/layers.py) and the plain formulations they replace:

* ``softmax``: low-precision attention scores go to the softmax as they are; plain: ``softmax(s.float())``
  cast back (the official code), two [N, H, L, L] copies forward and two backward.
* ``group_norm``: bf16 / fp16 GroupNorm with float32 affine parameters in one kernel; plain: GroupNorm of
  ``x.float()`` cast back (the official ``GroupNorm32``).
* ``attention_layout``: ``weight @ v^T``; plain: ``v @ weight^T``, whose backward copies the [L_q, L_k]
  gradient into the layout the softmax backward reads.
* ``pointwise``: the 1x1 convolutions (attention's qkv / proj_out, the ResBlock skips) as one batched matmul;
  plain: oneDNN's convolution (``nn.Conv1d`` / ``nn.Conv2d``).
* ``attention_scale``: 1 / sqrt(C) applied to q before the scores matmul; plain: to the [N, H, L, L] scores.
* ``cpu_sdpa``: self-attention over ``layers.CPU_SDPA_MIN_LENGTH`` positions or more (the 16x16 layers here)
  in SDPA's fused kernel; plain: the two matmuls at every length.

One process, one model per variant, timed in interleaved rounds (median); the same model, batch and
resolution as benchmarks/throughput.py. Run it on an otherwise idle machine:

    python benchmarks/fast_paths.py --threads 2 --precisions fp32,bf16
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics

import torch
import torch.nn.functional as F

from difflab.nn import layers
from throughput import Bench, paired_ratio

FAST_GROUP_NORM = layers.GroupNorm32.forward
FAST_ATTENTION = layers.qkv_attention
FAST_POINTWISE = layers._Pointwise.forward
FAST_SDPA_MIN_LENGTH = layers.CPU_SDPA_MIN_LENGTH


def plain_pointwise(self, x):
    """The convolution the 1x1 layers subclass (``nn.Conv1d.forward`` / ``nn.Conv2d.forward``)."""
    return super(layers._Pointwise, self).forward(x)


def plain_group_norm(self, x):
    """The official GroupNorm32: float32, then cast back."""
    return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).type(x.dtype)


def attention(qkv, n_heads, legacy_order, encoder_kv=None, key_mask=None, *, cast: bool, layout: bool,
              scale_q: bool = True, sdpa: bool = True):
    """CPU self-attention with the float32 softmax round trip (``cast``), the ``v @ weight^T`` layout (not
    ``layout``), the scaling of the scores (not ``scale_q``) and / or two matmuls at every length (not ``sdpa``)
    put back; otherwise the library's formulation."""
    if encoder_kv is not None or key_mask is not None:
        raise ValueError("the benchmark model has no context tokens")
    n, width, length = qkv.shape
    if sdpa and length >= layers.CPU_SDPA_MIN_LENGTH:
        return FAST_ATTENTION(qkv, n_heads, legacy_order)
    ch = width // (3 * n_heads)
    split = qkv.reshape(n, n_heads, 3, ch, length).unbind(2) if legacy_order else \
        qkv.reshape(n, 3, n_heads, ch, length).unbind(1)
    q, k, v = split
    if scale_q:
        scores = torch.matmul((q * (1.0 / math.sqrt(ch))).transpose(-1, -2), k)
    else:
        scores = torch.matmul(q.transpose(-1, -2), k) * (1.0 / math.sqrt(ch))
    weight = torch.softmax(scores.float(), dim=-1).to(scores.dtype) if cast else torch.softmax(scores, dim=-1)
    if layout:
        return torch.matmul(weight, v.transpose(-1, -2)).transpose(-1, -2).reshape(n, n_heads * ch, length)
    return torch.matmul(v, weight.transpose(-1, -2)).reshape(n, n_heads * ch, length)


def attention_before(qkv, n_heads, legacy_order, encoder_kv=None, key_mask=None):
    """The library's CPU attention before 2026-12-02: the [L, L] scores scaled, two matmuls at every length."""
    return attention(qkv, n_heads, legacy_order, encoder_kv, key_mask, cast=False, layout=True, scale_q=False,
                     sdpa=False)


@contextlib.contextmanager
def attention_installed(formulation):
    """``layers.qkv_attention`` replaced by ``formulation`` inside the block (the U-Net looks it up at call time;
    a backward needs no lookup), the library's own afterwards."""
    library = layers.qkv_attention
    layers.qkv_attention = formulation
    try:
        yield
    finally:
        layers.qkv_attention = library


VARIANTS = {
    "all fast paths": {},
    "plain softmax": {"cast": True},
    "plain group_norm": {"group_norm": True},
    "plain attention_layout": {"layout": False},
    "plain pointwise": {"pointwise": True},
    "plain attention_scale": {"scale_q": False},
    "plain cpu_sdpa": {"sdpa": False},
    "all plain": {"cast": True, "group_norm": True, "layout": False, "pointwise": True, "scale_q": False,
                  "sdpa": False},
    # not a revert: SDPA at every length (benchmarks/fast_paths_fd.py trains the MNIST default with it, whose
    # only attention is at 7x7, to check the fused kernel's training against the two matmuls')
    "sdpa everywhere": {"sdpa_from": 0},
}
ATTENTION_KNOBS = ("cast", "layout", "scale_q", "sdpa")


def use(variant: dict) -> None:
    """Install the variant's formulations into difflab.nn.layers (the U-Net looks them up at call time)."""
    layers.GroupNorm32.forward = plain_group_norm if variant.get("group_norm") else FAST_GROUP_NORM
    layers._Pointwise.forward = plain_pointwise if variant.get("pointwise") else FAST_POINTWISE
    layers.CPU_SDPA_MIN_LENGTH = variant.get("sdpa_from", FAST_SDPA_MIN_LENGTH)
    if any(knob in variant for knob in ATTENTION_KNOBS):
        knobs = {"cast": False, "layout": True, "scale_q": True, "sdpa": True}
        knobs.update({k: variant[k] for k in ATTENTION_KNOBS if k in variant})
        layers.qkv_attention = lambda *a, **kw: attention(*a, **kw, **knobs)
    else:
        layers.qkv_attention = FAST_ATTENTION


def use_optimizer(variant: str) -> None:
    """For "all plain": the trainer's ``torch.optim.AdamW(..., fused=True)`` becomes AdamW's default per-tensor
    loop (the trainer's one fast path outside the network; benchmarks/fast_paths_fd.py)."""
    if variant != "all plain":
        return
    adamw = torch.optim.AdamW

    def per_tensor_adamw(params, *args, fused=None, **kwargs):
        return adamw(params, *args, **kwargs)

    torch.optim.AdamW = per_tensor_adamw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=1, help="steps per variant per round")
    p.add_argument("--mode", default="train", choices=("train", "sample"),
                   help="time training steps, or sampling forwards (torch.inference_mode)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for precision in [s.strip() for s in args.precisions.split(",") if s.strip()]:
        if precision not in ("fp32", "bf16"):
            p.error(f"unknown precision {precision!r}; valid: fp32, bf16")
        bench = Bench("difflab", 32, 32, torch.device("cpu"), precision=precision)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        step = bench.train_step if args.mode == "train" else bench.sample_step
        for variant in VARIANTS.values():  # warm-up every variant's kernels
            use(variant)
            step()
        for r in range(args.rounds):
            for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                use(VARIANTS[name])
                times[name].append(bench.time(step, args.iters))
        use({})
        print(f"\n{precision}, {args.mode}, {torch.get_num_threads()} threads, batch 32, 1x32x32 ({args.rounds} "
              f"rounds of {args.iters} steps)")
        print(paired_table(times, "all fast paths").replace("train img/s", f"{args.mode} img/s"))
    return 0


def paired_table(times: dict[str, list[float]], ref: str) -> str:
    """Markdown rows: each variant's median img/s and the speed-up of ``ref`` over it (the median of the
    per-round ratios, with their quartiles: :func:`throughput.paired_ratio`)."""
    lines = ["| variant | train img/s | all fast paths vs this (median of rounds) | quartiles |", "|---|---|---|---|"]
    for name, ts in times.items():
        med, q1, q3 = paired_ratio(times[ref], ts)
        lines.append(f"| {name} | {statistics.median(ts):.1f} | {med:.2f}x | {q1:.2f}-{q3:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
