"""webdataset tar shards, streamed: ``data.source: webdataset``.

``data.path`` is a folder of ``.tar`` files (sorted by name), one ``.tar`` file, or a brace pattern
such as ``shards/{000..009}.tar`` or ``shards/{train,extra}-{0..3}.tar`` (a zero-padded range keeps
its width; nested braces are not supported).

Format, the webdataset convention: a sample is a run of consecutive tar members sharing a key, the
member's path up to the first dot of its file name (``a/000001.png`` -> key ``a/000001``, extension
``png``). A sample holds exactly one image (``png``, ``jpg``, ``jpeg`` or ``webp``) and optionally
``txt`` (its caption: UTF-8, outer whitespace stripped, non-empty) and ``cls`` (its integer label);
members with other extensions are ignored. The shards are read with the standard :mod:`tarfile`
module (uncompressed tars, as webdataset writes them; no extra dependency, and exact control of
the order and of seeking).

Order: a pure function of ``(seed, rank, world, num_workers, step)``.

- A *stream* is one (rank, decode worker) pair: a rank has ``max(1, num_workers)`` of them, each
  reading its own shards in its own thread (``num_workers`` = 0: one stream, no thread).
- Epoch ``e`` permutes the shards (:meth:`ShardedOrder.epoch_order`, seeded with ``seed + e``) and
  deals them round-robin to the ``world * workers`` streams (stream ``s = rank * workers + w``
  takes permuted shards ``s, s + world * workers, ...``), each read in that order, each shard's
  samples in file order. Shards should be written in shuffled order (the webdataset custom): the
  only mixing within an epoch is the shard order and the interleaving of a rank's workers.
- Local sample ``q`` of a rank in an epoch is its worker ``q % workers``'s sample ``q // workers``.
- Epoch ``e`` lasts as many steps as its shortest stream can fill; the rest of the longer streams
  is dropped for that epoch (the shards are dealt afresh the next epoch).
- Flips and random crops are pure functions of ``(seed, epoch, sample id)``, the id being the
  sample's position in the concatenation of all shards.

So the ranks of one step read disjoint shards, and together the whole data set once per epoch
(minus the dropped tails); changing ``world`` or ``num_workers`` changes the order (unlike a
map-style source, whose order is that of one process for any world size).

Resume: the per-shard sample counts (read from the tar headers when the source is built, no image
decoded; cached per process) place step ``k`` at (epoch, shard, offset) in every stream; a fresh
source opens each stream's shard and skips to the offset reading headers only, and returns exactly
the batches an uninterrupted run reads. Consecutive steps reuse the open tar files.

Errors (ValueError, one line naming the shard and, where there is one, the member): a shard that
is missing, not a tar, truncated or corrupt, or has no samples; a sample with no image, two images
or two members of one extension; a bad ``cls``; captions wanted but a sample has no ``txt``; labels
on some samples only. These are found when the source is built. An image that does not decode, or
a caption that is empty or not UTF-8, is found when its batch is read (ValueError naming the shard
and member); ``difflab data scan PATH`` decodes everything up front.
"""

from __future__ import annotations

import bisect
import io
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from difflab.data.images import (
    _DECODE_ERRORS,
    GRAY_MODES,
    _flip_bits,
    prepare_image,
    random_crops,
    uint8_to_float,
)

__all__ = ["ShardInfo", "WebDatasetSource", "expand_braces", "index_shard", "shard_paths", "tar_samples"]

TAR_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_BLOCK = 512


# ----------------------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``a/000.tar, a/001.tar, a/002.tar``; ``{x,y}`` lists; several braces
    multiply out, left to right. A range keeps the width of a zero-padded start."""
    depth = 0
    for ch in pattern:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"cannot expand {pattern!r}: unbalanced or nested braces")
    if depth:
        raise ValueError(f"cannot expand {pattern!r}: unbalanced braces")
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        if int(lo) > int(hi):
            raise ValueError(f"cannot expand {pattern!r}: the range {{{body}}} runs backwards")
        width = len(lo) if len(lo) > 1 and lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"cannot expand {{{body}}} in {pattern!r}: use a range {{000..009}} or a list {{a,b}}")
    return [name for c in choices for name in expand_braces(head + c + tail)]


def shard_paths(spec: str | os.PathLike) -> list[Path]:
    """The shard files ``data.path`` names (see the module docstring), each checked to exist."""
    spec = str(spec)
    if "{" in spec or "}" in spec:
        paths = [Path(p) for p in expand_braces(spec)]
        seen: set[Path] = set()
        for p in paths:
            if p in seen:
                raise ValueError(f"webdataset pattern {spec} names the shard {p} twice")
            seen.add(p)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"webdataset shard not found: {missing[0]} ({len(missing)} of the {len(paths)} "
                             f"shards {spec} names are missing)")
        return paths
    path = Path(spec)
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".tar")
        if not paths:
            raise ValueError(f"webdataset folder {path} holds no .tar shards")
        return paths
    if path.is_file():
        return [path]
    raise ValueError(f"webdataset shards not found: {spec} (give a folder of .tar files, one .tar, or a brace "
                     "pattern such as shards/{000..009}.tar)")


# ----------------------------------------------------------------------------- reading one tar


def _split_member(name: str) -> tuple[str, str] | None:
    """``"a/000001.seg.png"`` -> ``("a/000001", "seg.png")``; None for a name with no key or no extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _members(tf: tarfile.TarFile, shard: Path, size: int) -> Iterator[tarfile.TarInfo]:
    """The members of an open tar, each checked to lie inside the file; the archive's end checked
    too (tarfile stops silently at a truncated or invalid header, a real end is a zero block)."""
    last = None
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, EOFError, OSError) as e:
            after = f" after member {last.name}" if last is not None else ""
            raise ValueError(f"{shard}: truncated or corrupt tar{after} ({e})") from None
        if m is None:
            break
        if m.offset_data + m.size > size:
            raise ValueError(f"{shard}: member {m.name}: truncated (the tar ends at byte {size}, inside the "
                             f"member's {m.size} bytes)")
        tf.members.clear()  # streaming: no growing member list
        last = m
        yield m
    tf.fileobj.seek(tf.offset)
    if tf.fileobj.read(_BLOCK) != bytes(_BLOCK):
        after = f" after member {last.name}" if last is not None else ""
        raise ValueError(f"{shard}: truncated or corrupt tar{after}: no valid member header or end-of-archive "
                         f"marker at byte {tf.offset}")


def _open_tar(shard: Path) -> tuple[tarfile.TarFile, int]:
    try:
        size = shard.stat().st_size
        return tarfile.open(shard, mode="r:"), size
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{shard}: not an uncompressed tar file ({e}); webdataset shards are read as plain "
                         ".tar") from None
    except OSError as e:
        raise ValueError(f"{shard}: cannot open the shard ({e.strerror or e})") from None


def tar_samples(tf: tarfile.TarFile, shard: Path, size: int) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """``(key, {extension: member})`` per sample of an open tar, in file order; each sample holds
    exactly one image member (see the module docstring)."""
    key, group = None, {}

    def finish() -> tuple[str, dict[str, tarfile.TarInfo]]:
        images = [e for e in TAR_IMAGE_EXTENSIONS if e in group]
        if len(images) != 1:
            first = next(iter(group.values())).name
            problem = "no image member (.png, .jpg, .jpeg or .webp)" if not images else \
                f"{len(images)} images ({', '.join(group[e].name for e in images)})"
            raise ValueError(f"{shard}: member {first}: sample {key} has {problem}")
        return key, group

    for m in _members(tf, shard, size):
        if not m.isfile():
            continue
        parts = _split_member(m.name)
        if parts is None:
            continue
        k, ext = parts
        if k != key:
            if group:
                yield finish()
            key, group = k, {}
        if ext in group:
            raise ValueError(f"{shard}: member {m.name}: a second '.{ext}' member in sample {key}")
        group[ext] = m
    if group:
        yield finish()


def _read(tf: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> bytes:
    try:
        return tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{shard}: member {member.name}: cannot read ({e})") from None


def _label(tf: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> int:
    text = _read(tf, member, shard)
    try:
        label = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{shard}: member {member.name}: a .cls member must hold one integer label, "
                         f"got {text[:40]!r}") from None
    if label < 0:
        raise ValueError(f"{shard}: member {member.name}: labels must be >= 0, got {label}")
    return label


def _caption(data: bytes, shard: Path, member: tarfile.TarInfo) -> str:
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{shard}: member {member.name}: caption is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    if not text:
        raise ValueError(f"{shard}: member {member.name}: caption is empty")
    return text


def decode_member(data: bytes, shard: Path, member: tarfile.TarInfo) -> Image.Image:
    """A tar member's bytes as a fully decoded PIL image; a broken one is a ValueError naming both."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()
    except _DECODE_ERRORS as e:
        raise ValueError(f"{shard}: member {member.name}: cannot decode the image ({type(e).__name__}: "
                         f"{e})") from None


@dataclass(frozen=True)
class ShardInfo:
    """What the headers (and ``cls`` members) of one shard say: its sample count and labels."""

    path: Path
    count: int
    # int64 [count] from the samples' cls members; None when the shard has none
    labels: np.ndarray | None
    # the key of the first sample without a txt caption (None: every sample has one)
    uncaptioned: str | None
    # the mode of the first sample's image (to infer the channels)
    first_mode: str


_INDEX: dict[tuple[str, int, int], ShardInfo] = {}
_INDEX_LOCK = threading.Lock()


def index_shard(shard: str | os.PathLike) -> ShardInfo:
    """Count the samples of a shard from its tar headers (and read its ``cls`` labels), checking
    the structure (see the module docstring). Cached per process by (path, size, mtime)."""
    shard = Path(shard)
    try:
        st = shard.stat()
    except OSError as e:
        raise ValueError(f"webdataset shard not found: {shard} ({e.strerror or e})") from None
    key = (str(shard.resolve()), st.st_size, st.st_mtime_ns)
    with _INDEX_LOCK:
        if key in _INDEX:
            return _INDEX[key]
    tf, size = _open_tar(shard)
    count, labels, unlabelled, uncaptioned, first_mode = 0, [], None, None, None
    with tf:
        for name, group in tar_samples(tf, shard, size):
            if "cls" in group:
                labels.append(_label(tf, group["cls"], shard))
            elif unlabelled is None:
                unlabelled = next(iter(group.values())).name
            if "txt" not in group and uncaptioned is None:
                uncaptioned = name
            if first_mode is None:
                image = next(group[e] for e in TAR_IMAGE_EXTENSIONS if e in group)
                try:
                    with Image.open(io.BytesIO(_read(tf, image, shard))) as im:
                        first_mode = im.mode
                except _DECODE_ERRORS as e:
                    raise ValueError(f"{shard}: member {image.name}: not an image ({type(e).__name__}: {e})") from None
            count += 1
    if count == 0:
        raise ValueError(f"{shard}: the shard holds no samples (members named KEY.png, KEY.txt, KEY.cls)")
    if labels and unlabelled is not None:
        raise ValueError(f"{shard}: member {unlabelled}: its sample has no .cls label but others in the shard do; "
                         "label every sample or none")
    info = ShardInfo(shard, count, np.array(labels, dtype=np.int64) if labels else None, uncaptioned, first_mode)
    with _INDEX_LOCK:
        _INDEX[key] = info
    return info


# ----------------------------------------------------------------------------- streaming


@dataclass
class _Sample:
    image: np.ndarray  # uint8 [H, W, C], prepared (centre crop, or the whole image for random crops)
    caption: str | None
    id: int


class _Stream:
    """One stream's open shard: sequential reads; a jump reopens the shard and skips by headers."""

    def __init__(self, source: WebDatasetSource) -> None:
        self.source = source
        self.sid: int | None = None  # the open shard
        self.next = 0  # the offset of the next sample it yields
        self.tf: tarfile.TarFile | None = None
        self.samples: Iterator | None = None

    def close(self) -> None:
        if self.tf is not None:
            self.tf.close()
        self.tf = self.samples = self.sid = None

    def _seek(self, sid: int, offset: int) -> None:
        if self.sid == sid and self.next == offset:
            return
        if self.sid != sid or self.next > offset:
            self.close()
            info = self.source.shards[sid]
            self.tf, size = _open_tar(info.path)
            self.samples = tar_samples(self.tf, info.path, size)
            self.sid, self.next = sid, 0
        while self.next < offset:  # headers only: no member data is read
            self._next_group()
            self.next += 1

    def _next_group(self) -> dict[str, tarfile.TarInfo]:
        try:
            return next(self.samples)[1]
        except StopIteration:
            path = self.source.shards[self.sid].path
            raise ValueError(f"{path}: the shard ended after {self.next} samples but held "
                             f"{self.source.shards[self.sid].count} when indexed; was it changed?") from None

    def read(self, segments: list[tuple[int, int, int]]) -> list[_Sample]:
        """The samples of ``segments`` (``(shard, offset, count)`` each), read and decoded."""
        try:
            return self._read(segments)
        except BaseException:
            self.close()  # a retry starts from a clean state
            raise

    def _read(self, segments: list[tuple[int, int, int]]) -> list[_Sample]:
        src, out = self.source, []
        for sid, offset, count in segments:
            self._seek(sid, offset)
            path = src.shards[sid].path
            for _ in range(count):
                group = self._next_group()
                member = next(group[e] for e in TAR_IMAGE_EXTENSIONS if e in group)
                im = decode_member(_read(self.tf, member, path), path, member)
                caption = None
                if src.captions:
                    caption = _caption(_read(self.tf, group["txt"], path), path, group["txt"])
                image = prepare_image(im, src.image_size, src.channels, src.random_crop)
                out.append(_Sample(image, caption, int(src.base[sid]) + self.next))
                self.next += 1
        return out


class WebDatasetSource:
    """A :class:`~difflab.data.sources.BatchSource` over webdataset tar shards (module docstring).

    Args:
        path: ``data.path``: a folder of ``.tar``, one ``.tar`` or a brace pattern.
        image_size, channels (None: from the first sample's image; other images are converted),
        captions (batches carry ``caption``; every sample needs a ``txt``), class_cond (needs ``cls``
        labels), random_flip, random_crop: as ``DataConfig``.
        seed, rank, world, local_batch: the run seed, this rank of ``world``, examples per rank per step.
        num_workers: decode threads per rank, each with its own stream of shards (0: one stream).
    Attributes: ``shards`` (``ShardInfo`` each), ``num_classes`` (None without labels), ``channels``.
    """

    def __init__(self, path: str | os.PathLike, *, image_size: int, seed: int, local_batch: int, rank: int = 0,
                 world: int = 1, channels: int | None = None, captions: bool = False, class_cond: bool = False,
                 random_flip: bool = False, random_crop: bool = False, num_workers: int = 0) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        if local_batch < 1:
            raise ValueError(f"the per-rank batch must be >= 1, got {local_batch}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None (infer), got {channels!r}")
        self.path = str(path)
        self.shards = [index_shard(p) for p in shard_paths(path)]
        self.image_size, self.seed, self.rank, self.world = int(image_size), int(seed), rank, world
        self.local_batch, self.num_workers, self.workers = local_batch, num_workers, max(1, num_workers)
        self.captions, self.random_flip, self.random_crop = bool(captions), bool(random_flip), bool(random_crop)

        labelled = [s for s in self.shards if s.labels is not None]
        if labelled and len(labelled) < len(self.shards):
            bare = next(s for s in self.shards if s.labels is None)
            raise ValueError(f"{bare.path}: its samples have no .cls labels but those of {labelled[0].path} do; "
                             "label every sample or none")
        self.num_classes = int(max(s.labels.max() for s in labelled)) + 1 if labelled else None
        if class_cond and self.num_classes is None:
            raise ValueError(f"data.class_cond is true but the webdataset shards {self.path} have no .cls labels")
        if self.captions:
            for s in self.shards:
                if s.uncaptioned is not None:
                    raise ValueError(f"{s.path}: sample {s.uncaptioned} has no .txt caption (data.captions is "
                                     "true: every sample needs KEY.txt)")
        self.channels = channels or (1 if self.shards[0].first_mode in GRAY_MODES else 3)

        self.counts = np.array([s.count for s in self.shards], dtype=np.int64)
        self.base = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        n_streams = world * self.workers
        if len(self.shards) < n_streams:
            raise ValueError(f"webdataset {self.path}: {len(self.shards)} shards cannot feed {world} rank(s) x "
                             f"{self.workers} stream(s) each; write at least {n_streams} shards or lower "
                             "data.num_workers")
        fewest = int(np.sort(self.counts)[: len(self.shards) // n_streams].sum())
        if self.workers * fewest < local_batch:
            raise ValueError(f"webdataset {self.path}: a stream may get only {fewest} samples in an epoch "
                             f"({len(self.shards)} shards over {n_streams} streams), too few for a per-rank batch "
                             f"of {local_batch} from {self.workers} stream(s); use more or larger shards, fewer "
                             "workers or a smaller batch")
        from difflab.train.distributed import ShardedOrder

        self._order = ShardedOrder(len(self.shards), seed=self.seed, rank=0, world_size=1)
        self._steps_before = [0]  # _steps_before[e]: the steps of the epochs before e
        self._plan_of: tuple[int, list[np.ndarray]] | None = None
        self._streams = [_Stream(self) for _ in range(self.workers)]
        self._pool = None

    # -- where a step is
    def plan(self, epoch: int) -> list[np.ndarray]:
        """Every stream's shards in epoch ``epoch`` (stream ``rank * workers + w``), in reading order."""
        if self._plan_of is None or self._plan_of[0] != epoch:
            order = self._order.epoch_order(epoch)
            n = self.world * self.workers
            self._plan_of = (epoch, [order[s::n] for s in range(n)])
        return self._plan_of[1]

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimiser steps of epoch ``epoch``: as many as its shortest stream can fill."""
        n, b = self.workers, self.local_batch
        return min((n * int(self.counts[shards].sum()) + s % n) // b for s, shards in enumerate(self.plan(epoch)))

    def locate(self, step: int) -> tuple[int, int]:
        """``(epoch, step within the epoch)`` of optimiser step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        while self._steps_before[-1] <= step:
            e = len(self._steps_before) - 1
            self._steps_before.append(self._steps_before[-1] + self.steps_in_epoch(e))
        e = bisect.bisect_right(self._steps_before, step) - 1
        return e, step - self._steps_before[e]

    def _segments(self, shards: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Stream positions ``[lo, hi)`` as ``(shard, offset, count)`` pieces."""
        out, start = [], 0
        for sid in shards:
            c = int(self.counts[sid])
            a, z = max(lo, start), min(hi, start + c)
            if a < z:
                out.append((int(sid), a - start, z - a))
            start += c
        return out

    # -- the batches
    def batch(self, step: int) -> dict[str, Any]:
        """This rank's batch of optimiser step ``step``: ``x0`` [b, C, S, S] in [-1, 1], ``y`` [b]
        int64 with labels, ``caption`` (list of b str) with captions."""
        epoch, j = self.locate(int(step))
        plan, n, b = self.plan(epoch), self.workers, self.local_batch
        first, last = j * b, (j + 1) * b  # this rank's local samples [first, last) of the epoch
        work = []
        for w in range(n):
            lo = -(-(first - w) // n)  # positions q // n of the q in [first, last) with q % n == w
            hi = -(-(last - w) // n)
            work.append(self._segments(plan[self.rank * n + w], lo, hi))
        if self.num_workers == 0:
            parts = [self._streams[0].read(work[0])]
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="difflab-webdataset")
            parts = list(self._pool.map(lambda w: self._streams[w].read(work[w]), range(n)))
        taken = [iter(p) for p in parts]
        samples = [next(taken[q % n]) for q in range(first, last)]
        ids = np.array([s.id for s in samples], dtype=np.int64)
        images = [s.image for s in samples]
        if self.random_crop:
            raw = random_crops(images, self.image_size, seed=self.seed, epoch=epoch, indices=ids)
        else:
            raw = np.stack(images)
        x0 = uint8_to_float(raw)
        if self.random_flip:
            flip = torch.from_numpy(_flip_bits(self.seed, epoch, ids))
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        out: dict[str, Any] = {"x0": x0}
        if self.num_classes is not None:
            out["y"] = torch.from_numpy(self._labels(ids))
        if self.captions:
            out["caption"] = [s.caption for s in samples]
        return out

    def _labels(self, ids: np.ndarray) -> np.ndarray:
        sid = np.searchsorted(self.base, ids, side="right") - 1
        return np.array([self.shards[s].labels[i - self.base[s]] for s, i in zip(sid, ids, strict=True)],
                        dtype=np.int64)

    def close(self) -> None:
        """Close the open shards and the decode threads (a later ``batch`` reopens what it needs)."""
        for s in self._streams:
            s.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> WebDatasetSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
