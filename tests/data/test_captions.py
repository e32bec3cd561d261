"""Captioned data: caption sidecars of image folders, JSONL manifests, the per-batch (lazy) decode, the
broken-file scan, and the one-line errors of each bad input (library and CLI)."""

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import DataConfig
from difflab.data import ImageFolderDataset, ManifestDataset, build_dataset, build_source, scan_images
from difflab.data.images import check_image

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "mnist-tiny.yaml"


def _png(path: Path, value: int, size=(8, 8), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)


def _captioned_folder(root: Path, n: int = 4) -> dict[str, str]:
    """n grey 8x8 images, image i of value 20 * i, with the caption 'image i' (padded with whitespace)."""
    captions = {}
    for i in range(n):
        _png(root / f"img{i}.png", 20 * i)
        (root / f"img{i}.txt").write_text(f"  image {i}\n", encoding="utf-8")
        captions[f"img{i}.png"] = f"image {i}"
    return captions


def _value_of(x: torch.Tensor) -> int:
    """The uint8 value of a constant grey image in [-1, 1]."""
    return round((x.mean().item() + 1) * 127.5)


def _one_line_error(fn, *needles) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


# ----------------------------------------------------------------------------- caption sidecars


def test_folder_caption_sidecars_travel_with_their_images(tmp_path):
    _captioned_folder(tmp_path, 5)
    ds = ImageFolderDataset(tmp_path, 8, captions=True)
    assert ds.captions == [f"image {i}" for i in range(5)]  # stripped, in file order
    items = ds.get_items([3, 0, 4, -1], epoch=0)
    assert items["caption"] == ["image 3", "image 0", "image 4", "image 4"]
    assert [_value_of(x) for x in items["x0"]] == [60, 0, 80, 80]
    assert "y" not in items  # no class folders: unlabelled
    # through the config and the training loop's source: every batch pairs each image with its caption
    cfg = DataConfig(source="folder", path=str(tmp_path), image_size=8, captions=True)
    source = build_source(cfg, seed=3, local_batch=2)
    for step in range(5):
        batch = source.batch(step)
        assert [f"image {_value_of(x) // 20}" for x in batch["x0"]] == batch["caption"]
    # without data.captions the sidecars are not read and batches carry no caption
    assert "caption" not in build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8)).get_items([0])


def test_caption_sidecars_in_class_folders_and_utf8(tmp_path):
    _png(tmp_path / "cat" / "a.png", 10)
    (tmp_path / "cat" / "a.txt").write_bytes("\ufeffun chat noir é".encode())  # BOM + non-ASCII
    _png(tmp_path / "dog" / "b.png", 30)
    (tmp_path / "dog" / "b.txt").write_text("a dog", encoding="utf-8")
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8, captions=True, class_cond=True))
    items = ds.get_items([0, 1])
    assert items["caption"] == ["un chat noir é", "a dog"] and items["y"].tolist() == [0, 1]


@pytest.mark.parametrize("problem", ["missing", "empty", "latin1", "whitespace"])
def test_bad_caption_sidecar_names_the_file(tmp_path, problem):
    _captioned_folder(tmp_path, 3)
    bad = tmp_path / "img1.txt"
    if problem == "missing":
        bad.unlink()
        needle = "caption file missing"
    elif problem == "empty":
        bad.write_bytes(b"")
        needle = "caption file is empty"
    elif problem == "whitespace":
        bad.write_text(" \n\t ")
        needle = "caption file is empty"
    else:
        bad.write_bytes("caf\xe9".encode("latin-1"))
        needle = "caption is not UTF-8"
    cfg = DataConfig(source="folder", path=str(tmp_path), image_size=8, captions=True)
    _one_line_error(lambda: build_dataset(cfg), str(bad), needle)
    # also when another caption is bad: the first is named and the rest counted
    (tmp_path / "img2.txt").unlink()
    _one_line_error(lambda: build_dataset(cfg), str(bad), "and 1 more caption problems")


def test_captions_on_a_source_without_them():
    _one_line_error(lambda: build_dataset(DataConfig(source="digits", image_size=8, captions=True)),
                    "source 'digits' has no captions")


# ----------------------------------------------------------------------------- JSONL manifests


def _manifest(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for n, text in (raw_lines or {}).items():
        lines.insert(n - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_with_captions_labels_relative_and_absolute_paths(tmp_path):
    _png(tmp_path / "data" / "imgs" / "a.png", 10)
    _png(tmp_path / "data" / "imgs" / "b.png", 50)
    _png(tmp_path / "elsewhere" / "c.png", 90)
    manifest = _manifest(tmp_path / "data" / "train.jsonl", [
        {"image": "imgs/a.png", "caption": " first ", "label": 2},
        {"image": "imgs/b.png", "caption": "second", "label": 0},
        {"image": str(tmp_path / "elsewhere" / "c.png"), "caption": "third", "label": 4},
    ], raw_lines={3: "   "})  # a blank line is skipped (and counted: the third record is on line 4)
    cfg = DataConfig(source="manifest", path=str(manifest), image_size=8, captions=True, class_cond=True)
    ds = build_dataset(cfg)
    assert isinstance(ds, ManifestDataset) and len(ds) == 3 and ds.num_classes == 5 and ds.channels == 1
    assert ds.lines == [1, 2, 4]
    items = ds.get_items([2, 0, 1])
    assert items["caption"] == ["third", "first", "second"] and items["y"].tolist() == [4, 2, 0]
    assert [_value_of(x) for x in items["x0"]] == [90, 10, 50]
    # captions off: labels only
    plain = build_dataset(DataConfig(source="manifest", path=str(manifest), image_size=8))
    assert set(plain.get_items([0])) == {"x0", "y"}


@pytest.mark.parametrize("case", [
    "bad_json", "not_object", "missing_image_key", "unknown_key", "missing_file", "caption_on_some",
    "label_on_some", "bad_label", "empty_caption", "not_utf8",
])
def test_bad_manifest_lines_name_the_manifest_and_line(tmp_path, case):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png", 40)
    good = [{"image": "a.png", "caption": "x", "label": 1}, {"image": "b.png", "caption": "y", "label": 0}]
    bad_line, needle = {
        "bad_json": ('{"image": "c.png", "caption": "z",', "not valid JSON"),
        "not_object": ('["c.png"]', "expected a JSON object"),
        "missing_image_key": ('{"caption": "z", "label": 1}', "missing key 'image'"),
        "unknown_key": ('{"image": "c.png", "caption": "z", "lable": 1}', "unknown key 'lable'"),
        "missing_file": ('{"image": "nope.png", "caption": "z", "label": 1}', "image file not found"),
        "caption_on_some": ('{"image": "c.png", "label": 1}', "has no 'caption' but line 1 has one"),
        "label_on_some": ('{"image": "c.png", "caption": "z"}', "has no 'label' but line 1 has one"),
        "bad_label": ('{"image": "c.png", "caption": "z", "label": -3}', "'label' must be an integer >= 0"),
        "empty_caption": ('{"image": "c.png", "caption": "  ", "label": 1}', "'caption' must be a non-empty string"),
        "not_utf8": (None, "not UTF-8"),
    }[case]
    manifest = tmp_path / "m.jsonl"
    if case == "not_utf8":
        _manifest(manifest, good)
        manifest.write_bytes(manifest.read_bytes() + '{"image": "c.png", "caption": "caf\xe9", "label": 1}\n'
                             .encode("latin-1"))
    else:
        _manifest(manifest, good, raw_lines={3: bad_line})
    _one_line_error(lambda: build_dataset(DataConfig(source="manifest", path=str(manifest), image_size=8)),
                    f"{manifest}: line 3", needle)


def test_manifest_file_level_errors(tmp_path):
    _png(tmp_path / "a.png", 40)
    missing = tmp_path / "none.jsonl"
    _one_line_error(lambda: build_dataset(DataConfig(source="manifest", path=str(missing))), "manifest not found",
                    str(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _one_line_error(lambda: build_dataset(DataConfig(source="manifest", path=str(empty))), str(empty), "no images")
    uncaptioned = _manifest(tmp_path / "u.jsonl", [{"image": "a.png"}])
    _one_line_error(lambda: build_dataset(DataConfig(source="manifest", path=str(uncaptioned), captions=True)),
                    str(uncaptioned), "data.captions is true but the manifest has no 'caption' key")
    _one_line_error(lambda: build_dataset(DataConfig(source="manifest", path=str(uncaptioned), class_cond=True)),
                    "no 'label' key")
    many = _manifest(tmp_path / "many.jsonl", [{"image": f"gone{i}.png"} for i in range(3)])
    _one_line_error(lambda: build_dataset(DataConfig(source="manifest", path=str(many))), f"{many}: line 1",
                    "gone0.png", "and 2 more missing images")


# ----------------------------------------------------------------------------- lazy decode and the scan


def _png_with_bad_pixels(path: Path) -> None:
    """A PNG whose chunks and CRCs are all valid but whose IDAT is not zlib data: it passes
    Image.open + verify and fails only when its pixels are decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)  # 8x8, 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data at all")
                     + chunk(b"IEND", b""))


def test_decode_per_batch_with_a_cheap_check_up_front(tmp_path):
    for i in range(3):
        _png(tmp_path / f"ok{i}.png", 30 * i)
    _png_with_bad_pixels(tmp_path / "sly.png")
    assert check_image(tmp_path / "sly.png") == "L"  # the cheap check cannot see it
    ds = ImageFolderDataset(tmp_path, 8)  # the default: nothing decoded up front
    assert len(ds) == 4 and ds.skipped == []
    good = [ds.files.index(tmp_path / f"ok{i}.png") for i in range(3)]
    assert [_value_of(x) for x in ds.get_batch(good)[0]] == [0, 30, 60]
    _one_line_error(lambda: ds.get_batch([ds.files.index(tmp_path / "sly.png")]), str(tmp_path / "sly.png"),
                    "cannot decode the image", f"difflab data scan {tmp_path}")
    threaded = ImageFolderDataset(tmp_path, 8, num_workers=2)  # the same error from a decode thread
    _one_line_error(lambda: threaded.get_batch(range(4)), "sly.png", "cannot decode the image")
    # the full up-front check is an option (and what cache does): the file is skipped with a warning
    for kwargs in ({"check": "decode"}, {"cache": True}):
        with pytest.warns(UserWarning, match=r"1 of 4 image files .* sly\.png"):
            full = ImageFolderDataset(tmp_path, 8, **kwargs)
        assert len(full) == 3
    # and the scan lists it
    report = scan_images(tmp_path)
    assert report.kind == "folder" and report.checked == 4 and report.modes == {"L": 3}
    assert len(report.broken) == 1 and "sly.png" in report.broken[0] and not report.ok


def test_a_file_broken_after_the_build_is_named_at_its_batch(tmp_path):
    for i in range(3):
        _png(tmp_path / f"ok{i}.png", 30 * i)
    ds = ImageFolderDataset(tmp_path, 8)
    (tmp_path / "ok1.png").write_bytes(b"\x89PNG\r\n\x1a\n but no longer an image")
    assert ds.get_batch([0, 2])[0].shape == (2, 1, 8, 8)
    _one_line_error(lambda: ds.get_batch([1]), str(tmp_path / "ok1.png"), "cannot decode the image")


def test_cheap_check_finds_truncated_files(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "WEBP"):
        path = tmp_path / f"x.{fmt.lower()}"
        Image.fromarray(arr).save(path, format=fmt)
        assert check_image(path) == "RGB"
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        with pytest.raises((OSError, SyntaxError, ValueError)):
            check_image(path)
    # a JPEG with bytes after its end marker is fine (the full decode decides)
    ok = tmp_path / "trailer.jpg"
    Image.fromarray(arr).save(ok, format="JPEG")
    ok.write_bytes(ok.read_bytes() + b"camera trailer")
    assert check_image(ok) == "RGB"


def test_scan_a_manifest_and_captions(tmp_path):
    _captioned_folder(tmp_path, 3)
    (tmp_path / "img2.txt").write_bytes(b"")
    _png_with_bad_pixels(tmp_path / "img1.png")
    report = scan_images(tmp_path, captions=True)
    assert report.checked == 3 and len(report.broken) == 2
    assert any("img1.png" in b and "cannot decode" in b for b in report.broken)
    assert any("img2.txt" in b and "empty" in b for b in report.broken)
    manifest = _manifest(tmp_path / "m.jsonl", [{"image": f"img{i}.png"} for i in range(3)])
    report = scan_images(manifest)
    assert report.kind == "manifest" and report.checked == 3
    assert report.broken == [f"{manifest}: line 2: {tmp_path / 'img1.png'}: cannot decode the image "
                             + report.broken[0].split("cannot decode the image ", 1)[1]]


# ----------------------------------------------------------------------------- the CLI


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _cli_fails(capsys, args, *needles) -> str:
    capsys.readouterr()
    assert main(list(map(str, args))) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: "), err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_folder(tmp_path):
    """An empty output folder: a failed start must leave it empty (a folder holding anything is refused
    before the data are read: test_never_overwrite.py)."""
    out = tmp_path / "run"
    out.mkdir()
    return out


def _train_args(out: Path, *data: str) -> list:
    return ["train", TINY, "--out", out, "--max-steps", "1", "--quiet",
            *_sets("train.batch_size=2", "data.split=null", *data)]


def test_cli_train_bad_captions_and_manifests(tmp_path, capsys, run_folder):
    before = _hashes(run_folder)
    images = tmp_path / "images"
    _captioned_folder(images, 3)
    (images / "img2.txt").unlink()
    folder = ["data.source=folder", f"data.path={images}", "data.captions=true"]
    _cli_fails(capsys, _train_args(run_folder, *folder), str(images / "img2.txt"), "caption file missing")
    (images / "img2.txt").write_bytes(b"\xff\xfe bad")
    _cli_fails(capsys, _train_args(run_folder, *folder), "img2.txt", "not UTF-8")

    manifest = _manifest(tmp_path / "m.jsonl", [{"image": "images/img0.png", "caption": "a"},
                                                {"image": "images/nope.png", "caption": "b"}])
    listed = ["data.source=manifest", f"data.path={manifest}"]
    _cli_fails(capsys, _train_args(run_folder, *listed), f"{manifest}: line 2", "image file not found", "nope.png")
    manifest.write_text('{"image": "images/img0.png"}\n{"image": \n')
    _cli_fails(capsys, _train_args(run_folder, *listed), f"{manifest}: line 2", "not valid JSON")
    assert _hashes(run_folder) == before


def test_cli_data_scan(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / "imgs" / f"ok{i}.png", 30 * i)
    capsys.readouterr()
    assert main(["data", "scan", str(tmp_path / "imgs")]) == 0
    assert "3 images checked, 3 decode" in capsys.readouterr().out
    _png_with_bad_pixels(tmp_path / "imgs" / "sly.png")
    assert main(["data", "scan", str(tmp_path / "imgs"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 4 and not report["ok"] and "sly.png" in report["broken"][0]
    _cli_fails(capsys, ["data", "scan", tmp_path / "nowhere"], "nothing to scan", "nowhere")
