"""evaluate() and `difflab eval`: real MNIST against itself, and every kind of bad input."""

import json

import numpy as np
import pytest

from difflab.cli import main
from difflab.data import load_mnist5k
from difflab.eval.metrics import save_stats
from difflab.eval.report import evaluate, evaluate_npz, save_reference


@pytest.fixture(scope="module")
def mnist_test():
    return load_mnist5k("test")  # uint8 (1000, 28, 28), int64 (1000,)


def test_test_split_against_itself(mnist_test):
    images, labels = mnist_test
    out = evaluate(images[..., None], labels, ref="mnist5k-test")
    assert out["n"] == out["n_ref"] == 1000
    assert out["fd"] == pytest.approx(0.0, abs=1e-6)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["accuracy"] >= 0.97
    assert 6.0 < out["is"] <= 10.0  # confident and balanced (label smoothing in training caps it)


def test_padded_32x32_samples_equal_28x28(mnist_test):
    images, labels = mnist_test
    sub = images[::5]
    padded = np.pad(sub, ((0, 0), (2, 2), (2, 2)), constant_values=0)  # background 0 = -1 in [-1, 1]
    a = evaluate(sub, labels[::5], ref="mnist5k-train")
    b = evaluate(padded[..., None], labels[::5], ref="mnist5k-train")
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, str):
            assert value == b[key], key
        else:
            assert value == pytest.approx(b[key], rel=1e-6), key
    assert a["n"] == 200 and a["n_ref"] == 4000 and a["fd"] > 0 and 0 < a["recall"] < 1


def test_noise_is_far_from_mnist():
    noise = np.random.default_rng(0).integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
    out = evaluate(noise, ref="mnist5k-test")
    assert out["fd"] > 100 and out["precision"] < 0.05 and "accuracy" not in out


def test_reference_npz_images_stats_and_both(tmp_path, mnist_test):
    images, labels = mnist_test
    np.savez(tmp_path / "imgs.npz", arr_0=images[..., None])
    save_reference(tmp_path / "stats.npz", images)
    with np.load(tmp_path / "stats.npz") as f:
        stats = dict(f)
    np.savez(tmp_path / "both.npz", arr_0=images[..., None], mu=stats["mu"], sigma=stats["sigma"])
    samples = images[::5]
    named = evaluate(samples, ref="mnist5k-test")
    for ref in ("imgs.npz", "both.npz"):
        assert evaluate(samples, ref=tmp_path / ref)["fd"] == pytest.approx(named["fd"], rel=1e-9)
    st = evaluate(samples, ref=str(tmp_path / "stats.npz"))
    assert st["fd"] == pytest.approx(named["fd"], rel=1e-9)
    assert st["precision"] is None and st["recall"] is None and st["n_ref"] == 1000


def test_cli_prints_json(tmp_path, capsys, mnist_test):
    images, labels = mnist_test
    np.savez(tmp_path / "s.npz", arr_0=images[:300, :, :, None], arr_1=labels[:300])
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", "mnist5k-test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == evaluate_npz(tmp_path / "s.npz", ref="mnist5k-test")
    assert set(out) == {"n", "features", "ref", "n_ref", "fd", "precision", "recall", "is", "accuracy"}
    assert out["n"] == 300 and out["accuracy"] >= 0.97


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path, mnist_test):
    images, labels = mnist_test
    d = tmp_path
    np.savez(d / "no_arr0.npz", images=images)
    np.savez(d / "big.npz", arr_0=np.zeros((10, 64, 64, 3), np.uint8))
    np.savez(d / "float.npz", arr_0=images[..., None].astype(np.float32) / 127.5 - 1)
    np.savez(d / "one.npz", arr_0=images[:1, :, :, None])
    np.savez(d / "ok.npz", arr_0=images[:50, :, :, None])
    np.savez(d / "badlabels.npz", arr_0=images[:50, :, :, None], arr_1=labels[:10])
    save_stats(d / "ref2048.npz", np.zeros(2048), np.eye(2048))
    save_stats(d / "refincep.npz", np.zeros(128), np.eye(128), feature_space="inception")
    np.savez(d / "refempty.npz", x=np.zeros(3))
    return {
        "no_arr0": ([str(d / "no_arr0.npz")], r"no 'arr_0'.*found \['images'\].*uint8"),
        "missing": ([str(d / "missing.npz")], r"not found.*missing\.npz"),
        "size": ([str(d / "big.npz")], r"28x28 or 32x32.*\(10, 64, 64, 3\).*features='inception'"),
        "dtype": ([str(d / "float.npz")], r"uint8.*float32"),
        "one": ([str(d / "one.npz")], r"at least 2"),
        "labels": ([str(d / "badlabels.npz")], r"arr_1.*labels"),
        "dim": ([str(d / "ok.npz"), "--ref", str(d / "ref2048.npz")], r"2048-d statistics.*mnist: 128-d"),
        "space": ([str(d / "ok.npz"), "--ref", str(d / "refincep.npz")], r"inception statistics.*--features"),
        "refkeys": ([str(d / "ok.npz"), "--ref", str(d / "refempty.npz")], r"neither images.*\['x'\]"),
        "refname": ([str(d / "ok.npz"), "--ref", "mnist-test"], r"one of mnist5k-test, mnist5k-train or"),
        "refmissing": ([str(d / "ok.npz"), "--ref", str(d / "nope.npz")], r"reference file not found"),
        "noweights": ([str(d / "big.npz"), "--features", "inception"], r"--inception-weights.*never downloads"),
        "weightsmissing": ([str(d / "big.npz"), "--features", "inception", "--inception-weights",
                            str(d / "w.pth")], r"weights file not found"),
    }


@pytest.mark.parametrize("case", ["no_arr0", "missing", "size", "dtype", "one", "labels", "dim", "space",
                                  "refkeys", "refname", "refmissing", "noweights", "weightsmissing"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, mnist_test, case):
    argv, pattern = _bad(tmp_path, mnist_test)[case]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error: ") and err.count("\n") == 1
    assert __import__("re").search(pattern, err), err


def test_python_api_bad_choices(mnist_test):
    images, _ = mnist_test
    with pytest.raises(ValueError, match="features must be one of mnist, inception"):
        evaluate(images, features="clip")
    with pytest.raises(ValueError, match="uint8"):
        evaluate(images.astype(np.float64))
    with pytest.raises(ValueError, match=r"labels must be 1000 integers"):
        evaluate(images, labels=np.zeros(1000))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        evaluate(images, labels=np.full(1000, 10))


def test_inception_features_end_to_end(tmp_path, capsys):
    # random weights in the pytorch-fid layout; a set against itself: FD 0, precision = recall = 1
    import torch

    from difflab.eval.features import FIDInceptionV3

    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), tmp_path / "w.pth")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(4))
    with pytest.warns(UserWarning, match="singular"):
        code = main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                     "--features", "inception", "--inception-weights", str(tmp_path / "w.pth")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["features"] == "inception" and out["n"] == out["n_ref"] == 4
    assert out["fd"] == pytest.approx(0.0, abs=1e-9) and out["precision"] == out["recall"] == 1.0
    # IS = exp(mean KL) >= 1 in exact arithmetic; four identical images give KL = 0 up to float rounding
    assert out["accuracy"] is None and 1.0 - 1e-12 <= out["is"] <= 1008
