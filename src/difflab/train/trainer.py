"""The one training loop, for every kind of model (improved-diffusion's ``TrainLoop``, made exactly
resumable and rank-invariant). A task (:mod:`difflab.train.tasks`) says what is trained and what its
loss is; this loop owns the rest.

One optimiser step (``Trainer.train_step``), for a global batch of B examples over W ranks:

1. data: ``source.batch(step)`` (:mod:`difflab.data.sources`): rank r holds the global positions
   r, r+W, ... (together the ranks hold exactly the single-process batch);
2. randomness: the task draws it for the whole global batch from its own generators (seeded from
   ``(train.seed, name)``) and each rank keeps its positions, so a run's numbers do not depend on W
   and a checkpoint of the generator states resumes them exactly;
3. loss: the task's per-example ``loss`` times its importance ``weights`` (if any); gradients are
   accumulated over micro-batches as the sum over the global batch / B, and averaged over ranks by
   DDP (or reduce-scattered by FSDP), so the gradient is that of the global-batch mean whatever W and
   ``microbatch`` are;
4. a non-finite loss or gradient norm stops the run (:class:`TrainingDiverged`) before the
   optimiser step and before any checkpoint of the bad state;
5. gradient clipping, AdamW (PyTorch's fused kernel) with linear warm-up (then constant, or cosine to
   0: ``train.lr_schedule``), the EMA update of every rate, then the task's ``after_step`` (the
   loss-aware timestep sampler learns from the batch's terms).

The run folder (rank 0 writes): ``config.yaml``, ``metrics.jsonl`` (the task's ``log_terms``), what
the task writes (``samples/step_XXXXXXX.png``; a classifier's exported weights) and
``ckpt_XXXXXXX/`` (:mod:`difflab.train.checkpoint`) with the model, every EMA, the optimiser, and in
``state.pt`` the RNG states (torch, numpy, python and the task's generators), the task's state, the
data position (batches consumed = steps) and the log's running sums. Under ``train.parallel: fsdp``
each rank writes its shards of the weights and optimiser (:mod:`difflab.train.fsdp`). Resuming from
a checkpoint continues bit-identically on the same machine.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from difflab.build import CONFIG_NAME, load_state_strict
from difflab.config import save_config
from difflab.fileio import require_new_folder
from difflab.hardware import resolve_bf16
from difflab.threads import share_cores
from difflab.train import distributed as dist_utils
from difflab.train import fsdp
from difflab.train.checkpoint import (
    TrainingState,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from difflab.train.ema import EMA
from difflab.train.metrics import METRICS_NAME, MetricsLog, truncate_metrics
from difflab.train.tasks import Task, make_task
from difflab.train.tasks.base import chunk, rank_part


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN / inf; the run stopped before using it."""


@dataclass
class TrainResult:
    """How a call to :meth:`Trainer.train` ended."""

    run_dir: Path
    step: int
    stopped: str  # "max_steps", "max_minutes" or "max_cpu_minutes"
    seconds: float
    last_loss: float | None


def _seed_for(seed: int, name: str) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, generator name)."""
    return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class Trainer:
    """Trains ``cfg`` into ``run_dir`` (see the module docstring).

    Args:
        cfg: the resolved run config (a diffusion :class:`~difflab.config.Config`, a
            :class:`~difflab.config.ClassifierRunConfig`, ...: :func:`difflab.train.tasks.make_task`).
        run_dir: the run folder; a new run needs it empty of checkpoints, ``resume=True`` needs one.
        resume: continue from the latest complete checkpoint in ``run_dir``.
        quiet: no progress bar (it is also off when stderr is not a terminal, and on ranks > 0).
        task: the task (default: the one ``cfg`` names).
    """

    def __init__(self, cfg, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                 task: Task | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        tc = cfg.train
        self.task = task if task is not None else make_task(cfg)
        self.info = dist_utils.init_distributed()
        self.device = self.info.device
        self.world, self.rank = self.info.world_size, self.info.rank
        self.main = self.rank == 0
        if tc.batch_size % self.world:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {self.world} processes")
        self.local_batch = tc.batch_size // self.world
        ckpt = self._check_run_dir(resume)
        dist_utils.barrier()  # every rank has looked at the folder before rank 0 writes into it

        _seed_everything(tc.seed)  # identical initial weights on every rank
        self.source = self.task.build_source(rank=self.rank, world=self.world, local_batch=self.local_batch)
        self.net = self.task.build_model().to(self.device)
        self.sharded = tc.parallel == "fsdp" and self.world > 1
        self.model = self._parallel(self.net)
        if tc.compile:
            self.model = torch.compile(self.model)  # shares self.net's parameters; checkpoints stay plain
        # PyTorch's fused AdamW kernel: the update of torch.optim.AdamW in one pass over all parameters (the MNIST
        # default's whole training loop 1.09x faster on the CPU than with the per-tensor loop,
        # benchmarks/trainer_step.py; equal to float rounding, tests/train/test_trainer_optimizer.py). FSDP's
        # sharded (DTensor) parameters keep the default implementation.
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                     weight_decay=tc.weight_decay,
                                     fused=True if self.device.type in ("cpu", "cuda") and not self.sharded else None)
        self.ema = EMA(self.net, tc.ema_rates)
        self.generators = {
            name: torch.Generator(self.device if name in self.task.device_generators else "cpu").manual_seed(
                _seed_for(tc.seed, name))
            for name in self.task.generator_names
        }
        self.autocast, self.precision_note = resolve_bf16(tc.bf16, self.device)
        self.step = 0
        self.seconds = 0.0  # training wall-clock over every session of the run
        self.report: Any = None  # what the task's finish() reports (a classifier's accuracy table)
        self.metrics = MetricsLog(self.run_dir / METRICS_NAME, tc.log_every, write=self.main,
                                  terms=self.task.log_terms)
        if ckpt is not None:
            self._load(ckpt)
        elif self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / METRICS_NAME).unlink(missing_ok=True)
        if self.main:
            save_config(cfg, self.run_dir / CONFIG_NAME)
        dist_utils.barrier()

    # ------------------------------------------------------------------------------------------ setup
    def _parallel(self, net: nn.Module) -> nn.Module:
        """The module the steps call: the network itself, under DDP, or sharded in place by FSDP2."""
        if self.world == 1:
            return net
        if self.sharded:
            return fsdp.shard_model(net)
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _check_run_dir(self, resume: bool) -> Path | None:
        if resume:
            if not self.run_dir.is_dir():
                raise FileNotFoundError(f"run folder not found: {self.run_dir}")
            ckpt = latest_checkpoint(self.run_dir)
            # killed before its first checkpoint (a config and no ckpt_ folder at all): the run starts again
            # from step 0 with its saved config; unusable checkpoints are never written over
            started = (self.run_dir / CONFIG_NAME).is_file() and not any(
                p.is_dir() and p.name.startswith("ckpt_") for p in self.run_dir.iterdir())
            if ckpt is None and not started:
                raise FileNotFoundError(f"nothing to resume: {self.run_dir} has no complete checkpoint")
            return ckpt
        if list_checkpoints(self.run_dir) or (self.run_dir / CONFIG_NAME).is_file():
            raise ValueError(
                f"run folder {self.run_dir} already holds a run; resume it with --resume {self.run_dir} "
                "or choose another --out"
            )
        require_new_folder(self.run_dir, "run folder")  # anything else in it is not this command's to write over
        return None

    def _load(self, ckpt: Path) -> None:
        state = load_checkpoint(ckpt, map_location="cpu", rank=self.rank if self.sharded else None)
        if self.sharded:
            self._load_local(state, ckpt)
        else:
            load_state_strict(self.net, state.model, where=f"{ckpt}/model.safetensors")
            try:
                self.opt.load_state_dict(state.optimizer)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{ckpt}/optimizer.pt does not fit the model's parameters ({e})") from None
        for rate in self.ema.rates:
            if rate not in state.ema:
                raise ValueError(f"{ckpt} has no EMA at rate {rate}; it has {sorted(state.ema)}")
            self.ema.load_state_dict(rate, state.ema[rate])
        extra = state.extra
        if int(extra.get("world_size", self.world)) != self.world and self.sharded:
            raise ValueError(f"{ckpt} was written by {extra['world_size']} FSDP ranks; resume it on as many")
        self.task.load_state_dict(extra.get("task", {"timestep_sampler": extra.get("timestep_sampler", {})}))
        self.metrics.load_state_dict(extra.get("metrics", {}))
        self.seconds = float(extra.get("seconds", 0.0))
        self.step = state.step
        if int(extra.get("data_position", self.step)) != self.step:
            raise ValueError(f"{ckpt}: data position {extra['data_position']} does not match step {self.step}")
        restore_rng_state(extra["rng"], self.generators)
        if self.main:
            truncate_metrics(self.run_dir / METRICS_NAME, self.step)

    def _load_local(self, state: TrainingState, ckpt: Path) -> None:
        """This rank's shards of a sharded checkpoint into the FSDP-sharded network and optimiser."""
        where = f"{ckpt}/{fsdp.shard_name('model', self.rank, self.world)}"
        own = self.net.state_dict()
        if set(own) != set(state.model):
            raise ValueError(f"{where} does not fit the model (keys differ)")
        try:
            for name, value in own.items():
                fsdp.copy_local_(value, state.model[name])
            fsdp.restore_optimizer_state(self.opt, state.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{where} does not fit the model ({e})") from None

    # ------------------------------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (1-based): linear warm-up to ``train.lr`` over
        ``warmup_steps``, then constant, or with ``lr_schedule: cosine`` a half cosine from ``train.lr``
        to 0 at ``train.max_steps`` (0 after it)."""
        tc = self.cfg.train
        lr = tc.lr * min(1.0, step / tc.warmup_steps) if tc.warmup_steps else tc.lr
        if tc.lr_schedule == "cosine" and step > tc.warmup_steps:
            progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
            lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return lr

    def _sync_context(self, sync: bool):
        """No gradient all-reduce / reduce-scatter on micro-batches before the last (accumulation)."""
        if sync or self.world == 1:
            return contextlib.nullcontext()
        if self.sharded:
            @contextlib.contextmanager
            def no_sync():
                self.net.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.net.set_requires_gradient_sync(True)
            return no_sync()
        return self.model.no_sync()

    def train_step(self) -> dict[str, float]:
        """One optimiser step (see the module docstring); returns the step's global-batch metrics."""
        tc, step = self.cfg.train, self.step + 1
        share_cores()
        batch = {k: _to(v, self.device) for k, v in self.source.batch(self.step).items()}
        draws_all = self.task.draws(tc.batch_size, batch, self.generators)
        draws = {k: _to(rank_part(v, self.rank, self.world), self.device) for k, v in draws_all.items()}
        weights = draws.get("weights")
        self.opt.zero_grad(set_to_none=True)
        size = tc.microbatch or self.local_batch
        starts = list(range(0, self.local_batch, size))
        per_example: dict[str, list[torch.Tensor]] = {}
        for i, s in enumerate(starts):
            part = slice(s, s + size)
            with self._sync_context(i == len(starts) - 1), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                terms = self.task.losses(self.model, {k: chunk(v, part) for k, v in batch.items()},
                                         {k: chunk(v, part) for k, v in draws.items()})
                loss = terms["loss"] if weights is None else terms["loss"] * weights[part]
                # sum / local batch: with the mean over ranks, the gradient of the global-batch mean
                (loss.sum() / self.local_batch).backward()
            for k, v in terms.items():
                per_example.setdefault(k, []).append(v.detach().float())
        local = {k: torch.cat(v) for k, v in per_example.items()}
        metrics = self._reduce_means(local, weights)
        self.task.after_step(draws_all, local)
        if not math.isfinite(metrics["weighted_loss"]):
            raise TrainingDiverged(f"loss is {metrics['weighted_loss']} at step {step}")
        clip = tc.grad_clip if tc.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        grad_norm = float(grad_norm.full_tensor() if fsdp.is_sharded(grad_norm) else grad_norm)
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step}")
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.ema.update(self.net)
        self.step = step
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = lr
        return metrics

    def _reduce_means(self, local: dict[str, torch.Tensor], weights: torch.Tensor | None) -> dict[str, float]:
        """Global-batch means of the per-example terms (and of the weighted loss that was optimised)."""
        names = sorted(local)
        weighted = local["loss"] if weights is None else local["loss"] * weights
        sums = torch.stack([local[k].sum() for k in names] + [weighted.sum()]).double()
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        means = (sums / self.cfg.train.batch_size).tolist()
        return {**dict(zip(names, means[:-1], strict=True)), "weighted_loss": means[-1]}

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, max_steps: int | None = None, max_minutes: float | None = None,
              max_cpu_minutes: float | None = None) -> TrainResult:
        """Train until ``max_steps`` (default ``train.max_steps``), ``max_minutes`` of this call or
        ``max_cpu_minutes`` of this process's CPU time in this call (``time.process_time``: all its threads;
        an equal-compute budget that other work on the machine does not shrink); checkpoint every
        ``save_every`` steps and at the end, then let the task write its final outputs.
        Raises :class:`TrainingDiverged`."""
        tc = self.cfg.train
        max_steps = tc.max_steps if max_steps is None else max_steps
        check_limits(max_steps, max_minutes, max_cpu_minutes)
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.main and not self.quiet and self.step < max_steps:
            print(f"difflab: {self.precision_note}", file=sys.stderr, flush=True)
        bar = self._progress_bar(max_steps)
        stopped, last = "max_steps", None
        self.net.train()
        try:
            while self.step < max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                self.seconds += time.perf_counter() - t0
                last = metrics["loss"]
                self.metrics.add(self.step, metrics, tc.batch_size, metrics["lr"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last:.4f}", refresh=False)
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.save_sample_grid()
                if self.step % tc.save_every == 0:
                    self.save()
                if max_minutes is not None and self._out_of_time(time.perf_counter() - start, max_minutes):
                    stopped = "max_minutes"
                    break
                if max_cpu_minutes is not None and self._out_of_time(time.process_time() - cpu_start,
                                                                     max_cpu_minutes):
                    stopped = "max_cpu_minutes"
                    break
        finally:
            if bar is not None:
                bar.close()
        if self._saved_step() != self.step:
            self.save()
        self.finish()
        dist_utils.barrier()
        return TrainResult(self.run_dir, self.step, stopped, time.perf_counter() - start, last)

    def _out_of_time(self, elapsed: float, max_minutes: float) -> bool:
        """Rank 0's clock decides, so every rank stops after the same step."""
        flag = torch.tensor([float(elapsed >= 60.0 * max_minutes)])
        if self.world > 1:
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def _progress_bar(self, max_steps: int):
        if self.quiet or not self.main or not sys.stderr.isatty() or self.step >= max_steps:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _saved_step(self) -> int | None:
        ckpt = latest_checkpoint(self.run_dir) if self.main else None
        flag = torch.tensor([-1 if ckpt is None else int(ckpt.name.split("_")[1])])
        if self.world > 1:
            torch.distributed.broadcast(flag, src=0)
        value = int(flag.item())
        return None if value < 0 else value

    # ------------------------------------------------------------------------------------------ outputs
    def training_state(self) -> TrainingState:
        """Everything needed to resume exactly (see the module docstring); this rank's shards under FSDP."""
        return TrainingState(
            step=self.step,
            model=self.net.state_dict(),
            ema={rate: self.ema.state_dict(rate, self.net) for rate in self.ema.rates},
            optimizer=fsdp.local_optimizer_state(self.opt) if self.sharded else self.opt.state_dict(),
            extra={
                "rng": capture_rng_state(self.generators),
                "task": self.task.state_dict(),
                "data_position": self.step,
                "metrics": self.metrics.state_dict(),
                "seconds": self.seconds,
                "world_size": self.world,
            },
        )

    def save(self) -> Path | None:
        """Write a checkpoint of the current step, keeping the last ``train.keep_last``: rank 0 alone,
        or every rank its shards under FSDP."""
        keep = self.cfg.train.keep_last
        if self.sharded:
            from difflab.train.ema import ema_name

            state = self.training_state()
            model, sharded = fsdp.local_state(state.model)
            names = {"model": sharded}
            ema = {}
            for rate, sd in state.ema.items():
                ema[rate], names[ema_name(rate)] = fsdp.local_state(sd)
            local = TrainingState(step=state.step, model=model, ema=ema, optimizer=state.optimizer,
                                  extra=state.extra)
            return save_sharded_checkpoint(self.run_dir, local, rank=self.rank, world=self.world, sharded=names,
                                           barrier=dist_utils.barrier, keep_last=keep)
        path = None
        if self.main:
            path = save_checkpoint(self.run_dir, self.training_state(), keep_last=keep)
        dist_utils.barrier()
        return path

    def snapshot(self, ema_rate: float | None) -> nn.Module | None:
        """A plain copy of the network in eval mode with the weights of ``ema_rate`` (None = the
        trained weights), on rank 0 (None elsewhere). A collective under FSDP: every rank calls it.
        The global RNG is untouched, so training randomness does not depend on snapshots."""
        state = self.net.state_dict() if ema_rate is None else self.ema.state_dict(ema_rate, self.net)
        state = fsdp.full_state(state) if self.sharded else state
        if not self.main:
            return None
        with torch.random.fork_rng(devices=[]):
            net = self.task.build_model()
        load_state_strict(net, {k: v.detach() for k, v in state.items()}, where="the training weights")
        return net.to(self.device).eval()

    @torch.no_grad()
    def save_sample_grid(self) -> Path | None:
        """The task's picture of the model now (a diffusion run: ``samples/step_XXXXXXX.png`` from the
        first EMA); rank 0 writes it."""
        rate = self.task.grid_ema_rate()
        if not self.task.has_grid:
            return None
        net = self.snapshot(rate)
        path = self.task.sample_grid(self, net) if self.main else None
        dist_utils.barrier()
        return path

    def finish(self) -> None:
        """The task's final outputs of this call (a classifier's exported weights and accuracy table)."""
        if not self.task.has_finish:
            return
        net = self.snapshot(self.task.finish_ema_rate())
        if self.main:
            self.task.finish(self, net)
        dist_utils.barrier()


def check_limits(max_steps: int | None, max_minutes: float | None, max_cpu_minutes: float | None = None) -> None:
    """ValueError for a negative step count or a non-positive time limit."""
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    for name, value in (("max_minutes", max_minutes), ("max_cpu_minutes", max_cpu_minutes)):
        if value is not None and not value > 0:  # also refuses NaN
            raise ValueError(f"{name} must be > 0, got {value}")


def train(
    cfg,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    max_cpu_minutes: float | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train (or resume) a run: :class:`Trainer` then :meth:`Trainer.train`."""
    check_limits(max_steps, max_minutes, max_cpu_minutes)  # before the run folder is touched
    return Trainer(cfg, run_dir, resume=resume, quiet=quiet).train(max_steps=max_steps, max_minutes=max_minutes,
                                                                   max_cpu_minutes=max_cpu_minutes)


def resolve_train_config(
    config: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    max_steps: int | None = None,
) -> tuple[Any, Path]:
    """The config and run folder of ``difflab train``.

    New run: ``config`` + ``overrides`` (+ ``train.max_steps=max_steps``), into ``out`` (default
    ``runs/<config stem>``). Resume: the run's own ``config.yaml`` (+ the same overrides; a new
    ``max_steps`` extends the run); ``config``, when given as well, must equal the run's.
    """
    from difflab.build import load_run_config
    from difflab.config import check_resume_changes, load_config, override

    extra = [*overrides, *([f"train.max_steps={max_steps}"] if max_steps is not None else [])]
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise ValueError(f"--out {out} and --resume {resume} name different run folders; give only --resume")
        run_dir = Path(resume)
        saved = load_run_config(run_dir, any_task=True)
        cfg = override(saved, extra)
        check_resume_changes(saved, cfg, extra)
        if config is not None and load_config(config, extra) != cfg:
            raise ValueError(f"{config} differs from {run_dir / CONFIG_NAME}; resume without CONFIG to use the run's")
        return cfg, run_dir
    if config is None:
        raise ValueError("give a CONFIG file to train (or --resume RUN)")
    cfg = load_config(config, extra)
    run = getattr(getattr(cfg, "clip", None), "run", None)
    if isinstance(run, str) and not Path(run).is_absolute():  # an unCLIP prior / decoder: its CLIP, from anywhere
        import dataclasses

        cfg = dataclasses.replace(cfg, clip=dataclasses.replace(cfg.clip, run=str(Path(run).resolve())))
    return cfg, Path(out) if out is not None else Path("runs") / Path(config).stem
