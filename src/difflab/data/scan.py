"""Find every broken image of a data set up front: :func:`scan_images` (``difflab data scan PATH``).

Training decodes images per batch after a cheap check (see :mod:`difflab.data.images`); a scan
fully decodes every image once and lists every file that fails, so a long run does not stop on one
mid-way. It reads an image folder, a JSONL manifest (``.jsonl``) or webdataset shards (a ``.tar``,
a brace pattern, or a folder holding ``.tar`` files and no images), and with ``captions`` checks
the captions too (the ``x.txt`` sidecars of a folder, the ``txt`` members of shards; a manifest's
captions are checked whenever it is parsed).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from difflab.data.images import _DECODE_ERRORS, GRAY_MODES, IMAGE_EXTENSIONS, _decode, _image_files, read_caption

__all__ = ["ScanReport", "scan_images"]


@dataclass
class ScanReport:
    """What a scan found: ``checked`` images, ``broken`` (one line per problem, naming the file: an
    image that does not decode, a shard that does not read on, a bad caption), ``modes`` (the count
    of each PIL mode among the images that decode)."""

    path: str
    kind: Literal["folder", "manifest", "webdataset"]
    checked: int = 0
    broken: list[str] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.broken

    def summary(self, limit: int = 50) -> str:
        """A few lines for people: the counts, then each problem (at most ``limit``)."""
        grey = sum(n for m, n in self.modes.items() if m in GRAY_MODES)
        colour = sum(self.modes.values()) - grey
        head = (f"{self.kind} {self.path}: {self.checked} images checked, {sum(self.modes.values())} decode "
                f"({grey} grey, {colour} colour), {len(self.broken)} problems")
        lines = [head] + [f"  {problem}" for problem in self.broken[:limit]]
        if len(self.broken) > limit:
            lines.append(f"  ... and {len(self.broken) - limit} more")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "checked": self.checked, "ok": self.ok,
                "modes": dict(self.modes), "broken": list(self.broken)}


def _kind(path: str) -> Literal["folder", "manifest", "webdataset"]:
    p = Path(path)
    if "{" in path or p.suffix == ".tar":
        return "webdataset"
    if p.suffix == ".jsonl":
        return "manifest"
    if p.is_dir():
        if _image_files(p) or not any(q.suffix == ".tar" for q in p.iterdir()):
            return "folder"
        return "webdataset"
    raise ValueError(f"nothing to scan at {path}: give an image folder, a .jsonl manifest, a .tar shard, a folder "
                     "of .tar shards or a brace pattern such as shards/{000..009}.tar")


def _check_file(report: ScanReport, file: Path, where: str = "") -> None:
    report.checked += 1
    try:
        report.modes[_decode(file).mode] += 1
    except _DECODE_ERRORS as e:
        report.broken.append(f"{where}{file}: cannot decode the image ({type(e).__name__}: {e})")


def scan_images(path: str | os.PathLike, *, captions: bool = False) -> ScanReport:
    """Decode every image under ``path`` (module docstring) and report each one that fails.

    A path that holds no data, a folder without images or a manifest that does not parse is a
    ValueError (one line naming the file and the problem); broken images, shards and captions are
    listed in the report.
    """
    path = str(path)
    kind = _kind(path)
    report = ScanReport(path, kind)
    if kind == "folder":
        root = Path(path)
        files = _image_files(root)
        if not files:
            raise ValueError(f"image folder {root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                             "recursively)")
        for f in files:
            _check_file(report, f)
            if captions:
                try:
                    read_caption(f.with_suffix(".txt"))
                except ValueError as e:
                    report.broken.append(str(e))
    elif kind == "manifest":
        from difflab.data.manifest import read_manifest

        files, lines, _, _ = read_manifest(path)
        for f, n in zip(files, lines, strict=True):
            _check_file(report, f, f"{path}: line {n}: ")
    else:
        _scan_shards(report, path, captions)
    return report


def _scan_shards(report: ScanReport, spec: str, captions: bool) -> None:
    from difflab.data.webdataset import (
        TAR_IMAGE_EXTENSIONS,
        _caption,
        _open_tar,
        _read,
        decode_member,
        shard_paths,
        tar_samples,
    )

    for shard in shard_paths(spec):
        try:
            tf, size = _open_tar(shard)
            with tf:
                for _, group in tar_samples(tf, shard, size):
                    member = next(group[e] for e in TAR_IMAGE_EXTENSIONS if e in group)
                    report.checked += 1
                    try:
                        report.modes[decode_member(_read(tf, member, shard), shard, member).mode] += 1
                    except ValueError as e:
                        report.broken.append(str(e))
                    if captions and "txt" not in group:
                        report.broken.append(f"{shard}: member {member.name}: its sample has no .txt caption")
                    elif captions:
                        try:
                            _caption(_read(tf, group["txt"], shard), shard, group["txt"])
                        except ValueError as e:
                            report.broken.append(str(e))
        except ValueError as e:  # the shard itself does not read on: the rest of it is unchecked
            report.broken.append(f"{e} (the rest of the shard is unchecked)")
