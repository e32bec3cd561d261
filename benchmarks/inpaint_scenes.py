"""GLIDE inpainting on the captioned MNIST scenes: an inpainting model vs replacement with a plain text model.

Task: each two-object test scene (side by side or stacked; the reference scenes, split test, seed 0, in index
order) has one object's box erased (the first object for even indices, the second for odd ones) and is filled in
from the full caption, which names both objects. Two models, trained here on the same data for the same minutes
(``--minutes`` each, one after the other, one thread each; or given with ``--inpaint-run`` / ``--plain-run``):

* **glide**: configs/scenes-inpaint16.yaml (``model.inpaint``, random box / stroke / whole-image masks), sampled
  with GLIDE's rule (the known image and mask as inputs, x0^ pasted each step);
* **replace**: configs/scenes-text16.yaml (the plain text model), sampled with the replacement rule (x_t's known
  region replaced by q(x_t | image) before each network call; RePaint without resampling);

plus two reference rows: the plain model's text-to-image samples of the same captions (no known region) and the
real scenes themselves (the evaluator's ceiling). Reported per row: PSNR of the raw samples on the known region
(float, peak-to-peak 2; "exact" when equal), PSNR on the erased box against the real scene (how close to the
one true filling: informative only, many fillings fit the caption), the scene evaluator's attribute accuracy on
the results as ``difflab inpaint`` writes them (digit / colour / position / all correct / binding, FD in scene
features), and the erased object's own accuracy (present with the caption's digit and colour) beside the kept
one's.

Resumable: a run folder is reused; ``WORK/<name>.minutes.json`` records the minutes a run has trained and an
interrupted run is resumed (``difflab train --resume``) for the minutes it still lacks (an interrupted call's
minutes are not counted, so a killed run trains at most that much longer).

    OMP_NUM_THREADS=1 python benchmarks/inpaint_scenes.py --minutes 10

Writes docs/results/inpaint.{json,md} and inpaint-grid.png (rows: input with the box erased, glide, replace,
real scene). Smoke: ``--minutes 0.1 --n 8 --steps 3 --work /tmp/w --out-dir /tmp/w/results --set
model.model_channels=16 ...``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = (("inpaint16", "scenes-inpaint16.yaml"), ("text16", "scenes-text16.yaml"))


def train(work: Path, name: str, config: str, minutes: float, overrides: list[str]) -> dict:
    """Train ``config`` into ``work/name`` until it has trained ``minutes`` of CPU time (``difflab train
    --max-cpu-minutes``, so other work on the machine does not shrink the budget; resuming what an earlier
    call left)."""
    run, record = work / name, work / f"{name}.minutes.json"
    done = json.loads(record.read_text()) if record.is_file() else {"minutes": 0.0, "cpu_minutes": 0.0}
    if (run / "config.yaml").is_file() and not record.is_file():
        done = {"minutes": None, "cpu_minutes": None, "given": True}  # a run trained elsewhere: taken as it is
    left = minutes - done["cpu_minutes"] if done["cpu_minutes"] is not None else 0.0
    if left > 0.01:
        cmd = [sys.executable, "-m", "difflab", "train"]
        cmd += (["--resume", str(run)] if (run / "config.yaml").is_file()
                else [str(ROOT / "configs" / config), "--out", str(run),
                      *[a for o in overrides for a in ("--set", o)]])
        cmd += ["--max-cpu-minutes", f"{left:.3f}", "--quiet"]
        print("+", " ".join(cmd), flush=True)
        cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        subprocess.run(cmd, check=True)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = {"minutes": round(done["minutes"] + (time.perf_counter() - t0) / 60, 3),
                "cpu_minutes": round(done["cpu_minutes"] + ((cpu1.ru_utime + cpu1.ru_stime)
                                                            - (cpu0.ru_utime + cpu0.ru_stime)) / 60, 3)}
        record.write_text(json.dumps(done) + "\n")
    from difflab.runinfo import run_info

    info = run_info(run)
    return {"run": str(run), **done, "steps": info.get("steps_done"), "img_per_s": info.get("img_per_s")}


def erase_one_object(n: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The first ``n`` two-object reference scenes: captions, uint8 images [n, 16, 16, 3], masks [n, 16, 16]
    (True = known: all but one object's box) and which object was erased [n]."""
    from difflab.data.scenes import REFERENCE_SIZE, box_slices, reference_scenes

    ref = reference_scenes(16)
    two = [i for i, d in enumerate(ref.descriptions) if len(d.objects) == 2][:n]
    if len(two) < n:
        raise ValueError(f"--n {n}: the {REFERENCE_SIZE} reference scenes hold only {len(two)} two-object scenes")
    masks, which = np.ones((n, 16, 16), dtype=bool), np.zeros(n, dtype=int)
    for j, i in enumerate(two):
        which[j] = i % 2
        rows, cols = box_slices(ref.descriptions[i].objects[which[j]].box, 16)
        masks[j, rows, cols] = False
    return [ref.descriptions[i].caption for i in two], ref.images[16][two], masks, which


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float | None:
    """10 log10(peak^2 / MSE); None where the two are equal (infinite)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(peak**2 / mse)


def score(name: str, x: torch.Tensor | None, images_u8: np.ndarray, truth: np.ndarray, masks: np.ndarray,
          which: np.ndarray, captions: list[str], seconds: float | None) -> tuple[dict, np.ndarray]:
    """One row: the known / erased-region PSNRs of the raw samples and the evaluator on the written images."""
    from difflab.data import uint8_to_float
    from difflab.eval.scenes import evaluate_scenes, read_attributes

    row = {"method": name, "seconds": None if seconds is None else round(seconds, 1)}
    if x is not None:
        raw = x.permute(0, 2, 3, 1).numpy()
        real = uint8_to_float(truth).permute(0, 2, 3, 1).numpy()
        row["known_psnr_db"] = psnr(raw[masks], real[masks], 2.0)
        row["known_max_abs_err"] = float(np.abs(raw[masks] - real[masks]).max())
        row["erased_psnr_db"] = psnr(raw[~masks], real[~masks], 2.0)
    m = evaluate_scenes(images_u8, captions)
    row.update({k: m[k] for k in ("digit", "colour", "position", "all_correct", "binding", "fd")})
    readout = read_attributes(images_u8, captions)
    ok = readout.present & readout.digit_ok & readout.colour_ok
    first = np.flatnonzero(np.r_[True, readout.caption[1:] != readout.caption[:-1]])  # two rows per caption
    erased, kept = first + which, first + 1 - which
    row["erased_object_correct"] = float(ok[erased].mean())
    row["kept_object_correct"] = float(ok[kept].mean())
    row["erased_object_present"] = float(readout.present[erased].mean())
    return row, images_u8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training CPU minutes per model")
    ap.add_argument("--work", default=str(ROOT / "runs" / "scenes-inpaint"))
    ap.add_argument("--inpaint-run", help="an inpainting run to use instead of training one")
    ap.add_argument("--plain-run", help="a plain text run (e.g. runs/scenes/base16) instead of training one")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for both trainings (smoke tests)")
    ap.add_argument("--n", type=int, default=400, help="two-object test scenes (of about 400)")
    ap.add_argument("--sampler", default="ancestral")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0, help="classifier-free w, both models")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    if args.n < 2:
        ap.error("--n must be >= 2 (feature statistics)")
    from difflab.build import load_run
    from difflab.data import uint8_to_float
    from difflab.generate import draw_samples
    from difflab.images import save_grid, to_uint8

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    given = {"inpaint16": args.inpaint_run, "text16": args.plain_run}
    trained = {}
    for name, config in MODELS:
        trained[name] = ({"run": given[name], "given": True} if given[name]
                         else train(work, name, config, args.minutes, args.overrides))
    captions, truth, masks, which = erase_one_object(args.n)
    image = uint8_to_float(truth)
    mask = torch.from_numpy(masks[:, None].astype(np.float32))
    kw = dict(n=args.n, sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, batch=args.batch,
              seed=args.seed, prompts=captions, distributed=False)
    rows, pictures = [], {}
    for method, name, rule in (("glide (inpainting model)", "inpaint16", "glide"),
                               ("replace (plain text model)", "text16", "replace"),
                               ("plain text model, no known region", "text16", None)):
        cfg, _, denoiser = load_run(trained[name]["run"])
        t0 = time.perf_counter()
        known = dict(inpaint_image=image, inpaint_mask=mask, inpaint_rule=rule) if rule else {}
        x, _ = draw_samples(denoiser, cfg, **kw, **known)
        seconds = time.perf_counter() - t0
        u8 = to_uint8(x, cfg.data)
        if rule:  # as difflab inpaint writes them: the known pixels are the input's own bytes
            u8[masks] = truth[masks]
        row, pictures[method] = score(method, x if rule else None, u8, truth, masks, which, captions, seconds)
        rows.append(row)
        print(row, flush=True)
    real, _ = score("real scenes", None, truth, truth, masks, which, captions, None)
    rows.append(real)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = min(8, args.n)
    erased_input = np.where(masks[:k, ..., None], truth[:k], 128).astype(np.uint8)
    grid = np.concatenate([erased_input, pictures["glide (inpainting model)"][:k],
                           pictures["replace (plain text model)"][:k], truth[:k]])
    save_grid(grid, out / "inpaint-grid.png", nrow=k, scale=4)
    result = {"trained": trained, "rows": rows, "args": vars(args), "n_scenes": args.n,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/inpaint_scenes.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out / "inpaint.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "inpaint.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


def _f(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# Inpainting on the captioned scenes: GLIDE's inpainting model vs replacement with a plain text model", "",
        f"{result['n_scenes']} two-object test scenes at 16x16, one object's box erased, filled from the full caption; "
        f"{a['sampler']} {a['steps']} steps, classifier-free w = {a['guidance']}, seed {a['seed']}. "
        "Known PSNR: raw samples vs the scene on the kept pixels (peak-to-peak 2; exact = equal). Erased PSNR: on "
        "the erased box against the one real filling (informative only). Accuracies: the scene evaluator on the "
        "images as `difflab inpaint` writes them; erased / kept object: present with the caption's digit and colour.",
        "", "| method | known PSNR dB | erased PSNR dB | digit | colour | position | all correct | binding | "
        "erased object | kept object | FD | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        known = r.get("known_psnr_db", "n/a")
        known = "exact" if known is None else known if isinstance(known, str) else f"{known:.1f}"
        erased = r.get("erased_psnr_db", "n/a")
        erased = erased if isinstance(erased, str) else _f(erased, ".1f")
        lines.append(f"| {r['method']} | {known} | {erased} | {_f(r['digit'])} | {_f(r['colour'])} | "
                     f"{_f(r['position'])} | {_f(r['all_correct'])} | {_f(r['binding'])} | "
                     f"{_f(r['erased_object_correct'])} | {_f(r['kept_object_correct'])} | {_f(r['fd'], '.2f')} | "
                     f"{_f(r['seconds'], '.0f')} |")
    lines += ["", "Training (minutes per model, one thread): " + "; ".join(
        f"{name}: {t.get('steps', '?')} steps, {t.get('minutes', 'given')} min, {t.get('cpu_minutes', '-')} CPU min"
        for name, t in result["trained"].items()),
        "", f"`{result['command']}` on {result['machine']}, {result['date']}. Grid (inpaint-grid.png): input with "
        "the box erased, glide, replace, real scene."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
