"""From a :class:`~difflab.config.DataConfig` to data: :func:`build_dataset` (map-style, indexable)
and :func:`build_source` (what the training loop reads: one local batch per optimiser step).

The training loop's contract is a :class:`BatchSource`: ``source.batch(step)`` is this rank's part
of the global batch of optimiser step ``step`` (0-based), as a dict (``x0`` [b, C, S, S] in [-1, 1],
``y`` [b] for labelled data, ``caption`` list of b str for captioned data, ``low_res`` for pairs).
It is a pure function of ``(seed, rank, world, step)``, so a run resumed at step k reads exactly the
batches an uninterrupted run would have read; the loop stores only k.

Map-style datasets are wrapped in :class:`IndexedBatches` over a
:class:`~difflab.train.distributed.ShardedOrder`: rank r holds the global positions r, r+W, ... of
the single-process batch, so W ranks together see exactly what one process sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from difflab.data.images import (
    ArrayImageDataset,
    ImageFolderDataset,
    _ImageDataset,
    load_digits8,
    load_mnist5k,
    load_npz,
)
from difflab.data.scenes import SCENE_SIZES, SceneDataset

if TYPE_CHECKING:
    from difflab.config import DataConfig

__all__ = ["BatchSource", "IndexedBatches", "build_dataset", "build_source"]


class BatchSource(Protocol):
    """One local batch per optimiser step, deterministic in ``step`` (see the module docstring)."""

    def batch(self, step: int) -> dict[str, Any]: ...


class IndexedBatches:
    """A map-style dataset read in the order of a :class:`~difflab.train.distributed.ShardedOrder`.

    Args:
        dataset: anything with ``get_items(indices, epoch) -> dict`` and ``len``.
        seed: the order's seed (the run seed); epoch e's permutation is seeded with ``seed + e``.
        rank, world: this process and the number of processes.
        local_batch: examples per rank per step (global batch / world); the last partial batch of an
            epoch is dropped, so every epoch has ``len // (local_batch * world)`` steps.
    """

    def __init__(self, dataset, *, seed: int, rank: int, world: int, local_batch: int) -> None:
        from difflab.train.distributed import ShardedOrder

        self.dataset = dataset
        self.local_batch = local_batch
        self.order = ShardedOrder(len(dataset), seed=seed, even="drop", rank=rank, world_size=world)
        self.order.batches_per_epoch(local_batch)  # a batch larger than the data is an error now

    def batch(self, step: int) -> dict[str, Any]:
        epoch, idx = self.order.batch(step, self.local_batch)
        return self.dataset.get_items(idx, epoch)


def build_source(cfg: DataConfig, *, seed: int, rank: int = 0, world: int = 1, local_batch: int) -> BatchSource:
    """What the training loop reads for ``cfg`` on this rank (see the module docstring): webdataset
    shards are streamed (:class:`~difflab.data.webdataset.WebDatasetSource`), every other source is
    a map-style dataset read through :class:`IndexedBatches`; ``data.low_res_size`` adds ``low_res``."""
    if cfg.source == "webdataset":
        return _paired(_webdataset_source(cfg, seed=seed, rank=rank, world=world, local_batch=local_batch), cfg)
    return IndexedBatches(build_dataset(cfg, seed=seed), seed=seed, rank=rank, world=world, local_batch=local_batch)


def build_dataset(cfg: DataConfig, *, seed: int = 0) -> _ImageDataset:
    """The dataset a :class:`difflab.config.DataConfig` describes.

    ``seed`` drives the random flips and crops (pass the training seed). Checks that the data fits
    the config: ``channels`` (when set) must match, ``class_cond`` needs labels, ``captions`` needs
    captions, MNIST / digits / npz images are padded up to ``image_size`` (never shrunk, unless
    ``random_crop``). With ``data.low_res_size`` the dataset is wrapped in
    :class:`~difflab.data.pairs.LowResPairs` (its ``get_items`` adds ``low_res``).
    """
    ds = _dataset(cfg, seed=seed)
    if cfg.random_crop and not getattr(ds, "random_crop", False):
        raise ValueError(f"data.random_crop is not available for source {cfg.source!r}; it is for folder, manifest, "
                         "webdataset, npz, mnist5k and digits")
    return _paired(ds, cfg)


def _paired(data, cfg: DataConfig):
    """``data`` (a dataset or a batch source), with ``low_res`` added when ``data.low_res_size`` is set."""
    if cfg.low_res_size is None:
        return data
    from difflab.data.pairs import LowResPairs

    return LowResPairs(data, cfg.low_res_size)


def _dataset(cfg: DataConfig, *, seed: int) -> _ImageDataset:
    """:func:`build_dataset` before the low-res wrapper."""
    if cfg.captions and cfg.source in ("mnist5k", "digits", "npz"):
        raise ValueError(f"data.captions is true but source {cfg.source!r} has no captions; captioned sources: "
                         "folder (x.txt beside each x.png), manifest, webdataset, scenes")
    split = cfg.split
    if cfg.source in ("mnist5k", "digits"):
        split = split or "train"
        images, labels = load_mnist5k(split) if cfg.source == "mnist5k" else load_digits8(split)
        num_classes = 10
        native_channels = 1
    elif cfg.source == "npz":
        _whole_set_split(cfg)
        if not cfg.path:
            raise ValueError("data.path must name an .npz file for source 'npz'")
        images, labels = load_npz(cfg.path)
        num_classes = None
        native_channels = images.shape[-1]
    elif cfg.source in ("folder", "manifest"):
        return _file_dataset(cfg, seed=seed)
    elif cfg.source == "webdataset":
        raise ValueError("data.source 'webdataset' is streamed, not indexable: read it with build_source (what "
                         "difflab train reads); for evaluation, use a folder, a manifest or an .npz")
    elif cfg.source == "scenes":
        return _scene_dataset(cfg, seed=seed)
    elif cfg.source == "none":
        raise ValueError("data.source is 'none' (a converted checkpoint: no images to train on or score against); "
                         "set data.source to mnist5k, digits, folder or npz")
    else:
        raise ValueError(f"unknown data.source {cfg.source!r}; valid: 'mnist5k', 'digits', 'folder', 'npz'")

    if cfg.channels is not None and cfg.channels != native_channels:
        raise ValueError(
            f"data.channels={cfg.channels} but the {cfg.source} images have {native_channels} channel(s)"
        )
    if cfg.class_cond and labels is None:
        raise ValueError(f"data.class_cond is true but {cfg.path} has no arr_1 labels")
    h, w = images.shape[1:3]
    if cfg.random_crop and cfg.image_size > min(h, w):
        raise ValueError(f"data.random_crop: the {cfg.source} images ({h}x{w}) are smaller than "
                         f"data.image_size={cfg.image_size}; random crops need images at least that large")
    if cfg.image_size < max(h, w) and not cfg.random_crop:
        raise ValueError(
            f"data.image_size={cfg.image_size} is smaller than the {cfg.source} images ({h}x{w}); "
            f"use image_size >= {max(h, w)} (extra border is padded with the background -1)"
        )
    return ArrayImageDataset(
        images,
        labels,
        image_size=cfg.image_size,
        num_classes=num_classes,
        random_flip=cfg.random_flip,
        flip_seed=seed,
        random_crop=cfg.random_crop,
    )


def _file_dataset(cfg: DataConfig, *, seed: int) -> _ImageDataset:
    """An image folder (:class:`~difflab.data.images.ImageFolderDataset`) or a JSONL manifest
    (:class:`~difflab.data.manifest.ManifestDataset`): one set each, decoded per batch."""
    from difflab.data.manifest import ManifestDataset

    _whole_set_split(cfg)
    kind = ImageFolderDataset if cfg.source == "folder" else ManifestDataset
    if not cfg.path:
        raise ValueError(f"data.path must name {'an image folder' if kind is ImageFolderDataset else 'a .jsonl'} "
                         f"for source {cfg.source!r}")
    ds = kind(cfg.path, cfg.image_size, channels=cfg.channels, random_flip=cfg.random_flip, flip_seed=seed,
              on_broken=cfg.on_broken, cache=cfg.cache, num_workers=cfg.num_workers, captions=cfg.captions,
              random_crop=cfg.random_crop)
    if cfg.class_cond and ds.num_classes is None:
        what = "the image folder {} has no class subfolders" if kind is ImageFolderDataset else \
            "the manifest {} has no 'label' key"
        raise ValueError("data.class_cond is true but " + what.format(cfg.path))
    return ds


def _webdataset_source(cfg: DataConfig, *, seed: int, rank: int, world: int, local_batch: int):
    """Streamed webdataset shards (:class:`~difflab.data.webdataset.WebDatasetSource`)."""
    from difflab.data.webdataset import WebDatasetSource

    _whole_set_split(cfg)
    if cfg.cache:
        raise ValueError("data.cache does not apply to source 'webdataset': shards are streamed, not kept in memory")
    return WebDatasetSource(cfg.path, image_size=cfg.image_size, seed=seed, rank=rank, world=world,
                            local_batch=local_batch, channels=cfg.channels, captions=cfg.captions,
                            class_cond=cfg.class_cond, random_flip=cfg.random_flip, random_crop=cfg.random_crop,
                            num_workers=cfg.num_workers)


def _scene_dataset(cfg: DataConfig, *, seed: int = 0):
    """Captioned MNIST scenes (:class:`~difflab.data.scenes.SceneDataset`): ``split`` (null = train),
    ``scene_seed``, ``num_scenes`` (null = 20,000 train / 1,000 test), ``image_size`` 16, 32 or 64, or
    ``image_size`` windows of ``render_size`` renders under ``random_crop`` (cut with ``seed``)."""
    split = cfg.split or "train"
    if split == "all":
        raise ValueError("data.split='all' does not apply to source 'scenes'; use 'train' (scenes of train digits) "
                         "or 'test' (the reference scenes)")
    if cfg.image_size not in SCENE_SIZES and not cfg.random_crop:
        raise ValueError(f"data.image_size={cfg.image_size} is not a scene render size; valid for source 'scenes': "
                         + ", ".join(map(str, SCENE_SIZES)))
    if cfg.channels not in (None, 3):
        raise ValueError(f"data.channels={cfg.channels} but scenes are RGB (3 channels); set channels to 3 or null")
    if cfg.render_size is not None and cfg.render_size not in SCENE_SIZES:
        raise ValueError(f"data.render_size={cfg.render_size} is not a scene render size; valid: "
                         + ", ".join(map(str, SCENE_SIZES)))
    if cfg.random_crop and cfg.render_size is None:
        raise ValueError("data.random_crop on source 'scenes' needs data.render_size (the side the scenes are "
                         f"rendered at before image_size={cfg.image_size} windows are cut): one of "
                         + ", ".join(map(str, SCENE_SIZES)))
    if cfg.render_size is not None and not cfg.random_crop:
        raise ValueError("data.render_size is set but data.random_crop is false: scenes are never resized; "
                         "set random_crop: true (image_size windows of the renders) or drop render_size")
    if cfg.random_crop and cfg.image_size > cfg.render_size:
        raise ValueError(f"data.image_size={cfg.image_size} is larger than data.render_size={cfg.render_size}: "
                         "random crops are windows of the render")
    return SceneDataset(split, seed=cfg.scene_seed, num_scenes=cfg.num_scenes, image_size=cfg.image_size,
                        random_flip=cfg.random_flip, render_size=cfg.render_size, random_crop=cfg.random_crop,
                        crop_seed=seed)


def _whole_set_split(cfg: DataConfig) -> None:
    if cfg.split not in (None, "all"):
        raise ValueError(
            f"data.split={cfg.split!r} does not apply to source {cfg.source!r}: a folder, .npz, manifest or set "
            "of shards is one set; "
            "point data.path at the split you want and leave data.split unset (or 'all')"
        )
