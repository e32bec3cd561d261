"""Noise schedules (float64) and respacing.

Notation (code -> paper): ``betas[i]`` = beta_{i+1}; ``alpha_bar`` = abar = prod_s (1 - beta_s).
Code indices are 0-based: code ``t = 0`` is the paper's ``t = 1`` (DDPM, Ho et al. 2020).

- ``linear``: DDPM's ``linspace(1e-4, 0.02, T)`` at T=1000, both ends scaled by 1000/T for other T
  (Improved DDPM's code, so that the process ends at the same noise level for any T).
- ``cosine``: Improved DDPM eq. 17, abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008,
  with beta_t = min(1 - abar_t/abar_{t-1}, 0.999).
- Respacing (Improved DDPM sec. 4): keep an increasing subset S of the steps and recompute
  beta_i = 1 - abar_{S_i} / abar_{S_{i-1}}; the network still receives the original index S_i.

Two spellings of which steps to keep, never confused (a bare list is what the official
``space_timesteps`` reads as section counts, so ``[250]`` means 250 steps there and step 250 alone as
indices; :func:`resolve_timesteps` refuses it and names both spellings):

- a striding rule: ``"250"``, ``"10,10,3"``, ``"ddim50"``, ``"fast27"`` or an int K (and, in
  :func:`space_timesteps` only, the official list of section counts ``[10, 10, 3]``);
- explicit kept indices: :class:`UseTimesteps` ``([0, 10, 49])``, or a set (the official
  ``use_timesteps``, what the official ``space_timesteps`` returns).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

SCHEDULES = ("linear", "cosine")


def _check_T(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"number of diffusion steps T must be an integer >= 1, got {T!r}")
    return int(T)


def betas_for_alpha_bar(T: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous abar(t), t in [0, 1], into T betas (Improved DDPM eq. 17).

    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta). Returns float64 [T].
    """
    T = _check_T(T)
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """Improved DDPM's f(t) = cos^2(((t + s)/(1 + s)) pi/2) for t in [0, 1] (unnormalised abar)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, T: int) -> np.ndarray:
    """The named schedules of DDPM / Improved DDPM as float64 betas of shape [T].

    ``linear``: linspace(1e-4 * 1000/T, 0.02 * 1000/T, T). ``cosine``: see :func:`cosine_alpha_bar`.
    """
    T = _check_T(T)
    if name == "linear":
        scale = 1000 / T
        if scale * 0.02 > 1:
            raise ValueError(f"the linear schedule needs T >= 20 (its last beta is 20/T = {20 / T:g} > 1); got T={T}")
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(T, cosine_alpha_bar)
    raise ValueError(f"unknown beta schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")


class UseTimesteps(list):
    """Explicit kept steps of a respacing: original indices, strictly increasing (checked against T when
    used), e.g. ``sample_ddim(denoiser, x_T, steps=UseTimesteps([0, 10, 49]))``. The official
    ``SpacedDiffusion(use_timesteps=...)``; a plain list is refused there (see :func:`resolve_timesteps`)."""

    def __init__(self, steps: Iterable[int] = ()):
        super().__init__(int(s) for s in steps)

    def __repr__(self) -> str:
        return f"UseTimesteps({list(self)!r})"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def resolve_timesteps(T: int, spec) -> list[int]:
    """The kept original indices (sorted) of a respacing ``spec`` of a T-step process.

    ``spec``: a striding rule (a string or an int K, see :func:`space_timesteps`) or explicit indices
    (:class:`UseTimesteps`, or a set). Any other sequence is ambiguous and a ValueError naming both spellings.
    """
    if isinstance(spec, UseTimesteps):
        return check_timesteps(T, spec)
    if isinstance(spec, (set, frozenset)):
        return check_timesteps(T, sorted(int(s) for s in spec))
    if isinstance(spec, str) or _is_int(spec):
        return space_timesteps(T, spec)
    if not isinstance(spec, Iterable):
        raise ValueError(f"bad respacing {spec!r}: expected a string ('250', '10,10,3', 'ddim50', 'fast27'), "
                         "an int K or explicit indices UseTimesteps([...])")
    shown = list(spec)[:6]
    raise ValueError(
        f"steps={shown!r} is ambiguous: a list is read as section counts by the official space_timesteps "
        "([250] = 250 steps) but as kept indices by older difflab ([250] = step 250 alone); write section "
        "counts as a string (\"250\", \"10,10,3\") or explicit indices as UseTimesteps([...]) "
        "(from difflab.schedules)"
    )


def space_timesteps(T: int, section_counts: str | int | Sequence[int]) -> UseTimesteps:
    """Which of the original T steps to keep (Improved DDPM's striding rule), sorted ascending.

    ``section_counts`` may be:
    - ``"ddimK"``: the DDIM stride, ``range(0, T, k)`` for the k that gives exactly K steps;
    - ``"fast27"``: GLIDE's 27-step upsampler schedule, ``"10,10,3,2,2"`` with T-1 replaced by T-3;
    - ``"K"`` / ``"a,b,c"`` / an int / a list of ints (the official list form): split [0, T) into equal
      sections and take that many evenly spaced (rounded) steps from each section.
    Returns :class:`UseTimesteps` (a list), which respacing then reads as explicit indices.
    """
    T = _check_T(T)
    if isinstance(section_counts, (UseTimesteps, set, frozenset)):
        raise ValueError(f"space_timesteps takes section counts, not kept steps {section_counts!r}: "
                         "respace with the kept steps directly")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "fast27":
            steps = set(space_timesteps(T, "10,10,3,2,2"))
            steps.discard(T - 1)
            steps.add(T - 3)
            return UseTimesteps(sorted(steps))
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {spec!r}: expected 'ddimK' with an integer K") from None
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == desired:
                    return UseTimesteps(range(0, T, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from T={T}")
        try:
            counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {spec!r}: expected 'K', 'a,b,...', 'ddimK', 'fast27' or a list of step indices"
            ) from None
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing section counts must be integers >= 1, got {counts}")
    size_per = T // len(counts)
    extra = T % len(counts)
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps (T={T}, sections {counts})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return UseTimesteps(sorted(set(kept)))


def check_timesteps(T: int, use_timesteps: Iterable[int]) -> list[int]:
    """Validate an explicit list of kept steps: strictly increasing integers in [0, T)."""
    steps = [int(s) for s in use_timesteps]
    if not steps:
        raise ValueError("respacing must keep at least one step")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"respaced timesteps must be strictly increasing, got {steps[:10]}...")
    if steps[0] < 0 or steps[-1] >= T:
        raise ValueError(f"respaced timesteps must lie in [0, {T - 1}], got {steps[0]}..{steps[-1]}")
    return steps


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Respace a schedule to the kept steps S (Improved DDPM sec. 4).

    Returns ``(timestep_map, new_betas)``: int64 [K] original indices and float64 [K] betas with
    beta_i = 1 - abar_{S_i} / abar_{S_{i-1}} (abar_{S_{-1}} = 1), so abar is unchanged at every kept step.
    """
    betas = np.asarray(betas, dtype=np.float64)
    steps = check_timesteps(len(betas), use_timesteps)
    alpha_bar = np.cumprod(1.0 - betas)
    kept = alpha_bar[steps]
    prev = np.concatenate([[1.0], kept[:-1]])
    return np.asarray(steps, dtype=np.int64), 1.0 - kept / prev
