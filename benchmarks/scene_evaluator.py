"""Check the scene evaluator on real scenes: near 1 with the true captions, near chance with shuffled ones.

On the 1,000 reference scenes (test split, seed 0) at 64, 32 and 16 pixels:

* attribute accuracy (digit, colour, position), all-correct and binding with the true captions;
* the same with the captions shuffled (one fixed permutation), beside the chance levels: the nominal
  ones (1/10 digit, 1/6 colour, 0.16 = the chance that two random scenes have the same boxes) and an
  *oracle* on the same shuffle (the attributes read from the scenes' ground truth instead of their
  pixels: what a perfect reader would score);
* FD / precision / recall in the scene features: the reference against itself, the floor (1,000
  train-split scenes), the reference with pixel noise, with every colour replaced by the next one of
  the palette (the same colour distribution: FD barely moves, while the attribute metrics see every
  colour wrong), and with every object white (the colour distribution collapsed);
* diversity: 50 distinct reference captions drawn 8 times each with other MNIST images of the same digits
  (real scenes' diversity for one caption), against 8 copies of one image (0).

Writes ``docs/results/scene-evaluator.json``, ``docs/results/scene-evaluator-table.md`` and a grid of
scenes with their captions, ``docs/results/scene-evaluator-grid.png``:

    OMP_NUM_THREADS=1 python benchmarks/scene_evaluator.py
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from difflab.data.scenes import (
    COLOURS,
    PALETTE,
    box_slices,
    describe_scenes,
    downsample,
    parse_caption,
    reference_captions,
    reference_scenes,
    render_objects,
    render_scenes,
)
from difflab.eval.metrics import feature_statistics, frechet_distance, precision_recall
from difflab.eval.scenes import (
    attribute_metrics,
    diversity,
    evaluate_scenes,
    read_attributes,
    scene_features,
    scene_features_info,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
SIZES = (64, 32, 16)
KEYS = ("digit", "colour", "position", "all_correct", "binding")


def oracle(descriptions, captions) -> dict:
    """The attribute metrics a perfect reader would give: named objects matched to the scene's true
    objects by box (digit / colour right when the object in that box has them; position right when the
    box holds an object and no object lies outside the named boxes)."""
    digit, colour, position, all_ok, bound = [], [], [], [], []
    for d, c in zip(descriptions, captions, strict=True):
        layout, named = parse_caption(c)
        truth = {o.box: o for o in d.objects}
        clean = set(truth) <= {o.box for o in named}
        oks = []
        for o in named:
            t = truth.get(o.box)
            digit.append(t is not None and t.digit == o.digit)
            colour.append(t is not None and t.colour == o.colour)
            position.append(t is not None and clean)
            oks.append((digit[-1], colour[-1], position[-1]))
        all_ok.append(all(all(x) for x in oks))
        if len(named) == 2:
            bound.append(all(x[0] and x[1] for x in oks))
    return {"digit": float(np.mean(digit)), "colour": float(np.mean(colour)), "position": float(np.mean(position)),
            "all_correct": float(np.mean(all_ok)), "binding": float(np.mean(bound))}


def recoloured(images: np.ndarray, descriptions, size: int, to: str | None = None) -> np.ndarray:
    """Every object repainted in colour ``to``, or (None) in the next palette colour after its own
    (stroke = largest channel / the colour's peak)."""
    out = images.copy()
    for i, d in enumerate(descriptions):
        for o in d.objects:
            r, c = box_slices(o.box, size)
            a = out[i, r, c].max(-1, keepdims=True) / max(PALETTE[o.colour])
            new = to or COLOURS[(COLOURS.index(o.colour) + 1) % len(COLOURS)]
            out[i, r, c] = np.rint(np.clip(a, 0, 1) * np.array(PALETTE[new])).astype(np.uint8)
    return out


def same_caption_renders(descriptions, n_captions: int, per_caption: int, size: int, seed: int = 0):
    """``per_caption`` renders of each of the first ``n_captions`` scenes of distinct captions with other
    test images of the same digits (the caption fixed, the handwriting drawn anew)."""
    rng = np.random.default_rng(seed)
    scenes, captions = [], []
    for d in distinct(descriptions, n_captions):
        for _ in range(per_caption):
            scenes.append([dataclasses.replace(o, mnist_index=int(rng.integers(100))) for o in d.objects])
            captions.append(d.caption)
    return downsample(render_objects("test", scenes), size), captions


def distinct(descriptions, n: int) -> list:
    """The first ``n`` descriptions whose captions differ from all earlier ones."""
    seen, out = set(), []
    for d in descriptions:
        if d.caption not in seen:
            seen.add(d.caption)
            out.append(d)
    return out[:n]


def fd_row(feats: np.ndarray, ref_feats: np.ndarray) -> dict:
    p, r = precision_recall(ref_feats, feats)
    return {"fd": frechet_distance(*feature_statistics(feats), *feature_statistics(ref_feats)), "precision": p,
            "recall": r, "n": len(feats)}


def grid(path: Path, n: int = 12, cols: int = 3) -> None:
    """Reference scenes 0..n-1, each as its 64, 32 and 16 renders (shown at 128 px) over its caption."""
    from PIL import Image, ImageDraw, ImageFont

    tile, gap, text_h = 128, 6, 22
    cell_w, cell_h = 3 * tile + 2 * gap, tile + text_h
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * cell_w + (cols + 1) * 12, rows * cell_h + (rows + 1) * 12), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    renders = {s: reference_scenes(s).images[s] for s in SIZES}
    captions = reference_captions()
    for i in range(n):
        x0 = 12 + (i % cols) * (cell_w + 12)
        y0 = 12 + (i // cols) * (cell_h + 12)
        for j, s in enumerate(SIZES):
            im = Image.fromarray(renders[s][i]).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(im, (x0 + j * (tile + gap), y0))
        draw.text((x0, y0 + tile + 4), f"{i}: {captions[i]}", fill=(235, 235, 235), font=font)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    captions = reference_captions()
    descriptions = describe_scenes("test", 0, np.arange(1000))
    perm = np.random.default_rng(0).permutation(1000)
    shuffled = [captions[i] for i in perm]
    record: dict = {"sizes": {}, "chance": {"digit": 0.1, "colour": 1 / 6, "position_same_boxes": 0.16},
                    "oracle_shuffled": oracle(descriptions, shuffled)}
    for size in SIZES:
        images = reference_scenes(size).images[size]
        t0 = time.time()
        true = evaluate_scenes(images, captions)
        seconds = time.time() - t0
        shuf = attribute_metrics(read_attributes(images, shuffled))
        ref_feats = scene_features(images)
        train = render_scenes("train", 0, np.arange(1000), sizes=(size,)).images[size]
        noise = np.random.default_rng(1).normal(0, 25, images.shape)
        noisy = np.clip(images + noise, 0, 255).round().astype(np.uint8)
        wrong = recoloured(images, descriptions, size)
        wrong_attr = attribute_metrics(read_attributes(wrong, captions))
        white = recoloured(images, descriptions, size, to="white")
        div_images, div_caps = same_caption_renders(descriptions, 50, 8, size)
        div_real, _ = diversity(scene_features(div_images), div_caps)
        firsts = [d.index for d in distinct(descriptions, 50)]
        copies = np.repeat(images[firsts], 8, axis=0)
        div_copies, _ = diversity(scene_features(copies), [captions[i] for i in firsts for _ in range(8)])
        record["sizes"][str(size)] = {
            "true_captions": {k: true[k] for k in (*KEYS, "colour_swaps", "all_correct_by_layout")},
            "shuffled_captions": {k: shuf[k] for k in (*KEYS, "colour_swaps")},
            "recoloured_scenes": {k: wrong_attr[k] for k in KEYS},
            "fd": {"reference_vs_itself": {k: true[k] for k in ("fd", "precision", "recall")},
                   "train_scenes_floor": fd_row(scene_features(train), ref_feats),
                   "reference_plus_noise_25": fd_row(scene_features(noisy), ref_feats),
                   "reference_recoloured_next_colour": fd_row(scene_features(wrong), ref_feats),
                   "reference_all_white": fd_row(scene_features(white), ref_feats)},
            "diversity": {"real_same_caption_50x8": div_real, "copies_50x8": div_copies},
            "seconds_per_1000": round(seconds, 2),
        }
        print(f"{size}: true " + ", ".join(f"{k} {true[k]:.4f}" for k in KEYS)
              + " | shuffled " + ", ".join(f"{k} {shuf[k]:.4f}" for k in KEYS), flush=True)
    info = scene_features_info()
    record["scene_features"] = {"accuracy": info["accuracy"], "command": info["command"]}
    record["command"] = "OMP_NUM_THREADS=1 python benchmarks/scene_evaluator.py"
    record["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"
    record["torch"] = torch.__version__
    record["numpy"] = np.__version__
    record["date"] = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scene-evaluator.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "scene-evaluator-table.md").write_text(table(record))
    grid(args.out / "scene-evaluator-grid.png")
    print(table(record))
    return 0


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(record: dict) -> str:
    lines = ["| size | captions | digit | colour | position | all correct | binding |", "|---|---|---|---|---|---|---|"]
    for size, r in record["sizes"].items():
        for name, key in (("true", "true_captions"), ("shuffled", "shuffled_captions"),
                          ("true, scenes recoloured", "recoloured_scenes")):
            lines.append(f"| {size} | {name} | " + " | ".join(_f(r[key][k]) for k in KEYS) + " |")
    o = record["oracle_shuffled"]
    lines.append("| any | shuffled, oracle (ground truth, not pixels) | " + " | ".join(_f(o[k]) for k in KEYS) + " |")
    c = record["chance"]
    lines.append(f"| any | nominal chance | {c['digit']:.3f} | {c['colour']:.3f} | {c['position_same_boxes']:.3f} "
                 "| - | - |")
    lines += ["", "| size | scene features: set vs the 1,000 reference scenes | n | FD | precision | recall |",
              "|---|---|---|---|---|---|"]
    for size, r in record["sizes"].items():
        for name, row in r["fd"].items():
            lines.append(f"| {size} | {name} | {row.get('n', 1000)} | {row['fd']:.3f} | {row['precision']:.3f} | "
                         f"{row['recall']:.3f} |")
    lines += ["", "| size | diversity: real scenes, 50 captions x 8 | 8 copies of one image | seconds per 1,000 |",
              "|---|---|---|---|"]
    for size, r in record["sizes"].items():
        d = r["diversity"]
        lines.append(f"| {size} | {d['real_same_caption_50x8']:.3f} | {d['copies_50x8']:.3f} | "
                     f"{r['seconds_per_1000']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
