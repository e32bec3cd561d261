"""Helpers of the ``difflab serve`` tests: a server-sent-events client and the gallery's command run in-process."""

from __future__ import annotations

import json
import shlex
import time

import httpx
import numpy as np


def events(response) -> list[tuple[str, dict]]:
    """Every (name, data) of a server-sent-events response (read to its end)."""
    out, name, data = [], "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "":
            if data:
                out.append((name, json.loads(data)))
            name, data = "message", ""
    return out


def sample(url: str, body: dict, timeout: float = 60) -> list[tuple[str, dict]]:
    """POST /api/sample and read its events to the end (AssertionError on a refusal)."""
    with httpx.Client(timeout=timeout) as client, client.stream("POST", f"{url}/api/sample", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise AssertionError(f"{r.status_code}: {r.text}")
        return events(r)


def run_command(command: str, cwd) -> np.ndarray:
    """Run a gallery command (``difflab sample|inpaint ... --npz out.npz``) through the CLI in this process, in
    ``cwd``; its images (uint8 NHWC)."""
    import os

    from difflab.cli import main

    argv = shlex.split(command)
    assert argv[0] == "difflab" and argv[-2:] == ["--npz", "out.npz"], command
    before = os.getcwd()
    os.chdir(cwd)
    try:
        assert main([*argv[1:], "--quiet"]) == 0, command
    finally:
        os.chdir(before)
    with np.load(cwd / "out.npz") as f:
        return f["arr_0"]


def gallery_images(url: str, entry_id: str) -> np.ndarray:
    import io

    r = httpx.get(f"{url}/api/gallery/{entry_id}/images.npz")
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content)) as f:
        return f["arr_0"]


def wait_until(check, timeout: float = 10.0, every: float = 0.05):
    """Poll ``check()`` until it returns a truthy value (returned) or the time runs out (AssertionError)."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"still not true after {timeout} s: {check}")
        time.sleep(every)
