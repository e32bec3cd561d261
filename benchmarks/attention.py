"""CPU self-attention, one layer at a time: the formulations behind ``layers.CPU_SDPA_MIN_LENGTH``.

For each (batch, heads, head channels, positions) shape, three formulations of
softmax(q^T k / sqrt(C)) v on a legacy-order qkv tensor [N, H * 3C, L], timed for training (forward +
backward) and for sampling (forward under ``torch.inference_mode``), interleaved within every round:

* ``scores scaled``: two matmuls, the [N, H, L, L] scores multiplied by 1 / sqrt(C) (the library before);
* ``q scaled``: two matmuls, q multiplied by 1 / sqrt(C) before the first (the library below the threshold);
* ``sdpa``: ``F.scaled_dot_product_attention`` on unit-channel-stride copies (the library from the threshold
  on; its CPU flash kernel never materialises the scores).

Reported: the median ms per call and the speed-up of each formulation over ``scores scaled`` (median of the
per-round ratios, with quartiles: ``throughput.paired_ratio``). ``--networks`` adds whole released
architectures (random weights): one sampling forward at ``--network-batch`` with the library's attention
against ``scores scaled`` at every length (the library before). Run it alone on the machine:

    python benchmarks/attention.py --threads 2 --networks guided-diffusion/64x64_diffusion,ddpm-cifar10 \
        --out docs/results/attention.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.nn import layers
from fast_paths import attention as plain_attention
from fast_paths import attention_before, attention_installed
from throughput import cpu_name, paired_ratio

# (N, H, C, L): the throughput U-Net's 8x8 and 16x16 layers at batch 32, and 32x32 maps (ADM-64, GLIDE base).
SHAPES = ((32, 4, 32, 64), (32, 2, 32, 128), (32, 2, 32, 256), (8, 4, 64, 256), (8, 2, 32, 1024),
          (4, 4, 64, 1024))


def sdpa(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The library's path from ``CPU_SDPA_MIN_LENGTH`` on (legacy order)."""
    n, width, length = qkv.shape
    q, k, v = layers._heads_last(qkv, n_heads, 3, True)
    return F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(n, width // 3, length)


FORMULATIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "scores scaled": lambda qkv, h: attention_before(qkv, h, True),
    "q scaled": lambda qkv, h: plain_attention(qkv, h, True, cast=False, layout=True, scale_q=True, sdpa=False),
    "sdpa": sdpa,
}


def time_shape(shape: tuple[int, int, int, int], rounds: int, calls: int) -> dict:
    """{mode: {formulation: [ms per call, one per round]}} and the largest deviation from ``scores scaled``."""
    n, h, c, length = shape
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, 3 * h * c, length, generator=g, requires_grad=True)
    grad = torch.randn(n, h * c, length, generator=g)
    ref = FORMULATIONS["scores scaled"](qkv, h).detach()
    deviation = {name: (f(qkv, h).detach() - ref).abs().max().item() for name, f in FORMULATIONS.items()}

    def train(f):
        f(qkv, h).backward(grad)

    def sample(f):
        with torch.inference_mode():
            f(qkv, h)

    times: dict[str, dict[str, list[float]]] = {"train": {}, "sample": {}}
    for mode, step in (("train", train), ("sample", sample)):
        for f in FORMULATIONS.values():  # warm-up
            step(f)
        times[mode] = {name: [] for name in FORMULATIONS}
        for r in range(rounds):
            names = list(FORMULATIONS) if r % 2 == 0 else list(FORMULATIONS)[::-1]
            for name in names:
                t0 = time.perf_counter()
                for _ in range(calls):
                    step(FORMULATIONS[name])
                times[mode][name].append((time.perf_counter() - t0) / calls * 1e3)
    return {"times": times, "max_abs_deviation": deviation}


def time_network(preset: str, batch: int, rounds: int) -> dict:
    """One sampling forward of a preset's network (random weights, ``torch.inference_mode``): the library's CPU
    attention against ``scores scaled`` at every length, interleaved; {"library" / "before": [ms per call]}."""
    from difflab.nn import build_network, get_preset

    cfg = get_preset(preset)
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {"y": torch.randint(0, cfg.num_classes, (batch,), generator=g)} if cfg.num_classes else {}
    variants = {"library": layers.qkv_attention, "before": attention_before}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            with attention_installed(variants[name]), torch.inference_mode():
                t0 = time.perf_counter()
                net(x, t, **kwargs)
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    lengths = sorted({(cfg.image_size // ds) ** 2 for ds in cfg.attention_resolutions})
    return {"times": times, "attention_lengths": lengths, "batch": batch,
            "params": sum(p.numel() for p in net.parameters())}


def markdown(results: dict, meta: dict, networks: dict | None = None) -> str:
    lines = [f"# CPU self-attention per layer ({meta['threads']} threads, torch {meta['torch']}, "
             f"{meta['rounds']} rounds of {meta['calls']} calls)", "",
             f"`{meta['command']}` on {meta['machine']}, {meta['date']}. ms per call (median of rounds); "
             "speed-up over `scores scaled` = median of the per-round ratios (quartiles). The library's CPU path is "
             f"`q scaled` below L = {meta['threshold']} and `sdpa` from it on (`layers.CPU_SDPA_MIN_LENGTH`).", "",
             "| N, H, C, L | mode | " + " | ".join(FORMULATIONS) + " | " +
             " | ".join(f"{name} speed-up" for name in list(FORMULATIONS)[1:]) + " |",
             "|---|---|" + "---|" * (2 * len(FORMULATIONS) - 1)]
    for key, res in results.items():
        for mode, times in res["times"].items():
            base = times["scores scaled"]
            ms = " | ".join(f"{statistics.median(t):.2f}" for t in times.values())
            ups = []
            for name in list(FORMULATIONS)[1:]:
                med, q1, q3 = paired_ratio(base, times[name])
                ups.append(f"{med:.2f}x ({q1:.2f}-{q3:.2f})")
            lines.append(f"| {key} | {mode} | {ms} | " + " | ".join(ups) + " |")
    dev = max(d for res in results.values() for d in res["max_abs_deviation"].values())
    lines += ["", f"Largest |difference| from `scores scaled` over all shapes (float32 outputs): {dev:.1e}."]
    if networks:
        lines += ["", "## Whole networks: one sampling forward (random weights)", "",
                  "| preset | params | batch | attention lengths | before ms | library ms | speed-up (quartiles) |",
                  "|---|---|---|---|---|---|---|"]
        for preset, res in networks.items():
            before, lib = res["times"]["before"], res["times"]["library"]
            med, q1, q3 = paired_ratio(before, lib)
            lines.append(f"| {preset} | {res['params'] / 1e6:.1f}M | {res['batch']} | "
                         f"{', '.join(map(str, res['attention_lengths']))} | {statistics.median(before):.0f} | "
                         f"{statistics.median(lib):.0f} | {med:.2f}x ({q1:.2f}-{q3:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--networks", default="", help="comma-separated presets to time whole (sampling forward)")
    p.add_argument("--network-batch", type=int, default=2)
    p.add_argument("--network-rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the markdown here and the JSON beside it")
    args = p.parse_args(argv)
    presets = [name.strip() for name in args.networks.split(",") if name.strip()]
    from difflab.nn.presets import PRESETS

    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        p.error(f"unknown preset {unknown[0]!r}; valid: {', '.join(PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for shape in SHAPES:
        key = ", ".join(map(str, shape))
        results[key] = time_shape(shape, args.rounds, args.calls)
        print(key, {m: {k: round(statistics.median(v), 2) for k, v in t.items()}
                    for m, t in results[key]["times"].items()}, flush=True)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rounds": args.rounds,
            "calls": args.calls, "threshold": layers.CPU_SDPA_MIN_LENGTH, "machine": cpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/attention.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    networks = {}
    for preset in presets:
        networks[preset] = time_network(preset, args.network_batch, args.network_rounds)
        print(preset, {k: round(statistics.median(v)) for k, v in networks[preset]["times"].items()}, flush=True)
    text = markdown(results, meta, networks)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "results": results, "networks": networks}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
