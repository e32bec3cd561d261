"""FSDP (``train.parallel: fsdp``): torch.distributed's FSDP2 ``fully_shard`` and its sharded state.

Under FSDP every parameter is a DTensor sharded along dim 0 across the W ranks (rank r holds
``torch.chunk(full, W, dim=0)[r]``, possibly empty); gradients and the optimiser state (Adam's
``exp_avg`` / ``exp_avg_sq``) are sharded alike, and so are the EMAs, which average the local shards.
Buffers are not sharded. A checkpoint then holds one file per rank and kind of weights
(:func:`shard_name`); :func:`gather_state` rebuilds the whole tensors from the files alone, without a
process group (cat along dim 0 in rank order), which is how a sharded run is sampled from and how
``difflab gather`` writes one safetensors file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["shard_model", "is_sharded", "local_state", "full_state", "copy_local_", "local_optimizer_state",
           "restore_optimizer_state", "shard_name", "gather_state"]


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Any) -> bool:
    """True for a DTensor (an FSDP-sharded parameter, gradient, EMA or optimiser state)."""
    return isinstance(t, _dtensor_type())


def shard_model(net: nn.Module) -> nn.Module:
    """``fully_shard`` every block (each element of an ``nn.ModuleList``: the U-Net's input / output
    blocks, a transformer's layers), then the root, so that at most one block is gathered at a time.
    The module is sharded in place and returned."""
    from torch.distributed.fsdp import fully_shard

    for module in list(net.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(net)
    return net


def local_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """``(this rank's tensors, names of the sharded ones)``: DTensors replaced by their local shard."""
    out, sharded = {}, []
    for k, v in state.items():
        if is_sharded(v):
            out[k], _ = v.to_local(), sharded.append(k)
        else:
            out[k] = v
    return out, sharded


def full_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole tensors (a collective: every rank must call it); plain tensors pass through."""
    return {k: v.full_tensor() if is_sharded(v) else v for k, v in state.items()}


@torch.no_grad()
def copy_local_(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` where ``dst`` may be a DTensor and ``src`` its local shard."""
    target = dst.to_local() if is_sharded(dst) else dst
    if target.shape != src.shape:
        raise ValueError(f"shape {tuple(src.shape)} does not fit {tuple(target.shape)}")
    target.copy_(src)


def local_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with every DTensor state replaced by its local shard (weights-only safe)."""
    sd = opt.state_dict()
    state = {idx: {k: v.to_local() if is_sharded(v) else v for k, v in s.items()} for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def restore_optimizer_state(opt: torch.optim.Optimizer, local: Mapping[str, Any]) -> None:
    """Load :func:`local_optimizer_state`'s output back: each local shard re-wrapped as a DTensor
    laid out like its parameter."""
    DTensor = _dtensor_type()
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for idx, s in local["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
            if is_sharded(p) and isinstance(v, Tensor) and v.dim() > 0 else v
            for k, v in s.items()
        }
    opt.load_state_dict({"state": state, "param_groups": local["param_groups"]})


def shard_name(which: str, rank: int, world: int, ext: str = "safetensors") -> str:
    """``model.shard-00001-of-00002.safetensors``: rank 1's part of the weights ``which``."""
    return f"{which}.shard-{rank:05d}-of-{world:05d}.{ext}"


def gather_state(shards: list[dict[str, Tensor]], sharded: list[str]) -> dict[str, Tensor]:
    """Whole tensors from every rank's local state (rank order): the ``sharded`` names are concatenated
    along dim 0 (FSDP2's chunks), the others (buffers) are taken from rank 0."""
    out = {}
    names = set(sharded)
    for k in shards[0]:
        out[k] = torch.cat([s[k] for s in shards], dim=0) if k in names else shards[0][k]
    return out
