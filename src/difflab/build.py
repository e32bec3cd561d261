"""Config -> objects: the one place that turns a :class:`~difflab.config.Config` into a process,
a parameterisation, a network, a denoiser and a timestep sampler, and that reads a run folder back.

    build_process(cfg.diffusion)          Process.named(schedule, steps)
    build_parameterization(cfg.diffusion) Parameterization(mean_type, var_type)
    build_model(cfg)                      the network of cfg.model (a UNet), float32, on the CPU
    build_denoiser(cfg, net)              Denoiser(net, process, parameterization)
    build_timestep_sampler(cfg)           uniform or loss-second-moment over the T steps
    training_loss_type(cfg.diffusion)     the ``loss_type`` argument of :func:`difflab.losses.training_losses`
    load_run(run_dir, ema=..., checkpoint=...) -> (Config, net, Denoiser), reading only the run folder
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from difflab.config import Config, DiffusionConfig, load_config
from difflab.denoiser import Denoiser
from difflab.prediction import Parameterization
from difflab.process import Process
from difflab.timesteps import UniformSampler, create_timestep_sampler

CONFIG_NAME = "config.yaml"


def build_process(diffusion: DiffusionConfig) -> Process:
    """The forward process of ``diffusion``: its named beta schedule with ``steps`` steps (float64)."""
    return Process.named(diffusion.schedule, diffusion.steps)


def build_parameterization(diffusion: DiffusionConfig) -> Parameterization:
    """What the network predicts: ``mean_type`` and ``var_type`` of ``diffusion``."""
    return Parameterization(mean_type=diffusion.mean_type, var_type=diffusion.var_type)


def training_loss_type(diffusion: DiffusionConfig) -> str:
    """The ``loss_type`` for :func:`difflab.losses.training_losses`.

    ``hybrid`` with ``rescale_learned_sigmas`` is the official RESCALED_MSE (VLB term times T/1000);
    without it the official code uses plain MSE plus the unscaled VLB term (guided-diffusion), which
    ``training_losses`` calls ``mse`` on a learned-variance network.
    """
    if diffusion.loss_type == "hybrid" and not diffusion.rescale_learned_sigmas:
        return "mse"
    return diffusion.loss_type


def build_model(cfg: Config) -> nn.Module:
    """The network of ``cfg.model`` (float32, CPU, freshly initialised from torch's global RNG)."""
    from difflab.nn.presets import build_network

    return build_network(cfg.model)


def build_tokenizer(cfg: Config):
    """The tokenizer of a text-conditional run (``cfg.text``): ``vocab: scenes`` is the miniature vocabulary of
    the captioned MNIST scenes (:data:`difflab.data.scenes.SCENE_WORDS`), anything else a path."""
    return build_text_tokenizer(cfg.text, cfg.model.text.n_vocab, "model.text.n_vocab")


def build_text_tokenizer(text, n_vocab: int, field: str):
    """The tokenizer a :class:`~difflab.config.TextConfig` names, checked to fit an embedding of ``n_vocab``
    rows (``field`` names that setting in the error)."""
    from difflab.text import MiniatureTokenizer, load_tokenizer

    if text.vocab == "scenes":
        from difflab.data.scenes import SCENE_WORDS

        tokenizer = MiniatureTokenizer(SCENE_WORDS)
    else:
        tokenizer = load_tokenizer(text.tokenizer, text.vocab)
    if tokenizer.n_vocab > n_vocab:
        raise ValueError(f"the {text.tokenizer} tokenizer ({text.vocab}) has {tokenizer.n_vocab} ids but "
                         f"{field} is {n_vocab}: set {field} >= {tokenizer.n_vocab}")
    return tokenizer


def build_denoiser(cfg: Config, net) -> Denoiser:
    """``net`` wrapped with the process and parameterisation of ``cfg.diffusion``."""
    d = cfg.diffusion
    time_scale = 1000.0 / d.steps if d.rescale_timesteps else None
    return Denoiser(net, build_process(d), build_parameterization(d), time_scale=time_scale)


def build_timestep_sampler(cfg: Config) -> UniformSampler:
    """The training-time sampler of t named by ``cfg.diffusion.timestep_sampler``."""
    return create_timestep_sampler(cfg.diffusion.timestep_sampler, cfg.diffusion.steps)


def default_ema_rate(cfg: Config) -> float | None:
    """The EMA a run samples from by default: ``sample.ema_rate``, else the first of ``train.ema_rates``
    (None when the run keeps no average)."""
    if cfg.sample.ema_rate is not None:
        return cfg.sample.ema_rate
    return cfg.train.ema_rates[0] if cfg.train.ema_rates else None


def load_run_config(run_dir: str | os.PathLike, *, any_task: bool = False) -> Config:
    """The resolved config a run folder was trained with (``RUN/config.yaml``): a diffusion
    :class:`Config`, or with ``any_task`` the config of any training task (a noisy classifier's too)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if not (run / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run} is not a difflab run folder: {CONFIG_NAME} is missing")
    from difflab.convert import converted_run_config, is_converted_folder

    if is_converted_folder(run):  # difflab convert's layout: a released network with its README's flags
        return converted_run_config(run)
    cfg = load_config(run / CONFIG_NAME)
    if not isinstance(cfg, Config) and not any_task:
        task = getattr(cfg, "task", "?")
        if task == "classifier":
            raise ValueError(f"{run} is a noisy-classifier run (task: classifier): guide a diffusion run with it, "
                             f"e.g. difflab sample RUN --classifier {run} --classifier-scale S")
        if task == "noised_clip":
            raise ValueError(f"{run} is a noised-CLIP run (task: noised_clip): guide a text run with it, e.g. "
                             f"difflab sample RUN --prompt TEXT --clip {run} --clip-scale S")
        raise ValueError(f"{run} is a {task} run (task: {task}), not a diffusion model: it has nothing to sample "
                         "or score; its outputs are in the run folder (docs/training.md)")
    return cfg


def find_checkpoint(run_dir: str | os.PathLike, checkpoint: int | str | os.PathLike | None = None) -> Path:
    """A checkpoint directory of a run: the latest complete one (``None``), the one of a step (an int),
    or a given directory. Raises FileNotFoundError / ValueError listing what the run has."""
    from difflab.train.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints

    run = Path(run_dir)
    if checkpoint is None:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise FileNotFoundError(f"run folder {run} has no complete checkpoint (ckpt_XXXXXXX/)")
        return ckpt
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        ckpt = run / checkpoint_name(int(checkpoint))
        if not ckpt.is_dir():
            have = ", ".join(p.name for p in list_checkpoints(run)) or "none"
            raise FileNotFoundError(f"no checkpoint for step {int(checkpoint)} in {run}; it has: {have}")
        return ckpt
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt}")
    return ckpt


def load_run(
    run_dir: str | os.PathLike,
    *,
    ema: float | None = None,
    checkpoint: int | str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Config, nn.Module, Denoiser]:
    """Rebuild a trained run from its folder alone: ``(config, net in eval mode, denoiser)``.

    Args:
        run_dir: the folder ``difflab train`` wrote (``config.yaml`` + ``ckpt_XXXXXXX/``), or one ``difflab
            convert`` wrote (see :func:`difflab.convert.converted_run_config`).
        ema: load the exponential moving average at this rate (one of ``train.ema_rates``);
            ``None`` loads the raw training weights. See :func:`default_ema_rate`.
        checkpoint: ``None`` = the latest complete checkpoint, a step number, or a checkpoint folder.
        device: where to put the network.
    Raises FileNotFoundError for a missing folder or checkpoint, ValueError for a corrupt checkpoint
    file, an EMA rate the run does not have, or weights that do not fit the configured network.
    """
    from difflab.convert import is_converted_folder, load_converted
    from difflab.train.ema import ema_name

    cfg = load_run_config(run_dir)
    if is_converted_folder(run_dir):  # one set of weights, no checkpoints or EMAs
        if checkpoint is not None or ema is not None:
            raise ValueError(f"{run_dir} is a converted checkpoint with one set of weights: drop --checkpoint / --ema")
        net = load_converted(run_dir, device=device).eval()
        return cfg, net, build_denoiser(cfg, net)
    ckpt = find_checkpoint(run_dir, checkpoint)
    if ema is not None and float(ema) not in cfg.train.ema_rates:
        raise ValueError(f"the run has no EMA at rate {ema}; its rates: {list(cfg.train.ema_rates)}")
    which = "model" if ema is None else ema_name(float(ema))
    state, ckpt = _verified_weights(run_dir, ckpt, which, fallback=checkpoint is None)
    net = build_model(cfg)
    load_state_strict(net, state, where=f"{ckpt}/{which}.safetensors")
    net.to(device).eval()
    return cfg, net, build_denoiser(cfg, net)


def _verified_weights(run_dir, ckpt: Path, which: str, *, fallback: bool) -> tuple[dict, Path]:
    """The weights ``which`` of ``ckpt``, checked against its manifest's sha256. When they fail and
    ``fallback`` (the latest checkpoint was asked for), the newest older checkpoint whose file passes is
    used, with one warning naming both; otherwise the ValueError naming the bad file."""
    import warnings

    from difflab.train.checkpoint import list_checkpoints, load_weights

    try:
        return load_weights(ckpt, which, device="cpu"), ckpt
    except ValueError as first:
        if not fallback:
            raise
        for older in reversed([c for c in list_checkpoints(run_dir) if c.name < ckpt.name]):
            try:
                state = load_weights(older, which, device="cpu")
            except ValueError:
                continue
            warnings.warn(f"{first}; using the newest good checkpoint instead: {older}", stacklevel=3)
            return state, older
        raise


def official_denoiser(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Denoiser:
    """A converted released U-Net (a ``difflab convert`` folder) as a ready :class:`~difflab.denoiser.Denoiser`
    with the diffusion flags it was trained with (:func:`difflab.convert.converted_run_config`): ``Denoiser(net
    in eval mode, Process.named(schedule, T), Parameterization("eps", learned_range), time_scale=1000 / T if
    rescale_timesteps)``. (Here, not in convert: convert never imports build, so there is no import circle.)"""
    from difflab.convert import converted_run_config, load_converted

    cfg = converted_run_config(out_dir)
    return build_denoiser(cfg, load_converted(out_dir, device=device).eval())


def module_device(net) -> torch.device:
    """The device of a network's first parameter (CPU for a callable without parameters)."""
    params = getattr(net, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def load_state_strict(net: nn.Module, state: dict[str, torch.Tensor], *, where: str) -> None:
    """``net.load_state_dict(state)`` with every missing, unexpected or mis-shaped key named in a ValueError."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
        raise ValueError(f"{where} does not fit the configured network ({'; '.join(parts)})")
    net.load_state_dict(state)


def resolve_ema(cfg: Config, ema: str | float | None) -> float | None:
    """The EMA rate a command asked for: ``None`` -> :func:`default_ema_rate`, ``"model"`` -> None
    (the raw weights), a number or numeric string -> that rate (checked against ``train.ema_rates``)."""
    if ema is None:
        return default_ema_rate(cfg)
    if isinstance(ema, str) and ema.strip().lower() in ("model", "none", "raw"):
        return None
    try:
        rate = float(ema)
    except (TypeError, ValueError):
        raise ValueError(f"--ema must be an EMA rate {list(cfg.train.ema_rates)} or 'model'; got {ema!r}") from None
    if rate not in cfg.train.ema_rates:
        raise ValueError(f"the run has no EMA at rate {ema}; its rates: {list(cfg.train.ema_rates)} (or 'model')")
    return rate
