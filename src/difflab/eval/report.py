"""One call from samples to numbers: :func:`evaluate` (Python) and ``difflab eval`` (command line).

    from difflab.eval.report import evaluate
    evaluate(samples_uint8_nhwc, labels, ref="mnist5k-test", features="mnist")
    # {"n": 1000, "features": "mnist", "ref": "mnist5k-test", "n_ref": 1000,
    #  "fd": ..., "precision": ..., "recall": ..., "is": ..., "accuracy": ...}

    difflab eval SAMPLES.npz --ref mnist5k-test
    difflab eval SAMPLES.npz --ref VIRTUAL_imagenet64_labeled.npz --features inception \
        --inception-weights pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 2 -m difflab eval SAMPLES.npz     # features extracted in shards

Under ``torchrun`` (an initialised process group) feature extraction is split into contiguous
per-rank chunks and gathered back in order, so every rank computes the same metrics from all rows.

References: ``"mnist5k-test"`` / ``"mnist5k-train"`` (the MNIST-5k splits, computed on the fly), or
an ``.npz`` holding images (``arr_0``, uint8 NHWC), statistics (``mu``, ``sigma``: difflab's
:func:`~difflab.eval.metrics.save_stats` or an OpenAI reference batch), or both. When both are
there, FD uses the stored ``mu``/``sigma`` (as OpenAI's evaluator does) and precision / recall use
the images; with statistics only, precision and recall are ``None``.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.eval.features import (
    FIDInceptionV3,
    MNISTClassifier,
    extract,
    load_inception,
    load_mnist_classifier,
    uint8_nhwc_to_float,
)
from difflab.eval.metrics import (
    conditional_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_stats,
    precision_recall,
    save_stats,
)
from difflab.safeload import npz_reason
from difflab.train.distributed import all_gather_uneven, get_rank, get_world_size, is_distributed

__all__ = ["FEATURES", "NAMED_REFS", "DEFAULT_REF", "DEFAULT_FEATURES", "Evaluator", "make_evaluator", "evaluate",
           "evaluate_npz", "save_reference", "add_eval_arguments", "add_reference_arguments", "run_eval_command"]

FEATURES = ("mnist", "inception")
NAMED_REFS = ("mnist5k-test", "mnist5k-train")
DEFAULT_REF = "mnist5k-test"
DEFAULT_FEATURES = "mnist"
FEATURE_DIMS = {"mnist": MNISTClassifier.num_features, "inception": FIDInceptionV3.num_features}


@dataclass
class _Reference:
    source: str
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # None: statistics only (no precision / recall)
    n: int | None


def _check_features_choice(features: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {features!r}")


def _is_mnist_shaped(images: np.ndarray) -> bool:
    return images.ndim in (3, 4) and images.shape[1:3] in ((28, 28), (32, 32)) and (
        images.ndim == 3 or images.shape[3] == 1)


def _check_images(images, what: str, features: str) -> np.ndarray:
    """uint8 (N, H, W[, C]) with a size the feature space takes; returns it as a numpy array."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 NHWC images in 0..255, got dtype {images.dtype}; convert float images "
            "in [-1, 1] with difflab.data.float_to_uint8"
        )
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise ValueError(f"{what} must have shape (N, H, W, C) with C = 1 or 3, got {images.shape}")
    if features == "mnist" and not _is_mnist_shaped(images):
        raise ValueError(
            f"{what}: features='mnist' takes 28x28 or 32x32 (center-cropped to 28x28) grayscale "
            f"images, got shape {images.shape}; use features='inception' for other images"
        )
    if len(images) < 2:
        raise ValueError(f"{what}: need at least 2 images for feature statistics, got {len(images)}")
    # Plain C strides, as np.load gives: a view such as NCHW memory seen as NHWC (to_uint8's output; numpy
    # calls it contiguous when C = 1) reaches the convolutions in another memory format, whose other
    # summation order changes the features in the last bits
    c_strides = tuple(int(np.prod(images.shape[i + 1:])) * images.itemsize for i in range(images.ndim))
    return images if images.strides == c_strides else images.copy(order="C")


def _extractor(features: str, inception_weights, device) -> torch.nn.Module:
    if features == "mnist":
        return load_mnist_classifier(device=device)
    if inception_weights is None:
        raise ValueError(
            "features='inception' needs the FID Inception weights as a local file "
            "(--inception-weights PATH, pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a "
            ".safetensors of it); difflab never downloads"
        )
    return load_inception(inception_weights, device=device)


def _gather_rows(a: np.ndarray) -> np.ndarray:
    """Every rank's rows of ``a`` concatenated in rank order."""
    return all_gather_uneven(torch.from_numpy(a)).numpy()


def _features_of(model, images: np.ndarray, batch_size: int, distributed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(features, logits)`` of uint8 NHWC ``images``. With ``distributed`` inside a process group,
    rank r extracts the r-th of W contiguous chunks and the chunks are gathered, so every rank returns
    all rows in order (fewer images than ranks: every rank extracts them all)."""
    world = get_world_size() if distributed else 1
    if not (distributed and is_distributed()) or len(images) < world:
        return extract(model, uint8_nhwc_to_float(images), batch_size=batch_size)
    rank = get_rank()
    per, extra = divmod(len(images), world)
    lo = rank * per + min(rank, extra)
    hi = lo + per + (rank < extra)
    feats, logits = extract(model, uint8_nhwc_to_float(images[lo:hi]), batch_size=batch_size)
    return _gather_rows(feats), _gather_rows(logits)


def _named_reference_features(ref: str, model, batch_size: int, distributed: bool) -> np.ndarray:
    from difflab.data import load_mnist5k

    images, _ = load_mnist5k(ref.removeprefix("mnist5k-"))
    return _features_of(model, images, batch_size, distributed)[0]


@functools.lru_cache(maxsize=2 * len(NAMED_REFS))
def _mnist_named_reference(ref: str, batch_size: int, distributed: bool) -> np.ndarray:
    # distributed is part of the key: a rank that filled its cache alone must not skip a later collective
    feats = _named_reference_features(ref, load_mnist_classifier(), batch_size, distributed)
    feats.setflags(write=False)
    return feats


def _load_reference(ref, features: str, model, batch_size: int, distributed: bool) -> _Reference:
    if isinstance(ref, str) and ref in NAMED_REFS:
        if features == "mnist":  # the shipped classifier: the same numbers every time, so cache them
            feats = _mnist_named_reference(ref, batch_size, distributed)
        else:
            feats = _named_reference_features(ref, model, batch_size, distributed)
        mu, sigma = feature_statistics(feats)
        return _Reference(ref, mu, sigma, feats, len(feats))
    path = Path(ref)
    if path.suffix != ".npz":
        raise ValueError(f"ref must be one of {', '.join(NAMED_REFS)} or a path to an .npz file; got {ref!r}")
    if not path.is_file():
        raise FileNotFoundError(f"reference file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            images = f["arr_0"] if "arr_0" in keys else None
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read reference {path} as .npz: {npz_reason(e)}") from e
    has_stats = "mu" in keys and "sigma" in keys
    if images is None and not has_stats:
        raise ValueError(
            f"reference {path} has neither images (arr_0) nor statistics (mu, sigma); found keys {keys}"
        )
    feats = None
    if images is not None:
        feats, _ = _features_of(model, _check_images(images, f"reference {path} arr_0", features), batch_size,
                                distributed)
    if has_stats:
        st = load_stats(path)
        dim = FEATURE_DIMS[features]
        if st["feature_space"] is not None and st["feature_space"] != features:
            raise ValueError(
                f"reference {path} holds {st['feature_space']} statistics but features={features!r}; "
                f"pass --features {st['feature_space']} or a reference made in {features} features"
            )
        if st["mu"].shape[0] != dim:
            spaces = ", ".join(f"{k}: {v}-d" for k, v in FEATURE_DIMS.items())
            raise ValueError(
                f"reference {path} has {st['mu'].shape[0]}-d statistics but features={features!r} gives "
                f"{dim}-d features ({spaces})"
            )
        return _Reference(str(path), st["mu"], st["sigma"], feats, st["n"])
    mu, sigma = feature_statistics(feats)
    return _Reference(str(path), mu, sigma, feats, len(feats))


def _check_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers (one per sample), got {labels.dtype} {labels.shape}")
    return labels


@dataclass
class Evaluator:
    """A feature extractor and a loaded reference (:func:`make_evaluator`): call it on samples.

    Building one checks every choice and reads the reference, so bad input fails before samples are
    drawn (``difflab sample --eval``); :meth:`check` tests a sample shape without extracting anything.
    """

    features: str
    model: torch.nn.Module
    reference: _Reference
    k: int
    batch_size: int
    device: torch.device
    distributed: bool

    def check(self, samples) -> np.ndarray:
        """``samples`` as a uint8 numpy array, or ValueError when this feature space cannot take them."""
        return _check_images(samples, "samples", self.features)

    def __call__(self, samples, labels=None) -> dict:
        """The metrics of ``samples`` (and ``labels``): see :func:`evaluate`."""
        samples = self.check(samples)
        labels = _check_labels(labels, len(samples))
        feats, logits = _features_of(self.model, samples, self.batch_size, self.distributed)
        reference = self.reference
        mu, sigma = feature_statistics(feats)
        out = {
            "n": int(len(samples)),
            "features": self.features,
            "ref": reference.source,
            "n_ref": reference.n,
            "fd": frechet_distance(mu, sigma, reference.mu, reference.sigma),
            "precision": None,
            "recall": None,
            "is": inception_score(logits),
        }
        if reference.features is not None:
            out["precision"], out["recall"] = precision_recall(reference.features, feats, k=self.k)
        if labels is not None:
            if self.features == "mnist":
                out["accuracy"] = conditional_accuracy(logits, labels)
            elif _is_mnist_shaped(samples):
                _, mnist_logits = _features_of(load_mnist_classifier(device=self.device), samples, self.batch_size,
                                               self.distributed)
                out["accuracy"] = conditional_accuracy(mnist_logits, labels)
            else:
                out["accuracy"] = None  # no classifier for this domain
        return out


def make_evaluator(ref: str | Path = DEFAULT_REF, features: str = DEFAULT_FEATURES,
                   inception_weights: str | Path | None = None, *, k: int = 3, batch_size: int = 250,
                   device: str | torch.device = "cpu", distributed: bool = True) -> Evaluator:
    """Load the feature extractor and the reference once (arguments as in :func:`evaluate`);
    ValueError / FileNotFoundError here for a bad choice, weights file or reference."""
    _check_features_choice(features)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = _extractor(features, inception_weights, device)
    reference = _load_reference(ref, features, model, batch_size, distributed)
    return Evaluator(features, model, reference, k, batch_size, torch.device(device), distributed)


def evaluate(samples, labels=None, ref: str | Path = DEFAULT_REF, features: str = DEFAULT_FEATURES,
             inception_weights: str | Path | None = None, *, k: int = 3, batch_size: int = 250,
             device: str | torch.device = "cpu", distributed: bool = True) -> dict:
    """FD, improved precision / recall, Inception Score and (with labels) conditional accuracy.

    Args:
        samples: uint8 (N, H, W, C) images (C = 1 or 3; (N, H, W) is grayscale), N >= 2.
            ``features="mnist"``: 28x28 or 32x32 (center-cropped to 28x28) grayscale.
            ``features="inception"``: any size (resized to 299x299), grayscale repeated to RGB.
        labels: optional (N,) integer classes the samples were generated for; gives ``accuracy``
            under difflab's MNIST classifier (MNIST-shaped samples only, else ``None``).
        ref: ``"mnist5k-test"``, ``"mnist5k-train"`` or an ``.npz`` (see the module docstring).
        features: ``"mnist"`` (128-d, difflab's classifier) or ``"inception"`` (2048-d pool3).
        inception_weights: local pytorch-fid weights file; required for ``features="inception"``.
        k: k of the precision / recall radii. batch_size: images per forward pass.
        distributed: inside an initialised process group, split the feature extraction across the
            ranks (every rank must call this with the same arguments); False: this process does it all.
    Returns:
        ``{"n", "features", "ref", "n_ref", "fd", "precision", "recall", "is"}`` plus ``"accuracy"``
        when labels are given. ``is`` uses the 1008 Inception logits or the classifier's 10 logits.
    Raises:
        ValueError / FileNotFoundError with the problem and the valid choices.
    """
    _check_features_choice(features)
    samples = _check_images(samples, "samples", features)
    _check_labels(labels, len(samples))
    evaluator = make_evaluator(ref, features, inception_weights, k=k, batch_size=batch_size, device=device,
                               distributed=distributed)
    return evaluator(samples, labels)


def evaluate_npz(path: str | Path, **kwargs) -> dict:
    """:func:`evaluate` on an ``.npz`` of samples (``arr_0`` uint8 NHWC, optional ``arr_1`` labels)."""
    from difflab.data import load_npz

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    images, labels = load_npz(path)
    return evaluate(images, labels, **kwargs)


def save_reference(path: str | Path, images, features: str = "mnist",
                   inception_weights: str | Path | None = None, *, batch_size: int = 250) -> dict:
    """Write the statistics of ``images`` (uint8 NHWC) as a reference ``.npz`` (``mu``, ``sigma``,
    ``feature_space``, ``n``). Returns ``{"mu", "sigma"}``. Images are not stored: keep the images
    ``.npz`` as well where precision / recall are wanted."""
    _check_features_choice(features)
    images = _check_images(images, "reference images", features)
    feats, _ = _features_of(_extractor(features, inception_weights, "cpu"), images, batch_size, distributed=False)
    mu, sigma = feature_statistics(feats)
    save_stats(path, mu, sigma, feature_space=features, n=len(feats))
    return {"mu": mu, "sigma": sigma}


# ------------------------------------------------------------------------------------- CLI


def add_reference_arguments(p, *, defaults: bool = True) -> None:
    """``--ref``, ``--features`` and ``--inception-weights`` (``difflab eval``, ``difflab sample --eval``)
    on a parser or argument group. ``defaults=False`` leaves them None when not given (so a caller can
    tell whether they were); the help names the defaults either way."""
    p.add_argument("--ref", default=DEFAULT_REF if defaults else None, metavar="|".join(NAMED_REFS) + "|REF.npz",
                   help="reference set: a named MNIST-5k split, or an .npz with arr_0 images and/or "
                   f"mu, sigma statistics (an OpenAI reference batch works) (default: {DEFAULT_REF})")
    p.add_argument("--features", default=DEFAULT_FEATURES if defaults else None, choices=FEATURES,
                   help="feature space: difflab's MNIST classifier (128-d) or the FID InceptionV3 (2048-d) "
                   f"(default: {DEFAULT_FEATURES})")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local pytorch-fid weights (pt_inception-2015-12-05-6726825d.pth or .safetensors); "
                   "needed for --features inception, never downloaded")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``difflab eval``."""
    p.add_argument("samples", metavar="SAMPLES.npz",
                   help="arr_0 = uint8 NHWC images, optional arr_1 = int64 labels (OpenAI's layout)")
    add_reference_arguments(p, defaults=False)  # defaults applied in run_eval_command (--captions has its own)
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass (default 250)")
    p.add_argument("--captions", metavar="FILE.txt|scenes-test",
                   help="captioned MNIST scene samples: their captions, one per line in sample order, or "
                   "'scenes-test' (the 1,000 benchmark prompts); prints attribute accuracy, binding, FD / precision / "
                   "recall in the scene features against --ref (scenes-test (default), scenes-train or an .npz of "
                   "scene images) and diversity (docs/scenes.md)")


def run_eval_command(args: argparse.Namespace) -> int:
    """Run ``difflab eval`` and print the result as JSON on stdout (rank 0 under torchrun, where the
    feature extraction is sharded across the ranks)."""
    from difflab.train.distributed import init_distributed

    info = init_distributed()
    if getattr(args, "captions", None) is not None:  # captioned MNIST scenes: difflab.eval.scenes
        from difflab.eval.scenes import evaluate_scenes_npz

        given = [flag for flag, value in (("--features", args.features),
                                          ("--inception-weights", args.inception_weights)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with --captions (scene samples are scored in difflab's "
                             "scene features)")
        result = evaluate_scenes_npz(args.samples, args.captions, ref=args.ref or "scenes-test")
    else:
        result = evaluate_npz(args.samples, ref=args.ref or DEFAULT_REF, features=args.features or DEFAULT_FEATURES,
                              inception_weights=args.inception_weights, batch_size=args.batch_size)
    if info.rank == 0:
        print(json.dumps(result, indent=2))
    return 0
