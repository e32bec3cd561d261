"""Data sharding and gathers: coverage, determinism and mid-epoch resume."""

import numpy as np
import pytest
import torch

from difflab.data import ArrayImageDataset
from difflab.train.distributed import (
    OrderBatchSampler,
    ShardedOrder,
    all_gather_uneven,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
)


@pytest.mark.parametrize("n, world", [(40, 4), (37, 4), (5, 1), (11, 3)])
def test_uneven_shards_cover_every_index_exactly_once(n, world):
    for epoch in (0, 3):
        shards = [ShardedOrder(n, rank=r, world_size=world, seed=7, even="none").shard(epoch) for r in range(world)]
        allidx = np.concatenate(shards)
        assert sorted(allidx.tolist()) == list(range(n))
        assert [len(s) for s in shards] == [len(ShardedOrder(n, rank=r, world_size=world, even="none"))
                                            for r in range(world)]


def test_even_modes():
    n, world = 37, 4
    drop = [ShardedOrder(n, rank=r, world_size=world, even="drop").shard(0) for r in range(world)]
    pad = [ShardedOrder(n, rank=r, world_size=world, even="pad").shard(0) for r in range(world)]
    assert {len(s) for s in drop} == {9} and len(set(np.concatenate(drop).tolist())) == 36
    assert {len(s) for s in pad} == {10} and set(np.concatenate(pad).tolist()) == set(range(n))
    # same seed + epoch -> same order on every rank; different epochs differ
    o = ShardedOrder(n, seed=1)
    assert np.array_equal(o.epoch_order(2), ShardedOrder(n, seed=1, rank=0).epoch_order(2))
    assert not np.array_equal(o.epoch_order(0), o.epoch_order(1))


def test_every_index_once_per_epoch_across_ranks_in_batches():
    n, world, bs = 48, 3, 4
    orders = [ShardedOrder(n, rank=r, world_size=world, seed=5) for r in range(world)]
    per_epoch = orders[0].batches_per_epoch(bs)
    assert per_epoch == 4
    for epoch in range(2):
        seen = []
        for o in orders:
            for k in range(epoch * per_epoch, (epoch + 1) * per_epoch):
                e, idx = o.batch(k, bs)
                assert e == epoch
                seen.extend(idx.tolist())
        assert sorted(seen) == list(range(n))


def test_resume_mid_epoch_is_identical():
    o = ShardedOrder(50, rank=1, world_size=2, seed=3)
    stream = o.batches(batch_size=7)
    full = [next(stream) for _ in range(20)]  # crosses several epochs (3 batches per epoch)
    for start in (0, 2, 5, 13):
        resumed = o.batches(batch_size=7, start=start)
        for k in range(start, 20):
            e, idx = next(resumed)
            assert e == full[k][0] and np.array_equal(idx, full[k][1])
            assert np.array_equal(o.batch(k, 7)[1], idx)


def test_order_batch_sampler_with_dataloader_resumes():
    rng = np.random.default_rng(0)
    ds = ArrayImageDataset(rng.integers(0, 256, (30, 4, 4), dtype=np.uint8), rng.integers(0, 3, 30),
                           random_flip=True, flip_seed=11)
    order = ShardedOrder(len(ds), seed=2)

    def take(start, count, workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=OrderBatchSampler(order, 8, start=start),
                                             num_workers=workers)
        it = iter(loader)
        return [next(it) for _ in range(count)]

    full = take(0, 9, 0)
    resumed = take(4, 5, 2)  # fresh iterator, worker processes, mid-epoch
    for (x, y), (xr, yr) in zip(full[4:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_single_process_helpers():
    info = init_distributed()
    assert (info.rank, info.world_size) == (0, 1) and get_rank() == 0 and get_world_size() == 1 and is_main()
    t = torch.arange(6).reshape(3, 2)
    assert torch.equal(all_gather_uneven(t), t)


def test_errors():
    with pytest.raises(ValueError, match="per-rank batch size 20"):
        ShardedOrder(30, rank=0, world_size=2).batches_per_epoch(20)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        ShardedOrder(30, rank=2, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        ShardedOrder(0)


def _gather_worker(rank, world, port, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from difflab.train import distributed as d

    d.init_distributed(backend="gloo")
    try:
        shard = ShardedOrder(11, even="none", shuffle=False).shard(0)  # rank and world from the group
        rows = torch.from_numpy(shard).float()[:, None].repeat(1, 2)
        gathered = d.all_gather_uneven(rows)
        if d.is_main():
            torch.save(gathered, out)
        d.barrier()
    finally:
        d.cleanup()


def test_all_gather_uneven_over_gloo(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "g.pt"
    torch.multiprocessing.spawn(_gather_worker, args=(2, port, str(out)), nprocs=2, join=True)
    g = torch.load(out, weights_only=True)
    # rank r holds r, r+2, ...: sizes 6 and 5; gathered in rank order
    assert g.shape == (11, 2)
    assert g[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9]
