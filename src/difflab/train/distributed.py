"""Multi-process helpers: start from torchrun's environment, rank queries, gathers, data sharding.

Single-process runs need no setup: every helper answers as rank 0 of 1 when torch.distributed is
not initialised. Under ``torchrun`` call :func:`init_distributed` once (gloo on CPU, nccl on CUDA).

Data order (:class:`ShardedOrder`) is a pure function of ``(seed, epoch)``: the k-th batch a rank
draws depends only on k, so a run resumed at batch k continues with exactly the batches an
uninterrupted run would have drawn. The trainer stores k (batches consumed), nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); without them (or WORLD_SIZE=1) stay single-process.

    Backend: nccl when CUDA is available, else gloo (or ``backend``). On CUDA the process is bound
    to GPU ``LOCAL_RANK``. Returns this process's :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun")
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), init_method="env://",
                                rank=rank, world_size=world)
    return DistInfo(get_rank(), get_world_size(), local_rank, device)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0: the process that writes checkpoints, logs and samples."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where the process group's collectives run: this rank's GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_uneven(t: Tensor) -> Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order; ranks may hold different numbers
    of rows (the other dims must agree). The collective runs on the backend's device (a GPU for
    nccl, the CPU for gloo); the result is on ``t``'s device. Single-process: returns ``t``."""
    if not is_distributed():
        return t
    home, t = t.device, t.to(_collective_device())
    world = get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    biggest = max(counts)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0).to(home)


class ShardedOrder:
    """Deterministic per-epoch permutation of ``num_items`` indices, split across ranks.

    Epoch e's global order is ``torch.randperm(num_items)`` from a generator seeded with
    ``seed + e`` (the identity when ``shuffle=False``). Rank r takes positions r, r+W, r+2W, ...
    ``even`` decides what happens when W does not divide the count:

    - ``"drop"``: drop the last ``num_items % W`` of the order (each index at most once per epoch);
    - ``"pad"``:  repeat the start of the order (each index at least once; DistributedSampler's rule);
    - ``"none"``: uneven shards (each index exactly once; for sampling / evaluation, with
      :func:`all_gather_uneven`).
    """

    def __init__(
        self,
        num_items: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        even: Literal["drop", "pad", "none"] = "drop",
    ) -> None:
        self.num_items = int(num_items)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_items < 1:
            raise ValueError(f"cannot order an empty dataset (num_items={num_items})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if even not in ("drop", "pad", "none"):
            raise ValueError(f"even must be 'drop', 'pad' or 'none', got {even!r}")
        if even == "drop" and self.num_items < self.world_size:
            raise ValueError(f"{self.num_items} items cannot be split over {self.world_size} ranks")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.even = even

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch`` (int64 [num_items]), the same on every rank."""
        if not self.shuffle:
            return np.arange(self.num_items, dtype=np.int64)
        g = torch.Generator().manual_seed(self.seed + int(epoch))
        return torch.randperm(self.num_items, generator=g).numpy()

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in order."""
        order = self.epoch_order(epoch)
        w = self.world_size
        if self.even == "drop":
            order = order[: len(order) - len(order) % w]
        elif self.even == "pad" and len(order) % w:
            extra = w - len(order) % w
            order = np.concatenate([order, np.resize(order, extra)])
        return order[self.rank :: w]

    def __len__(self) -> int:
        """Indices per rank per epoch (this rank's count under ``even="none"``)."""
        n, w = self.num_items, self.world_size
        if self.even == "drop":
            return n // w
        if self.even == "pad":
            return -(-n // w)
        return len(range(self.rank, n, w))

    def batches_per_epoch(self, batch_size: int) -> int:
        """Full per-rank batches in one epoch (a partial last batch is dropped)."""
        if not 1 <= batch_size <= len(self):
            raise ValueError(
                f"per-rank batch size {batch_size} must be in [1, {len(self)}] "
                f"(items per rank per epoch with {self.num_items} items over {self.world_size} ranks)"
            )
        return len(self) // batch_size

    def batch(self, k: int, batch_size: int) -> tuple[int, np.ndarray]:
        """The k-th (0-based) per-rank batch of the endless stream: ``(epoch, indices [batch_size])``."""
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, j = divmod(int(k), per_epoch)
        return epoch, self.shard(epoch)[j * batch_size : (j + 1) * batch_size]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Endless ``(epoch, indices)`` batches from batch ``start`` on (resume: ``start`` = batches
        consumed so far). Each epoch's shard is computed once."""
        per_epoch = self.batches_per_epoch(batch_size)
        k = int(start)
        while True:
            epoch, j = divmod(k, per_epoch)
            shard = self.shard(epoch)
            for jj in range(j, per_epoch):
                yield epoch, shard[jj * batch_size : (jj + 1) * batch_size]
            k = (epoch + 1) * per_epoch


class OrderBatchSampler(torch.utils.data.Sampler):
    """A DataLoader ``batch_sampler`` over :meth:`ShardedOrder.batches`: yields lists of
    ``(epoch, index)`` pairs, which the difflab datasets read with that epoch's flips.

    Endless; stop after the number of steps you want. Resume with ``start`` = batches consumed.
    """

    def __init__(self, order: ShardedOrder, batch_size: int, start: int = 0) -> None:
        self.order = order
        self.batch_size = batch_size
        self.start = start
        order.batches_per_epoch(batch_size)  # validate now, not in a worker

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, idx in self.order.batches(self.batch_size, self.start):
            yield [(epoch, int(i)) for i in idx]
