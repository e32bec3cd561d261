"""A JSONL manifest of images: ``data.source: manifest``, ``data.path: x.jsonl``.

One JSON object per line::

    {"image": "cats/001.png", "caption": "a cat on a mat", "label": 3}

``image`` is a path relative to the manifest's folder (or absolute); ``caption`` (a non-empty
string) and ``label`` (an integer >= 0) are optional, but each is on every line or on none. Blank
lines are skipped; any other key is an error (a misspelt ``"lable"`` must not pass silently). Every
problem is a ValueError naming the manifest, the line number and the problem, raised when the
dataset is built. The images then behave as an image folder's (:class:`~difflab.data.images.
FileImageDataset`): the cheap check up front, decoded per batch, ``label`` gives ``y`` and
``num_classes = max(label) + 1``, and with ``captions`` the batches carry ``caption``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from difflab.data.images import FileImageDataset

__all__ = ["ManifestDataset", "read_manifest"]

MANIFEST_KEYS = ("image", "caption", "label")


def read_manifest(path: str | os.PathLike) -> tuple[list[Path], list[int], list[str] | None, np.ndarray | None]:
    """Parse and check a manifest: ``(image paths, their line numbers, captions or None, int64 labels
    or None)``. Image files must exist (their contents are checked by the dataset)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"manifest not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    images: list[Path] = []
    lines: list[int] = []
    captions: list[str] = []
    labels: list[int] = []
    first: tuple[int, bool, bool] | None = None  # (line, has caption, has label) of the first record
    missing: list[tuple[int, Path]] = []
    for n, chunk in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}: line {n}"
        try:
            line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f'{where}: expected a JSON object like {{"image": "a.png", "caption": "..."}}, '
                             f"got {type(rec).__name__}")
        unknown = sorted(set(rec) - set(MANIFEST_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: 'image' (required), 'caption', 'label'")
        if "image" not in rec:
            raise ValueError(f"{where}: missing key 'image' (the image file, relative to the manifest's folder)")
        image = rec["image"]
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
        has_caption, has_label = "caption" in rec, "label" in rec
        if first is None:
            first = (n, has_caption, has_label)
        for key, has, had in (("caption", has_caption, first[1]), ("label", has_label, first[2])):
            if has != had:
                state = "has" if has else "has no"
                other = "has one" if had else "has none"
                raise ValueError(f"{where}: {state} {key!r} but line {first[0]} {other}; "
                                 f"{key} must be on every line or on none")
        if has_caption:
            caption = rec["caption"]
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{where}: 'caption' must be a non-empty string, got {caption!r}")
            captions.append(caption.strip())
        if has_label:
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise ValueError(f"{where}: 'label' must be an integer >= 0, got {label!r}")
            labels.append(label)
        file = Path(image)
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            missing.append((n, file))
        images.append(file)
        lines.append(n)
    if first is None:
        raise ValueError(f"{path}: the manifest lists no images (one JSON object per line, "
                         '{"image": path, "caption": text, "label": int})')
    if missing:
        (n, file), more = missing[0], len(missing) - 1
        extra = f" (and {more} more missing images)" if more else ""
        raise ValueError(f"{path}: line {n}: image file not found: {file}{extra}")
    return images, lines, (captions if first[1] else None), (np.array(labels, dtype=np.int64) if first[2] else None)


class ManifestDataset(FileImageDataset):
    """The images of a JSONL manifest (see the module docstring) as a map-style dataset.

    ``captions``: batches carry each line's ``caption`` (the manifest must have them). Other
    arguments as :class:`~difflab.data.images.ImageFolderDataset`. Attributes: ``manifest``,
    ``lines`` (the line number of each kept image) and those of ``FileImageDataset``.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        image_size: int,
        *,
        channels: int | None = None,
        random_flip: bool = False,
        flip_seed: int = 0,
        on_broken: Literal["skip", "raise"] = "skip",
        cache: bool = False,
        num_workers: int = 0,
        captions: bool = False,
        check: Literal["header", "decode"] = "header",
        random_crop: bool = False,
    ) -> None:
        super().__init__(image_size, channels=channels, random_flip=random_flip, flip_seed=flip_seed,
                         on_broken=on_broken, cache=cache, num_workers=num_workers, check=check,
                         random_crop=random_crop)
        manifest = Path(manifest)
        files, lines, texts, labels = read_manifest(manifest)
        if captions and texts is None:
            raise ValueError(f"{manifest}: data.captions is true but the manifest has no 'caption' key "
                             '(add "caption": text to every line, or set data.captions to false)')
        line_of: dict[Path, int] = {}
        for f, n in zip(files, lines, strict=True):
            line_of.setdefault(f, n)

        def name(p: Path) -> str:
            return f"line {line_of[p]} {p}"

        self.manifest = manifest
        self._take(files, labels, texts if captions else None, what=f"manifest {manifest}",
                   origin=f"listed in {manifest}", name=name, scan=manifest)
        self.lines = [lines[i] for i in self.kept]
        self.num_classes = None if labels is None else int(labels.max()) + 1
