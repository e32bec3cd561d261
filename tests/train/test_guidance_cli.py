"""Guidance through the CLI: ``difflab train`` with a classifier config, ``difflab sample --label all
--guidance W --classifier CLF --classifier-scale S`` on tiny digits runs, and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import ROOT, TINY, TINY_SET, sets

from difflab import Process
from difflab.cli import main
from difflab.guidance import ClassifierInfo
from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.train.classifier import load_classifier, save_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

CLF_CONFIG = ROOT / "configs" / "digits-classifier.yaml"
COND = ["data.class_cond=true", "model.num_classes=10", "model.class_null=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs on 8x8 digits (cosine, T = 100): unconditional, CFG (p_uncond 0.3), class-conditional
    without dropout, and a noisy classifier trained through the CLI on the same schedule."""
    root = tmp_path_factory.mktemp("guidance")
    out = {}
    for name, extra in (("uncond", []), ("cfg", [*COND, "diffusion.p_uncond=0.3"]), ("nodrop", COND)):
        out[name] = root / name
        assert main(["train", str(TINY), "--out", str(out[name]), "--max-steps", "4", "--quiet",
                     *sets(*TINY_SET, *extra)]) == 0
    out["clf"] = root / "clf"
    assert main(["train", str(CLF_CONFIG), "--out", str(out["clf"]), "--quiet"]) == 0
    out["root"] = root
    return out


def _sample(run, tmp, *args):
    npz = tmp / "s.npz"
    assert main(["sample", str(run), "--n", "12", "--steps", "4", "--batch", "12", "--npz", str(npz), "--quiet",
                 *map(str, args)]) == 0
    with np.load(npz) as arrays:
        out = arrays["arr_0"], arrays["arr_1"] if "arr_1" in arrays else None
    npz.unlink()  # the next call writes a new s.npz (sample never overwrites a file)
    return out


def _fails(capsys, args, *needles):
    """The CLI exits 2 with one 'difflab: error:' line naming every needle."""
    capsys.readouterr()
    assert main(args) == 2, f"difflab {' '.join(map(str, args))} did not exit 2"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    for needle in needles:
        assert needle in err, err


def test_classifier_training_writes_weights_info_and_accuracy_per_noise_level(runs):
    clf_run = runs["clf"]
    for name in ("config.yaml", "metrics.jsonl", "classifier.safetensors", "accuracy_by_noise.json"):
        assert (clf_run / name).is_file(), name
    report = json.loads((clf_run / "accuracy_by_noise.json").read_text())
    assert report["split"] == "test" and report["n"] == 355 and report["chance"] == 0.1
    assert report["t_start"][0] == 0 and report["t_end"][-1] == 99 and len(report["accuracy"]) == 10
    acc = report["accuracy"]
    assert all(0.0 <= a <= 1.0 for a in acc)
    assert acc[0] > 0.3, acc  # well above chance (0.1) at low noise ...
    assert acc[-1] < acc[0] - 0.1, acc  # ... and falling towards chance as x_t becomes noise
    assert max(acc[-2:]) < 0.3, acc
    clf = load_classifier(clf_run)  # a run folder or its file
    assert clf.diffusion_info.num_classes == 10 and clf.diffusion_info.image_size == 8
    assert clf.diffusion_info.timesteps == tuple(range(100)) and clf.diffusion_info.schedule == "cosine/100"
    rows = [json.loads(line) for line in (clf_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [40, 80, 120]


def test_cfg_labels_cycle_and_w0_is_the_conditional_model(runs, tmp_path):
    x0, y0 = _sample(runs["cfg"], tmp_path, "--label", "all")
    assert y0.tolist() == [i % 10 for i in range(12)] and x0.shape == (12, 8, 8, 1)
    x_w0, _ = _sample(runs["cfg"], tmp_path, "--label", "all", "--guidance", "0")
    assert np.array_equal(x_w0, x0)
    x_w3, y3 = _sample(runs["cfg"], tmp_path, "--label", "all", "--guidance", "3")
    assert y3.tolist() == y0.tolist() and not np.array_equal(x_w3, x0)
    _, y7 = _sample(runs["cfg"], tmp_path, "--label", "7", "--guidance", "1")
    assert y7.tolist() == [7] * 12


def test_classifier_guidance_on_an_unconditional_run(runs, tmp_path):
    plain, none = _sample(runs["uncond"], tmp_path)
    assert none is None
    s0, y0 = _sample(runs["uncond"], tmp_path, "--classifier", runs["clf"], "--classifier-scale", "0")
    assert np.array_equal(s0, plain) and y0.tolist() == [i % 10 for i in range(12)]  # s = 0: the same samples
    file = runs["clf"] / "classifier.safetensors"
    guided, y = _sample(runs["uncond"], tmp_path, "--classifier", file, "--classifier-scale", "30", "--label", "all")
    assert y.tolist() == y0.tolist() and not np.array_equal(guided, plain)
    # the guided samples are more of the asked class in the classifier's own eyes (at its lowest noise level)
    clf = load_classifier(file)

    def log_p(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            lp = torch.log_softmax(clf(x, torch.zeros(len(x), dtype=torch.long)), -1)
        return lp[torch.arange(len(x)), torch.from_numpy(y)].mean().item()

    assert log_p(guided) > log_p(plain) + 0.1


def _foreign_classifier(path, process, image_size=8):
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                      attention_resolutions=(), num_groups=8, pool="adaptive", image_size=image_size,
                                      out_channels=10))
    save_classifier(path, clf, ClassifierInfo.from_process(process, image_size, 10, "foreign"))
    return path


def test_bad_guidance_input(runs, tmp_path, capsys):
    base = ["sample", "--n", "2", "--steps", "2", "--quiet", "--npz", str(tmp_path / "x.npz")]
    cfg, uncond, clf = str(runs["cfg"]), str(runs["uncond"]), str(runs["clf"])
    _fails(capsys, [base[0], cfg, *base[1:], "--label", "10"], "label 10 is outside the classes", "0..9")
    _fails(capsys, [base[0], cfg, *base[1:], "--label", "-1"], "outside the classes")
    _fails(capsys, [base[0], cfg, *base[1:], "--label", "seven"], "'all'")
    _fails(capsys, [base[0], uncond, *base[1:], "--guidance", "2"], "unconditional", "--classifier")
    _fails(capsys, [base[0], uncond, *base[1:], "--label", "3"], "unconditional")
    _fails(capsys, [base[0], str(runs["nodrop"]), *base[1:], "--guidance", "2"], "p_uncond")
    _fails(capsys, [base[0], cfg, *base[1:], "--guidance", "-1"], "finite number >= 0")
    _fails(capsys, [base[0], uncond, *base[1:], "--classifier-scale", "2"], "needs a noisy classifier")
    _fails(capsys, [base[0], uncond, *base[1:], "--classifier", str(tmp_path / "nope"), "--classifier-scale", "1"],
           "not found")
    _fails(capsys, [base[0], uncond, *base[1:], "--classifier", clf, "--label", "12"], "outside the classes")
    linear = _foreign_classifier(tmp_path / "linear.safetensors", Process.named("linear", 100))
    _fails(capsys, [base[0], uncond, *base[1:], "--classifier", str(linear), "--classifier-scale", "1"],
           "another noise schedule")
    longer = _foreign_classifier(tmp_path / "t1000.safetensors", Process.named("cosine", 1000))
    _fails(capsys, [base[0], uncond, *base[1:], "--classifier", str(longer), "--classifier-scale", "1"],
           "another noise schedule")
    big = _foreign_classifier(tmp_path / "16px.safetensors", Process.named("cosine", 100), image_size=16)
    _fails(capsys, [base[0], uncond, *base[1:], "--classifier", str(big), "--classifier-scale", "1"],
           "16x16", "8x8")
    _fails(capsys, [base[0], clf, *base[1:]], "noisy-classifier run", "--classifier")
    assert not (tmp_path / "x.npz").exists()  # nothing written by a refused command


def test_bad_classifier_configs(runs, tmp_path, capsys):
    _fails(capsys, ["train", str(CLF_CONFIG), "--out", str(runs["clf"]), "--quiet"], "already holds a run",
           "--resume")
    _fails(capsys, ["train", str(CLF_CONFIG), "--out", str(tmp_path / "c"), *sets("classifier.out_channels=7")],
           "10 classes", "out_channels is 7")
    _fails(capsys, ["train", str(CLF_CONFIG), "--out", str(tmp_path / "c"), *sets("data.image_size=16")],
           "data.image_size")
    _fails(capsys, ["train", str(CLF_CONFIG), "--out", str(tmp_path / "c"), *sets("classifier.depth=2")],
           "classifier.depth", "unknown key")
    bad = tmp_path / "task.yaml"
    bad.write_text(CLF_CONFIG.read_text().replace("task: classifier", "task: clasifier"))
    _fails(capsys, ["train", str(bad), "--out", str(tmp_path / "c")], "unknown task 'clasifier'", "valid: classifier")
