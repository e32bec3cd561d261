"""What a task tells the one training loop (:class:`difflab.train.trainer.Trainer`).

A task says what is trained and how it is scored; it never owns a loop. The loop owns everything
else: data order and sharding, the optimiser and warm-up, micro-batches, bf16 autocast, DDP / FSDP,
clipping, EMAs, the NaN stop, checkpoints and exact resume, the JSONL log, the progress bar and
the step and time limits.

One optimiser step, for a global batch of B examples over W ranks (rank r holds the global
positions r, r+W, ...):

1. ``batch = source.batch(step)``: this rank's part, a dict (``x0`` [b, ...], ``y``, ``caption``, ...);
2. ``draws = task.draws(B, batch, generators)``: the step's randomness for the *whole global batch*
   (every tensor [B, ...]) from the task's own generators, of which each rank keeps its positions,
   so a run's numbers do not depend on W (``weights`` [B], when present, multiplies the loss:
   importance sampling);
3. ``terms = task.losses(model, batch_part, draws_part)``: per-example terms [n], ``loss`` among
   them (the one optimised); every term's global-batch mean is logged;
4. ``task.after_step(draws, terms)``: task state that learns from the step (the loss-aware timestep
   sampler), with the rank's per-example terms of the whole local batch.

Checkpoints hold ``task.state_dict()``; the run folder may hold what ``task.sample_grid`` and
``task.finish`` write (a sample grid; an exported classifier and its accuracy table).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from difflab.data.sources import BatchSource, build_source

if TYPE_CHECKING:
    from difflab.train.trainer import Trainer

Tensor = torch.Tensor


class Task:
    """The base task: override :meth:`build_model`, :meth:`draws` and :meth:`losses` (see the module docstring).

    Attributes:
        cfg: the run config (it has at least ``data`` and ``train`` sections).
        generator_names: the task's random generators; the loop seeds one per name from
            ``(train.seed, name)``, keeps it on the training device for names in ``device_generators``,
            and checkpoints its state.
        log_terms: the per-step metrics written to metrics.jsonl (means over each ``log_every`` window).
    """

    generator_names: tuple[str, ...] = ()
    device_generators: tuple[str, ...] = ()
    log_terms: tuple[str, ...] = ("loss", "grad_norm")

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # ----------------------------------------------------------------------------------- what is trained
    def build_model(self) -> nn.Module:
        """The freshly initialised network (float32, CPU, from torch's global RNG, seeded by the loop)."""
        raise NotImplementedError

    def build_source(self, *, rank: int, world: int, local_batch: int) -> BatchSource:
        """The data: by default :func:`difflab.data.build_source` of ``cfg.data`` (a task checks here
        that the data fits it, before the run folder is touched)."""
        return build_source(self.cfg.data, seed=self.cfg.train.seed, rank=rank, world=world, local_batch=local_batch)

    # ----------------------------------------------------------------------------------- one step
    def draws(self, batch_size: int, batch: dict[str, Any], generators: dict[str, torch.Generator]
              ) -> dict[str, Tensor]:
        """The step's randomness for the global batch: every tensor [batch_size, ...] (see the module docstring)."""
        return {}

    def losses(self, model: nn.Module, batch: dict[str, Any], draws: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-example terms [n] of a (micro-)batch, ``loss`` among them."""
        raise NotImplementedError

    def after_step(self, draws: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
        """Learn from the step (``draws``: global; ``terms``: this rank's whole local batch)."""

    # ----------------------------------------------------------------------------------- state and outputs
    def state_dict(self) -> dict[str, Any]:
        """Task state for the checkpoint (weights-only safe)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    has_grid = False  # writes a picture every train.sample_every steps (sample_grid)
    has_finish = False  # writes final outputs at the end of each train() call (finish)

    def grid_ema_rate(self) -> float | None:
        """The weights :meth:`sample_grid` is given: an EMA rate, or None for the trained weights."""
        return None

    def sample_grid(self, trainer: Trainer, net: nn.Module) -> Path | None:
        """Write a picture of ``net`` (a plain copy of the network in eval mode; rank 0)."""
        return None

    def finish_ema_rate(self) -> float | None:
        """The weights :meth:`finish` is given: an EMA rate, or None for the trained weights."""
        return None

    def finish(self, trainer: Trainer, net: nn.Module) -> None:
        """After the last checkpoint of a :meth:`Trainer.train` call (rank 0; ``net`` as for sample_grid)."""


def rank_part(value: Any, rank: int, world: int) -> Any:
    """This rank's positions r, r+W, ... of a global-batch tensor (other values unchanged)."""
    return value[rank::world] if isinstance(value, Tensor) and world > 1 else value


def chunk(value: Any, part: slice) -> Any:
    """A micro-batch of a batch value (tensor or list); other values unchanged."""
    return value[part] if isinstance(value, (Tensor, list, tuple)) else value
