"""Sharing the cores with other processes: difflab's intra-op thread count follows the machine's load.

libgomp's idle threads spin on their core for a while before they sleep (``GOMP_SPINCOUNT``). Alone that
is the fastest way to run (a 2-core training step of configs/mnist-default.yaml ~25% faster than with
passive waiting), but when two processes share the cores, each one's spinning threads burn the time its
own descheduled partner needs: two difflab commands on 2 cores each ran at ~0.2 of their speed alone
(docs/results/concurrency.md). One intra-op thread per process has no partner to wait for.

So the long loops (each training step, each sampling step) call :func:`share_cores`, which at most every
``CHECK_SECONDS`` reads how many *other* threads are runnable (``/proc/stat`` procs_running less this
process's running threads, the median of three reads) and sets ``torch.set_num_threads`` to the cores
left over (at least one). Alone, every core; beside one busy process on 2 cores, one each; back to every
core when the other ends, never more than torch had at the first call (so ``torch.set_num_threads(k)``
before it caps the count at k). ``OMP_NUM_THREADS`` in the environment fixes the count: nothing changes
then, nor anywhere but Linux.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CHECK_SECONDS = 2.0

_state = {"next": 0.0, "cores": None}


def _procs_running() -> int | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _own_running() -> int:
    n = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].startswith("R"):
            n += 1
    return n


def others_running() -> int | None:
    """Runnable threads of other processes now (median of three reads), or None off Linux."""
    counts = []
    for _ in range(3):
        total = _procs_running()
        if total is None:
            return None
        counts.append(max(0, total - _own_running()))
    return sorted(counts)[1]


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_cores(now: float | None = None) -> int | None:
    """Fit the intra-op thread count to the cores other processes leave free (see the module docstring);
    returns the count set, or None when nothing was checked or changed."""
    now = time.monotonic() if now is None else now
    if now < _state["next"]:
        return None
    _state["next"] = now + CHECK_SECONDS
    if _state["cores"] is None:  # first call: the most threads to use, unless the user fixed the count
        fixed = "OMP_NUM_THREADS" in os.environ
        _state["cores"] = 0 if fixed else min(torch.get_num_threads(), _usable_cores())
    cores = _state["cores"]
    if not cores:
        return None
    busy = others_running()
    if busy is None:
        return None
    want = max(1, cores - busy)
    if want != torch.get_num_threads():
        torch.set_num_threads(want)
        return want
    return None
