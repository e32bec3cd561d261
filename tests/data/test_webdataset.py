"""webdataset tar shards, streamed: sharding over ranks and decode workers, exact resume mid-shard,
and the errors of broken shards. Real tar files written with the standard tarfile module."""

import dataclasses
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import DataConfig
from difflab.data import WebDatasetSource, build_dataset, build_source, scan_images
from difflab.data.webdataset import expand_braces, index_shard, shard_paths

pytestmark = pytest.mark.usefixtures("single_thread")


def _png_bytes(value: int, size: int = 8, mode: str = "L") -> bytes:
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size, size) if mode == "L" else (size, size, 3), dtype=np.uint8)
    arr.flat[0] = value % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, counts: list[int], *, captions=True, labels=True, size=8, mode="L",
                 extra=False) -> list[Path]:
    """Shards ``folder/shard-000.tar``, ...; sample k (numbered across shards) is ``{k:06d}.png`` with a
    caption naming its shard and position and the label ``k % 3``; ``extra`` adds an ignored ``.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, k = [], 0
    for s, n in enumerate(counts):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(n):
                _add(tf, f"{k:06d}.png", _png_bytes(k, size, mode))
                if captions:
                    _add(tf, f"{k:06d}.txt", f"shard {s} sample {i}".encode())
                if labels:
                    _add(tf, f"{k:06d}.cls", str(k % 3).encode())
                if extra:
                    _add(tf, f"{k:06d}.json", b'{"ignored": true}')
                k += 1
        paths.append(path)
    return paths


def _shard_of(caption: str) -> int:
    return int(caption.split()[1])


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ----------------------------------------------------------------------------- shard lists and the index


def test_brace_patterns_and_shard_lists(tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, needle in (("{0..2", "unbalanced"), ("{{a,b},c}", "nested"), ("{3..1}", "backwards"),
                        ("{abc}", "range")):
        with pytest.raises(ValueError, match=needle):
            expand_braces(bad)
    paths = write_shards(tmp_path / "s", [2, 2, 2])
    assert shard_paths(tmp_path / "s") == paths  # a folder: its .tar files, sorted
    assert shard_paths(str(tmp_path / "s" / "shard-{000..002}.tar")) == paths
    assert shard_paths(paths[1]) == [paths[1]]
    with pytest.raises(ValueError, match=r"shard not found: .*shard-003\.tar \(1 of the 4"):
        shard_paths(str(tmp_path / "s" / "shard-{000..003}.tar"))
    with pytest.raises(ValueError, match="names the shard .* twice"):
        shard_paths(str(tmp_path / "s" / "shard-{000,000}.tar"))
    with pytest.raises(ValueError, match="webdataset shards not found"):
        shard_paths(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .tar shards"):
        shard_paths(tmp_path / "empty")


def test_index_counts_samples_and_reads_labels(tmp_path):
    (path,) = write_shards(tmp_path, [5], extra=True)
    info = index_shard(path)
    assert info.count == 5 and info.labels.tolist() == [0, 1, 2, 0, 1] and info.uncaptioned is None
    assert info.first_mode == "L"
    (bare,) = write_shards(tmp_path / "bare", [3], captions=False, labels=False)
    info = index_shard(bare)
    assert info.count == 3 and info.labels is None and info.uncaptioned == "000000"


# ----------------------------------------------------------------------------- order and sharding


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_disjoint_shards_and_cover_them(tmp_path, workers):
    counts = [4] * 8
    write_shards(tmp_path, counts)
    cfg = DataConfig(source="webdataset", path=str(tmp_path), image_size=8, captions=True, num_workers=workers)
    ranks = [build_source(cfg, seed=5, rank=r, world=2, local_batch=2) for r in (0, 1)]
    streams = 2 * max(1, workers)
    steps = ranks[0].steps_in_epoch(0)
    assert steps == sum(counts) // 2 // 2 and steps == ranks[1].steps_in_epoch(0)  # equal shards: nothing dropped
    orders = []
    for epoch in (0, 1):
        seen = []
        for source in ranks:
            captions = [c for k in range(epoch * steps, (epoch + 1) * steps) for c in source.batch(k)["caption"]]
            assert len(set(captions)) == len(captions) == sum(counts) // 2  # each sample once
            seen.append(captions)
        assert not set(seen[0]) & set(seen[1])  # disjoint samples ...
        shards = [{_shard_of(c) for c in captions} for captions in seen]
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(8))  # ... and shards, covering all
        assert len(shards[0]) == 8 // streams * max(1, workers)
        orders.append(seen)
    assert orders[0] != orders[1]  # epochs deal the shards afresh
    # the batch is a pure function of (seed, rank, world, step): a second source agrees, another seed does not
    again = build_source(cfg, seed=5, rank=1, world=2, local_batch=2)
    _same(again.batch(3), ranks[1].batch(3))
    other = build_source(cfg, seed=6, rank=1, world=2, local_batch=2)
    assert [other.batch(k)["caption"] for k in range(steps)] != [ranks[1].batch(k)["caption"] for k in range(steps)]


def test_decode_workers_interleave_their_shards(tmp_path):
    write_shards(tmp_path, [3, 3, 3, 3])
    source = WebDatasetSource(tmp_path, image_size=8, seed=0, local_batch=4, captions=True, num_workers=2)
    plan = source.plan(0)  # stream w of rank 0 reads plan[w]
    batch = source.batch(0)["caption"]
    for q, caption in enumerate(batch):
        assert _shard_of(caption) == plan[q % 2][0]  # sample q from worker q % 2's first shard
        assert caption.endswith(f"sample {q // 2}")


def test_uneven_shards_drop_the_tail_of_the_longer_streams(tmp_path):
    write_shards(tmp_path, [2, 7, 3, 5])
    source = WebDatasetSource(tmp_path, image_size=8, seed=1, local_batch=2, world=2, rank=0, captions=True)
    for epoch in range(3):
        plan = source.plan(epoch)
        shortest = min(int(source.counts[p].sum()) for p in plan)
        assert source.steps_in_epoch(epoch) == shortest // 2
    e, j = source.locate(source.steps_in_epoch(0))
    assert (e, j) == (1, 0)


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers,rank,world", [(0, 0, 1), (2, 1, 2)])
def test_resume_mid_shard_returns_the_uninterrupted_batches(tmp_path, workers, rank, world):
    write_shards(tmp_path, [5, 7, 6, 5, 7, 6, 5, 9], size=12, mode="RGB")
    cfg = DataConfig(source="webdataset", path=str(tmp_path) + "/shard-{000..007}.tar", image_size=8, captions=True,
                     class_cond=True, random_flip=True, random_crop=True, num_workers=workers)
    uninterrupted = build_source(cfg, seed=11, rank=rank, world=world, local_batch=3)
    total = sum(uninterrupted.steps_in_epoch(e) for e in range(2)) + 2  # into the third epoch
    run = [uninterrupted.batch(k) for k in range(total)]
    assert run[0]["x0"].shape == (3, 3, 8, 8) and run[0]["y"].dtype == torch.int64
    # a step that starts in the middle of a shard (its first sample is not a shard's first)
    mid = [k for k in range(1, total) if not run[k]["caption"][0].endswith(" sample 0")]
    for k in (mid[0], mid[len(mid) // 2], total - 1):
        resumed = build_source(cfg, seed=11, rank=rank, world=world, local_batch=3)  # "killed", restarted at k
        for step in range(k, total):
            _same(resumed.batch(step), run[step])
        resumed.close()
    # random access agrees too (reopening and skipping by headers)
    jumpy = build_source(cfg, seed=11, rank=rank, world=world, local_batch=3)
    for step in (total - 1, 0, mid[0], 2, mid[0] + 1):
        _same(jumpy.batch(step), run[step])
    # labels come from the .cls members: sample k (its number is in the PNG's first pixel) has label k % 3
    assert uninterrupted.num_classes == 3


def test_sequential_steps_keep_the_shard_open(tmp_path):
    write_shards(tmp_path, [20])
    source = WebDatasetSource(tmp_path, image_size=8, seed=0, local_batch=2)
    source.batch(0)
    tf = source._streams[0].tf
    for k in range(1, 6):
        source.batch(k)
        assert source._streams[0].tf is tf  # no reopen, no skipping
    source.batch(2)  # a jump back reopens
    assert source._streams[0].tf is not tf
    source.close()


def test_flips_and_crops_depend_on_epoch_and_sample(tmp_path):
    write_shards(tmp_path, [6, 6], size=12, mode="RGB")
    cfg = DataConfig(source="webdataset", path=str(tmp_path), image_size=8, random_crop=True, random_flip=True)
    a = build_source(cfg, seed=2, local_batch=12)  # one stream, one step per epoch: every sample each step
    assert set(a.batch(0)) == {"x0", "y"}  # captions not asked for
    _same(a.batch(1), build_source(cfg, seed=2, local_batch=12).batch(1))
    captioned = build_source(dataclasses.replace(cfg, captions=True), seed=2, local_batch=12)
    by_epoch = []
    for step in (0, 1):
        batch = captioned.batch(step)
        by_epoch.append(dict(zip(batch["caption"], batch["x0"], strict=True)))
    assert by_epoch[0].keys() == by_epoch[1].keys()
    changed = sum(not torch.equal(by_epoch[0][c], by_epoch[1][c]) for c in by_epoch[0])
    assert changed >= 10  # each sample gets another crop (and flip) in another epoch


# ----------------------------------------------------------------------------- bad shards


def test_broken_member_is_named_at_its_batch(tmp_path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tf:
        for k in range(4):
            data = _png_bytes(k)
            if k == 2:  # valid start, garbage after: opens at index time, fails to decode
                data = data[:40] + b"\0" * (len(data) - 40)
            _add(tf, f"{k:06d}.png", data)
    source = WebDatasetSource(path, image_size=8, seed=0, local_batch=1)
    with pytest.raises(ValueError) as info:
        for step in range(4):
            source.batch(step)
    msg = str(info.value)
    assert str(path) in msg and "member 000002.png" in msg and "cannot decode" in msg and "\n" not in msg
    report = scan_images(path)
    assert report.checked == 4 and len(report.broken) == 1 and "000002.png" in report.broken[0]


def test_truncated_and_corrupt_tars_fail_at_build_naming_shard_and_member(tmp_path):
    (path,) = write_shards(tmp_path / "t", [6], captions=False, labels=False)
    data = path.read_bytes()
    cases = {
        "cut mid member": (data[: 512 * 5 + 10], "member 000002.png: truncated"),
        "cut at a header": (data[: 512 * 6], "no valid member header or end-of-archive marker"),
        "garbage header": (data[: 512 * 6] + b"\x07" * 512 + data[512 * 7:], "after member 000002.png"),
    }
    for name, (content, needle) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '-')}.tar"
        bad.write_bytes(content)
        with pytest.raises(ValueError) as info:
            WebDatasetSource(bad, image_size=8, seed=0, local_batch=1)
        msg = str(info.value)
        assert str(bad) in msg and needle in msg and "\n" not in msg, (name, msg)
    gz = tmp_path / "gz.tar"
    gz.write_bytes(gzip.compress(data))
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        WebDatasetSource(gz, image_size=8, seed=0, local_batch=1)


def test_bad_samples_and_configs(tmp_path):
    def shard(name, members):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w") as tf:
            for member, data in members:
                _add(tf, member, data)
        return path

    png = _png_bytes(0)
    cases = [
        (shard("noimage", [("a.png", png), ("b.txt", b"no image")]), {}, "member b.txt: sample b has no image"),
        (shard("twoimages", [("a.png", png), ("a.jpg", png)]), {}, "sample a has 2 images"),
        (shard("dup", [("a.png", png), ("a.png", png)]), {}, "member a.png: a second '.png' member in sample a"),
        (shard("badcls", [("a.png", png), ("a.cls", b"seven")]), {}, "member a.cls: a .cls member must hold one"),
        (shard("somecls", [("a.png", png), ("a.cls", b"1"), ("b.png", png)]), {}, "member b.png: its sample has no"),
        (shard("notxt", [("a.png", png), ("a.txt", b"x"), ("b.png", png)]), {"captions": True}, "sample b has no .txt"),
        (shard("nocls", [("a.png", png)]), {"class_cond": True}, "have no .cls labels"),
        (shard("empty", []), {}, "holds no samples"),
        (shard("notimage", [("a.png", b"definitely not a png")]), {}, "member a.png: not an image"),
    ]
    for path, kwargs, needle in cases:
        with pytest.raises(ValueError) as info:
            WebDatasetSource(path, image_size=8, seed=0, local_batch=1, **kwargs)
        msg = str(info.value)
        assert str(path) in msg and needle in msg and "\n" not in msg, (needle, msg)
    # a caption found empty while streaming names its member
    path = shard("emptytxt", [("a.png", png), ("a.txt", b"ok"), ("b.png", png), ("b.txt", b"   ")])
    source = WebDatasetSource(path, image_size=8, seed=0, local_batch=1, captions=True)
    with pytest.raises(ValueError, match=r"emptytxt\.tar: member b\.txt: caption is empty"):
        [source.batch(k) for k in range(2)]
    # more streams than shards, or too few samples for a batch
    write_shards(tmp_path / "few", [2, 2])
    with pytest.raises(ValueError, match=r"2 shards cannot feed 2 rank\(s\) x 2 stream"):
        WebDatasetSource(tmp_path / "few", image_size=8, seed=0, local_batch=1, world=2, num_workers=2)
    with pytest.raises(ValueError, match="too few for a per-rank batch of 5"):
        WebDatasetSource(tmp_path / "few", image_size=8, seed=0, local_batch=5, world=2)
    with pytest.raises(ValueError, match="streamed, not indexable"):
        build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "few")))
    with pytest.raises(ValueError, match="data.cache does not apply"):
        build_source(DataConfig(source="webdataset", path=str(tmp_path / "few"), cache=True), seed=0, local_batch=1)


def test_cli_scan_of_shards(tmp_path, capsys):
    write_shards(tmp_path / "good", [3, 3])
    assert main(["data", "scan", str(tmp_path / "good" / "shard-{000..001}.tar"), "--captions"]) == 0
    assert "6 images checked, 6 decode (6 grey" in capsys.readouterr().out
    (path,) = write_shards(tmp_path / "cut", [4], captions=False, labels=False)
    path.write_bytes(path.read_bytes()[: 512 * 5 + 10])
    assert main(["data", "scan", str(tmp_path / "cut")]) == 1
    out = capsys.readouterr().out
    assert "member 000002.png: truncated" in out and "the rest of the shard is unchecked" in out


# ----------------------------------------------------------------------------- through difflab train

TINY = Path(__file__).resolve().parents[2] / "configs" / "mnist-tiny.yaml"


def _train(out: Path, shards: Path, *extra: str) -> int:
    sets = ["data.source=webdataset", f"data.path={shards}", "data.split=null", "train.batch_size=4",
            "train.save_every=2", "train.log_every=1", "data.num_workers=2", "data.random_flip=true", *extra]
    return main(["train", str(TINY), "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]])


def test_cli_train_resumes_a_webdataset_run_exactly(tmp_path, capsys):
    import safetensors.torch

    write_shards(tmp_path / "s", [5, 6, 7, 5])
    assert _train(tmp_path / "whole", tmp_path / "s", "train.max_steps=5") == 0
    assert _train(tmp_path / "cut", tmp_path / "s", "train.max_steps=3") == 0  # stops mid-shard ...
    assert main(["train", "--resume", str(tmp_path / "cut"), "--max-steps", "5", "--quiet"]) == 0  # ... resumes
    whole, cut = (safetensors.torch.load_file(tmp_path / run / "ckpt_0000005" / "model.safetensors")
                  for run in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_cli_train_on_a_broken_shard_fails_before_writing(tmp_path, capsys):
    (path,) = write_shards(tmp_path / "s", [8], captions=False, labels=False)
    path.write_bytes(path.read_bytes()[: 512 * 5 + 10])
    out = tmp_path / "run"
    out.mkdir()
    capsys.readouterr()
    assert _train(out, tmp_path / "s", "train.max_steps=2") == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("difflab: error: ") and "Traceback" not in captured.err
    assert str(path) in err and "member 000002.png: truncated" in err
    assert list(out.iterdir()) == []  # nothing written
