"""Noisy-classifier training for classifier guidance (ADM Sec. 4; guided-diffusion ``classifier_train.py``).

A classifier p_phi(y | x_t, t) is trained on x_t ~ q(x_t | x_0) at t drawn uniformly from the
*same* process as the diffusion model it will guide, with the plain cross-entropy:

    L(phi) = E_{t ~ U{0..T-1}, (x_0, y), eps} [ -log softmax(f_phi(x_t, t))_y ],
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                                   (DDPM eq. 4)

It then carries a :class:`~difflab.guidance.ClassifierInfo` (the steps and alpha_bar it saw, its
image size) as ``classifier.diffusion_info``; :func:`save_classifier` writes it into the
safetensors metadata, and :class:`~difflab.guidance.ClassifierGuidance` refuses a classifier
whose info does not fit the model it guides.

The objective, the report and the file format; the training itself is a task of the one loop
(:class:`difflab.train.tasks.classifier.ClassifierTask`, ``difflab train`` with ``task: classifier``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from difflab.fileio import atomic_write_with
from difflab.guidance import ClassifierInfo, check_labels
from difflab.process import Process, q_sample

Tensor = torch.Tensor

__all__ = ["classifier_losses", "accuracy_by_noise_level", "save_classifier", "load_classifier",
           "CLASSIFIER_FILE"]

_META_KEY = "difflab"


def classifier_losses(
    classifier: Callable[[Tensor, Tensor], Tensor],
    process: Process,
    x0: Tensor,
    y: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Per-example cross-entropy of the classifier on x_t ~ q(x_t | x_0), t ~ U{0..T-1} (ADM Sec. 4).

    Args:
        x0: [N, C, H, W] clean images in [-1, 1]; y: [N] labels.
        t: [N] steps of ``process`` (drawn uniformly from ``generator`` when None); the classifier is
            called with the original indices ``process.original_t(t)``.
        noise: [N, C, H, W] eps for q_sample (drawn from ``generator`` when None).
    Returns:
        ``loss`` [N] (nats), ``t`` [N] (the steps used), ``correct`` [N] bool (top-1), ``logits`` [N, K].
    """
    n = x0.shape[0]
    check_labels(y, None, n, "classifier training")
    if t is None:
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, process.num_timesteps, (n,), generator=generator, device=dev).to(x0.device)
    if noise is None:
        dev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(process, x0, t, noise)
    logits = classifier(x_t, process.original_t(t))
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"the classifier must return logits [N, K], got {tuple(logits.shape)}")
    if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1} (the classifier's classes), got "
                         f"{int(y.min())}..{int(y.max())}")
    y = y.to(logits.device)
    loss = F.cross_entropy(logits.float(), y, reduction="none")
    return {"loss": loss, "t": t, "correct": logits.argmax(dim=-1) == y, "logits": logits}


@torch.no_grad()
def accuracy_by_noise_level(
    classifier: Callable[[Tensor, Tensor], Tensor],
    process: Process,
    x0: Tensor,
    y: Tensor,
    bins: int = 10,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> dict[str, list]:
    """Top-1 accuracy and cross-entropy per band of noise levels (guided-diffusion logs them per t-quartile).

    The steps 0..T-1 are cut into ``bins`` equal bands; every example [N] is classified once per
    band at a t drawn uniformly inside it. A module classifier is put in eval mode and restored.
    Returns lists of length ``bins``: ``t_start``, ``t_end`` (inclusive), ``accuracy``, ``loss``.
    """
    T = process.num_timesteps
    if not isinstance(bins, int) or not 1 <= bins <= T:
        raise ValueError(f"bins must be an integer in 1..{T} (the number of steps), got {bins!r}")
    edges = [round(i * T / bins) for i in range(bins + 1)]
    was_training = getattr(classifier, "training", None)
    if was_training:
        classifier.eval()
    out: dict[str, list] = {"t_start": [], "t_end": [], "accuracy": [], "loss": []}
    try:
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            correct, loss = 0.0, 0.0
            for i in range(0, x0.shape[0], batch_size):
                xb, yb = x0[i:i + batch_size], y[i:i + batch_size]
                dev = generator.device if generator is not None else xb.device
                t = torch.randint(lo, hi, (xb.shape[0],), generator=generator, device=dev).to(xb.device)
                terms = classifier_losses(classifier, process, xb, yb, t=t, generator=generator)
                correct += terms["correct"].sum().item()
                loss += terms["loss"].sum().item()
            out["t_start"].append(lo)
            out["t_end"].append(hi - 1)
            out["accuracy"].append(correct / x0.shape[0])
            out["loss"].append(loss / x0.shape[0])
    finally:
        if was_training:
            classifier.train()
    return out


def save_classifier(path: str | os.PathLike, classifier: torch.nn.Module, info: ClassifierInfo | None = None) -> None:
    """Write the weights as safetensors, with the network config and the :class:`ClassifierInfo` as metadata.

    ``info`` defaults to ``classifier.diffusion_info``; it is required.
    The file is written atomically.
    """
    from difflab.config import to_dict

    info = info if info is not None else getattr(classifier, "diffusion_info", None)
    if info is None:
        raise ValueError("the classifier has no ClassifierInfo (the schedule and image size it was trained on); "
                         "pass info=ClassifierInfo.from_process(...)")
    meta = {"kind": "classifier", "config": to_dict(classifier.config), "diffusion_info": info.to_dict()}
    state = {k: v.detach().contiguous().cpu() for k, v in classifier.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta)}))


CLASSIFIER_FILE = "classifier.safetensors"


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A :class:`~difflab.nn.classifier.Classifier` from :func:`save_classifier`'s file (or a classifier
    run folder of ``difflab train``, holding ``classifier.safetensors``, or a released classifier that
    ``difflab convert`` wrote: :func:`difflab.convert.converted_classifier`), with its ``diffusion_info``
    set, in eval mode."""
    from difflab.config import from_dict
    from difflab.convert import converted_classifier, is_converted_folder
    from difflab.nn.classifier import Classifier, ClassifierConfig

    if os.path.isdir(path) and is_converted_folder(path):  # a released classifier, from difflab convert
        return converted_classifier(path, device)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CLASSIFIER_FILE)):
            raise ValueError(f"{path} is not a classifier run folder: {CLASSIFIER_FILE} is missing")
        path = os.path.join(path, CLASSIFIER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"classifier file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise ValueError(f"cannot read classifier file {path}: {e}") from None
    if raw is None:
        raise ValueError(f"{path} is not a difflab classifier file (no '{_META_KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("kind") != "classifier":
        raise ValueError(f"{path} holds a {meta.get('kind')!r}, not a classifier")
    clf = Classifier(from_dict(ClassifierConfig, meta["config"])).to(device)
    clf.load_state_dict(state)
    clf.diffusion_info = ClassifierInfo.from_dict(meta["diffusion_info"])
    return clf.eval()
