"""One short GPU throughput run of a difflab preset (default: ADM-64) in bf16: train img/s, MFU, sample img/s.

Presets of every diffusion network kind: ADM / iDDPM U-Nets (class labels when the preset has them), GLIDE's
text U-Nets (``glide/base``: random GPT-2 tokens, every position a caption token), Karlo's decoder
(``karlo/decoder``: random CLIP image / text features) and Karlo's prior (``karlo/prior``: the diffused tensor is
the [N, 768] embedding; x0 prediction); ``--set`` changes a field of the preset's config.

* training: forward + MSE on the eps channels + backward + Adam step under ``torch.autocast(dtype=bfloat16)``
  (weights, optimizer state and the sampler state stay float32: DESIGN "Numbers");
* model FLOP utilisation (MFU): FLOPs of one training step counted by ``torch.utils.flop_counter``
  (forward + backward; the optimizer is not counted) times steps/s, over the card's dense bf16 peak
  (a table of common cards, or ``--peak-tflops``);
* sampling: network evaluations per second (forward under ``torch.inference_mode``) and complete
  DPM-Solver++(2M) samples per second at ``--sample-steps`` evaluations each.

``benchmarks/gpu.sh`` runs it on a CUDA machine in well under 5 minutes; on a CPU it runs with a
tiny preset for testing: ``python benchmarks/gpu_bench.py --device cpu --preset mnist-tiny --steps 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F

from difflab import Denoiser, Parameterization, Process
from difflab.config import override
from difflab.nn import build_network, get_preset
from difflab.nn.clip_unet import DecoderUNetConfig
from difflab.nn.prior import PriorConfig
from difflab.nn.text_unet import TextUNetConfig
from difflab.nn.unet import UNetConfig
from difflab.samplers import sample_dpmpp_2m
from throughput import flop_counter

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 0.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s): ``override``, else the first table key in the device name."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value or None
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conditioning(cfg, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random conditioning of the network's kind, full length (every caption position real, the costliest case):
    class labels (ADM), GPT-2 tokens + mask (GLIDE's text U-Nets), CLIP image and text features + mask (Karlo's
    decoder and prior: x_t of the prior is the [N, clip_dim] embedding itself)."""
    if isinstance(cfg, PriorConfig):
        d, L = cfg.clip_dim, cfg.text_ctx
        return {"text_emb": torch.randn(n, d, generator=g), "text_enc": torch.randn(n, L, d, generator=g),
                "mask": torch.ones(n, L, dtype=torch.bool)}
    if isinstance(cfg, DecoderUNetConfig):
        d, L = cfg.clip_dim, cfg.text_ctx
        return {"y": torch.randn(n, d, generator=g), "txt_feat": torch.randn(n, d, generator=g),
                "txt_feat_seq": torch.randn(n, L, d, generator=g), "mask": torch.ones(n, L, dtype=torch.bool)}
    if isinstance(cfg, TextUNetConfig):
        L = cfg.text.text_ctx
        return {"tokens": torch.randint(0, cfg.text.n_vocab, (n, L), generator=g),
                "mask": torch.ones(n, L, dtype=torch.bool)}
    if cfg.num_classes:
        return {"y": torch.randint(0, cfg.num_classes, (n,), generator=g)}
    return {}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = override(get_preset(args.preset), args.set)
    if not isinstance(cfg, UNetConfig | PriorConfig):
        raise ValueError(f"preset {args.preset!r} is neither a diffusion U-Net nor unCLIP's prior")
    net = build_network(cfg).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if args.compile else net
    size = args.image_size or getattr(cfg, "image_size", None) or 64
    c = cfg.clip_dim if isinstance(cfg, PriorConfig) else cfg.in_channels
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        g = torch.Generator().manual_seed(seed)
        shape = (n, c) if isinstance(cfg, PriorConfig) else (n, c, size, size)
        x = torch.randn(*shape, generator=g).to(device)
        t = torch.randint(0, 1000, (n,), generator=g).to(device)
        cond = {k: v.to(device) for k, v in conditioning(cfg, n, g).items()}
        if args.channels_last and x.dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        return x, t, cond

    x, t, cond = batch(args.batch, 0)
    noise = torch.randn_like(x)[:, :c]
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = fwd(x, t, **cond)
        F.mse_loss(out[:, :c].float(), noise).backward()
        opt.step()

    with flop_counter() as fc:
        with autocast():
            out = net(x, t, **cond)
        F.mse_loss(out[:, :c].float(), noise).backward()
    opt.zero_grad(set_to_none=True)
    step_flops = fc.get_total_flops()

    for _ in range(args.warmup):
        train_step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    sync(device)
    train_s = (time.perf_counter() - t0) / args.steps
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    # Sampling: raw network evaluations, then complete DPM-Solver++(2M) samples through a Denoiser.
    net.eval()
    xs, ts, conds = batch(args.sample_batch, 1)
    with torch.inference_mode(), autocast():
        for _ in range(max(1, args.warmup)):
            fwd(xs, ts, **conds)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fwd(xs, ts, **conds)
        sync(device)
    eval_s = (time.perf_counter() - t0) / args.steps
    process = Process.named("cosine", 1000)
    if isinstance(cfg, PriorConfig):  # the prior predicts the clean embedding (unCLIP Sec. 2.2)
        param = Parameterization("x0", "fixed_small")
    else:
        param = Parameterization("eps", "learned_range" if cfg.learn_sigma else "fixed_small")
    denoiser = Denoiser(fwd, process, param)
    with autocast():
        sync(device)
        t0 = time.perf_counter()
        sample_dpmpp_2m(denoiser, xs, steps=args.sample_steps, model_kwargs=conds or None)
        sync(device)
    sample_s = time.perf_counter() - t0

    peak = peak_tflops(device, args.peak_tflops)
    achieved = step_flops / train_s
    result = {
        "preset": args.preset, "params": sum(p.numel() for p in net.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "compile": args.compile, "channels_last": args.channels_last,
        "image_size": size, "batch": args.batch, "train_steps": args.steps,
        "train_gflop_per_img": step_flops / args.batch / 1e9,
        "train_img_s": args.batch / train_s,
        "train_tflops": achieved / 1e12,
        "peak_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
        "peak_train_mem_gib": peak_mem / 2**30 if peak_mem is not None else None,
        "sample_batch": args.sample_batch,
        "eval_img_s": args.sample_batch / eval_s,
        "sample_steps": args.sample_steps,
        "sample_img_s": args.sample_batch / sample_s,
        "torch": torch.__version__,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="guided-diffusion/64x64_diffusion", help="a difflab.nn preset")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (and timed forward passes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++(2M) steps per sample")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: table)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a field of the preset's config (dotted: text.xf_layers=1); repeatable")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    for name in ("batch", "sample_batch", "steps", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here; use --device cpu (with a tiny preset) to test the script")
    result = run(args)
    mfu = "n/a (unknown peak; pass --peak-tflops)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
    print(f"{result['preset']} on {result['device']} ({args.dtype}, batch {args.batch}, "
          f"{result['params'] / 1e6:.1f}M params, {result['train_gflop_per_img']:.1f} GFLOP/img train)")
    print(f"train: {result['train_img_s']:.1f} img/s, {result['train_tflops']:.1f} TFLOP/s, MFU {mfu}")
    print(f"sample: {result['eval_img_s']:.1f} network evals/s per image, "
          f"{result['sample_img_s']:.2f} img/s with DPM-Solver++(2M) at {args.sample_steps} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
