"""The Gaussian forward process q and its closed forms (DDPM sec. 2, Improved DDPM sec. 2). No nn.Module.

Notation (code -> paper), with code index ``t`` = paper t+1:
    betas                 beta_t
    alphas_cumprod        abar_t = prod_{s<=t} (1 - beta_s)
    alphas_cumprod_prev   abar_{t-1} (abar_0 = 1)
    posterior_variance    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t            (DDPM eq. 7)
    posterior_mean_coef1  sqrt(abar_{t-1}) beta_t / (1 - abar_t)                         (DDPM eq. 7)
    posterior_mean_coef2  sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)                  (DDPM eq. 7)

Coefficients are kept in float64 and gathered in the dtype of the data they multiply: float64 data
gives the official formulas in float64; float32 data gives the official code's float32 casts. Logs are
taken in float64 and then cast (``log_betas``, ``large_log_variance``), as the official code does, so a
float32 log variance is the float64 value rounded once, never the log of a rounded variance.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from difflab.schedules import get_named_beta_schedule, resolve_timesteps, respace_betas

Tensor = torch.Tensor


class Process:
    """Coefficients of a (possibly respaced) discrete Gaussian diffusion process, float64.

    Args:
        betas: [T] betas in (0, 1].
        timestep_map: [T] original process index of each step (identity when not respaced); the
            network is always called with ``timestep_map[t]``.
    """

    def __init__(self, betas, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        T = len(betas)
        if timestep_map is None:
            timestep_map = np.arange(T)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {timestep_map.shape}")
        self.num_timesteps = T
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        large_var = np.append(post_var[1] if T > 1 else betas[0], betas[1:])
        arrays = {
            "betas": betas,
            "log_betas": np.log(betas),  # learned range: the upper end log beta_t
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": ac_next,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # beta~_1 = 0, so the log is clipped by using beta~_2 at t = 0 (official code).
            "posterior_log_variance_clipped": np.log(np.append(post_var[1] if T > 1 else betas[0], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            # Fixed-large variance: beta_t, with beta~_2 at t = 0 (official code).
            "large_variance": large_var,
            "large_log_variance": np.log(large_var),
        }
        self._arrays = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        self.timestep_map = torch.from_numpy(timestep_map.copy())
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def named(cls, schedule: str, T: int) -> Process:
        """The process of a named schedule (``linear`` or ``cosine``) with T steps."""
        return cls(get_named_beta_schedule(schedule, T))

    def respace(self, spec: str | int | Iterable[int]) -> Process:
        """A process over a subset of this one's steps (Improved DDPM sec. 4).

        ``spec``: a striding string ("250", "10,10,3,2,2", "ddim50", "fast27"), an int K (K evenly
        strided steps), or explicit kept indices of this process, ``UseTimesteps([...])`` or a set
        (a bare list is ambiguous and refused: :func:`~difflab.schedules.resolve_timesteps`). The new
        process's ``timestep_map`` composes with this one's, so the network still sees original indices.
        """
        steps = resolve_timesteps(self.num_timesteps, spec)
        local_map, new_betas = respace_betas(self._arrays["betas"].numpy(), steps)
        return Process(new_betas, self.timestep_map.numpy()[local_map])

    # -- coefficient access ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Tensor:
        arrays = self.__dict__.get("_arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def check_t(self, t: Tensor) -> Tensor:
        """Validate integer step indices [N] in [0, T).

        The range is checked for CPU tensors only: on an accelerator it would cost two host syncs per
        network call (an out-of-range index still fails there, in the gather).
        """
        if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"timesteps must be an integer tensor, got {type(t).__name__} {getattr(t, 'dtype', '')}")
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps out of range: got {int(t.min())}..{int(t.max())}, valid 0..{self.num_timesteps - 1}"
            )
        return t

    def extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Gather coefficient ``name`` at steps ``t`` [N], shaped [N, 1, ..., 1] to broadcast over ``like``.

        The result has ``like``'s dtype (float64 coefficients cast at the boundary) and device.
        """
        key = (name, like.device)
        arr = self._cache.get(key)
        if arr is None:
            arr = self._arrays[name].to(like.device)
            self._cache[key] = arr
        out = arr[t.to(like.device)].to(like.dtype)
        if like.dim() > 1 and out.dim() == 1 and out.shape[0] != like.shape[0]:
            raise ValueError(f"timesteps of shape {tuple(t.shape)} do not fit a batch of {like.shape[0]}")
        return out.reshape(out.shape + (1,) * (like.dim() - out.dim()))

    def original_t(self, t: Tensor) -> Tensor:
        """Original-process indices of steps ``t`` (what the network receives)."""
        return self.timestep_map.to(t.device)[t]


# -- q-side math: official names ---------------------------------------------------------------------


def q_mean_variance(process: Process, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4): (mean, variance, log_variance)."""
    mean = process.extract("sqrt_alphas_cumprod", t, x0) * x0
    variance = process.extract("sqrt_one_minus_alphas_cumprod", t, x0) ** 2
    log_variance = process.extract("log_one_minus_alphas_cumprod", t, x0)
    return mean, variance.expand_as(x0), log_variance.expand_as(x0)


def q_sample(process: Process, x0: Tensor, t: Tensor, noise: Tensor | None = None, generator=None) -> Tensor:
    """Draw x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4). x0, noise: [N, ...]; t: [N]."""
    process.check_t(t)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
    return (
        process.extract("sqrt_alphas_cumprod", t, x0) * x0
        + process.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
    )


def q_posterior_mean_variance(process: Process, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM eqs. 6-7): (mean, variance, log_variance_clipped)."""
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} does not match x_t shape {tuple(x_t.shape)}")
    mean = process.extract("posterior_mean_coef1", t, x_t) * x0 + process.extract("posterior_mean_coef2", t, x_t) * x_t
    variance = process.extract("posterior_variance", t, x_t).expand_as(x_t)
    log_variance = process.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(process: Process, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (DDPM eq. 4 solved for x0)."""
    return (
        process.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
        - process.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
    )


def predict_eps_from_x0(process: Process, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """eps = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)."""
    return (process.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / process.extract(
        "sqrt_recipm1_alphas_cumprod", t, x_t
    )


def predict_x0_from_v(process: Process, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1-abar) x0)."""
    return (
        process.extract("sqrt_alphas_cumprod", t, x_t) * x_t
        - process.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v
    )


def get_v(process: Process, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, the v-prediction target."""
    return (
        process.extract("sqrt_alphas_cumprod", t, x0) * eps
        - process.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0
    )


def snr(process: Process, t: Tensor) -> Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at steps t [N], float64."""
    ac = process.alphas_cumprod[t.cpu()]
    return ac / (1.0 - ac)
