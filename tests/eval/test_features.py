"""Feature extractors: the FID InceptionV3 layout and loading, and the shipped MNIST classifier."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difflab.data import load_mnist5k
from difflab.eval.features import (
    MNIST_INFO,
    MNIST_WEIGHTS,
    FIDInceptionV3,
    MNISTClassifier,
    check_float_images,
    extract,
    load_inception,
    load_mnist_classifier,
    uint8_nhwc_to_float,
)

# Key names of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 names).
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
    "Mixed_6e.branch7x7_3.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.bn.bias": (384,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _randomized_inception_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = FIDInceptionV3().state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue  # pytorch-fid's file may or may not carry these; the loader takes both
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bn.bias")):
            out[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("bn.weight"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            fan_in = v[0].numel() if v.ndim > 1 else 1
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out


def test_inception_layout_matches_pytorch_fid():
    model = FIDInceptionV3()
    sd = model.state_dict()
    for k, shape in PYTORCH_FID_KEYS.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("AuxLogits") for k in sd)  # the FID graph has no aux classifier
    # torchvision's inception_v3 has 27,161,264 parameters; minus the aux classifier (3,326,696)
    # and plus 8 more classes in fc (8 * 2049) gives the FID network's count
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    sd = _randomized_inception_state_dict()
    d = tmp_path_factory.mktemp("inception")
    torch.save(sd, d / "pt_inception-test.pth")
    save_file(sd, str(d / "pt_inception-test.safetensors"))
    return sd, d


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_inception_loads_state_dict_exactly(inception_files, fmt):
    sd, d = inception_files
    model = load_inception(d / f"pt_inception-test.{fmt}")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_inception_gives_2048_features(inception_files):
    sd, d = inception_files
    model = load_inception(d / "pt_inception-test.pth")
    # the standard path: any size is resized to 299x299 (one image keeps the test fast on 2 cores)
    feats, logits = extract(model, torch.rand(1, 3, 40, 40) * 2 - 1)
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    assert np.isfinite(feats).all() and (feats >= 0).all() and feats.max() > 0  # pool3 follows a ReLU
    # the network is fully convolutional: without the resize it takes 75x75, its smallest input
    model.resize = False
    x = torch.rand(2, 3, 75, 75) * 2 - 1
    feats, logits = extract(model, x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert np.abs(feats[0] - feats[1]).max() > 0  # two images, two feature vectors
    np.testing.assert_allclose(logits, feats @ sd["fc.weight"].double().numpy().T + sd["fc.bias"].double().numpy(),
                               rtol=1e-4, atol=1e-4)
    # grayscale input is the same image with its channel repeated
    gray = x[:1, :1]
    torch.testing.assert_close(model(gray)[0], model(gray.expand(-1, 3, -1, -1))[0])


def test_inception_load_errors(tmp_path):
    sd = _randomized_inception_state_dict()
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 missing .*fc\.bias.*1 unexpected.*extra\.weight"):
        load_inception(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_inception(tmp_path / "junk.pth")


def test_image_conversion_and_checks():
    u8 = np.array([[[[0], [255]], [[128], [1]]]], dtype=np.uint8)  # (1, 2, 2, 1)
    x = uint8_nhwc_to_float(u8)
    assert x.shape == (1, 1, 2, 2)
    torch.testing.assert_close(x[0, 0], torch.tensor([[-1.0, 1.0], [128 / 127.5 - 1, 1 / 127.5 - 1]]))
    with pytest.raises(ValueError, match="uint8"):
        uint8_nhwc_to_float(u8.astype(np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        uint8_nhwc_to_float(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*got range \[0, 255\]"):
        check_float_images(torch.tensor([[[[0.0, 255.0], [9.0, 9.0]]]]))
    with pytest.raises(ValueError, match="float tensor"):
        check_float_images(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))


def test_mnist_classifier_input_sizes():
    model = MNISTClassifier().eval()
    x28 = torch.rand(3, 1, 28, 28) * 2 - 1
    x32 = torch.nn.functional.pad(x28, (2, 2, 2, 2), value=-1.0)  # padded as for a 32x32 U-Net
    f28, l28 = model(x28)
    f32, l32 = model(x32)
    assert f28.shape == (3, 128) and l28.shape == (3, 10)
    torch.testing.assert_close(f28, f32, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"28x28 images \(or 32x32.*got 64x64"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"C in \(1,\)"):
        model(torch.zeros(1, 3, 28, 28))


def test_shipped_mnist_classifier_accuracy():
    assert MNIST_WEIGHTS.stat().st_size < 1_000_000
    model = load_mnist_classifier()
    images, labels = load_mnist5k("test")
    feats, logits = extract(model, uint8_nhwc_to_float(images))
    acc = float((logits.argmax(1) == labels).mean())
    assert len(labels) == 1000 and acc >= 0.97
    info = json.loads(MNIST_INFO.read_text())
    assert info["test_accuracy"] == pytest.approx(acc, abs=1e-4)  # the shipped JSON tells the truth
    assert feats.shape == (1000, 128)
