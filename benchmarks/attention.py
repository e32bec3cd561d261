"""CPU self-attention, one layer at a time: the formulations behind ``layers.CPU_SDPA_MIN_LENGTH``.

For each (batch, heads, head channels, positions) shape, three formulations of
softmax(q^T k / sqrt(C)) v on a legacy-order qkv tensor [N, H * 3C, L], timed for training (forward +
backward) and for sampling (forward under ``torch.inference_mode``), interleaved within every round:

* ``scores scaled``: two matmuls, the [N, H, L, L] scores multiplied by 1 / sqrt(C) (the library before);
* ``q scaled``: two matmuls, q multiplied by 1 / sqrt(C) before the first (the library below the threshold);
* ``sdpa``: ``F.scaled_dot_product_attention`` on unit-channel-stride copies (the library from the threshold
  on; its CPU flash kernel never materialises the scores).

Reported: the median ms per call and the speed-up of each formulation over ``scores scaled`` (median of the
per-round ratios, with quartiles: ``throughput.paired_ratio``). Run it alone on the machine:

    python benchmarks/attention.py --threads 2 --out docs/results/attention.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.nn import layers
from fast_paths import attention as plain_attention
from throughput import paired_ratio

# (N, H, C, L): the throughput U-Net's 8x8 and 16x16 layers at batch 32, and 32x32 maps (ADM-64, GLIDE base).
SHAPES = ((32, 4, 32, 64), (32, 2, 32, 128), (32, 2, 32, 256), (8, 4, 64, 256), (8, 2, 32, 1024),
          (4, 4, 64, 1024))


def sdpa(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The library's path from ``CPU_SDPA_MIN_LENGTH`` on (legacy order)."""
    n, width, length = qkv.shape
    q, k, v = layers._heads_last(qkv, n_heads, 3, True)
    return F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(n, width // 3, length)


FORMULATIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "scores scaled": lambda qkv, h: plain_attention(qkv, h, True, cast=False, layout=True, scale_q=False,
                                                    sdpa=False),
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


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (info.read_text().splitlines() if info.exists() else [])
             if ln.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def markdown(results: dict, meta: dict) -> str:
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the markdown here and the JSON beside it")
    args = p.parse_args(argv)
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
    text = markdown(results, meta)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
