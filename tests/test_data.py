"""Data: MNIST-5k, digits, image folders and npz, including broken inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.config import DataConfig
from difflab.data import (
    ArrayImageDataset,
    ImageFolderDataset,
    build_dataset,
    center_crop,
    float_to_uint8,
    load_digits8,
    load_mnist5k,
    load_npz,
    uint8_to_float,
)


def test_mnist5k_canonical_split():
    xtr, ytr = load_mnist5k("train")
    xte, yte = load_mnist5k("test")
    xall, yall = load_mnist5k("all")
    assert xtr.shape == (4000, 28, 28) and xte.shape == (1000, 28, 28) and xall.shape == (5000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert np.bincount(ytr).tolist() == [400] * 10 and np.bincount(yte).tolist() == [100] * 10
    # within each class: first 400 train, last 100 test
    for c in (0, 7):
        rows = xall[yall == c]
        assert np.array_equal(rows[:400], xtr[ytr == c]) and np.array_equal(rows[400:], xte[yte == c])
    assert xall.max() == 255 and xall.min() == 0
    with pytest.raises(ValueError, match="'train', 'test', 'all'"):
        load_mnist5k("val")


def test_mnist_padded_to_32_with_background():
    ds = build_dataset(DataConfig(source="mnist5k", image_size=32, split="test"))
    assert len(ds) == 1000 and ds.channels == 1 and ds.num_classes == 10
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (x[:, :2] == -1).all() and (x[:, -2:] == -1).all() and (x[..., :2] == -1).all()
    raw, labels = load_mnist5k("test")
    assert np.array_equal(float_to_uint8(center_crop(x, 28) + 1e-4)[..., 0], raw[0]) and y == labels[0]
    x28, _ = build_dataset(DataConfig(source="mnist5k", image_size=28, split="test"))[0]
    assert torch.equal(center_crop(x, 28), x28)
    with pytest.raises(ValueError, match="image_size=16 is smaller"):
        build_dataset(DataConfig(source="mnist5k", image_size=16))
    with pytest.raises(ValueError, match="channels=3"):
        build_dataset(DataConfig(source="mnist5k", channels=3))


def test_digits_split_and_scaling():
    xtr, ytr = load_digits8("train")
    xte, yte = load_digits8("test")
    assert len(xtr) + len(xte) == 1797 and xtr.shape[1:] == (8, 8) and len(xte) == 355
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target)
    assert np.bincount(yte).tolist() == (counts // 5).tolist()
    assert xtr.max() == 255 and set(np.unique(xtr)) <= {round(v * 255 / 16) for v in range(17)}
    ds = build_dataset(DataConfig(source="digits", image_size=8, split="train"))
    x, _ = ds.get_batch(np.arange(len(ds)))
    assert x.shape == (1442, 1, 8, 8) and x.min() == -1 and x.max() == 1


def test_uint8_float_round_trip():
    u = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    x = uint8_to_float(u)
    assert x.shape == (4, 3, 5, 6) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(float_to_uint8(x + 1e-4), u)


def test_flips_deterministic_per_epoch():
    x, y = load_digits8("train")
    ds = ArrayImageDataset(x, y, random_flip=True, flip_seed=3)
    a, _ = ds.get_batch(np.arange(200), epoch=0)
    b, _ = ds.get_batch(np.arange(200), epoch=0)
    c, _ = ds.get_batch(np.arange(200), epoch=1)
    plain = uint8_to_float(x[:200, ..., None])
    flipped = (a == plain.flip(-1)).flatten(1).all(1) & ~(a == plain).flatten(1).all(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 60 < int(flipped.sum()) < 140  # about half
    assert torch.equal(ds[(1, 5)][0], c[5])


def _write_png(path, mode="RGB", size=(20, 12), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L",) else (value, 255 - value, 30)
    Image.new(mode, size, color).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    for i in range(3):
        _write_png(tmp_path / "dog" / f"{i}.png", value=10 * i)
    for i in range(2):
        path = tmp_path / "cat" / "nested" / f"{i}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 64), (200, 20, 20)).save(path, format="JPEG", quality=95)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "cat" / "w.webp")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, wrong extension: ignored")
    ds = ImageFolderDataset(tmp_path, 8)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 6 and ds.channels == 3
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y.item() == 0
    assert abs(x[0].mean().item() - (200 / 127.5 - 1)) < 0.05  # JPEG red survives the resize
    xd, yd = ds[ds.files.index(tmp_path / "dog" / "2.png")]
    assert yd.item() == 1 and torch.allclose(xd[:, 0, 0], torch.tensor([20, 235, 30]) / 127.5 - 1)
    gray = ImageFolderDataset(tmp_path, 8, channels=1, cache=True)
    assert gray[0][0].shape == (1, 8, 8)
    assert torch.equal(gray.get_batch(range(6))[0], ImageFolderDataset(tmp_path, 8, channels=1).get_batch(range(6))[0])


def test_image_folder_threads_decode_the_same_batches(tmp_path):
    """num_workers threads decode each batch in parallel: the same tensors in the same order, for any indices."""
    from skimage import data as photos

    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        img = getattr(photos, name)()
        Image.fromarray(img).save(tmp_path / f"{name}.jpg", quality=90)
        Image.fromarray(img[::2, ::-1]).save(tmp_path / f"{name}-half.png")
    idx = np.random.default_rng(0).integers(0, 10, size=16)  # repeats and any order
    plain = ImageFolderDataset(tmp_path, 32, channels=3, random_flip=True)
    threaded = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=32, channels=3,
                                        random_flip=True, num_workers=2))
    assert threaded.num_workers == 2 and plain.num_workers == 0
    for epoch in (0, 1):
        a, b = plain.get_batch(idx, epoch), threaded.get_batch(idx, epoch)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        ImageFolderDataset(tmp_path, 32, num_workers=-1)


def test_image_folder_resize_and_center_crop(tmp_path):
    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, 30:70] = 255  # a white centre band 40 wide in a 100-wide image
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, 10)
    x, y = ds[0]
    assert ds.num_classes is None and y.item() == 0
    assert x.shape == (3, 10, 10) and x.min() >= -1 and x.max() <= 1
    # shorter side 40 -> 10; the centre 10x10 crop sees only the white band
    assert x.mean() > 0.9


def test_folder_config_and_class_cond(tmp_path):
    for i in range(2):
        _write_png(tmp_path / f"{i}.png", mode="L", value=40)
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=4))
    assert ds.channels == 1 and len(ds) == 2
    with pytest.raises(ValueError, match="no class subfolders"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=4, class_cond=True))
    with pytest.raises(ValueError, match="does not apply to source 'folder'"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=4, split="train"))


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"contains no images \(looked for .png"):
        ImageFolderDataset(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nope", 8)


def _truncated_jpeg(path):
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_broken_files_skipped_with_warning_or_raised(tmp_path):
    for i in range(5):
        _write_png(tmp_path / f"ok{i}.png")
    _truncated_jpeg(tmp_path / "half.jpg")
    (tmp_path / "fake.png").write_bytes(b"this is not a png at all")
    with pytest.warns(UserWarning, match=r"2 of 7 image files .* cannot be read: fake\.png .*half\.jpg.*skipped"):
        ds = ImageFolderDataset(tmp_path, 8)
    assert len(ds) == 5 and {p.name for p, _ in ds.skipped} == {"fake.png", "half.jpg"}
    # every remaining item loads (nothing broken reaches a DataLoader worker)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    assert next(iter(loader))[0].shape == (5, 3, 8, 8)
    with pytest.raises(ValueError, match=r"half\.jpg"):
        ImageFolderDataset(tmp_path, 8, on_broken="raise")


def test_only_broken_files_is_an_error(tmp_path):
    _truncated_jpeg(tmp_path / "half.jpg")
    with pytest.raises(ValueError, match=r"1 of 1 image files .* half\.jpg \((OSError|SyntaxError)"):
        ImageFolderDataset(tmp_path, 8)


def test_mixed_modes(tmp_path):
    _write_png(tmp_path / "g1.png", mode="L")
    _write_png(tmp_path / "g2.png", mode="L")
    _write_png(tmp_path / "c1.png", mode="RGB")
    Image.new("RGBA", (10, 10), (5, 6, 7, 128)).save(tmp_path / "c2.png")
    with pytest.raises(ValueError, match=r"mixes grayscale \(2: g1\.png, g2\.png\) and colour \(2: c1\.png, c2\.png\)"):
        ImageFolderDataset(tmp_path, 8)
    assert ImageFolderDataset(tmp_path, 8, channels=3)[0][0].shape == (3, 8, 8)
    assert ImageFolderDataset(tmp_path, 8, channels=1)[3][0].shape == (1, 8, 8)


def test_class_folders_mixed_with_loose_files(tmp_path):
    _write_png(tmp_path / "a" / "1.png")
    _write_png(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"mixes class subfolders \(a\) with images at its top level \(loose\.png\)"):
        ImageFolderDataset(tmp_path, 8)


def test_npz_round_trip_and_errors(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    np.savez(tmp_path / "s.npz", imgs, labels)
    x, y = load_npz(tmp_path / "s.npz")
    assert np.array_equal(x, imgs) and np.array_equal(y, labels)
    ds = build_dataset(DataConfig(source="npz", path=str(tmp_path / "s.npz"), image_size=5, class_cond=True))
    assert len(ds) == 6 and ds.num_classes == 3 and ds.channels == 3
    assert np.array_equal(float_to_uint8(ds.get_batch(np.arange(6))[0] + 1e-4), imgs)

    np.savez(tmp_path / "nolabels.npz", imgs)
    assert load_npz(tmp_path / "nolabels.npz")[1] is None
    with pytest.raises(ValueError, match="no arr_1 labels"):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "nolabels.npz"), image_size=5, class_cond=True))

    np.savez(tmp_path / "wrong.npz", images=imgs)
    with pytest.raises(ValueError, match=r"wrong\.npz: no 'arr_0' array \(found \['images'\]\)"):
        load_npz(tmp_path / "wrong.npz")
    np.savez(tmp_path / "float.npz", imgs.astype(np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        load_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "badlab.npz", imgs, labels[:3])
    with pytest.raises(ValueError, match=r"arr_1 must be integer labels of shape \[6\]"):
        load_npz(tmp_path / "badlab.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"junk\.npz: cannot read"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="npz file not found"):
        load_npz(tmp_path / "absent.npz")
