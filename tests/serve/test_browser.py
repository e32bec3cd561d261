"""The page of ``difflab serve`` driven by Playwright in headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs): pick a model, set a label and a seed, sample, see the progress events and the image
arrive, the gallery's command draw the same pixels through the CLI, compare two settings with the same seed,
cancel a job mid-run, and paint a mask on the canvas and inpaint."""

from __future__ import annotations

import io
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import gallery_images, run_command

CHROMIUM = os.environ.get("DIFFLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright "
                                   "(pip install -e '.[test]')")
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM} missing: apt-get install -y chromium; .ci/run "
                    "installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # bypass_csp: wait_for_function evaluates strings, which the page's CSP (script-src 'self') forbids
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    pg.wait_for_selector("body[data-ready='1']", timeout=15000)
    yield pg
    context.close()
    assert not errors, errors


def _last_entry(server) -> dict:
    return httpx.get(f"{server.url}/api/gallery").json()["entries"][0]


def _wait_done(page, timeout=30000):
    page.wait_for_function("document.getElementById('job-status').textContent.startsWith('Done')", timeout=timeout)


def test_sample_from_the_page_and_its_command_draws_the_same_pixels(page, server, tmp_path):
    page.select_option("#model", "digits")
    assert page.is_visible("#label") and page.is_visible("#guidance") and not page.is_visible("#prompt")
    page.select_option("#label", "7")
    page.fill("#seed", "21")
    page.fill("#n", "4")
    page.select_option("#sampler", "ddim")
    assert page.is_visible("#eta")
    page.fill("#steps", "12")
    page.fill("#guidance", "1")
    page.click("#sample")
    _wait_done(page)
    names = page.evaluate("window.difflabEvents")
    assert names[0] == "job" and names[-1] == "done" and names.count("progress") == 12 and "preview" in names
    assert page.get_attribute("#preview", "src").startswith("data:image/png")
    page.wait_for_function("document.getElementById('result-grid').naturalWidth > 0")
    entry_id = page.get_attribute("#result-grid", "data-entry")
    command = page.inner_text("#result-cmd")
    assert "--label 7" in command and "--seed 21" in command and "--sampler ddim" in command
    web = gallery_images(server.url, entry_id)
    assert web.shape == (4, 8, 8, 1)
    assert np.array_equal(run_command(command, tmp_path), web)
    assert page.locator(f".tile[data-entry='{entry_id}']").count() == 1

    # compare: the same settings without guidance, same seed, side by side
    page.click(f".tile[data-entry='{entry_id}'] button:text('A')")
    page.fill("#guidance", "0")
    page.click("#sample-b")
    page.wait_for_function("document.getElementById('compare-b').naturalWidth > 0", timeout=30000)
    assert page.inner_text("#compare-seed") == "same seed 21"
    diff = page.locator("#compare-table tr.diff th").all_inner_texts()
    assert diff == ["guidance"], diff
    b = _last_entry(server)
    assert b["settings"]["seed"] == 21 and b["settings"]["guidance"] == 0.0


def test_cancel_a_job_mid_run(page, server):
    before = len(httpx.get(f"{server.url}/api/gallery").json()["entries"])
    page.select_option("#model", "digits")
    page.fill("#n", "64")
    page.fill("#steps", "100")
    page.click("#sample")
    page.wait_for_function("document.getElementById('job-status').textContent.startsWith('Step')", timeout=20000)
    page.wait_for_function("document.getElementById('job-eta').textContent.startsWith('ETA')")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('job-status').textContent === 'Cancelled'", timeout=10000)
    status = httpx.get(f"{server.url}/api/status").json()
    assert status["running"] == {} and status["waiting"] == {}
    assert len(httpx.get(f"{server.url}/api/gallery").json()["entries"]) == before
    assert not page.is_disabled("#sample")


def test_paint_a_mask_and_inpaint(page, server, tmp_path):
    from difflab.data import render_scene

    scene = render_scene("test", 0, 3).image16
    Image.fromarray(scene).save(tmp_path / "scene.png")
    page.select_option("#model", "scenes")
    assert page.is_visible("#prompt") and not page.is_visible("#label")
    page.fill("#prompt", "a small red 7 in the bottom left")
    page.fill("#seed", "5")
    page.fill("#n", "2")
    page.fill("#steps", "4")
    page.click("#inpaint-box summary")
    page.set_input_files("#inpaint-file", str(tmp_path / "scene.png"))
    page.wait_for_selector("body[data-inpaint-source]", timeout=10000)  # the upload answered
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] - 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 - 20, box["y"] + box["height"] / 2 + 20, steps=8)
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] / 2 + 20, steps=8)
    page.mouse.up()
    assert page.is_checked("#inpaint-on")
    page.click("#sample")
    _wait_done(page)
    entry = _last_entry(server)
    assert entry["settings"]["inpaint_rule"] == "glide" and entry["command"].startswith("difflab inpaint ")
    mask = np.array(Image.open(io.BytesIO(httpx.get(f"{server.url}/api/gallery/{entry['id']}/mask.png").content)))
    known = (mask if mask.ndim == 2 else mask[..., 0]) == 255
    assert 0 < (~known).sum() < known.size and not known[-2, 1] and known[1, -2]  # painted bottom left only
    web = gallery_images(server.url, entry["id"])
    assert np.array_equal(web[:, known], np.broadcast_to(scene[known], web[:, known].shape))
    assert np.array_equal(run_command(entry["command"], tmp_path), web)
