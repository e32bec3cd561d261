"""Exponential moving averages of a network's parameters at several rates.

The official update (improved-diffusion ``update_ema``), applied after every optimiser step::

    targ = rate * targ + (1 - rate) * src        (targ.mul_(rate).add_(src, alpha=1 - rate))

so after n steps from ``targ_0``, ``targ_n = rate^n targ_0 + (1 - rate) sum_k rate^(n-k) src_k``.
The averages start equal to the parameters and are kept in float32 whatever the network's dtype.
Only parameters are averaged (as the official code); buffers are copied from the network when an
average is exported with :meth:`EMA.state_dict`, so an exported average loads as a whole network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def ema_name(rate: float) -> str:
    """The file stem of an average: ``ema_0.9999`` (the official ``ema_{rate}_{step}.pt`` rate text)."""
    return f"ema_{rate}"


class EMA:
    """Float32 moving averages of ``model``'s parameters, one per rate.

    ``averages[rate]`` maps parameter names to float32 tensors on the parameters' device.
    """

    def __init__(self, model: nn.Module, rates: Sequence[float]) -> None:
        rates = tuple(float(r) for r in rates)
        for r in rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"EMA rates must be in [0, 1), got {r}")
        if len(set(rates)) != len(rates):
            raise ValueError(f"EMA rates must be distinct, got {rates}")
        self.rates = rates
        self._names = [n for n, p in model.named_parameters()]
        self.averages: dict[float, dict[str, Tensor]] = {
            r: {n: p.detach().float().clone() for n, p in model.named_parameters()} for r in rates
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One official EMA step for every rate, from ``model``'s current parameters."""
        params = dict(model.named_parameters())
        if list(params) != self._names:
            raise ValueError("the model's parameters differ from those the EMA was built for")
        src = [p.detach().float() for p in params.values()]
        for rate, avg in self.averages.items():
            targ = list(avg.values())
            torch._foreach_mul_(targ, rate)
            torch._foreach_add_(targ, src, alpha=1.0 - rate)

    def state_dict(self, rate: float, model: nn.Module | None = None) -> dict[str, Tensor]:
        """The average at ``rate`` as a network state dict (float32 parameters; buffers from ``model``
        when given, so the result loads with ``model.load_state_dict``)."""
        avg = self._average(rate)
        out: dict[str, Tensor] = {}
        if model is not None:
            for name, value in model.state_dict().items():
                out[name] = avg[name] if name in avg else value.detach()
        else:
            out.update(avg)
        return out

    def load_state_dict(self, rate: float, state: dict[str, Tensor]) -> None:
        """Set the average at ``rate`` from a state dict (extra keys such as buffers are ignored)."""
        avg = self._average(rate)
        missing = [n for n in avg if n not in state]
        if missing:
            raise ValueError(f"EMA {rate}: state lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        from difflab.train.fsdp import copy_local_

        for name, t in avg.items():  # under FSDP, t is a sharded DTensor and state holds its local shard
            try:
                copy_local_(t, state[name].float())
            except ValueError as e:
                raise ValueError(f"EMA {rate}: {name}: {e}") from None

    def _average(self, rate: float) -> dict[str, Tensor]:
        if float(rate) not in self.averages:
            raise ValueError(f"no EMA at rate {rate}; rates: {list(self.rates)}")
        return self.averages[float(rate)]

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, rate: float) -> Iterator[nn.Module]:
        """Temporarily load the average at ``rate`` into ``model`` (for sampling), restoring after."""
        avg = self._average(rate)
        params = dict(model.named_parameters())
        saved = {n: p.detach().clone() for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(avg[n].to(p.dtype))
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
