"""Timestep samplers for training: uniform, and Improved DDPM's loss-second-moment importance sampling.

Importance sampling (Improved DDPM eq. 18): L_vlb = E_{t ~ p_t}[L_t / p_t], p_t proportional to
sqrt(E[L_t^2]), estimated from the last ``history_per_term`` losses of each t. Until every t has a
full history, t is drawn uniformly. The official code mixes in ``uniform_prob`` of the uniform
distribution and weights each drawn loss by 1 / (T p_t), so that the weighted mean is an unbiased
estimate of the uniform-t mean.
"""

from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


class UniformSampler:
    """t ~ U{0, ..., T-1}, every weight 1."""

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        """Unnormalised sampling weights, float64 [T]."""
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` steps: (t int64 [N], loss weights float32 [N] = 1 / (T p_t))."""
        w = torch.from_numpy(self.weights())
        p = w / w.sum()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses (a no-op for the uniform sampler)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the checkpoint holds a {sorted(state)} timestep-sampler state, which the uniform "
                             "sampler does not have: it was trained with diffusion.timestep_sampler="
                             "loss_second_moment; resume it with that")


class LossSecondMomentResampler(UniformSampler):
    """Improved DDPM's importance sampler: p_t proportional to sqrt(E[L_t^2]) over the last losses."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / len(w)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Push each (t, loss) pair into its t's history, dropping the oldest once full."""
        for ti, loss in zip(t.tolist(), losses.detach().double().tolist(), strict=True):
            if self.loss_counts[ti] == self.history_per_term:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:]
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, self.loss_counts[ti]] = loss
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict:
        return {
            "loss_history": torch.from_numpy(self.loss_history.copy()),
            "loss_counts": torch.from_numpy(self.loss_counts.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        if "loss_history" not in state or "loss_counts" not in state:
            raise ValueError("the checkpoint has no loss-second-moment history: it was trained with "
                             "diffusion.timestep_sampler=uniform; resume it with that")
        history = np.asarray(state["loss_history"], dtype=np.float64)
        if history.shape != self.loss_history.shape:
            raise ValueError(f"sampler history has shape {history.shape}, expected {self.loss_history.shape}")
        self.loss_history = history.copy()
        self.loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()


TIMESTEP_SAMPLERS = {"uniform": UniformSampler, "loss_second_moment": LossSecondMomentResampler}


def create_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """Build a sampler by name: ``uniform`` or ``loss_second_moment``."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; valid choices: {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](num_timesteps)
