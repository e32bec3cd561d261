"""Data: what a run trains on and what evaluation compares against.

- :mod:`difflab.data.images`: map-style image datasets (MNIST-5k, sklearn digits, image folders,
  ``.npz``) and the uint8 <-> [-1, 1] conversion rule.
- :mod:`difflab.data.sources`: a :class:`~difflab.config.DataConfig` to a dataset
  (:func:`build_dataset`) or to the per-step batches the training loop reads (:func:`build_source`).
- :mod:`difflab.data.manifest`: a JSONL manifest of images (``data.source: manifest``).
- :mod:`difflab.data.webdataset`: webdataset tar shards, streamed (``data.source: webdataset``).
- :mod:`difflab.data.pairs`: super-resolution pairs (``data.low_res_size``: batches carry ``low_res``).
- :mod:`difflab.data.scan`: decode every image of a data set and list the broken ones (``difflab data scan``).
- :mod:`difflab.data.scenes`: captioned MNIST scenes (``data.source: scenes``), the reference scenes and
  the benchmark prompt list.
"""

from difflab.data.images import (
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    MNIST_TRAIN_PER_CLASS,
    ArrayImageDataset,
    FileImageDataset,
    ImageFolderDataset,
    center_crop,
    center_crop_resize,
    float_to_uint8,
    load_digits8,
    load_mnist5k,
    load_npz,
    pad_to,
    random_crops,
    read_caption,
    uint8_to_float,
)
from difflab.data.manifest import ManifestDataset, read_manifest
from difflab.data.pairs import LowResPairs, area_downsample
from difflab.data.scan import ScanReport, scan_images
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
from difflab.data.webdataset import WebDatasetSource

__all__ = [
    "GRAY_MODES", "IMAGE_EXTENSIONS", "MNIST_TRAIN_PER_CLASS", "ArrayImageDataset", "ImageFolderDataset",
    "center_crop", "center_crop_resize", "float_to_uint8", "load_digits8", "load_mnist5k", "load_npz", "pad_to",
    "uint8_to_float", "BatchSource", "IndexedBatches", "build_dataset", "build_source",
    "FileImageDataset", "random_crops", "read_caption", "ManifestDataset", "read_manifest", "LowResPairs",
    "area_downsample", "ScanReport", "scan_images", "WebDatasetSource",
    "PALETTE", "Scene", "SceneDataset", "SceneDescription", "SceneObject", "describe_scene", "parse_caption",
    "reference_captions", "reference_scenes", "render_scene", "render_scenes", "write_prompt_list",
]
