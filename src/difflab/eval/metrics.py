"""Sample-quality metrics on features: Frechet distance, Inception Score, precision / recall, accuracy.

Notation (code -> paper):
    ``mu1, sigma1``  mean and covariance of the first feature set (samples), m_g, C_g
    ``mu2, sigma2``  the same for the reference set (real data), m_r, C_r
    ``k``            the k of the k-NN radii of improved precision / recall (Kynkaanniemi et al. 2019)
    ``logits``       unnormalised class scores; p(y|x) = softmax(logits), p(y) = E_x p(y|x)

Choices, and why (all float64, numpy + torch only; scipy is not needed at run time):

* **Frechet distance** (Heusel et al. 2017, eq. in Sec. "FID"):
  ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``. The trace of the matrix
  square root is computed by eigen-decomposition: with ``A = sigma1^{1/2}`` (symmetric, from
  ``eigh``), ``sigma1 sigma2`` is similar to the symmetric PSD ``A sigma2 A``, so
  ``tr((sigma1 sigma2)^{1/2}) = sum_i sqrt(lambda_i(A sigma2 A))`` with eigenvalues below the rank
  tolerance (round-off, including tiny negative ones) set to 0. Unlike ``scipy.linalg.sqrtm`` on
  the non-symmetric product (pytorch-fid, OpenAI's evaluator) it never returns complex parts and
  needs no ``eps * I`` offset for singular covariances (fewer samples than dimensions); on
  well-conditioned inputs both agree to ~1e-8 relative or better (tested).
* **Inception Score** (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))``, split into chunks of
  ``split_size`` samples and averaged over chunks, as OpenAI's evaluator does (``split_size=5000``).
* **Improved precision / recall** (Kynkaanniemi et al. 2019): the manifold of a set is the union of
  balls around its points whose radius is the distance to the point's k-th nearest neighbour in the
  same set (k = 3). Precision = share of samples inside the reference manifold; recall = share of
  reference points inside the sample manifold. Exact pairwise squared distances in float64 torch,
  in row batches so memory stays bounded (no approximate nearest neighbours).
* **Too few samples**: a covariance needs ``n >= 2`` (error below that). With ``n <= dim`` the
  covariance is singular and FD is biased upwards and unreliable: allowed (the eigen approach is
  exact for PSD matrices) but a ``UserWarning`` says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from difflab.safeload import npz_reason

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "save_stats",
    "load_stats",
    "inception_score",
    "precision_recall",
    "manifold_radii",
    "conditional_accuracy",
]


def _as_features(x, name: str = "features") -> np.ndarray:
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x


def _as_tensor(x, name: str) -> torch.Tensor:
    f = _as_features(x, name)
    return torch.from_numpy(f if f.flags.writeable else f.copy())


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, as FID uses them.

    Args:
        features: (N, D) array or tensor.
    Returns:
        ``mu`` (D,) and ``sigma`` (D, D), float64; ``sigma`` is the unbiased covariance (N - 1),
        like pytorch-fid and OpenAI's evaluator.
    Raises:
        ValueError: N < 2 (no covariance). A ``UserWarning`` when N <= D (singular covariance).
    """
    f = _as_features(features)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    if n <= d:
        warnings.warn(
            f"only {n} samples for {d}-dimensional features: the covariance is singular and the "
            f"Frechet distance is unreliable; use more than {d} samples (1000+ for MNIST, 10k+ for FID)",
            UserWarning,
            stacklevel=2,
        )
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(d, d)


def _check_stats(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: mu / sigma contain NaN or inf")
    return mu, sigma


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that are round-off (below the rank tolerance ``D * eps * max|w|``, as
    ``numpy.linalg.matrix_rank`` uses): sqrt would blow an exact 0 computed as 1e-16 up to 1e-8."""
    tol = w.shape[0] * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_psd_eigvals(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula).

    Args:
        mu1, mu2: (D,) means. sigma1, sigma2: (D, D) covariances (symmetric PSD).
    Returns:
        ``|mu1 - mu2|^2 + tr(sigma1 + sigma2) - 2 tr((sigma1 sigma2)^{1/2})`` as a float >= 0
        (see the module docstring for the eigen-decomposition used).
    Raises:
        ValueError: shapes that do not match (e.g. a reference from another feature space).
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; both sets must come from the "
            "same feature space (mnist: 128-d, inception: 2048-d)"
        )
    a = _sqrt_psd(sigma1)
    m = a @ sigma2 @ a
    tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return float(max(fd, 0.0))


def save_stats(path: str | Path, mu, sigma, *, feature_space: str | None = None, n: int | None = None) -> None:
    """Write reference statistics as ``.npz`` with ``mu`` (D,), ``sigma`` (D, D) (OpenAI's key names),
    plus ``feature_space`` (e.g. ``"mnist"``) and ``n`` when given."""
    mu, sigma = _check_stats(mu, sigma, "statistics")
    extra = {}
    if feature_space is not None:
        extra["feature_space"] = np.array(feature_space)
    if n is not None:
        extra["n"] = np.array(n, dtype=np.int64)
    from difflab.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)


def load_stats(path: str | Path) -> dict:
    """Read reference statistics from ``.npz``: difflab's (:func:`save_stats`) or an OpenAI reference
    batch (``mu``, ``sigma``; its ``mu_s``, ``sigma_s`` spatial statistics are ignored).

    Returns:
        ``{"mu": (D,), "sigma": (D, D), "feature_space": str | None, "n": int | None}``.
    Raises:
        FileNotFoundError, or ValueError naming the missing keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "mu" not in keys or "sigma" not in keys:
                raise ValueError(f"{path} has no 'mu' / 'sigma' statistics (found keys {keys})")
            out = {"mu": f["mu"], "sigma": f["sigma"]}
            out["feature_space"] = str(f["feature_space"]) if "feature_space" in keys else None
            out["n"] = int(f["n"]) if "n" in keys else None
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path} as .npz: {npz_reason(e)}") from e
    out["mu"], out["sigma"] = _check_stats(out["mu"], out["sigma"], str(path))
    return out


def _log_softmax(logits) -> np.ndarray:
    z = _as_features(logits, "logits")
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, split_size: int = 5000) -> float:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from classifier logits.

    Args:
        logits: (N, K) unnormalised scores (1008 for the FID Inception, 10 for the MNIST classifier:
            the "classifier score"). Bounded by 1 <= IS <= K.
        split_size: chunk size; the score is the mean over chunks (OpenAI's evaluator: 5000).
    Returns:
        the mean score over ceil(N / split_size) chunks.
    """
    logp = _log_softmax(logits)
    if len(logp) == 0:
        raise ValueError("no logits (N = 0)")
    scores = []
    for i in range(0, len(logp), split_size):
        lp = logp[i:i + split_size]
        p = np.exp(lp)
        log_py = np.log(p.mean(axis=0) + 1e-300)
        kl = (p * (lp - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _batch_rows(n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(n_cols, 1))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(n, m) squared Euclidean distances in float64; clipped at 0 against round-off."""
    d = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2 * a @ b.T
    return d.clamp_min_(0)


def manifold_radii(features, k: int = 3) -> torch.Tensor:
    """Squared k-NN radii of a set: for each point, squared distance to its k-th nearest other point.

    Args:
        features: (N, D), N > k.
    Returns:
        (N,) float64 tensor.
    """
    x = _as_tensor(features, "features")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..N-1 = 1..{n - 1} for a set of {n} points, got k={k}")
    x_sq = (x * x).sum(1)
    out = torch.empty(n, dtype=torch.float64)
    step = _batch_rows(n)
    for i in range(0, n, step):
        d = _sq_dists(x[i:i + step], x, x_sq)
        d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = 0.0  # self, exactly
        out[i:i + step] = torch.kthvalue(d, k + 1, dim=1).values  # k + 1: the point itself is first
    return out


def _coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``points`` inside the union of balls (centre ``manifold[j]``, squared radius ``radii[j]``)."""
    m_sq = (manifold * manifold).sum(1)
    inside = 0
    step = _batch_rows(manifold.shape[0])
    for i in range(0, points.shape[0], step):
        d = _sq_dists(points[i:i + step], manifold, m_sq)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, k-NN manifolds).

    Args:
        real: (N_r, D) reference features. fake: (N_g, D) sample features. Both N > k.
        k: neighbourhood size of the radii (3 in the paper and in OpenAI's evaluator).
    Returns:
        ``(precision, recall)``: share of fake points inside the real manifold, share of real points
        inside the fake manifold. A set against itself gives (1.0, 1.0).
    """
    r = _as_tensor(real, "reference features")
    g = _as_tensor(fake, "sample features")
    if r.shape[1] != g.shape[1]:
        raise ValueError(
            f"feature dimensions differ: samples {g.shape[1]} vs reference {r.shape[1]}; both must come "
            "from the same feature space (mnist: 128-d, inception: 2048-d)"
        )
    precision = _coverage(g, r, manifold_radii(r, k))
    recall = _coverage(r, g, manifold_radii(g, k))
    return precision, recall


def conditional_accuracy(logits, labels) -> float:
    """Share of samples whose classifier argmax equals the class they were generated for.

    Args:
        logits: (N, K). labels: (N,) integers in 0..K-1.
    """
    z = _as_features(logits, "logits")
    y = np.asarray(labels)
    if y.shape != (z.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {z.shape[0]} integers, got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}, got range {y.min()}..{y.max()}")
    return float((z.argmax(axis=1) == y).mean())
