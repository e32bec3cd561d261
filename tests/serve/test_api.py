"""``difflab serve``'s API against a server on loopback: the inputs each model takes, a job's event stream
(progress, x0^ previews, the result), the gallery command reproducing the same pixels through the CLI (a class-
conditional run with guidance, a text run, a cascade, inpainting), every bad request answered with a 4xx and one
clear message while the server keeps serving, and the queue's order and cancelling."""

from __future__ import annotations

import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import gallery_images, run_command, sample

from difflab.serve.jobs import JobCancelled, JobQueue

pytestmark = pytest.mark.usefixtures("single_thread")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _upload(url: str, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(f"{url}/api/uploads", content=data, headers={"Content-Type": content_type}, timeout=60)


def test_models_list_the_inputs_each_takes(server):
    info = httpx.get(f"{server.url}/api/models").json()
    models = {m["name"]: m for m in info["models"]}
    assert set(models) == {"digits", "scenes", "pipeline"}
    d, s, c = models["digits"], models["scenes"], models["pipeline"]
    assert (d["num_classes"], d["guidance"], d["text"], d["inpaint"], d["side"], d["T"]) == (10, True, False,
                                                                                           "replace", 8, 100)
    assert (s["text"], s["inpaint"], s["num_classes"], s["side"], s["channels"]) == (True, "glide", None, 16, 3)
    assert len(c["stages"]) == 2 and c["num_classes"] == 10 and c["side"] == 8 and c["stages"][1]["low_res"]
    assert "ddim" in info["samplers"] and info["eta_samplers"] == ["ddim"] and info["limits"]["max_n"] == 64
    assert d["classifiers"] == ["clf"] and s["classifiers"] == []  # no classifier guidance of a text model


def test_classifier_guidance_and_its_command_draw_the_same_pixels(server, tmp_path):
    body = {"model": "digits", "n": 2, "seed": 1, "label": 4, "steps": 5, "classifier": "clf",
            "classifier_scale": 2.0}
    entry = sample(server.url, body)[-1][1]["entry"]
    assert "--classifier-scale 2.0" in entry["command"] and entry["settings"]["classifier"] == "clf"
    web = gallery_images(server.url, entry["id"])
    assert np.array_equal(run_command(entry["command"], tmp_path), web)
    plain = sample(server.url, {**body, "classifier": None, "classifier_scale": None})[-1][1]["entry"]
    assert not np.array_equal(gallery_images(server.url, plain["id"]), web)  # the guidance did something


def test_the_page_loads_nothing_from_elsewhere(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and "difflab" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for name in ("app.js", "app.css", "favicon.svg"):
        body = httpx.get(f"{server.url}/static/{name}").text
        assert "http://" not in body.replace("http://www.w3.org/2000/svg", "") and "https://" not in body, name
    assert "http://" not in r.text and "https://" not in r.text


def test_a_job_streams_progress_and_previews_and_its_command_draws_the_same_pixels(server, tmp_path):
    body = {"model": "digits", "n": 3, "seed": 11, "label": "3", "guidance": 1.5, "sampler": "ddim", "steps": 8,
            "eta": 0.5}
    evs = sample(server.url, body)
    names = [n for n, _ in evs]
    assert names[0] == "job" and names[-1] == "done" and "started" in names
    progress = [d for n, d in evs if n == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 9)) and progress[-1]["fraction"] == 1.0
    assert all(p["eta_s"] >= 0 for p in progress) and progress[-1]["eta_s"] == 0
    previews = [d for n, d in evs if n == "preview"]
    assert len(previews) >= 2 and previews[0]["image"].startswith("data:image/png;base64,")
    entry = evs[-1][1]["entry"]
    assert entry["settings"]["label"] == 3 and entry["settings"]["checkpoint"] == 4 and entry["labels"] == [3] * 3
    web = gallery_images(server.url, entry["id"])
    assert web.shape == (3, 8, 8, 1)
    cli = run_command(entry["command"], tmp_path)
    assert np.array_equal(cli, web), entry["command"]
    grid = httpx.get(f"{server.url}/api/gallery/{entry['id']}/grid.png")
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    listed = httpx.get(f"{server.url}/api/gallery").json()["entries"]
    assert entry["id"] in [e["id"] for e in listed]


def test_text_and_cascade_commands_draw_the_same_pixels(server, tmp_path):
    text = sample(server.url, {"model": "scenes", "n": 2, "seed": 3, "prompt": "a large red 7", "guidance": 2.0,
                               "steps": 4})[-1][1]["entry"]
    assert "--prompt 'a large red 7'" in text["command"]
    (tmp_path / "a").mkdir()
    assert np.array_equal(run_command(text["command"], tmp_path / "a"), gallery_images(server.url, text["id"]))
    evs = sample(server.url, {"model": "pipeline", "n": 3, "seed": 8, "label": 5, "stages": [
        {"sampler": "ddim", "steps": 4}, {"sampler": "ancestral", "steps": 3, "aug_level": 10}]})
    stages = {d["stage"] for n, d in evs if n == "progress"}
    assert stages == {1, 2}
    entry = evs[-1][1]["entry"]
    assert entry["command"].endswith("cascade.yaml --npz out.npz")
    (tmp_path / "b").mkdir()
    cli = run_command(entry["command"], tmp_path / "b")
    assert cli.shape == (3, 8, 8, 1) and np.array_equal(cli, gallery_images(server.url, entry["id"]))


def test_inpainting_keeps_the_known_pixels_and_its_command_draws_the_same(server, tmp_path):
    from difflab.data import render_scene

    scene = render_scene("test", 0, 3).image16
    keep = np.full((16, 16), 255, np.uint8)
    keep[8:, :8] = 0
    image = _upload(server.url, _png(scene)).json()["id"]
    mask = _upload(server.url, _png(keep)).json()["id"]
    evs = sample(server.url, {"model": "scenes", "n": 2, "seed": 4, "prompt": "a small red 7 in the bottom left",
                              "steps": 4, "inpaint": {"image": image, "mask": mask}})
    entry = evs[-1][1]["entry"]
    assert entry["settings"]["inpaint_rule"] == "glide" and entry["command"].startswith("difflab inpaint ")
    web = gallery_images(server.url, entry["id"])
    known = keep == 255
    assert np.array_equal(web[:, known], np.broadcast_to(scene[known], web[:, known].shape))
    assert not np.array_equal(web[0][~known], scene[~known])
    assert np.array_equal(run_command(entry["command"], tmp_path), web)


def _refused(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]
    assert isinstance(message, str) and "\n" not in message and needle in message, message


def test_bad_requests_get_one_clear_4xx_and_the_server_keeps_serving(server):
    url = server.url

    def post(body, **kw):
        return httpx.post(f"{url}/api/sample", json=body, timeout=30, **kw)

    _refused(post({"model": "nope"}), 422, "unknown model 'nope'; served models: digits")
    _refused(post({"model": "digits", "steps": 0}), 422, "steps must be in 1..100")
    _refused(post({"model": "digits", "steps": 10**6}), 422, "got 1000000")
    _refused(post({"model": "digits", "steps": "ddim5000"}), 422, "steps must be in 1..100")
    _refused(post({"model": "digits", "n": 10**4}), 422, "n must be in 1..64")
    _refused(post({"model": "digits", "label": 12}), 422, "label must be a class index 0..9")
    _refused(post({"model": "digits", "guidance": -1}), 422, "guidance must be a number in 0..100")
    _refused(post({"model": "digits", "eta": 0.5}), 422, "takes no eta")
    _refused(post({"model": "digits", "sampler": "magic"}), 422, "unknown sampler 'magic'; valid: ancestral")
    _refused(post({"model": "scenes"}), 422, "give a prompt")
    _refused(post({"model": "scenes", "prompt": "x" * 300}), 422, "the limit is 256")
    _refused(post({"model": "digits", "prompt": "a 7"}), 422, "not text-conditional")
    _refused(post({"model": "digits", "seed": -1}), 422, "seed: input should be greater than or equal to 0")
    _refused(post({"model": "digits", "extra": 1}), 422, "unknown field 'extra'")
    # a path in a field is a name that is not served, never a file that is opened
    _refused(post({"model": "/etc/passwd"}), 422, "unknown model '/etc/passwd'")
    _refused(post({"model": "digits", "classifier": "../../etc"}), 422, "unknown classifier '../../etc'")
    _refused(post({"model": "scenes", "prompt": "a", "inpaint": {"image": "/etc/passwd", "mask": "../x"}}), 422,
             "'/etc/passwd' is not an upload id")
    _refused(httpx.get(f"{url}/api/gallery/..%2F..%2Fetc/passwd"), 404, "")
    _refused(httpx.get(f"{url}/api/gallery/20250101-000000-abcdef/settings.json"), 404, "no gallery entry")
    # the body: JSON only, bounded; uploads: bounded, images only
    _refused(httpx.post(f"{url}/api/sample", content=b"model=digits",
                        headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "JSON")
    _refused(httpx.post(f"{url}/api/sample", content=b"{not json", headers={"Content-Type": "application/json"}),
             422, "not valid JSON")
    _refused(post({"model": "digits", "prompt": "x" * 100_000}), 413, "the limit is 64 kB")
    started = time.monotonic()
    _refused(_upload(url, b"\0" * (50 * 1024 * 1024)), 413, "the upload is 52.4 MB; the limit is 4.0 MB")
    assert time.monotonic() - started < 20
    _refused(_upload(url, b"hello, this is not an image", "image/png"), 415, "not an image")
    _refused(_upload(url, b""), 422, "empty")
    big = _upload(url, _png(np.zeros((2048, 1024), np.uint8)))
    _refused(big, 422, "the image is 1024x2048; the limit is 1048576 pixels")
    grey = np.full((16, 16), 128, np.uint8)
    wrong = _upload(url, _png(np.zeros((20, 20, 3), np.uint8))).json()["id"]
    mask = _upload(url, _png(grey)).json()["id"]
    _refused(post({"model": "scenes", "prompt": "a", "inpaint": {"image": wrong, "mask": mask}}), 422,
             "the uploaded image is 20x20; this run's images are 16x16")
    good = _upload(url, _png(np.zeros((16, 16, 3), np.uint8))).json()["id"]
    _refused(post({"model": "scenes", "prompt": "a", "inpaint": {"image": good, "mask": mask}}), 422,
             "not black and white")
    # another origin, another Host (DNS rebinding)
    _refused(post({"model": "digits"}, headers={"Origin": "http://evil.example"}), 403, "cross-origin")
    r = httpx.get(f"{url}/api/models", headers={"Host": "evil.example"})
    assert r.status_code == 400
    # and it still serves
    assert server.alive()
    assert sample(url, {"model": "digits", "n": 1, "steps": 2})[-1][0] == "done"


def test_the_queue_runs_jobs_in_order_one_at_a_time_and_cancels_waiting_and_running_ones():
    queue = JobQueue()
    order, gate, running = [], threading.Event(), threading.Event()

    def work(tag, block=False):
        def run(job):
            order.append(tag)
            if block:
                running.set()
                while True:  # a sampling loop: check between steps
                    job.check_cancelled()
                    gate.wait(0.01)
                    if gate.is_set():
                        break
            return {"tag": tag}
        return run

    first = queue.submit("m", work("first", block=True))
    assert running.wait(5)
    jobs = [queue.submit("m", work(f"w{k}")) for k in range(3)]
    other = queue.submit("other-model", work("other"))
    assert [j.ahead for j in jobs] == [1, 2, 3]
    assert queue.cancel(jobs[1]) and jobs[1].state == "cancelled"
    assert [j.ahead for j in (jobs[0], jobs[2])] == [1, 2]
    deadline = time.monotonic() + 5
    while other.state != "done" and time.monotonic() < deadline:  # another model does not wait for "m"
        time.sleep(0.01)
    assert other.state == "done" and first.state == "running"
    gate.set()
    while any(j.state not in ("done", "cancelled") for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["first", "other", "w0", "w2"] or order == ["first", "w0", "other", "w2"] or \
        [t for t in order if t != "other"] == ["first", "w0", "w2"]
    assert [j.state for j in jobs] == ["done", "cancelled", "done"] and jobs[2].result == {"tag": "w2"}
    # a running job stops at its next check
    gate.clear()
    running.clear()
    job = queue.submit("m", work("stopped", block=True))
    assert running.wait(5)
    queue.cancel(job)
    while job.state == "running" and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    assert job.state == "cancelled" and job.work is None
    for j in [first, *jobs, other, job]:
        queue.forget(j)
    assert queue.status()["jobs"] == 0 and queue.status()["running"] == {}
    with pytest.raises(JobCancelled):
        job.check_cancelled()


def test_a_host_other_than_loopback_prints_a_warning(runs, tmp_path, monkeypatch, capsys):
    import uvicorn

    from difflab.serve import is_loopback, serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    serve([runs["digits"]], host="127.0.0.1", port=0, gallery=tmp_path / "g")
    out = capsys.readouterr()
    assert "warning" not in out.err and "http://127.0.0.1:" in out.out
    serve([runs["digits"]], host="0.0.0.0", port=0, gallery=tmp_path / "g")
    err = capsys.readouterr().err
    assert "difflab: warning: serving on 0.0.0.0, not loopback" in err and len(err.strip().splitlines()) == 1


def test_bad_command_lines_are_one_line_errors(runs, tmp_path, capsys):
    from difflab.cli import main

    for args, needle in (([str(tmp_path / "missing")], "run folder not found"),
                         ([str(runs["digits"] / "config.yaml")], "must be a cascade file"),
                         ([str(runs["digits"]), "--port", "70000"], "--port must be in 0..65535"),
                         ([str(runs["digits"]), "--max-n", "0"], "--max-n must be >= 1")):
        assert main(["serve", *args, "--gallery", str(tmp_path / "g")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
