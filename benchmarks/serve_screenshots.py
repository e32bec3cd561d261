"""Screenshots of ``difflab serve`` for docs/serve.md (docs/serve-*.png): the page driven by Playwright in
headless Chromium (Debian's ``chromium``) against a server on loopback over trained runs.

    python benchmarks/serve_screenshots.py --run runs/cascade/single28 \\
        --cascade runs/cascade/base14 runs/cascade/sr-noise --out docs

``--run``: a class-conditional run (label, guidance, inpainting by replacement); ``--cascade BASE SR``: a base and
a super-resolution stage (a cascade file is written into the work folder). Writes serve-sample.png (a finished
job with its command), serve-progress.png (a job mid-run: progress, ETA, the x0^ preview), serve-compare.png (two
settings with the same seed), serve-inpaint.png (a mask painted on a gallery image and its fillings),
serve-cascade.png (the per-stage options of a cascade).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--force-device-scale-factor=1"]


def _start(models: list[str], work: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "difflab", "serve", *models, "--port", "0", "--gallery",
                             str(work / "gallery")], cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://[^/\s]+", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"difflab serve did not start: {line}")
    return proc, match.group(0)


def _done(page, timeout=300_000):
    """Wait for the job just started to finish (a new result, not the last one's 'Done')."""
    before = page.get_attribute("#result-grid", "data-entry") or ""
    page.wait_for_function(f"document.getElementById('job-status').textContent.startsWith('Done') && "
                           f"document.getElementById('result-grid').dataset.entry !== '{before}'", timeout=timeout)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a class-conditional run folder")
    p.add_argument("--cascade", nargs=2, metavar=("BASE", "SR"), help="a base run and a super-resolution run")
    p.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go (default docs/)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="serve-shots-"))
    models = [str(Path(args.run).resolve())]
    if args.cascade:
        cascade = work / "mnist.cascade.yaml"
        cascade.write_text(yaml.safe_dump({"n": 8, "batch": 8, "seed": 0, "label": "all", "stages": [
            {"run": str(Path(args.cascade[0]).resolve()), "sampler": "dpmpp-2m-sde", "steps": 20},
            {"run": str(Path(args.cascade[1]).resolve()), "sampler": "dpmpp-2m-sde", "steps": 15,
             "aug_level": 100}]}))
        models.append(str(cascade))
    name = Path(args.run).name
    proc, url = _start(models, work)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_context(viewport={"width": 1360, "height": 1000}, bypass_csp=True).new_page()
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.select_option("#model", name)

            # mid-run: progress, ETA and the x0^ preview
            page.select_option("#label", "3")
            page.fill("#seed", "7")
            page.fill("#n", "16")
            page.select_option("#sampler", "ancestral")
            page.fill("#steps", "100")
            page.click("#sample")
            page.wait_for_function("(document.getElementById('job-bar').style.width || '0').replace('%','') > 40",
                                   timeout=300_000)
            page.screenshot(path=str(out / "serve-progress.png"))
            page.click("#cancel")
            page.wait_for_function("document.getElementById('job-status').textContent === 'Cancelled'")

            # a finished job: the grid, its settings and the command that draws it again
            guided = page.is_visible("#guidance")  # a run trained with label dropout
            page.select_option("#sampler", "dpmpp-2m-sde")
            page.fill("#steps", "25")
            if guided:
                page.fill("#guidance", "2")
            page.click("#sample")
            _done(page)
            page.wait_for_function("document.getElementById('result-grid').naturalWidth > 0")
            page.screenshot(path=str(out / "serve-sample.png"))

            # compare: the same seed without guidance, or with the ODE solver
            first = page.get_attribute("#result-grid", "data-entry")
            page.click(f".tile[data-entry='{first}'] button:text('A')")
            if guided:
                page.fill("#guidance", "0")
            else:
                page.select_option("#sampler", "dpmpp-2m")
            page.click("#sample-b")
            page.wait_for_function("document.getElementById('compare-b').naturalWidth > 0", timeout=300_000)
            page.locator("#compare-card").scroll_into_view_if_needed()
            page.locator("#compare-card").screenshot(path=str(out / "serve-compare.png"))

            # inpainting: a gallery image, the lower half painted, its fillings
            page.evaluate("window.scrollTo(0, 0)")
            page.fill("#n", "8")
            page.select_option("#sampler", "dpmpp-2m-sde")
            page.click(f".tile[data-entry='{first}'] button:text('Inpaint')")
            page.wait_for_selector("body[data-inpaint-source]")
            page.wait_for_timeout(300)
            page.evaluate("document.getElementById('brush').value = 5")
            box = page.locator("#mask-canvas").bounding_box()
            page.mouse.move(box["x"] + 4, box["y"] + box["height"] * 0.55)
            page.mouse.down()
            for row in range(8):
                y = box["y"] + box["height"] * (0.55 + 0.06 * row)
                page.mouse.move(box["x"] + (box["width"] - 4 if row % 2 == 0 else 4), y, steps=12)
            page.mouse.up()
            assert page.is_checked("#inpaint-on"), "the mask was not painted"
            page.click("#sample")
            _done(page)
            page.wait_for_function("document.getElementById('result-grid').naturalWidth > 0")
            page.evaluate("document.getElementById('inpaint-box').scrollIntoView({block: 'start'})")
            page.screenshot(path=str(out / "serve-inpaint.png"))

            if args.cascade:
                page.evaluate("window.scrollTo(0, 0)")
                page.select_option("#model", "mnist")
                page.select_option("#label", "all")
                page.click("#sample")
                _done(page)
                page.wait_for_function("document.getElementById('result-grid').naturalWidth > 0")
                page.screenshot(path=str(out / "serve-cascade.png"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    for shot in sorted(out.glob("serve-*.png")):
        print(f"wrote {shot}")


if __name__ == "__main__":
    main()
