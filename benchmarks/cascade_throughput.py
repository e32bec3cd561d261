"""Throughput of the cascade and unCLIP miniatures on the CPU: training (img/s of ``Trainer.train_step``, batch 32)
of the MNIST SR stage (configs/mnist-cascade-sr14-28.yaml, noise augmentation), of the scenes cascade's text U-Nets
(configs/scenes-text16.yaml, scenes-sr16-32.yaml, scenes-sr32-64.yaml) and of unCLIP's three networks
(configs/scenes-unclip-{clip,prior,decoder}16.yaml; the prior and the decoder read a freshly initialised CLIP);
cascade sampling (img/s of a base then its SR stage through difflab.pipelines.cascade, ancestral, ``--steps``
steps each: MNIST 14 -> 28, and the text scenes 16 -> 32 with the benchmark prompts and classifier-free guidance at
the base); unCLIP's text -> image (difflab.pipelines.unclip: the prior by DDIM with best-of-2, then the decoder,
``--steps`` each). In float32 and under bf16 autocast, timed in interleaved rounds (fp32 bf16 fp32 ...; the median
round is reported). Freshly initialised networks: speed does not depend on the weights.

    python benchmarks/cascade_throughput.py --threads 2 --rounds 1

Writes docs/results/cascade-throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"


def train_rate(cfg, steps: int) -> float:
    from difflab.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run:
        tr = Trainer(cfg, run, quiet=True)
        tr.net.train()
        for _ in range(3):
            tr.train_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def sample_rate(base_cfg, sr_cfg, n: int, steps: int, bf16: bool, prompts=None) -> float:
    from difflab.build import build_denoiser, build_model
    from difflab.pipelines.cascade import CascadeConfig, Stage, StageConfig, check_chain, sample_cascade

    stages = []
    for name, cfg in (("base", base_cfg), ("sr", sr_cfg)):
        torch.manual_seed(0)
        net = build_model(cfg).eval()
        level = 100 if name == "sr" else None
        spec = StageConfig(run=name, sampler="ancestral", steps=steps, bf16=bf16, aug_level=level)
        stages.append(Stage(spec, cfg, build_denoiser(cfg, net)))
    label = None if prompts else "all"
    check_chain(stages, label)
    cascade = CascadeConfig(stages=tuple(s.spec for s in stages), n=n, batch=n, label=label)
    t0 = time.perf_counter()
    sample_cascade(cascade, stages, prompts=prompts, distributed=False)
    return n / (time.perf_counter() - t0)


def unclip_parts(tmp: Path) -> Path:
    """A freshly initialised scenes CLIP (configs/scenes-unclip-clip16.yaml, one training step) in ``tmp/clip``:
    what the prior's and the decoder's ``clip.run`` read."""
    from difflab.cli import main as difflab

    clip = tmp / "clip"
    if not clip.exists():
        sets = ["train.max_steps=1", "train.warmup_steps=1", "data.num_scenes=64", "train.sample_every=1",
                "train.save_every=1", "eval_examples=32", "export_ema=null"]
        assert difflab(["train", str(ROOT / "configs" / "scenes-unclip-clip16.yaml"), "--out", str(clip), "--quiet",
                        *[a for x in sets for a in ("--set", x)]]) == 0
    return clip


def unclip_sample_rate(tmp: Path, n: int, steps: int, bf16: bool) -> float:
    """img/s of text -> image through difflab.pipelines.unclip (prior DDIM ``steps`` with best-of-2, then the
    decoder, ancestral ``steps``, w = 2), from one-step runs of the scenes prior and decoder."""
    from difflab.cli import main as difflab
    from difflab.data.scenes import reference_captions
    from difflab.pipelines.cascade import StageConfig
    from difflab.pipelines.unclip import UnCLIP, UnCLIPConfig

    clip = unclip_parts(tmp)
    for part in ("prior", "decoder"):
        if not (tmp / part).exists():
            sets = [f"clip.run={clip}", "train.max_steps=1", "data.num_scenes=64", "train.save_every=1",
                    "train.sample_every=1000"]
            assert difflab(["train", str(ROOT / "configs" / f"scenes-unclip-{part}16.yaml"), "--out", str(tmp / part),
                            "--quiet", *[a for x in sets for a in ("--set", x)]]) == 0
    spec = UnCLIPConfig(prior=StageConfig(run=str(tmp / "prior"), sampler="ddim", steps=steps, bf16=bf16),
                        decoder=StageConfig(run=str(tmp / "decoder"), sampler="ancestral", steps=steps, bf16=bf16,
                                            guidance=2.0), n=n, batch=n)
    pipe = UnCLIP(spec)
    t0 = time.perf_counter()
    pipe.text_to_image(reference_captions()[:n])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=64, help="images per cascade sampling")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps of each stage")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from difflab.config import load_config
    from difflab.data.scenes import reference_captions
    from difflab.hardware import native_bf16

    native, why = native_bf16("cpu")
    # emulated bf16 (no AMX / AVX512-BF16) is ~10x slower: a quarter of the work says its rate as well
    share = 1 if native else 4
    rows: dict[str, list[float]] = {}
    configs = ROOT / "configs"
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    for _ in range(args.rounds):
        for bf16 in (False, True):
            tag, flag = ("bf16", "true") if bf16 else ("fp32", "false")
            steps, n = (max(2, args.train_steps // share), max(4, args.n // share)) if bf16 else (args.train_steps,
                                                                                              args.n)
            sr = load_config(configs / "mnist-cascade-sr14-28.yaml", [f"train.bf16={flag}"])
            base = load_config(configs / "mnist-cascade-base14.yaml", ["data.path=unused.npz"])
            text_base = load_config(configs / "scenes-text16.yaml", [f"train.bf16={flag}"])
            text_sr = load_config(configs / "scenes-sr16-32.yaml", [f"train.bf16={flag}"])
            text_sr64 = load_config(configs / "scenes-sr32-64.yaml", [f"train.bf16={flag}"])
            rows.setdefault(f"SR 14 -> 28 training (MNIST, class), {tag}", []).append(train_rate(sr, steps))
            rows.setdefault(f"text U-Net 16 training (scenes base), {tag}", []).append(train_rate(text_base, steps))
            rows.setdefault(f"text SR 16 -> 32 training (scenes), {tag}", []).append(train_rate(text_sr, steps))
            rows.setdefault(f"text SR 32 -> 64 training (scenes), {tag}", []).append(train_rate(text_sr64, steps))
            reads_clip = [f"clip.run={unclip_parts(tmp)}"]  # the prior and the decoder name their CLIP
            for part, what in (("clip", "CLIP"), ("prior", "diffusion prior"), ("decoder", "decoder U-Net")):
                sets = [f"train.bf16={flag}"] + (reads_clip if part != "clip" else [])
                cfg = load_config(configs / f"scenes-unclip-{part}16.yaml", sets)
                rows.setdefault(f"unCLIP {what} 16 training (scenes), {tag}", []).append(train_rate(cfg, steps))
            rows.setdefault(f"unCLIP text -> image 16 sampling (scenes, prior best-of-2, w = 2), {tag}", []).append(
                unclip_sample_rate(tmp, n, args.steps, bf16))
            rows.setdefault(f"cascade 14 -> 28 sampling (MNIST), {tag}", []).append(
                sample_rate(base, sr, n, args.steps, bf16))
            rows.setdefault(f"text cascade 16 -> 32 sampling (scenes, w = 2 at 16), {tag}", []).append(
                sample_rate(text_base, text_sr, n, args.steps, bf16, prompts=reference_captions()[:n]))
    tmp_dir.cleanup()
    med = {k: statistics.median(v) for k, v in rows.items()}
    record = {"command": "python benchmarks/cascade_throughput.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, {platform.processor()}",
              "torch": torch.__version__, "threads": args.threads, "img_per_s": rows, "median": med,
              "native_bf16": native, "why": why}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cascade-throughput.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Cascade miniature throughput (CPU)", "",
             f"`{record['command']}` ({record['date']}, {record['machine']}, torch {record['torch']}, "
             f"{args.threads} threads; median of {args.rounds} interleaved rounds). Training: batch 32, noise "
             f"augmentation, the whole loop step. Sampling: {args.n} images, base 14x14 then SR 14 -> 28, "
             f"ancestral {args.steps} steps each (2 x {args.steps} network calls per image batch); unCLIP "
             f"text -> image: the prior by DDIM {args.steps} steps with best-of-2, then the decoder ancestral "
             f"{args.steps} steps at w = 2 (networks freshly initialised). bf16: "
             f"native {native} ({why})" + ("" if native else "; its rows did a quarter of the work") + ".", "",
             "| what | img/s | rounds |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.1f} | {', '.join(f'{v:.1f}' for v in rows[k])} |" for k in rows]
    (OUT / "cascade-throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
