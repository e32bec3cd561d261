"""Data: what a run trains on and what evaluation compares against.

- :mod:`difflab.data.images`: map-style image datasets (MNIST-5k, sklearn digits, image folders,
  ``.npz``) and the uint8 <-> [-1, 1] conversion rule.
- :mod:`difflab.data.sources`: a :class:`~difflab.config.DataConfig` to a dataset
  (:func:`build_dataset`) or to the per-step batches the training loop reads (:func:`build_source`).
- :mod:`difflab.data.scenes`: captioned MNIST scenes (``data.source: scenes``), the reference scenes and
  the benchmark prompt list.
"""

from difflab.data.images import (
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    MNIST_TRAIN_PER_CLASS,
    ArrayImageDataset,
    ImageFolderDataset,
    center_crop,
    center_crop_resize,
    float_to_uint8,
    load_digits8,
    load_mnist5k,
    load_npz,
    pad_to,
    uint8_to_float,
)
from difflab.data.scenes import (
    PALETTE,
    Scene,
    SceneDataset,
    SceneDescription,
    SceneObject,
    describe_scene,
    parse_caption,
    reference_captions,
    reference_scenes,
    render_scene,
    render_scenes,
    write_prompt_list,
)
from difflab.data.sources import BatchSource, IndexedBatches, build_dataset, build_source

__all__ = [
    "GRAY_MODES", "IMAGE_EXTENSIONS", "MNIST_TRAIN_PER_CLASS", "ArrayImageDataset", "ImageFolderDataset",
    "center_crop", "center_crop_resize", "float_to_uint8", "load_digits8", "load_mnist5k", "load_npz", "pad_to",
    "uint8_to_float", "BatchSource", "IndexedBatches", "build_dataset", "build_source",
    "PALETTE", "Scene", "SceneDataset", "SceneDescription", "SceneObject", "describe_scene", "parse_caption",
    "reference_captions", "reference_scenes", "render_scene", "render_scenes", "write_prompt_list",
]
