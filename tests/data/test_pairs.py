"""Super-resolution pairs (data.low_res_size) and random crops (data.random_crop), for every kind of source."""

import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.config import DataConfig
from difflab.data import LowResPairs, area_downsample, build_dataset, build_source, random_crops

pytestmark = pytest.mark.usefixtures("single_thread")


def _block_means(x: torch.Tensor, s: int) -> torch.Tensor:
    """The mean of each (S/s) x (S/s) block, in float64: what area downsampling must equal."""
    b, c, h, w = x.shape
    return x.double().reshape(b, c, s, h // s, s, w // s).mean(dim=(3, 5))


def _photos(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _folder(tmp_path, images: np.ndarray):
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    return tmp_path


def test_area_downsample_is_block_means_or_area_interpolation():
    x = torch.rand(3, 2, 12, 12) * 2 - 1
    for s in (1, 2, 3, 4, 6):
        assert torch.allclose(area_downsample(x, s).double(), _block_means(x, s), atol=1e-6, rtol=0)
    assert torch.equal(area_downsample(x, 5), F.interpolate(x, size=(5, 5), mode="area"))  # 5 does not divide 12
    with pytest.raises(ValueError, match="cannot area-downsample"):
        area_downsample(x, 13)


def test_low_res_equals_block_means_of_x0_for_every_source(tmp_path):
    photos = _photos(6, 16, 16)
    (tmp_path / "f").mkdir()
    _folder(tmp_path / "f", photos)
    np.savez(tmp_path / "x.npz", arr_0=photos, arr_1=np.arange(6))
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for i, im in enumerate(photos):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:03d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    configs = [
        DataConfig(source="folder", path=str(tmp_path / "f"), image_size=16, low_res_size=4, random_flip=True),
        DataConfig(source="npz", path=str(tmp_path / "x.npz"), image_size=16, low_res_size=8),
        DataConfig(source="digits", image_size=8, low_res_size=4),
        DataConfig(source="webdataset", path=str(shard), image_size=16, low_res_size=4, random_flip=True),
        DataConfig(source="folder", path=str(tmp_path / "f"), image_size=8, low_res_size=2, random_crop=True),
    ]
    for cfg in configs:
        source = build_source(cfg, seed=1, local_batch=3)
        for step in (0, 1, 2):
            batch = source.batch(step)
            x0, low = batch["x0"], batch["low_res"]
            assert low.shape == (3, x0.shape[1], cfg.low_res_size, cfg.low_res_size), cfg.source
            assert torch.allclose(low.double(), _block_means(x0, cfg.low_res_size), atol=1e-6, rtol=0), cfg.source
    # build_dataset wraps the same way; everything else is the dataset's
    ds = build_dataset(configs[1])
    assert isinstance(ds, LowResPairs) and len(ds) == 6 and ds.num_classes == 6 and ds.channels == 3
    items = ds.get_items([4, 1])
    assert items["y"].tolist() == [4, 1] and items["low_res"].shape == (2, 3, 8, 8)
    x, y = ds.get_batch([4])
    assert torch.equal(x, items["x0"][:1]) and y.item() == 4


def _locate(crop: np.ndarray, image: np.ndarray) -> tuple[int, int]:
    """Where the window ``crop`` sits inside ``image`` (unique for random pixels)."""
    s = crop.shape[0]
    hits = [(t, left) for t in range(image.shape[0] - s + 1) for left in range(image.shape[1] - s + 1)
            if np.array_equal(image[t : t + s, left : left + s], crop)]
    assert len(hits) == 1, hits
    return hits[0]


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).numpy()


@pytest.mark.parametrize("source", ["folder", "npz"])
def test_random_crops_are_windows_reproducible_and_change_with_the_epoch(tmp_path, source):
    photos = _photos(5, 20, 26, seed=3)
    if source == "folder":
        path = _folder(tmp_path, photos)
    else:
        path = tmp_path / "x.npz"
        np.savez(path, arr_0=photos)
    cfg = DataConfig(source=source, path=str(path), image_size=8, random_crop=True)
    ds = build_dataset(cfg, seed=7)
    order = [int(p.stem) for p in ds.files] if source == "folder" else list(range(5))
    where = {}
    for epoch in (0, 1, 2):
        crops = ds.get_batch(range(5), epoch)[0]
        assert crops.shape == (5, 3, 8, 8)
        where[epoch] = [_locate(_as_uint8(c), photos[order[i]]) for i, c in enumerate(crops)]
        # reproducible: a fresh dataset with the same seed, in any index order and batch
        again = build_dataset(cfg, seed=7).get_batch([3, 0], epoch)[0]
        assert torch.equal(again, crops[[3, 0]])
    assert where[0] != where[1] and where[1] != where[2]  # another epoch, other windows
    assert len({w for ws in where.values() for w in ws}) > 8  # spread over the image
    assert where[0] != [_locate(_as_uint8(c), photos[order[i]]) for i, c in
                        enumerate(build_dataset(cfg, seed=8).get_batch(range(5), 0)[0])]  # the seed matters
    # without random_crop: the centre crop after resizing (folder) / an error for larger arrays (npz)
    if source == "folder":
        centre = build_dataset(DataConfig(source="folder", path=str(path), image_size=8)).get_batch(range(5))[0]
        assert torch.equal(centre, build_dataset(DataConfig(source="folder", path=str(path), image_size=8))
                           .get_batch(range(5), 3)[0])
    else:
        with pytest.raises(ValueError, match="smaller than the npz images"):
            build_dataset(DataConfig(source="npz", path=str(path), image_size=8))


def test_random_crops_in_a_cached_folder_and_from_small_images(tmp_path):
    photos = _photos(4, 12, 12, seed=1)
    _folder(tmp_path, photos)
    small = np.random.default_rng(5).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")  # smaller than image_size: scaled up, then cropped
    lazy = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8, random_crop=True), seed=2)
    cached = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8, random_crop=True,
                                      cache=True), seed=2)
    for epoch in (0, 1):
        a, b = lazy.get_batch(range(5), epoch)[0], cached.get_batch(range(5), epoch)[0]
        assert torch.equal(a, b) and a.shape == (5, 3, 8, 8)


def test_random_crops_function():
    images = [np.arange(10 * 12 * 1, dtype=np.uint8).reshape(10, 12, 1), np.zeros((8, 8, 1), np.uint8)]
    out = random_crops(images, 8, seed=0, epoch=0, indices=[0, 1])
    assert out.shape == (2, 8, 8, 1) and np.array_equal(out[1], images[1])
    top, left = _locate(out[0], images[0])
    assert 0 <= top <= 2 and 0 <= left <= 4
    tops = {_locate(random_crops(images[:1], 8, seed=0, epoch=e, indices=[0])[0], images[0]) for e in range(40)}
    assert len(tops) > 8  # many of the 15 positions are used
    with pytest.raises(ValueError, match="cannot crop 8x8 from a 7x7 image"):
        random_crops([np.zeros((7, 7, 1), np.uint8)], 8, seed=0, epoch=0, indices=[0])


def test_random_crop_errors():
    with pytest.raises(ValueError, match=r"random_crop: the digits images \(8x8\) are smaller than data.image_size=16"):
        build_dataset(DataConfig(source="digits", image_size=16, random_crop=True))
    with pytest.raises(ValueError, match="low_res_size must be an integer"):
        LowResPairs(build_dataset(DataConfig(source="digits", image_size=8)), 8)
