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
    """What the training loop reads for ``cfg`` on this rank (see the module docstring)."""
    return IndexedBatches(build_dataset(cfg, seed=seed), seed=seed, rank=rank, world=world, local_batch=local_batch)



def build_dataset(cfg: DataConfig, *, seed: int = 0) -> _ImageDataset:
    """The dataset a :class:`difflab.config.DataConfig` describes.

    ``seed`` drives the random flips (pass the training seed). Checks that the data fits the
    config: ``channels`` (when set) must match, ``class_cond`` needs labels, MNIST / digits / npz
    images are padded up to ``image_size`` (never shrunk).
    """
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
    elif cfg.source == "folder":
        _whole_set_split(cfg)
        if not cfg.path:
            raise ValueError("data.path must name an image folder for source 'folder'")
        ds = ImageFolderDataset(
            cfg.path,
            cfg.image_size,
            channels=cfg.channels,
            random_flip=cfg.random_flip,
            flip_seed=seed,
            on_broken=cfg.on_broken,
            cache=cfg.cache,
            num_workers=cfg.num_workers,
        )
        if cfg.class_cond and ds.num_classes is None:
            raise ValueError(
                f"data.class_cond is true but the image folder {cfg.path} has no class subfolders"
            )
        return ds
    elif cfg.source == "scenes":
        return _scene_dataset(cfg)
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
    if cfg.image_size < max(h, w):
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
    )


def _scene_dataset(cfg: DataConfig):
    """Captioned MNIST scenes (:class:`~difflab.data.scenes.SceneDataset`): ``split`` (null = train),
    ``scene_seed``, ``num_scenes`` (null = 20,000 train / 1,000 test), ``image_size`` 16, 32 or 64."""
    split = cfg.split or "train"
    if split == "all":
        raise ValueError("data.split='all' does not apply to source 'scenes'; use 'train' (scenes of train digits) "
                         "or 'test' (the reference scenes)")
    if cfg.image_size not in SCENE_SIZES:
        raise ValueError(f"data.image_size={cfg.image_size} is not a scene render size; valid for source 'scenes': "
                         + ", ".join(map(str, SCENE_SIZES)))
    if cfg.channels not in (None, 3):
        raise ValueError(f"data.channels={cfg.channels} but scenes are RGB (3 channels); set channels to 3 or null")
    return SceneDataset(split, seed=cfg.scene_seed, num_scenes=cfg.num_scenes, image_size=cfg.image_size,
                        random_flip=cfg.random_flip)


def _whole_set_split(cfg: DataConfig) -> None:
    if cfg.split not in (None, "all"):
        raise ValueError(
            f"data.split={cfg.split!r} does not apply to source {cfg.source!r}: a folder or .npz is one set; "
            "point data.path at the split you want and leave data.split unset (or 'all')"
        )
