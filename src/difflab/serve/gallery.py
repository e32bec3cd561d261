"""The gallery of ``difflab serve``: every finished job's images on disk with its full settings and the
``difflab`` command that draws the same pixels.

One folder per result under the gallery root, named by an id the server makes (``YYYYmmdd-HHMMSS-xxxxxx``)::

    ID/settings.json   the model, every setting, the labels, the command, the seconds it took
    ID/images.npz      arr_0 uint8 NHWC (+ arr_1 labels), what ``difflab sample --npz`` writes
    ID/grid.png        the images as one grid
    ID/image_K.png     each image
    ID/image.png, ID/mask.png   an inpainting job's inputs (the command reads them)
    ID/cascade.yaml    a cascade job's stages and settings (the command samples it)

A result is written into ``.tmp-ID`` and renamed into place, so a half-written one is never listed. Files are
served by id and by a fixed set of names only (:meth:`Gallery.file`): nothing a request says becomes a path.
Uploaded images wait in ``.uploads/`` (bounded count, oldest removed first) until a job copies them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Gallery", "ENTRY_ID"]

ENTRY_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_FIXED = {"settings.json", "images.npz", "grid.png", "image.png", "mask.png", "cascade.yaml"}
_IMAGE = re.compile(r"^image_(\d{1,4})\.png$")


class Gallery:
    """Results on disk (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, max_uploads: int = 64) -> None:
        self.root = Path(root).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"--gallery {root} is a file, not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads = self.root / ".uploads"
        self.uploads.mkdir(exist_ok=True)
        self.max_uploads = max_uploads
        self._lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and ENTRY_ID.match(folder.name):
                try:
                    entry = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(entry, dict) and entry.get("id") == folder.name:
                    self.entries[folder.name] = entry

    def new_id(self) -> str:
        while True:
            entry_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            if entry_id not in self.entries and not (self.root / entry_id).exists():
                return entry_id

    def folder(self, entry_id: str) -> Path:
        return self.root / entry_id

    def add(self, entry_id: str, images: np.ndarray, labels: np.ndarray | None, entry: dict[str, Any],
            files: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Write a result (uint8 NHWC ``images``, ``labels`` or None, its ``entry`` dict, extra ``files`` by name)
        and list it; returns the entry as listed."""
        from difflab.images import save_grid, save_npz

        tmp = self.root / f".tmp-{entry_id}"
        tmp.mkdir()
        try:
            save_npz(images, labels, tmp / "images.npz")
            save_grid(images, tmp / "grid.png")
            for k, im in enumerate(images):
                _save_png(im, tmp / f"image_{k}.png")
            for name, data in (files or {}).items():
                assert name in _FIXED, name
                (tmp / name).write_bytes(data)
            entry = {**entry, "id": entry_id, "images": [f"image_{k}.png" for k in range(len(images))],
                     "labels": labels.tolist() if labels is not None else None}
            (tmp / "settings.json").write_text(json.dumps(entry, indent=1), encoding="utf-8")
            os.replace(tmp, self.root / entry_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            self.entries[entry_id] = entry
        return entry

    def list(self, limit: int = 200) -> list[dict[str, Any]]:
        with self._lock:
            newest = sorted(self.entries.values(), key=lambda e: (e.get("created", 0), e["id"]), reverse=True)
            return newest[:limit]

    def get(self, entry_id: str) -> dict[str, Any]:
        with self._lock:
            if entry_id not in self.entries:
                raise KeyError(f"no gallery entry {entry_id!r}")
            return self.entries[entry_id]

    def file(self, entry_id: str, name: str) -> Path:
        """The path of file ``name`` of entry ``entry_id``: only listed entries and the names above."""
        entry = self.get(entry_id)
        m = _IMAGE.match(name)
        if name not in _FIXED and not (m and int(m.group(1)) < len(entry.get("images", []))):
            raise KeyError(f"entry {entry_id} has no file {name!r}")
        path = self.root / entry_id / name
        if not path.is_file():
            raise KeyError(f"entry {entry_id} has no file {name!r}")
        return path

    def delete(self, entry_id: str) -> None:
        self.get(entry_id)
        with self._lock:
            self.entries.pop(entry_id, None)
        shutil.rmtree(self.root / entry_id, ignore_errors=True)

    # uploads -----------------------------------------------------------------------------------------------
    def store_upload(self, png: bytes) -> str:
        upload_id = secrets.token_hex(16)
        with self._lock:
            (self.uploads / f"{upload_id}.png").write_bytes(png)
            kept = sorted(self.uploads.glob("*.png"), key=lambda p: p.stat().st_mtime)
            for old in kept[: max(0, len(kept) - self.max_uploads)]:
                old.unlink(missing_ok=True)
        return upload_id

    def upload_path(self, upload_id: str) -> Path:
        if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
            raise KeyError(f"{upload_id!r} is not an upload id (upload the image first: POST /api/uploads)")
        path = self.uploads / f"{upload_id}.png"
        if not path.is_file():
            raise KeyError(f"no upload {upload_id!r} (the last {self.max_uploads} uploads are kept; upload it again)")
        return path


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")
