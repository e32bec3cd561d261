"""Noisy-classifier training (ADM Sec. 4): the objective, accuracy per noise level, a real tiny
ADM classifier on sklearn digits, the saved schedule info and its checks."""

from pathlib import Path

import pytest
import torch

from difflab import Denoiser, Parameterization, Process, q_sample
from difflab.config import load_config
from difflab.data import load_digits8, uint8_to_float
from difflab.guidance import ClassifierGuidance, ClassifierInfo
from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.unet import UNet, UNetConfig
from difflab.train.classifier import accuracy_by_noise_level, classifier_losses, load_classifier, save_classifier
from difflab.train.metrics import read_metrics
from difflab.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("single_thread")

PROCESS = Process.named("cosine", 1000)


def digits(split):
    images, labels = load_digits8(split)
    return uint8_to_float(images[..., None]), torch.as_tensor(labels)


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return Classifier(ClassifierConfig(in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                       attention_resolutions=(), num_groups=8, pool="adaptive", image_size=8,
                                       out_channels=10))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/digits-classifier.yaml on the schedule of these tests (cosine, T = 1000), trained by the
    one training loop: (the exported classifier, the metrics lines)."""
    cfg = load_config(ROOT / "configs" / "digits-classifier.yaml", ["diffusion.steps=1000"])
    run = tmp_path_factory.mktemp("clf")
    Trainer(cfg, run, quiet=True).train()
    return load_classifier(run), read_metrics(run / "metrics.jsonl")


def test_objective_is_cross_entropy_on_q_samples():
    x, y = digits("test")
    x, y = x[:16], y[:16]
    clf = tiny_classifier()
    seen = {}

    def spy(x_t, t):
        seen.update(x_t=x_t, t=t)
        return clf(x_t, t)

    respaced = PROCESS.respace(50)
    out = classifier_losses(spy, respaced, x, y, generator=torch.Generator().manual_seed(3))
    assert set(out) == {"loss", "t", "correct", "logits"} and out["loss"].shape == (16,)
    assert 0 <= int(out["t"].min()) and int(out["t"].max()) < 50
    assert torch.equal(seen["t"], respaced.original_t(out["t"]))  # the classifier sees original steps
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    t = torch.arange(16) * 3
    out = classifier_losses(spy, respaced, x, y, t=t, noise=noise)
    assert torch.equal(seen["x_t"], q_sample(respaced, x, t, noise))
    logp = torch.log_softmax(out["logits"], dim=-1)
    assert torch.allclose(out["loss"], -logp[torch.arange(16), y], atol=1e-6)
    assert torch.equal(out["correct"], out["logits"].argmax(-1) == y)
    a = classifier_losses(clf, PROCESS, x, y, generator=torch.Generator().manual_seed(5))
    b = classifier_losses(clf, PROCESS, x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["loss"], b["loss"])


def test_tiny_classifier_beats_chance_at_low_noise_and_not_at_t_near_T(trained):
    clf, records = trained
    assert [r["step"] for r in records] == [40, 80, 120]
    assert records[-1]["loss"] < records[0]["loss"]
    x, y = digits("test")
    acc = accuracy_by_noise_level(clf, PROCESS, x, y, bins=10, generator=torch.Generator().manual_seed(2))
    assert acc["t_start"] == list(range(0, 1000, 100)) and acc["t_end"] == list(range(99, 1000, 100))
    assert acc["accuracy"][0] > 0.45, acc  # chance is 0.1 (355 test digits: +-0.016)
    assert acc["accuracy"][-1] < 0.2, acc  # x_t is nearly pure noise at t ~ T (abar < 0.025)
    assert acc["accuracy"][0] > acc["accuracy"][-1] + 0.25, acc
    assert acc["loss"][0] < acc["loss"][-1]


def test_trained_classifier_carries_its_schedule_and_round_trips(trained, tmp_path):
    clf, _ = trained
    info = clf.diffusion_info
    assert info.image_size == 8 and info.num_classes == 10 and info.schedule == "cosine/1000"
    assert info.timesteps == tuple(range(1000))
    path = tmp_path / "clf.safetensors"
    save_classifier(path, clf)
    back = load_classifier(path)
    assert back.diffusion_info == info
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(back(x, t), clf(x, t))
    # it guides a model of the same schedule and size, respaced too, and refuses another schedule
    unet = UNet(UNetConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), num_groups=8, image_size=8))
    ClassifierGuidance(Denoiser(unet, PROCESS, Parameterization()), back).respace("ddim25")
    with pytest.raises(ValueError, match=r"another noise schedule \(cosine/1000\)"):
        ClassifierGuidance(Denoiser(unet, Process.named("linear", 1000), Parameterization()), back)


def test_bad_inputs(tmp_path):
    x, y = digits("test")
    clf = tiny_classifier()
    with pytest.raises(ValueError, match="no ClassifierInfo"):
        save_classifier(tmp_path / "c.safetensors", clf)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        classifier_losses(clf, PROCESS, x[:2], torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="bins must be an integer in 1..1000"):
        accuracy_by_noise_level(clf, PROCESS, x[:2], y[:2], bins=0)
    with pytest.raises(ValueError, match="classifier file not found"):
        load_classifier(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read classifier file"):
        load_classifier(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a difflab classifier file"):
        load_classifier(tmp_path / "plain.safetensors")
    assert ClassifierInfo.from_dict(ClassifierInfo.from_process(PROCESS, 8, 10).to_dict()) == \
        ClassifierInfo.from_process(PROCESS, 8, 10)
