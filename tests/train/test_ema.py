"""EMA: the official update against its closed form."""

import torch
from torch import nn

from difflab.train.ema import EMA, ema_name


def test_ema_matches_closed_form():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    start = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    rates = (0.9, 0.5)
    ema = EMA(net, rates)
    sources = []
    for _ in range(20):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        sources.append({n: p.detach().double().clone() for n, p in net.named_parameters()})
        ema.update(net)
    n = len(sources)
    for r in rates:
        for name, a0 in start.items():
            # targ_n = r^n targ_0 + (1 - r) sum_k r^(n-k) src_k
            closed = r**n * a0 + (1 - r) * sum(r ** (n - 1 - k) * s[name] for k, s in enumerate(sources))
            got = ema.averages[r][name]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), closed, rtol=1e-5, atol=1e-5)


def test_ema_constant_source_and_state_round_trip():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(net, [0.99])
    with torch.no_grad():
        a0 = net[0].weight.clone()
        net[0].weight.fill_(1.0)
    for _ in range(50):
        ema.update(net)
    expected = 0.99**50 * a0 + (1 - 0.99**50) * 1.0
    torch.testing.assert_close(ema.averages[0.99]["0.weight"], expected)
    sd = ema.state_dict(0.99, net)
    assert set(sd) == set(net.state_dict())  # buffers included: loads as a whole network
    other = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    other.load_state_dict(sd)
    ema2 = EMA(other, [0.99])
    ema2.load_state_dict(0.99, sd)
    assert torch.equal(ema2.averages[0.99]["0.weight"], ema.averages[0.99]["0.weight"])
    with ema.swapped_in(net, 0.99):
        torch.testing.assert_close(net[0].weight, expected)
    assert (net[0].weight == 1.0).all()
    assert ema_name(0.9999) == "ema_0.9999"


def test_ema_keeps_float32_for_bf16_networks():
    net = nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(net, [0.999])
    ema.update(net)
    assert all(t.dtype == torch.float32 for t in ema.averages[0.999].values())
