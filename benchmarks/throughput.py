"""Training and sampling throughput of difflab's U-Net against diffusers and lucidrains, one process.

Three U-Nets at matched parameter counts (~4.0M, within 5%), 1x32x32 images, batch 32:

* difflab ``UNet(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention at 16x16 and 8x8)``
* diffusers ``UNet2DModel(block_out_channels=(32, 64, 128), layers_per_block=2, attention in the lower two)``
* lucidrains ``denoising_diffusion_pytorch.Unet(dim=40, dim_mults=(1, 2, 4), channels=1)``

Measured: training img/s (forward + MSE loss + backward + Adam step), sampling img/s (one forward
under ``torch.inference_mode``), FLOPs per image (``torch.utils.flop_counter``: forward, and forward +
backward), FLOP/s as a fraction of a same-run 2048x2048 float32 matmul on the same threads, and peak
memory of a training step (CUDA: ``max_memory_allocated``; CPU: peak live heap bytes from glibc
``mallinfo2`` sampled every millisecond, minus the bytes live before the step). The models are timed
in interleaved rounds (A B C A B C ...) and the median round is reported, so that load from other
processes hits all of them alike; compare ratios within one run. ``--precisions fp32,bf16`` (the default)
times every model in float32 and under bf16 autocast (fast on CPUs with AMX / AVX512-BF16 and on GPUs).
Writes docs/results/throughput.json and throughput.md (with the load average before and after) and, with
``--profile``, torch.profiler's top ops; docs/results/speed.md is the write-up.

The peers pull torchvision and a CUDA build of torch; run this from a benchmark-only environment:

    python -m venv /work/benchenv
    /work/benchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers denoising-diffusion-pytorch
    /work/benchenv/bin/pip install -e . --no-deps
    /work/benchenv/bin/python benchmarks/throughput.py
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import flop_counter as _flop_counter
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


# -- models ------------------------------------------------------------------------------------------


Factory = Callable[[], tuple[torch.nn.Module, Callable, torch.memory_format]]


def difflab_model(memory_format: torch.memory_format = torch.contiguous_format):
    from difflab.nn import UNet, UNetConfig

    cfg = UNetConfig(in_channels=1, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
                     attention_resolutions=(2, 4), num_head_channels=32, image_size=32)
    net = UNet(cfg).to(memory_format=memory_format)
    return net, lambda m, x, t: m(x, t), memory_format


def difflab_conv1x1():
    """difflab's U-Net with its 1x1 layers back on oneDNN's convolution (the library before the pointwise path)."""
    from difflab.nn.layers import PointwiseConv1d, PointwiseConv2d

    net, call, fmt = difflab_model()
    for m in net.modules():
        if isinstance(m, (PointwiseConv1d, PointwiseConv2d)):
            m.__class__ = torch.nn.Conv1d if isinstance(m, PointwiseConv1d) else torch.nn.Conv2d
    return net, call, fmt


def difflab_attention_before():
    """difflab's U-Net with its CPU attention as before 2026-12-02 (benchmarks/fast_paths.py's plain attention
    knobs): the [L, L] scores scaled after the matmul, two matmuls at every length."""
    from fast_paths import attention_before, attention_installed

    net, call, fmt = difflab_model()

    def call_before(m, x, t):
        with attention_installed(attention_before):
            return call(m, x, t)

    return net, call_before, fmt


def difflab_compiled():
    """difflab's U-Net under ``torch.compile`` (inductor; needs a C++ compiler on CPU; minutes to compile)."""
    net, call, fmt = difflab_model()
    return torch.compile(net), call, fmt


def diffusers_model():
    from diffusers import UNet2DModel

    net = UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    return net, lambda m, x, t: m(x, t).sample, torch.contiguous_format


def lucidrains_model():
    from denoising_diffusion_pytorch import Unet

    net = Unet(dim=40, dim_mults=(1, 2, 4), channels=1)
    return net, lambda m, x, t: m(x, t.float()), torch.contiguous_format


MODELS: dict[str, Factory] = {
    "difflab": difflab_model,
    "difflab-channels-last": lambda: difflab_model(torch.channels_last),
    "difflab-conv1x1": difflab_conv1x1,
    "difflab-attention-before": difflab_attention_before,
    "difflab-compiled": lambda: difflab_compiled(),
    "diffusers": diffusers_model,
    "lucidrains": lucidrains_model,
}


# -- measurement -------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> Callable[[], int] | None:
    """glibc's bytes in use (small-block heap + mmapped blocks), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during ``step()`` above those live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    in_use = _heap_in_use()
    if in_use is None:
        return None
    before = in_use()
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        step()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], in_use()) - before


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops_per_s(device: torch.device, n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (2 n^3 FLOPs), best of ``reps``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


#: FlopCounterMode knows SDPA's CUDA kernels but not its CPU flash kernel, which it counts as 0 FLOPs: the
#: same formulas (the two matmuls, forward and backward) for the CPU ops, so that a row's FLOPs do not depend
#: on the attention kernel (difflab from 16x16 on, diffusers everywhere).
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops}


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts SDPA's CPU flash kernel (:data:`CPU_SDPA_FLOPS`)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)


class Bench:
    """One model with its optimizer, fixed inputs and the three operations that get timed."""

    def __init__(self, name: str, batch: int, res: int, device: torch.device, seed: int = 0,
                 precision: str = "fp32"):
        torch.manual_seed(seed)
        self.name = name
        self.precision = precision
        self.net, self.call, fmt = MODELS[name]()
        self.net.to(device).train()
        self.params = sum(p.numel() for p in self.net.parameters())
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 1, res, res, generator=g).to(device, memory_format=fmt)
        self.noise = torch.randn(batch, 1, res, res, generator=g).to(device, memory_format=fmt)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.batch = batch
        self.device = device

    def forward(self) -> torch.Tensor:
        """The network's output; under bf16 autocast for ``precision="bf16"`` (weights stay float32)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.call(self.net, self.x, self.t)

    def loss(self) -> torch.Tensor:
        return F.mse_loss(self.forward().float(), self.noise)

    def train_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    def sample_step(self) -> None:
        with torch.inference_mode():
            self.forward()

    def flops(self) -> tuple[float, float]:
        """(forward, forward + backward) FLOPs per image."""
        with flop_counter() as fc:
            with torch.no_grad():
                self.call(self.net, self.x, self.t)
        fwd = fc.get_total_flops()
        with flop_counter() as fc:
            self.loss().backward()
        self.opt.zero_grad(set_to_none=True)
        return fwd / self.batch, fc.get_total_flops() / self.batch

    def time(self, fn: Callable[[], None], iters: int) -> float:
        """Images per second over ``iters`` calls."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(self.device)
        return iters * self.batch / (time.perf_counter() - t0)


CATEGORIES = {
    "convolution": ("conv",),
    "matmul / attention": ("bmm", "mm", "matmul", "softmax", "scaled_dot_product", "baddbmm", "linear"),
    "group norm": ("group_norm",),
    "optimizer": ("adam", "lerp", "addcdiv", "sqrt", "_foreach"),
}


def profile_top_ops(bench: Bench, iters: int = 2, rows: int = 12) -> dict:
    """torch.profiler over ``iters`` training steps: the top-ops table (by self CPU time) and the share of
    self CPU time per op category (convolution, matmul / attention, group norm, optimizer, other)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            bench.train_step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for e in events:
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES.items() if any(k in name for k in keys)), "other")
        shares[cat] += e.self_cpu_time_total / total
    return {"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), "shares": shares}


# -- report --------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (info.read_text().splitlines() if info.exists() else [])
             if ln.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("diffusers", "denoising_diffusion_pytorch", "difflab"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            out[mod] = "not installed"
    return out


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def label(name: str, precision: str) -> str:
    """Row name: the model, with " bf16" appended for the bf16 autocast rows."""
    return name if precision == "fp32" else f"{name} {precision}"


def markdown(result: dict) -> str:
    rows = result["models"]
    ref = rows.get("difflab")
    mm = result["matmul_gflops"]
    lines = [
        "# Throughput: difflab vs diffusers vs lucidrains U-Nets",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; load average {result['load_before']} before, {result['load_after']} after  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}  ",
        f"Date: {result['date']}; batch {result['batch']}, 1x{result['res']}x{result['res']}, "
        f"{result['rounds']} interleaved rounds (median reported)  ",
        f"Same-run {result['matmul_n']}x{result['matmul_n']} matmul: "
        + ", ".join(f"{p} {v:.1f} GFLOP/s" for p, v in mm.items()),
        "",
        "\"bf16\" rows run the network under `torch.autocast(dtype=torch.bfloat16)` (weights, Adam and the loss "
        "in float32). FLOP/s is given against the same-run matmul of the row's precision and against the "
        "float32 matmul (the BENCHMARKS.md bar).",
        "",
        "| model | params | train GFLOP/img | train img/s | sample img/s | train FLOP/s vs matmul (own / fp32) | "
        "peak train MiB | difflab train speed-up | difflab sample speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        mem = "n/a" if r["peak_train_bytes"] is None else f"{r['peak_train_bytes'] / 2**20:.0f}"
        up_t = f"{ref['train_img_s'] / r['train_img_s']:.2f}x" if ref else ""
        up_s = f"{ref['sample_img_s'] / r['sample_img_s']:.2f}x" if ref else ""
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['train_gflop_per_img']:.2f} | {r['train_img_s']:.1f} | "
            f"{r['sample_img_s']:.1f} | {100 * r['train_flops_frac']:.0f}% / {100 * r['train_flops_frac_fp32']:.0f}% "
            f"| {mem} | {up_t} | {up_s} |"
        )
    lines += ["", "Speed-ups are difflab (float32) over each row; the targets below compare each library's "
              "fastest row.", "", "Rounds (train img/s per round): " + "; ".join(
                  f"{n}: {', '.join(f'{v:.1f}' for v in r['train_rounds'])}" for n, r in rows.items())]
    if result.get("targets"):
        lines += ["", "## Targets (BENCHMARKS.md)", ""]
        for line in result["targets"]:
            lines.append(f"- {line}")
    if result.get("profiles"):
        lines += ["", "## Profiles (top ops by self CPU time, 2 training steps)", ""]
        lines += ["Share of self CPU time in aten ops:", "",
                  "| model | " + " | ".join(CATEGORIES) + " | other |", "|---|" + "---|" * (len(CATEGORIES) + 1)]
        for name, prof in result["profiles"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * v:.0f}%" for v in prof["shares"].values()) + " |")
        lines.append("")
        for name, prof in result["profiles"].items():
            lines += [f"### {name}", "", "```", prof["table"].rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios a[r] / b[r] of two rows timed back to back in each round:
    load that lasts longer than a round hits both and cancels, which the ratio of medians does not do."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def target_lines(rows: dict[str, dict], names: list[str]) -> list[str]:
    """The BENCHMARKS.md training bars: each library's fastest row (over precisions) against difflab's."""

    def best(name: str) -> tuple[str, dict] | None:
        own = [(k, r) for k, r in rows.items() if k.split()[0] == name]
        return max(own, key=lambda kr: kr[1]["train_img_s"]) if own else None

    mine = best("difflab")
    if mine is None:
        return []
    out = []
    for peer, bar in (("diffusers", 1.5), ("lucidrains", 1.2)):
        theirs = best(peer)
        if theirs is None:
            continue
        ratio = mine[1]["train_img_s"] / theirs[1]["train_img_s"]
        verdict = "met" if ratio >= bar else "MISSED"
        med, q1, q3 = paired_ratio(mine[1]["train_rounds"], theirs[1]["train_rounds"])
        out.append(f"training img/s, fastest vs fastest: {mine[0]} {mine[1]['train_img_s']:.1f} vs {theirs[0]} "
                   f"{theirs[1]['train_img_s']:.1f}: {ratio:.2f}x (target >= {bar}x): {verdict}; per-round ratio "
                   f"median {med:.2f}x, quartiles {q1:.2f}-{q3:.2f}")
        for prec in PRECISIONS:
            a, b = rows.get(label("difflab", prec)), rows.get(label(peer, prec))
            if a and b:
                out.append(f"  same precision ({prec}): {a['train_img_s'] / b['train_img_s']:.2f}x")
    for k, r in rows.items():
        if k.split()[0] == "difflab":
            out.append(f"{k} training FLOP/s: {100 * r['train_flops_frac_fp32']:.0f}% of the float32 matmul "
                       f"(target >= 70%: {'met' if r['train_flops_frac_fp32'] >= 0.7 else 'MISSED'}), "
                       f"{100 * r['train_flops_frac']:.0f}% of its own precision's matmul")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="difflab,diffusers,lucidrains", help="comma-separated among "
                        + ", ".join(MODELS))
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated among " + ", ".join(PRECISIONS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--train-iters", type=int, default=3, help="training steps per model per round")
    parser.add_argument("--sample-iters", type=int, default=6, help="forward passes per model per round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler top ops per model")
    parser.add_argument("--out", default=str(OUT), help="folder for throughput.json / .md ('' = do not write)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad:
        parser.error(f"unknown models {bad}; valid: {', '.join(MODELS)}")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        parser.error(f"unknown precisions {bad}; valid: {', '.join(PRECISIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = [round(v, 2) for v in os.getloadavg()]

    benches = {label(n, p): Bench(n, args.batch, args.res, device, precision=p) for p in precisions for n in names}
    labels = list(benches)
    flops = {k: b.flops() for k, b in benches.items()}
    for b in benches.values():  # warm-up: allocator, oneDNN kernels
        b.train_step()
        b.train_step()
        b.sample_step()
    mem = {k: peak_memory(b.train_step, device) for k, b in benches.items()}
    matmul: dict[str, list[float]] = {p: [] for p in dict.fromkeys(["fp32", *precisions])}
    train: dict[str, list[float]] = {k: [] for k in labels}
    sample: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(args.rounds):
        for p in matmul:
            matmul[p].append(matmul_flops_per_s(device, reps=3, dtype=PRECISIONS[p]))
        order = labels if r % 2 == 0 else labels[::-1]
        for k in order:
            train[k].append(benches[k].time(benches[k].train_step, args.train_iters))
            sample[k].append(benches[k].time(benches[k].sample_step, args.sample_iters))
    mm = {p: statistics.median(v) for p, v in matmul.items()}
    rows = {}
    for k, b in benches.items():
        fwd, fwd_bwd = flops[k]
        tr, sa = statistics.median(train[k]), statistics.median(sample[k])
        own = mm[b.precision]
        rows[k] = {
            "params": b.params, "precision": b.precision, "fwd_gflop_per_img": fwd / 1e9,
            "train_gflop_per_img": fwd_bwd / 1e9, "train_img_s": tr, "sample_img_s": sa,
            "train_flops_frac": fwd_bwd * tr / own, "train_flops_frac_fp32": fwd_bwd * tr / mm["fp32"],
            "sample_flops_frac": fwd * sa / own, "peak_train_bytes": mem[k],
            "train_rounds": train[k], "sample_rounds": sample[k],
        }
    cmd = " ".join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])])
    result = {
        "what": "U-Net training / sampling throughput at matched parameters, same process",
        "command": cmd,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   + (torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"),
        "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
        "versions": versions(), "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "batch": args.batch, "res": args.res, "rounds": args.rounds,
        "matmul_n": 2048, "matmul_gflops": {p: v / 1e9 for p, v in mm.items()},
        "matmul_rounds_gflops": {p: [m / 1e9 for m in v] for p, v in matmul.items()},
        "models": rows, "targets": target_lines(rows, names), "profiles": {},
    }
    print(markdown(result), flush=True)
    if args.profile:
        result["profiles"] = {k: profile_top_ops(b, iters=2) for k, b in benches.items()}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "throughput.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "throughput.md").write_text(markdown(result))
        print(f"wrote {out / 'throughput.json'} and {out / 'throughput.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
