"""The benchmark scripts' Python parts on a CPU: gpu.sh's with a tiny preset reports consistent numbers;
kernels.py times the network's own layers, and its weight-gradient candidate is exact."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import throughput.py


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_on_cpu_tiny(tmp_path):
    gpu_bench = _load("gpu_bench")
    out = tmp_path / "gpu.json"
    r = gpu_bench.main(["--device", "cpu", "--preset", "mnist-tiny", "--steps", "2", "--warmup", "1",
                        "--batch", "4", "--sample-batch", "4", "--sample-steps", "3", "--image-size", "16",
                        "--peak-tflops", "1.0", "--json", str(out)])
    assert out.is_file()
    assert r["params"] == 176_849 and r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["sample_img_s"] > 0
    # MFU = counted FLOPs per step x steps/s over the peak.
    flops_per_s = r["train_gflop_per_img"] * 1e9 * r["train_img_s"]
    assert r["mfu"] == pytest.approx(flops_per_s / 1e12, rel=1e-6)
    # A full sample costs sample_steps network evaluations, so it is slower than one evaluation.
    assert r["sample_img_s"] < r["eval_img_s"]


def test_gpu_bench_bad_input():
    gpu_bench = _load("gpu_bench")
    with pytest.raises(SystemExit):
        gpu_bench.main(["--device", "cpu", "--preset", "mnist-tiny", "--steps", "0"])
    with pytest.raises(ValueError, match="unknown preset"):
        gpu_bench.main(["--device", "cpu", "--preset", "nope", "--steps", "1"])


# tiny versions of the second milestone's kinds: every conditioning input reaches a network of that kind
M2_TINY = {
    "glide/base": ["model_channels=32", "num_res_blocks=1", "num_head_channels=16", "text.xf_width=32",
                   "text.xf_layers=1", "text.xf_heads=2", "text.text_ctx=8", "cond_dim=null", "encoder_channels=null"],
    "karlo/decoder": ["model_channels=32", "num_res_blocks=1", "num_head_channels=16", "xf_width=32", "clip_dim=16",
                      "text_ctx=8", "encoder_channels=null"],
    "karlo/prior": ["xf_width=32", "xf_layers=1", "xf_heads=2", "clip_dim=16", "text_ctx=8"],
}


@pytest.mark.parametrize("preset", list(M2_TINY))
def test_gpu_bench_runs_every_kind_tiny(preset):
    gpu_bench = _load("gpu_bench")
    sets = [a for s in M2_TINY[preset] for a in ("--set", s)]
    r = gpu_bench.main(["--device", "cpu", "--preset", preset, "--steps", "1", "--warmup", "1", "--batch", "2",
                        "--sample-batch", "2", "--sample-steps", "2", "--image-size", "16", "--peak-tflops", "1.0",
                        *sets])
    from difflab.config import override
    from difflab.nn import build_network, get_preset

    # the benchmarked network is the preset with the changes: the same parameter count as building it here
    net = build_network(override(get_preset(preset), M2_TINY[preset]))
    assert r["params"] == sum(p.numel() for p in net.parameters())
    assert r["mfu"] == pytest.approx(r["train_gflop_per_img"] * 1e9 * r["train_img_s"] / 1e12, rel=1e-6)
    assert r["train_gflop_per_img"] > 0 and r["sample_img_s"] < r["eval_img_s"]


def test_gpu_bench_names_a_bad_change():
    gpu_bench = _load("gpu_bench")
    from difflab.config import ConfigError

    with pytest.raises(ConfigError, match="xf_heads"):
        gpu_bench.main(["--device", "cpu", "--preset", "karlo/prior", "--set", "xf_heads=0", "--steps", "1"])


@pytest.fixture
def kernels():
    return _load("kernels")


@pytest.mark.parametrize("stride", [1, 2])
def test_kernels_im2col_weight_gradient_equals_onednn(kernels, stride):
    """The weight-gradient candidate of benchmarks/kernels.py computes what the convolution's backward does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 7, (9 - 1) // stride + 1, (8 - 1) // stride + 1, generator=g, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(grad, x, weight, [7], [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
                                              [False, True, False])[1]
    torch.testing.assert_close(kernels.im2col_weight_grad(grad, x, stride), ref, rtol=1e-12, atol=1e-12)


def test_kernels_finds_every_layer_of_the_throughput_unet(kernels):
    """The shapes it times are the network's: one entry per 1x1 / 3x3 convolution and GroupNorm, with the
    batch-32 input each one sees."""
    net = kernels.difflab_model()[0]
    shapes = kernels.layer_shapes()
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    assert sum(shapes["pointwise"].values()) == sum(m.kernel_size in ((1,), (1, 1)) for m in convs) == 33
    assert sum(shapes["conv3x3"].values()) == sum(m.kernel_size == (3, 3) for m in convs)
    assert sum(shapes["group_norm"].values()) == sum(isinstance(m, kernels.GroupNorm32) for m in net.modules())
    assert all(shape[0] == 32 for shape, _, _ in shapes["conv3x3"])
    assert ((32, 96, 32, 32), 32, 1) in shapes["conv3x3"] and ((32, 32, 32, 32), 32, 2) in shapes["conv3x3"]


def test_paired_ratio_cancels_load_shared_by_a_round(monkeypatch):
    """Two rows slowed alike in a round keep their ratio: the per-round ratio is exact where the ratio of the
    medians is not."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    throughput = _load("throughput")
    load = [1.0, 0.5, 0.9, 0.6, 1.0]  # the machine's speed in each round
    fast = [30.0 * f for f in load]
    slow = [20.0 * f for f in load[1:] + load[:1]]  # the other row saw each round's load one round later
    assert throughput.paired_ratio([30.0 * f for f in load], [20.0 * f for f in load]) == pytest.approx((1.5,) * 3)
    med, q1, q3 = throughput.paired_ratio(fast, slow)
    assert q1 <= med <= q3 and q1 < 1.5 < q3
    assert throughput.paired_ratio([3.0], [2.0]) == (1.5, 1.5, 1.5)


def test_throughput_conv1x1_row_is_the_same_network_before_the_pointwise_path(monkeypatch):
    """The "difflab-conv1x1" row (the before of the pointwise path) computes the difflab row's function with
    oneDNN 1x1 convolutions in place of the batched matmuls, and keeps every parameter."""
    throughput = _load("throughput")
    from difflab.nn.layers import _Pointwise

    torch.manual_seed(0)
    fast = throughput.difflab_model()[0].eval()
    torch.manual_seed(0)
    before = throughput.MODELS["difflab-conv1x1"]()[0].eval()
    assert sum(isinstance(m, _Pointwise) for m in fast.modules()) == 33
    assert not any(isinstance(m, _Pointwise) for m in before.modules())
    assert fast.state_dict().keys() == before.state_dict().keys()
    with torch.no_grad():
        for p, q in zip(fast.parameters(), before.parameters(), strict=True):
            p.normal_(0, 0.05)
            q.copy_(p)
        x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 900])
        out, ref = fast(x, t), before(x, t)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_throughput_attention_before_row_uses_the_old_attention_and_restores_the_new():
    """The "difflab-attention-before" row runs the U-Net's 11 attention layers through the old formulation
    (scores scaled, two matmuls at every length: its output differs from the library's by rounding only), and
    the library's attention is back in place after every call, forward and backward."""
    from difflab.nn import layers

    throughput = _load("throughput")
    torch.manual_seed(0)
    net, call, _ = throughput.MODELS["difflab-attention-before"]()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    fast = layers.qkv_attention
    seen = []
    old = layers.F.scaled_dot_product_attention
    layers.F.scaled_dot_product_attention = lambda *a, **k: seen.append(1) or old(*a, **k)
    try:
        x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 900])
        out = call(net, x, t)
        assert not seen  # the 16x16 layers took the two matmuls
        out.sum().backward()
        assert layers.qkv_attention is fast
        ref = net(x, t)
        assert len(seen) == 5  # the library's own call: SDPA at 16x16
    finally:
        layers.F.scaled_dot_product_attention = old
    assert not torch.equal(out, ref)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_flop_counter_counts_the_cpu_flash_kernel(monkeypatch):
    """throughput.flop_counter gives SDPA's CPU kernel the FLOPs of its two matmuls (plain FlopCounterMode
    counts 0), so the forward costs the same on either CPU attention path; the backward counts the flash
    kernel's recomputed scores (5 matmuls against the plain path's 4)."""
    from difflab.nn import layers

    throughput = _load("throughput")
    n, heads, ch, length = 2, 2, 8, layers.CPU_SDPA_MIN_LENGTH
    qkv = torch.randn(n, 3 * heads * ch, length, requires_grad=True)

    def counted(threshold):
        monkeypatch.setattr(layers, "CPU_SDPA_MIN_LENGTH", threshold)
        with throughput.flop_counter() as fc:
            out = layers.qkv_attention(qkv, heads, True)
        fwd = fc.get_total_flops()
        with throughput.flop_counter() as fc:
            out.sum().backward()
        return fwd, fc.get_total_flops()

    one_matmul = 2 * n * heads * length * length * ch
    assert counted(length + 1) == (2 * one_matmul, 4 * one_matmul)  # two matmuls
    assert counted(length) == (2 * one_matmul, 5 * one_matmul)  # SDPA's CPU flash kernel


def test_fast_paths_variants_compute_the_library_function_and_restore_it():
    """Every variant of benchmarks/fast_paths.py (each fast path reverted, all of them, SDPA everywhere) gives
    the library's output and parameter gradients up to float32 rounding (exactly, for the two that only remove
    casts to float32), and ``use({})`` puts the library's formulations back."""
    from difflab.nn import layers

    fast_paths = _load("fast_paths")
    throughput = _load("throughput")
    library = (layers.qkv_attention, layers.GroupNorm32.forward, layers._Pointwise.forward,
               layers.CPU_SDPA_MIN_LENGTH)
    torch.manual_seed(0)
    net = throughput.difflab_model()[0]
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 900])

    def run():
        net.zero_grad(set_to_none=True)
        out = net(x, t)
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    ref_out, ref_grad = run()
    try:
        for name, variant in list(fast_paths.VARIANTS.items())[1:]:  # after "all fast paths"
            fast_paths.use(variant)
            out, grad = run()
            assert ((out - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-5, name
            assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-4, name
            if name in ("plain softmax", "plain group_norm"):  # casts to float32, which float32 does not need
                assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad), name
            elif name != "plain attention_layout":  # (the transposed product can round alike)
                assert variant and not torch.equal(grad, ref_grad), name  # it really took another formulation
    finally:
        fast_paths.use({})
    assert (layers.qkv_attention, layers.GroupNorm32.forward, layers._Pointwise.forward,
            layers.CPU_SDPA_MIN_LENGTH) == library
