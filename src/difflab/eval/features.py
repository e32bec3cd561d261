"""Feature extractors for sample-quality metrics.

Two feature spaces:

* ``"inception"``: the standard FID InceptionV3 (the TensorFlow ``inception-2015-12-05`` graph as
  ported by pytorch-fid: torchvision's Inception v3 with the FID patches). ``pool3`` gives the
  2048-d features of FID / precision / recall; ``fc`` gives the 1008 logits of the Inception Score.
  Written here in plain torch (no torchvision); it loads a state dict with pytorch-fid's key names
  (``pt_inception-2015-12-05-6726825d.pth``) from a local file and never downloads anything.
* ``"mnist"``: difflab's own small MNIST CNN (:class:`MNISTClassifier`), trained on the MNIST-5k
  train split only by ``benchmarks/train_mnist_classifier.py``; its 128-d penultimate layer is the
  feature space of FD on MNIST and its 10 logits give accuracy and the classifier Inception Score.
  Its weights ship in the package (``eval/weights/mnist_classifier.safetensors``).

Images. Every extractor takes float NCHW in [-1, 1] (difflab's in-memory convention); uint8 NHWC
(the ``.npz`` on-disk layout) goes through :func:`uint8_nhwc_to_float` first. Both check shape,
dtype and range and raise a ``ValueError`` that says what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from difflab.safeload import load_weights_only

__all__ = [
    "FIDInceptionV3",
    "MNISTClassifier",
    "MNIST_WEIGHTS",
    "MNIST_INFO",
    "uint8_nhwc_to_float",
    "check_float_images",
    "load_state_dict_file",
    "load_inception",
    "load_mnist_classifier",
    "extract",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MNIST_WEIGHTS = WEIGHTS_DIR / "mnist_classifier.safetensors"
MNIST_INFO = WEIGHTS_DIR / "mnist_classifier.json"


# ----------------------------------------------------------------------------------------------
# Image conversion and checks
# ----------------------------------------------------------------------------------------------


def uint8_nhwc_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert on-disk images to the in-memory convention.

    Args:
        images: uint8 array of shape (N, H, W, C) with C in {1, 3}, or (N, H, W) (grayscale).
    Returns:
        float32 tensor of shape (N, C, H, W) in [-1, 1] (``x / 127.5 - 1``).
    Raises:
        ValueError: wrong dtype (anything but uint8) or wrong number of dimensions / channels.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 NHWC in 0..255, got dtype {images.dtype}; "
                "scale floats in [-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
            )
        t = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 NHWC in 0..255, got dtype {images.dtype}")
        t = images
    else:
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must have shape (N, H, W, C) with C = 1 or 3 (or (N, H, W)), got {tuple(t.shape)}"
        )
    from difflab.data import uint8_to_float  # the library's one conversion rule

    return uint8_to_float(t)


def check_float_images(x: torch.Tensor, channels: tuple[int, ...] = (1, 3)) -> None:
    """Raise ``ValueError`` unless ``x`` is float NCHW in [-1, 1] with an allowed channel count."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"expected a float tensor NCHW in [-1, 1], got {got}; convert uint8 NHWC images with "
            "difflab.eval.features.uint8_nhwc_to_float"
        )
    if x.ndim != 4 or x.shape[1] not in channels:
        raise ValueError(f"expected shape (N, C, H, W) with C in {channels}, got {tuple(x.shape)}")
    if x.numel() and (x.min().item() < -1.0 - 1e-3 or x.max().item() > 1.0 + 1e-3):
        raise ValueError(
            f"expected values in [-1, 1], got range [{x.min().item():.4g}, {x.max().item():.4g}]; "
            "uint8 images go through uint8_nhwc_to_float, [0, 1] images through 2 * x - 1"
        )


# ----------------------------------------------------------------------------------------------
# FID InceptionV3 (pytorch-fid layout)
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU. Keys: ``conv.*``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 SAME average pool leaves the zero padding out of the mean (the FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + c_in."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convs -> 768 channels."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 1280."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3/3x1 outputs -> 2048 channels.

    ``pool="avg"`` (Mixed_7b) uses the TF average pool; ``pool="max"`` (Mixed_7c) is the FID graph's
    max pool, a quirk of the 2015 TensorFlow model that pytorch-fid reproduces.
    """

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            p = _tf_avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 (pytorch-fid's ``fid_inception_v3``), attribute names = state dict keys.

    Input: float NCHW in [-1, 1], C = 3 (C = 1 is repeated to 3), any H, W: :meth:`forward` resizes
    bilinearly (``align_corners=False``) to 299x299 as pytorch-fid does, then the network sees the
    [-1, 1] range the TensorFlow graph expects (pytorch-fid's ``normalize_input`` maps its [0, 1]
    input to the same range). Output of :meth:`forward`: ``(pool3, logits)`` with shapes
    (N, 2048) and (N, 1008).

    Known difference from OpenAI's evaluator (which runs the TF graph itself): the TF graph resizes
    and rounds differently, so FID values match the TF ones to within a small fraction, not bit
    for bit. Report which implementation produced a number.
    """

    num_features = 2048
    num_classes = 1008

    def __init__(self, resize: bool = True):
        super().__init__()
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W) float in [-1, 1], C in {1, 3} -> (pool3 (N, 2048), logits (N, 1008))."""
        check_float_images(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize and tuple(x.shape[-2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        pool3 = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pool3, self.fc(pool3)  # dropout of the original is the identity in eval mode


# ----------------------------------------------------------------------------------------------
# difflab's MNIST classifier
# ----------------------------------------------------------------------------------------------


class MNISTClassifier(nn.Module):
    """Small CNN for MNIST: the feature space of difflab's MNIST FD and precision/recall.

    Layout: [conv3x3-BN-ReLU] x2 at 28x28 (32 ch) -> maxpool -> x2 at 14x14 (64 ch) -> maxpool ->
    conv3x3-BN-ReLU at 7x7 (128 ch) -> global average pool -> linear 128 -> ReLU (= ``features``)
    -> linear 10 (= ``logits``). About 0.16M parameters.

    Input: float NCHW in [-1, 1], C = 1, 28x28; 32x32 inputs (MNIST padded with the background
    value for a U-Net) are center-cropped to 28x28 (2 pixels off each side), any other size is an
    error.
    """

    num_features = 128
    num_classes = 10

    def __init__(self, width: int = 32, num_features: int = 128):
        super().__init__()
        w = width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature = nn.Linear(4 * w, num_features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, 10)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Check (N, 1, 28|32, 28|32) float in [-1, 1]; crop 32x32 to the central 28x28."""
        check_float_images(x, channels=(1,))
        size = tuple(x.shape[-2:])
        if size == (32, 32):
            return x[:, :, 2:30, 2:30]
        if size != (28, 28):
            raise ValueError(
                f"the MNIST classifier takes 28x28 images (or 32x32, center-cropped to 28x28), got "
                f"{size[0]}x{size[1]}; use features='inception' for other sizes"
            )
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 1, 28|32, 28|32) in [-1, 1] -> (features (N, 128), logits (N, 10))."""
        h = F.relu(self.feature(self.body(self.prepare(x))))
        return h, self.head(self.dropout(h))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``, no pickle code).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = load_weights_only(path, what="weights file")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(sd)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load that forgives only BatchNorm's ``num_batches_tracked`` (unused in eval)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shape (e.g. {wrong[:2]})")
        raise ValueError(f"state dict does not fit the {what}: " + "; ".join(parts))
    for k, v in own.items():
        if k not in sd:  # num_batches_tracked
            sd[k] = v
    model.load_state_dict(sd, strict=True)


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID InceptionV3 and load pytorch-fid weights from a local file (never downloads).

    Args:
        path: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release file) or the same
            state dict as ``.safetensors``.
    Returns:
        the network in eval mode with gradients off.
    """
    model = FIDInceptionV3()
    _load_into(model, load_state_dict_file(path), "FID InceptionV3 (pytorch-fid layout)")
    return model.eval().requires_grad_(False).to(device)


def load_mnist_classifier(path: str | Path | None = None,
                          device: str | torch.device = "cpu") -> MNISTClassifier:
    """Load difflab's MNIST classifier (the shipped weights unless ``path`` is given), eval mode."""
    path = MNIST_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST classifier weights not found at {path}; train them with "
            "`python benchmarks/train_mnist_classifier.py`"
        )
    model = MNISTClassifier()
    _load_into(model, load_state_dict_file(path), "MNIST classifier")
    return model.eval().requires_grad_(False).to(device)


def mnist_classifier_info() -> dict:
    """The JSON shipped beside the weights: test accuracy, training command, seed."""
    return json.loads(MNIST_INFO.read_text())


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Run a feature extractor over images in batches.

    Args:
        model: :class:`FIDInceptionV3` or :class:`MNISTClassifier` (returns ``(features, logits)``).
        images: float (N, C, H, W) in [-1, 1].
    Returns:
        ``(features (N, D) float64, logits (N, K) float64)`` as numpy arrays.
    """
    check_float_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    feats, logits = [], []
    for i in range(0, images.shape[0], batch_size):
        f, lg = model(images[i:i + batch_size].to(device))
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    if not feats:
        raise ValueError("no images to extract features from (N = 0)")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()
