"""What the machine can do fast: the ``bf16: auto`` rule.

bf16 autocast pays only where the hardware multiplies bf16 natively: CUDA GPUs that support it, and
x86 CPUs with AMX-BF16 or AVX512-BF16 (Sapphire Rapids and later, Zen 4 and later). Elsewhere the CPU
kernels emulate bf16 through float32 conversions: on an AVX2-only 2-core EPYC a training step of
``configs/mnist-default.yaml`` ran at 6 img/s in bf16 against 76 in float32 (docs/results/concurrency.md),
so ``auto`` means float32 there. The rule reads ``/proc/cpuinfo`` (Linux); other systems count as "no".
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: /proc/cpuinfo flags that mean native bf16 matrix arithmetic on an x86 CPU
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether bf16 autocast is fast on ``device``, and why, in a few words for the log."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "the GPU supports bf16" if ok else "this GPU lacks bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for {device.type}"
    found = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    if found:
        return True, f"the CPU has {found[0].upper().replace('_', '-')}"
    return False, "the CPU lacks AMX-BF16 / AVX512-BF16: bf16 would be emulated, several times slower"


def resolve_bf16(setting: bool | str, device: torch.device | str) -> tuple[bool, str]:
    """``bf16: true | false | auto`` -> (use bf16 autocast, the reason to log)."""
    if setting == "auto":
        ok, why = native_bf16(device)
        return ok, f"bf16 autocast {'on' if ok else 'off'} (auto: {why})"
    return bool(setting), f"bf16 autocast {'on' if setting else 'off'} (set in the config)"
