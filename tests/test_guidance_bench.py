"""benchmarks/guidance.py end to end on tiny 28x28 MNIST runs: every point scored, plots and tables
written, and a second call only computes the points it lacks."""

import importlib.util
import json
from pathlib import Path

import pytest

from difflab.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore:only .* samples")]


def _sets(*items):
    return [a for item in items for a in ("--set", item)]


def _load():
    spec = importlib.util.spec_from_file_location("guidance_bench", ROOT / "benchmarks" / "guidance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guidance_benchmark_tiny_and_resumable(tmp_path, monkeypatch):
    cfg_run, clf_run, out = tmp_path / "cfg", tmp_path / "clf", tmp_path / "results"
    mnist28 = ["data.source=mnist5k", "data.image_size=28", "model.image_size=28", "data.class_cond=true",
               "model.num_classes=10", "model.class_null=true", "diffusion.p_uncond=0.2", "train.batch_size=16"]
    assert main(["train", str(ROOT / "configs" / "mnist-tiny.yaml"), "--out", str(cfg_run), "--max-steps", "2",
                 "--quiet", *_sets(*mnist28)]) == 0
    assert main(["train", str(ROOT / "configs" / "digits-classifier.yaml"), "--out", str(clf_run), "--quiet",
                 "--max-steps", "2", *_sets("data.source=mnist5k", "data.image_size=28",
                                            "classifier.image_size=28")]) == 0
    bench = _load()
    args = ["--cfg-run", str(cfg_run), "--clf-run", str(clf_run), "--n", "20", "--steps", "2", "--batch", "20",
            "--floor-draws", "1", "--w", "0,2", "--s", "0,4", "--out", str(out)]
    assert bench.main(args) == 0
    doc = json.loads((out / "guidance.json").read_text())
    assert set(doc["results"]["cfg"]) == {"0", "2"} and set(doc["results"]["cg"]) == {"0", "4"}
    for kind in ("cfg", "cg"):
        for r in doc["results"][kind].values():
            assert r["n"] == 20 and 0 <= r["accuracy"] <= 1 and r["fd"] > 0
            assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    # s = 0 and w = 0 draw the same unguided samples from the same seeds (labels ignored by the null half
    # differ from the conditional model's, so only each sweep's own baseline is compared)
    assert doc["results"]["cg"]["0"]["fd"] != doc["results"]["cg"]["4"]["fd"]
    assert doc["fd_floor"]["n"] == 20 and doc["fd_floor"]["fd"] > 0
    assert doc["models"]["unconditional"] == {"null-label half of": "cfg"}
    assert doc["models"]["classifier"]["steps"] == 2
    for name in ("guidance.md", "guidance_cfg.png", "guidance_cg.png", "guidance_samples.png"):
        assert (out / name).is_file(), name
    assert "| 4 |" in (out / "guidance.md").read_text()

    calls = []
    original = bench._point

    def counted(kind, scale, *rest):
        calls.append((kind, scale))
        return original(kind, scale, *rest)

    monkeypatch.setattr(bench, "_point", counted)
    assert bench.main([*args[:-6], "--w", "0,2,1", "--s", "0,4", "--out", str(out)]) == 0
    assert calls == [("cfg", 1.0)]
    again = json.loads((out / "guidance.json").read_text())
    assert again["results"]["cfg"]["2"] == doc["results"]["cfg"]["2"] and "1" in again["results"]["cfg"]
