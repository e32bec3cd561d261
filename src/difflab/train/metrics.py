"""The run's metrics log: ``metrics.jsonl``, one JSON object per ``log_every`` steps.

Each line holds the means over the steps since the previous line: ``loss``, ``mse`` and ``vb`` (the
per-example terms of :func:`difflab.losses.training_losses`, averaged over the global batch, as the
official ``log_loss_dict``), ``grad_norm`` (before clipping), the learning rate at the last step and
the throughput ``img/s`` over the interval. The running sums are part of the checkpoint, so a
resumed run writes exactly the lines an uninterrupted run would have written (``img/s`` aside).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from difflab.fileio import atomic_write_text

METRICS_NAME = "metrics.jsonl"
_TERMS = ("loss", "mse", "vb", "grad_norm")


class MetricsLog:
    """Running means of the step metrics, flushed as a JSON line every ``log_every`` steps."""

    def __init__(self, path: str | os.PathLike, log_every: int, *, write: bool = True,
                 terms: tuple[str, ...] = _TERMS) -> None:
        self.terms = terms
        self.path = Path(path)
        self.log_every = log_every
        self.write = write
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self._t0 = time.perf_counter()
        self.last: dict[str, float] = {}

    def add(self, step: int, metrics: dict[str, float], images: int, lr: float) -> dict | None:
        """Record one optimiser step; at a multiple of ``log_every`` append (and return) the line."""
        for k in self.terms:
            if k in metrics:
                self.sums[k] = self.sums.get(k, 0.0) + float(metrics[k])
        self.count += 1
        self.images += images
        if step % self.log_every:
            return None
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        line = {"step": step, **{k: v / self.count for k, v in self.sums.items()}, "lr": lr,
                "img/s": self.images / seconds}
        if self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        self.last = line
        self.sums, self.count, self.images = {}, 0, 0
        self._t0 = time.perf_counter()
        return line

    def state_dict(self) -> dict:
        """The running sums (weights-only safe), for the checkpoint."""
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))
        self.images = 0
        self._t0 = time.perf_counter()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete line of a metrics log (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            out.append(row)
    return out


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only the lines up to ``step`` (resume: the lines a killed run wrote after its last
    checkpoint are written again by the resumed run). Rewritten atomically."""
    path = Path(path)
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
