"""The training loop (improved-diffusion's ``TrainLoop``, made exactly resumable and rank-invariant).

One optimiser step (``Trainer.train_step``), for a global batch of B images over W ranks:

1. data: the step-th batch of a :class:`~difflab.train.distributed.ShardedOrder` (rank r holds the
   global positions r, r+W, ...; together the ranks hold exactly the single-process batch);
2. randomness: t (timestep sampler), eps and the label-dropout coins are drawn for the whole global
   batch from the trainer's own generators and each rank keeps its positions, so a run's numbers
   do not depend on W and a checkpoint of three generator states resumes them exactly;
3. loss: per-example ``training_losses`` times the importance weights; gradients are accumulated
   over micro-batches as the sum over the global batch / B, and averaged over ranks by DDP, so the
   gradient is that of the global-batch mean whatever W and ``microbatch`` are;
4. a non-finite loss or gradient norm stops the run (:class:`TrainingDiverged`) before the
   optimiser step and before any checkpoint of the bad state;
5. gradient clipping, AdamW with linear warm-up, the EMA update of every rate; the
   loss-second-moment sampler is updated with the per-example ``loss`` terms of the whole batch
   (the official code feeds it the same terms, per rank and micro-batch).

The run folder (rank 0 writes): ``config.yaml``, ``metrics.jsonl``, ``samples/step_XXXXXXX.png``
(from the first EMA) and ``ckpt_XXXXXXX/`` (:mod:`difflab.train.checkpoint`) with the model, every
EMA, the optimiser, and in ``state.pt`` the RNG states (torch, numpy, python and the trainer's
generators), the timestep-sampler history, the data position (batches consumed = steps) and the
log's running sums. Resuming from a checkpoint continues bit-identically on the same machine.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.build import (
    CONFIG_NAME,
    build_denoiser,
    build_model,
    build_timestep_sampler,
    default_ema_rate,
    load_state_strict,
    training_loss_type,
)
from difflab.config import Config, save_config
from difflab.data import build_dataset
from difflab.losses import training_losses
from difflab.timesteps import LossSecondMomentResampler
from difflab.train import distributed as dist_utils
from difflab.train.checkpoint import (
    TrainingState,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from difflab.train.ema import EMA
from difflab.train.metrics import METRICS_NAME, MetricsLog, truncate_metrics

GENERATORS = ("timesteps", "noise", "labels")
GRID_IMAGES = 16


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN / inf; the run stopped before using it."""


@dataclass
class TrainResult:
    """How a call to :meth:`Trainer.train` ended."""

    run_dir: Path
    step: int
    stopped: str  # "max_steps" or "max_minutes"
    seconds: float
    last_loss: float | None


def _seed_for(seed: int, name: str) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, generator name)."""
    return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """Trains ``cfg`` into ``run_dir`` (see the module docstring).

    Args:
        cfg: the resolved run config.
        run_dir: the run folder; a new run needs it empty of checkpoints, ``resume=True`` needs one.
        resume: continue from the latest complete checkpoint in ``run_dir``.
        quiet: no progress bar (it is also off when stderr is not a terminal, and on ranks > 0).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, quiet: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        tc = cfg.train
        self.info = dist_utils.init_distributed()
        self.device = self.info.device
        self.world, self.rank = self.info.world_size, self.info.rank
        self.main = self.rank == 0
        if tc.batch_size % self.world:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {self.world} processes")
        self.local_batch = tc.batch_size // self.world
        ckpt = self._check_run_dir(resume)

        _seed_everything(tc.seed)  # identical initial weights on every rank
        self.dataset = build_dataset(cfg.data, seed=tc.seed)
        self.order = dist_utils.ShardedOrder(len(self.dataset), seed=tc.seed, even="drop")
        self.order.batches_per_epoch(self.local_batch)  # a batch larger than the data is an error now
        self.net = build_model(cfg).to(self.device)
        self.model = self.net
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if tc.compile:
            self.model = torch.compile(self.model)  # shares self.net's parameters; checkpoints stay plain
        self.denoiser = build_denoiser(cfg, self.model)
        self.loss_type = training_loss_type(cfg.diffusion)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                     weight_decay=tc.weight_decay)
        self.ema = EMA(self.net, tc.ema_rates)
        self.timestep_sampler = build_timestep_sampler(cfg)
        self.generators = {
            "timesteps": torch.Generator().manual_seed(_seed_for(tc.seed, "timesteps")),
            "noise": torch.Generator(self.device).manual_seed(_seed_for(tc.seed, "noise")),
            "labels": torch.Generator().manual_seed(_seed_for(tc.seed, "labels")),
        }
        self.autocast = tc.bf16
        self.step = 0
        self.seconds = 0.0  # training wall-clock over every session of the run
        self.metrics = MetricsLog(self.run_dir / METRICS_NAME, tc.log_every, write=self.main)
        if ckpt is not None:
            self._load(ckpt)
        elif self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / METRICS_NAME).unlink(missing_ok=True)
        if self.main:
            save_config(cfg, self.run_dir / CONFIG_NAME)
        dist_utils.barrier()

    # ------------------------------------------------------------------------------------------ setup
    def _check_run_dir(self, resume: bool) -> Path | None:
        if resume:
            if not self.run_dir.is_dir():
                raise FileNotFoundError(f"run folder not found: {self.run_dir}")
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"nothing to resume: {self.run_dir} has no complete checkpoint")
            return ckpt
        if list_checkpoints(self.run_dir):
            raise ValueError(
                f"run folder {self.run_dir} already has checkpoints; resume it with --resume {self.run_dir} "
                "or choose another --out"
            )
        return None

    def _load(self, ckpt: Path) -> None:
        state = load_checkpoint(ckpt, map_location="cpu")
        load_state_strict(self.net, state.model, where=f"{ckpt}/model.safetensors")
        for rate in self.ema.rates:
            if rate not in state.ema:
                raise ValueError(f"{ckpt} has no EMA at rate {rate}; it has {sorted(state.ema)}")
            self.ema.load_state_dict(rate, state.ema[rate])
        try:
            self.opt.load_state_dict(state.optimizer)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{ckpt}/optimizer.pt does not fit the model's parameters ({e})") from None
        extra = state.extra
        self.timestep_sampler.load_state_dict(extra.get("timestep_sampler", {}))
        self.metrics.load_state_dict(extra.get("metrics", {}))
        self.seconds = float(extra.get("seconds", 0.0))
        self.step = state.step
        if int(extra.get("data_position", self.step)) != self.step:
            raise ValueError(f"{ckpt}: data position {extra['data_position']} does not match step {self.step}")
        restore_rng_state(extra["rng"], self.generators)
        if self.main:
            truncate_metrics(self.run_dir / METRICS_NAME, self.step)

    # ------------------------------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (1-based): linear warm-up to ``train.lr``."""
        tc = self.cfg.train
        return tc.lr * min(1.0, step / tc.warmup_steps) if tc.warmup_steps else tc.lr

    def _global_draws(self, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """t, weights, eps and dropout coins for the whole global batch; this rank's positions kept."""
        B, mine = self.cfg.train.batch_size, slice(self.rank, None, self.world)
        t, w = self.timestep_sampler.sample(B, generator=self.generators["timesteps"])
        g = self.generators["noise"]
        noise = torch.randn((B, *shape), generator=g, device=g.device)
        out = {"t_all": t, "t": t[mine].to(self.device), "weights": w[mine].to(self.device),
               "noise": noise[mine].to(self.device)}
        if self.cfg.data.class_cond and self.cfg.diffusion.p_uncond > 0:
            # The same Bernoulli(p_uncond) coins as guidance.drop_labels, drawn for the global batch.
            coins = torch.rand(B, generator=self.generators["labels"])
            out["drop"] = (coins < self.cfg.diffusion.p_uncond)[mine].to(self.device)
        return out

    def _model_kwargs(self, y: torch.Tensor, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.cfg.data.class_cond:
            return {}
        if "drop" in draws:  # classifier-free training: the null label num_classes (CFG Alg. 1)
            y = torch.where(draws["drop"], torch.full_like(y, self.cfg.model.num_classes), y)
        return {"y": y}

    def train_step(self) -> dict[str, float]:
        """One optimiser step (see the module docstring); returns the step's global-batch metrics."""
        tc, step = self.cfg.train, self.step + 1
        epoch, idx = self.order.batch(self.step, self.local_batch)
        x0, y = self.dataset.get_batch(idx, epoch)
        x0, y = x0.to(self.device), y.to(self.device)
        draws = self._global_draws(tuple(x0.shape[1:]))
        kwargs = self._model_kwargs(y, draws)
        self.opt.zero_grad(set_to_none=True)
        chunk = tc.microbatch or self.local_batch
        starts = list(range(0, self.local_batch, chunk))
        per_example: dict[str, list[torch.Tensor]] = {}
        for i, s in enumerate(starts):
            part = slice(s, s + chunk)
            sync = i == len(starts) - 1 or self.world == 1
            with (contextlib.nullcontext() if sync else self.model.no_sync()), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                terms = training_losses(self.denoiser, x0[part], draws["t"][part], loss_type=self.loss_type,
                                        noise=draws["noise"][part],
                                        model_kwargs={k: v[part] for k, v in kwargs.items()})
                # sum / local batch: with DDP's mean over ranks, the gradient of the global-batch mean
                loss = (terms["loss"] * draws["weights"][part]).sum() / self.local_batch
                loss.backward()
            for k, v in terms.items():
                per_example.setdefault(k, []).append(v.detach().float())
        local = {k: torch.cat(v) for k, v in per_example.items()}
        metrics = self._reduce_means(local, draws["weights"])
        self._update_timestep_sampler(draws["t_all"], local["loss"])
        if not math.isfinite(metrics["weighted_loss"]):
            raise TrainingDiverged(f"loss is {metrics['weighted_loss']} at step {step}")
        clip = tc.grad_clip if tc.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip))
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

    def _reduce_means(self, local: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, float]:
        """Global-batch means of the loss terms (and of the weighted loss that was optimised)."""
        names = sorted(local)
        sums = torch.stack([local[k].sum() for k in names] + [(local["loss"] * weights).sum()]).double()
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        means = (sums / self.cfg.train.batch_size).tolist()
        return {**dict(zip(names, means[:-1], strict=True)), "weighted_loss": means[-1]}

    def _update_timestep_sampler(self, t_all: torch.Tensor, local_loss: torch.Tensor) -> None:
        if not isinstance(self.timestep_sampler, LossSecondMomentResampler):
            return  # the uniform sampler keeps no history: no gather needed
        losses = dist_utils.all_gather_uneven(local_loss)
        # gathered rank by rank; rank r held positions r, r+W, ...: interleave back to batch order
        losses = losses.reshape(self.world, self.local_batch).t().reshape(-1)
        self.timestep_sampler.update(t_all, losses.cpu())

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, max_steps: int | None = None, max_minutes: float | None = None) -> TrainResult:
        """Train until ``max_steps`` (default ``train.max_steps``) or ``max_minutes`` of this call;
        checkpoint every ``save_every`` steps and at the end. Raises :class:`TrainingDiverged`."""
        tc = self.cfg.train
        max_steps = tc.max_steps if max_steps is None else max_steps
        check_limits(max_steps, max_minutes)
        start = time.perf_counter()
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
                if max_minutes is not None and self._out_of_time(start, max_minutes):
                    stopped = "max_minutes"
                    break
        finally:
            if bar is not None:
                bar.close()
        if self._saved_step() != self.step:
            self.save()
        dist_utils.barrier()
        return TrainResult(self.run_dir, self.step, stopped, time.perf_counter() - start, last)

    def _out_of_time(self, start: float, max_minutes: float) -> bool:
        """Rank 0's clock decides, so every rank stops after the same step."""
        flag = torch.tensor([float(time.perf_counter() - start >= 60.0 * max_minutes)])
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
        """Everything needed to resume exactly (see the module docstring)."""
        return TrainingState(
            step=self.step,
            model=self.net.state_dict(),
            ema={rate: self.ema.state_dict(rate, self.net) for rate in self.ema.rates},
            optimizer=self.opt.state_dict(),
            extra={
                "rng": capture_rng_state(self.generators),
                "timestep_sampler": self.timestep_sampler.state_dict(),
                "data_position": self.step,
                "metrics": self.metrics.state_dict(),
                "seconds": self.seconds,
                "world_size": self.world,
            },
        )

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0), keeping the last ``train.keep_last``."""
        path = None
        if self.main:
            path = save_checkpoint(self.run_dir, self.training_state(), keep_last=self.cfg.train.keep_last)
        dist_utils.barrier()
        return path

    @torch.no_grad()
    def save_sample_grid(self) -> Path | None:
        """``samples/step_XXXXXXX.png``: 16 images from the first EMA (rank 0), drawn with the run's
        sample settings and a fixed seed; training randomness is untouched."""
        if not self.main:
            return None
        from difflab.generate import draw_samples
        from difflab.images import save_grid, to_uint8

        rate = default_ema_rate(self.cfg)
        swap = self.ema.swapped_in(self.net, rate) if rate is not None else contextlib.nullcontext()
        with swap:
            self.net.eval()
            try:
                denoiser = build_denoiser(self.cfg, self.net)
                x, _ = draw_samples(denoiser, self.cfg, n=GRID_IMAGES, distributed=False, progress=False)
            finally:
                self.net.train()
        path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
        save_grid(to_uint8(x, self.cfg.data), path)
        return path


def check_limits(max_steps: int | None, max_minutes: float | None) -> None:
    """ValueError for a negative step count or a non-positive time limit."""
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0, got {max_minutes}")


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train (or resume) a run: :class:`Trainer` then :meth:`Trainer.train`."""
    check_limits(max_steps, max_minutes)  # before the run folder is touched
    return Trainer(cfg, run_dir, resume=resume, quiet=quiet).train(max_steps=max_steps, max_minutes=max_minutes)


def resolve_train_config(
    config: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    max_steps: int | None = None,
) -> tuple[Config, Path]:
    """The config and run folder of ``difflab train``.

    New run: ``config`` + ``overrides`` (+ ``train.max_steps=max_steps``), into ``out`` (default
    ``runs/<config stem>``). Resume: the run's own ``config.yaml`` (+ the same overrides; a new
    ``max_steps`` extends the run); ``config``, when given as well, must equal the run's.
    """
    from difflab.build import load_run_config
    from difflab.config import load_config, override

    extra = [*overrides, *([f"train.max_steps={max_steps}"] if max_steps is not None else [])]
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise ValueError(f"--out {out} and --resume {resume} name different run folders; give only --resume")
        run_dir = Path(resume)
        cfg = override(load_run_config(run_dir), extra)
        if config is not None and load_config(config, extra) != cfg:
            raise ValueError(f"{config} differs from {run_dir / CONFIG_NAME}; resume without CONFIG to use the run's")
        return cfg, run_dir
    if config is None:
        raise ValueError("give a CONFIG file to train (or --resume RUN)")
    cfg = load_config(config, extra)
    return cfg, Path(out) if out is not None else Path("runs") / Path(config).stem
