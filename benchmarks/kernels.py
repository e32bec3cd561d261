"""Per-op timings of the throughput U-Net's layers on the CPU: what each candidate kernel would save.

Shapes are read off benchmarks/throughput.py's difflab model (forward hooks on one batch-32 forward), and
each candidate is timed forward + backward on every shape, min over ``--repeats`` x ``--calls`` calls, then
summed with the shape's count in the network (ms per training step):

* ``pointwise``: the 1x1 convolutions through oneDNN (``nn.Conv1d`` / ``nn.Conv2d``) against
  :func:`difflab.nn.layers.pointwise_conv` (one batched matmul, the library's CPU path);
* ``wgrad``: the 3x3 convolutions' weight gradient, oneDNN's ``convolution_backward`` against an im2col
  ``[O, N*H*W] @ [N*H*W, 9C]`` GEMM (a candidate that lost: kept here so the finding can be re-checked);
* ``gn_silu`` (with ``--compile``): GroupNorm + SiLU eager against the pair compiled by inductor into
  fused loops (tens of seconds of compilation per shape).

The numbers are indicative per-op costs (docs/results/speed.md); the end-to-end effect of a path is measured
by benchmarks/fast_paths.py. Run it alone on the machine:

    python benchmarks/kernels.py --threads 2 [--compile] [--out docs/results/kernels.md]
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.nn.layers import GroupNorm32, pointwise_conv
from throughput import difflab_model


def layer_shapes(batch: int = 32, res: int = 32) -> dict[str, collections.Counter]:
    """{"pointwise" / "conv3x3" / "group_norm": Counter of (input shape, out channels or groups, stride)}."""
    net = difflab_model()[0]
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def hook(module, inputs, _output):
        shape = tuple(inputs[0].shape)
        if isinstance(module, GroupNorm32):
            found["group_norm"][(shape, module.num_groups, 1)] += 1
        elif module.kernel_size in ((1,), (1, 1)):
            found["pointwise"][(shape, module.out_channels, 1)] += 1
        elif module.kernel_size == (3, 3):
            found["conv3x3"][(shape, module.out_channels, module.stride[0])] += 1

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, GroupNorm32)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.randn(batch, 1, res, res), torch.zeros(batch, dtype=torch.long))
    return found


def best_ms(fn: Callable[[], object], calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return min(times)


def im2col_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """dW of a 3x3, padding-1 convolution as one GEMM over an im2col copy: [O, N*H'*W'] @ [N*H'*W', 9C]."""
    n, c = x.shape[:2]
    o, h, w = grad_out.shape[1:]
    xp = F.pad(x, (1, 1, 1, 1))
    s_n, s_c, s_h, s_w = xp.stride()
    cols = xp.as_strided((c, 3, 3, n, h, w), (s_c, s_h, s_w, s_n, s_h * stride, s_w * stride))
    return torch.mm(grad_out.transpose(0, 1).reshape(o, -1), cols.reshape(c * 9, -1).t()).view(o, c, 3, 3)


def time_pointwise(shape: tuple, out_ch: int, _stride: int, calls: int, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    weight = torch.randn(out_ch, shape[1], *([1] * (len(shape) - 2)), generator=g).requires_grad_(True)
    bias = torch.zeros(out_ch, requires_grad=True)
    conv = F.conv1d if len(shape) == 3 else F.conv2d
    grad = torch.randn(shape[0], out_ch, *shape[2:], generator=g)
    return (best_ms(lambda: conv(x, weight, bias).backward(grad), calls, repeats),
            best_ms(lambda: pointwise_conv(x, weight, bias).backward(grad), calls, repeats))


def time_wgrad(shape: tuple, out_ch: int, stride: int, calls: int, repeats: int) -> tuple[float, float]:
    op = torch.ops.aten.convolution_backward
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(out_ch, shape[1], 3, 3, generator=g)
    grad = torch.randn(shape[0], out_ch, (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1, generator=g)
    args = ([out_ch], [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
    ref = op(grad, x, weight, *args)[1]
    err = ((im2col_weight_grad(grad, x, stride) - ref).abs().max() / ref.abs().max()).item()
    if err > 1e-5:
        raise AssertionError(f"im2col weight gradient differs from oneDNN's by {err:.1e} at {shape}")
    return (best_ms(lambda: op(grad, x, weight, *args), calls, repeats),
            best_ms(lambda: im2col_weight_grad(grad, x, stride), calls, repeats))


def gn_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    return F.silu(F.group_norm(x, groups, w, b, 1e-5))


def time_gn_silu(shape: tuple, groups: int, _stride: int, calls: int, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    w, b = torch.ones(shape[1], requires_grad=True), torch.zeros(shape[1], requires_grad=True)
    grad = torch.randn(shape, generator=g)
    fused = torch.compile(gn_silu, dynamic=False)
    return (best_ms(lambda: gn_silu(x, w, b, groups).backward(grad), calls, repeats),
            best_ms(lambda: fused(x, w, b, groups).backward(grad), calls, repeats))


SECTIONS = {
    "pointwise": ("pointwise", "1x1 convolutions, forward + backward", "oneDNN conv", "batched matmul",
                  time_pointwise),
    "wgrad": ("conv3x3", "3x3 convolutions' weight gradient", "oneDNN", "im2col GEMM", time_wgrad),
    "gn_silu": ("group_norm", "GroupNorm + SiLU, forward + backward", "eager", "inductor-fused", time_gn_silu),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the inductor-fused GroupNorm + SiLU")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = layer_shapes()
    lines = [f"# Per-op timings of the throughput U-Net ({torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, ms per call, min of {args.repeats} x {args.calls})"]
    for key in ("pointwise", "wgrad") + (("gn_silu",) if args.compile else ()):
        kind, title, base, cand, timer = SECTIONS[key]
        lines += ["", f"## {title}", "", f"| input | out / groups | count | {base} | {cand} | ratio |",
                  "|---|---|---|---|---|---|"]
        total = [0.0, 0.0]
        for (shape, out, stride), count in shapes[kind].items():
            if kind == "conv3x3" and shape[1] == 1:  # the input layer: no weight gradient worth timing
                continue
            a, b = timer(shape, out, stride, args.calls, args.repeats)
            out_text = f"{out}, stride {stride}" if stride > 1 else f"{out}"
            lines.append(f"| {list(shape)} | {out_text} | {count} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
            total[0] += a * count
            total[1] += b * count
        lines.append(f"| **per training step** | | | **{total[0]:.0f}** | **{total[1]:.0f}** | "
                     f"**{total[0] / total[1]:.2f}x** |")
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
