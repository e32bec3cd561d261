"""Metrics against closed forms, independent formulas and constructions with a known answer."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from difflab.eval.metrics import (
    conditional_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_stats,
    manifold_radii,
    precision_recall,
    save_stats,
)


def _random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ----------------------------------------------------------------------------- Frechet distance


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_fd_commuting_covariances_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    l1, l2 = rng.uniform(0.01, 5, 12), rng.uniform(0.01, 5, 12)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu = rng.standard_normal(12)
    expected = ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum()
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


def test_fd_1d_is_w2_of_gaussians():
    # 1-D: W2^2 = (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_fd_general_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(2)
    d = 40
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the pytorch-fid / OpenAI formula
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_fd_singular_covariances_finite_and_exact():
    # rank-3 covariances in 10-D, both in the same 3-D subspace: FD = closed form in that subspace
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((10, 3)))
    l1, l2 = np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.5, 3.0])
    s1, s2 = basis @ np.diag(l1) @ basis.T, basis @ np.diag(l2) @ basis.T
    fd = frechet_distance(np.zeros(10), s1, np.zeros(10), s2)
    assert fd == pytest.approx(((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum(), abs=1e-9)


def test_fd_of_set_with_itself_is_zero_and_of_shifted_set_is_shift():
    x = np.random.default_rng(4).standard_normal((500, 20))
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    mu2, sigma2 = feature_statistics(x + 0.5)
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(20 * 0.25, rel=1e-9)


def test_feature_statistics_unbiased_covariance():
    x = np.random.default_rng(5).standard_normal((50, 4))
    mu, sigma = feature_statistics(torch.from_numpy(x))
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 49, rtol=1e-12)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)


def test_too_few_samples():
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 8)))
    with pytest.warns(UserWarning, match="singular"):
        feature_statistics(np.random.default_rng(0).standard_normal((8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_statistics(np.random.default_rng(0).standard_normal((9, 8)))


def test_fd_dimension_mismatch_names_feature_spaces():
    with pytest.raises(ValueError, match=r"128 vs 2048.*mnist.*inception"):
        frechet_distance(np.zeros(128), np.eye(128), np.zeros(2048), np.eye(2048))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_stats_roundtrip_and_openai_layout(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.standard_normal(5), _random_spd(rng, 5)
    save_stats(tmp_path / "ref.npz", mu, sigma, feature_space="mnist", n=77)
    got = load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(got["mu"], mu)
    np.testing.assert_array_equal(got["sigma"], sigma)
    assert got["feature_space"] == "mnist" and got["n"] == 77
    # OpenAI's reference batches: arr_0 images + mu, sigma, mu_s, sigma_s (float64 or float32)
    np.savez(tmp_path / "openai.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu.astype(np.float32),
             sigma=sigma.astype(np.float32), mu_s=mu, sigma_s=sigma)
    got = load_stats(tmp_path / "openai.npz")
    assert got["feature_space"] is None and got["mu"].dtype == np.float64
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(ValueError, match=r"no 'mu' / 'sigma'.*arr_0"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- Inception Score, accuracy


def test_inception_score_extremes():
    k = 10
    confident = np.full((1000, k), -50.0)
    confident[np.arange(1000), np.arange(1000) % k] = 50.0
    assert inception_score(confident) == pytest.approx(k, rel=1e-6)  # sharp and uniform over classes
    assert inception_score(np.zeros((1000, k))) == pytest.approx(1.0)  # uninformative
    collapsed = np.tile(confident[:1], (1000, 1))
    assert inception_score(collapsed) == pytest.approx(1.0)  # sharp but one class only


def test_inception_score_matches_direct_formula_and_splits():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((600, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def direct(p):
        py = p.mean(0)
        return np.exp((p * (np.log(p) - np.log(py))).sum(1).mean())

    assert inception_score(logits, split_size=600) == pytest.approx(direct(p), rel=1e-10)
    assert inception_score(logits, split_size=200) == pytest.approx(
        np.mean([direct(p[i:i + 200]) for i in range(0, 600, 200)]), rel=1e-10)


def test_conditional_accuracy():
    logits = np.eye(4)[[0, 1, 2, 3, 0]]
    assert conditional_accuracy(logits, np.array([0, 1, 2, 3, 1])) == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        conditional_accuracy(logits, np.array([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="5 integers"):
        conditional_accuracy(logits, np.array([0, 1]))


# ----------------------------------------------------------------------------- precision / recall


def _grid(nx, ny, x0=0.0):
    xs, ys = np.meshgrid(np.arange(nx) + x0, np.arange(ny))
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)


def test_pr_identical_sets_are_one():
    x = np.random.default_rng(8).standard_normal((300, 16))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_pr_grid_radii_closed_form():
    # unit grid: interior / edge points have 3rd-NN distance 1, corners sqrt(2)
    r2 = manifold_radii(_grid(5, 5), k=3).numpy().reshape(5, 5)
    expected = np.ones((5, 5))
    expected[[0, 0, -1, -1], [0, -1, 0, -1]] = 2.0
    np.testing.assert_allclose(r2, expected, atol=1e-12)


def test_pr_half_overlapping_grids_exact():
    # real: unit grid x in 0..39; fake: the same grid shifted by 20.5. Exactly the 20 columns
    # x = 20.5 .. 39.5 of fake lie within 0.5 < radius 1 of a real point, the next column is
    # 1.5 > sqrt(2) away; symmetrically for recall.
    real, fake = _grid(40, 40), _grid(40, 40, x0=20.5)
    p, r = precision_recall(real, fake)
    assert (p, r) == (0.5, 0.5)


def test_pr_known_fraction_inside_random():
    # the real grid's manifold covers its square [0, 39]^2 entirely (every point is within
    # sqrt(2)/2 < 1 of a grid point); fake points far away are never inside.
    rng = np.random.default_rng(9)
    inside = rng.uniform(0, 39, (700, 2))
    outside = rng.uniform(100, 139, (300, 2))
    p, r = precision_recall(_grid(40, 40), np.concatenate([inside, outside]))
    assert p == pytest.approx(0.7, abs=1e-12)
    # recall: share of grid points within the fake k-NN balls; fake points cover the square only
    # partly, so recall is strictly between 0 and 1
    assert 0.2 < r < 1.0


def test_pr_matches_bruteforce_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(10)
    real, fake = rng.standard_normal((400, 8)), rng.standard_normal((300, 8)) * 1.3 + 0.3

    def coverage(points, manifold):
        rad = NearestNeighbors(n_neighbors=4).fit(manifold).kneighbors(manifold)[0][:, 3]
        d = np.sqrt(((points[:, None, :] - manifold[None]) ** 2).sum(-1))
        return (d <= rad[None]).any(1).mean()

    p, r = precision_recall(real, fake)
    assert p == pytest.approx(coverage(fake, real), abs=1e-12)
    assert r == pytest.approx(coverage(real, fake), abs=1e-12)


def test_pr_bad_input():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((3, 3)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.full((10, 3), np.nan), np.zeros((10, 3)))
