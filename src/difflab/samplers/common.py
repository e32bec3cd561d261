"""What every sampler shares: the initial state, the reverse-time loop and its callback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflab.denoiser import Denoiser
from difflab.threads import share_cores

Tensor = torch.Tensor
StepFn = Callable[[Tensor, Tensor], dict[str, Tensor]]


def initial_state(x_T: Tensor | Sequence[int], generator: torch.Generator | None, device=None) -> Tensor:
    """x_T itself, or a standard normal draw of the given shape (float32) from ``generator``."""
    if isinstance(x_T, Tensor):
        return x_T
    shape = tuple(int(s) for s in x_T)
    if len(shape) < 2:
        raise ValueError(f"x_T must be a tensor or a shape (N, C, ...), got {x_T!r}")
    if generator is not None:
        device = generator.device
    return torch.randn(shape, generator=generator, device=device)


def step_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """A standard normal draw shaped like x, from ``generator`` (on the generator's device)."""
    z = torch.randn(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
    return z.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def reverse_loop(
    denoiser: Denoiser,
    x: Tensor,
    step: StepFn,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    end: int = 0,
) -> Tensor:
    """Run ``step(x, t)`` for t = T-1, ..., ``end`` of ``denoiser``'s process and return the last state:
    x_0 for ``end = 0``; for ``end = 1`` the state at the noise level of step 0, x ~ q(x_{t_0} | ...), where
    a chain is truncated (CDM's truncated conditioning augmentation: :mod:`difflab.augment`).

    ``callback`` receives ``{"i", "t", "x", "pred_xstart"}`` after each step (i counts from 0).
    """
    if not 0 <= end < max(denoiser.num_timesteps, 1):
        raise ValueError(f"end must be in 0..{denoiser.num_timesteps - 1} (the process's steps), got {end}")
    steps = range(denoiser.num_timesteps - 1, end - 1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i, step_index in enumerate(steps):
        share_cores()
        t = torch.full((x.shape[0],), step_index, dtype=torch.long, device=x.device)
        out = step(x, t)
        x = out["sample"]
        if callback is not None:
            callback({"i": i, "t": step_index, "x": x, "pred_xstart": out["pred_xstart"]})
    return x
