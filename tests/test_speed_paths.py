"""The fast paths give the plain path's numbers: CPU attention (two matmuls) vs SDPA, forward and backward,
in float32 / float64 / bf16; 1x1 convolutions as batched matmuls vs the convolution; a channels_last U-Net
vs a contiguous one."""

import pytest
import torch
import torch.nn.functional as F

from difflab.nn import UNet, get_preset, layers
from difflab.nn.layers import GroupNorm32, PointwiseConv1d, PointwiseConv2d, _heads_last, qkv_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def split_qkv(qkv, heads, legacy):
    """q, k, v [N, H, C, L] of the official layouts, and C."""
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        return (*qkv.reshape(n, heads, 3, ch, length).unbind(2), ch)
    return (*qkv.reshape(n, 3, heads, ch, length).unbind(1), ch)


def sdpa_reference(qkv, heads, legacy):
    """The SDPA formulation (the path CUDA takes)."""
    q, k, v, ch = split_qkv(qkv, heads, legacy)
    out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(qkv.shape[0], heads * ch, qkv.shape[2])


def math_reference(qkv, heads, legacy):
    """softmax(q^T k / sqrt(C)) v written out, in float64."""
    q, k, v, ch = split_qkv(qkv.double(), heads, legacy)
    weight = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / ch**0.5, dim=-1)
    return torch.einsum("nhqk,nhck->nhcq", weight, v).reshape(qkv.shape[0], heads * ch, qkv.shape[2])


@pytest.mark.parametrize("length", [64, layers.CPU_SDPA_MIN_LENGTH])  # two matmuls / SDPA's fused kernel
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_attention_matches_sdpa_with_gradients(legacy, dtype, length):
    g = torch.Generator().manual_seed(0)
    heads, ch, n = 2, 16, 3
    qkv = torch.randn(n, 3 * heads * ch, length, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(n, heads * ch, length, generator=g, dtype=dtype)
    out = qkv_attention(qkv, heads, legacy)
    (grad,) = torch.autograd.grad((out * w).sum(), qkv)
    ref = sdpa_reference(qkv, heads, legacy)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), qkv)
    exact = math_reference(qkv, heads, legacy)
    (exact_grad,) = torch.autograd.grad((exact * w.double()).sum(), qkv)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    torch.testing.assert_close(out.double(), exact, **tol)
    torch.testing.assert_close(grad.double(), exact_grad.double(), **tol)


@pytest.mark.parametrize("length, fused", [(layers.CPU_SDPA_MIN_LENGTH - 1, False), (layers.CPU_SDPA_MIN_LENGTH, True)])
def test_cpu_self_attention_takes_sdpa_from_the_threshold_on(monkeypatch, length, fused):
    """Self-attention over CPU_SDPA_MIN_LENGTH positions or more goes to SDPA (with unit-stride q, k, v);
    shorter sequences take the two matmuls."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape, q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    qkv = torch.randn(2, 3 * 2 * 8, length, generator=torch.Generator().manual_seed(5))
    out = qkv_attention(qkv, 2, True)
    assert calls == ([((2, 2, length, 8), 1, 1, 1)] if fused else [])
    torch.testing.assert_close(out.double(), math_reference(qkv, 2, True), rtol=1e-5, atol=1e-5)


def test_cpu_attention_bf16_softmax_in_float32():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 3 * 2 * 8, 16, generator=g)
    out = qkv_attention(qkv.bfloat16(), 2, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sdpa_reference(qkv, 2, True), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_inputs_have_unit_channel_stride(legacy):
    """The GPU path hands SDPA q, k, v [N, H, L, C] with unit stride along C (what its flash and memory-efficient
    kernels need; with any other stride it falls back to the float32 math kernel), holding the same numbers
    as the plain channel-first views."""
    heads, ch, n, length = 3, 8, 2, 20
    qkv = torch.randn(n, 3 * heads * ch, length, generator=torch.Generator().manual_seed(4))
    parts = _heads_last(qkv, heads, 3, legacy)
    if legacy:
        ref = qkv.reshape(n, heads, 3, ch, length).unbind(2)
    else:
        ref = qkv.reshape(n, 3, heads, ch, length).unbind(1)
    for got, want in zip(parts, ref, strict=True):
        assert got.shape == (n, heads, length, ch) and got.stride(-1) == 1
        assert torch.equal(got, want.transpose(-1, -2))


def float32_softmax_attention(qkv, heads):
    """The plain low-precision path of the official code: softmax of scores.float(), cast back (legacy order),
    with the library's scaling of q (so that the casts are the only difference)."""
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(n, heads, 3, ch, length).unbind(2)
    scores = torch.matmul((q * (1.0 / ch**0.5)).transpose(-1, -2), k)
    weight = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.matmul(weight, v.transpose(-1, -2)).transpose(-1, -2).reshape(n, heads * ch, length)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_attention_skips_the_casts_exactly(dtype):
    """Without the float32 round trip the forward output is bit-identical (the CPU softmax kernel accumulates
    in float32 and rounds once) for key lengths that are multiples of 8; gradients agree to the low precision's
    rounding."""
    g = torch.Generator().manual_seed(2)
    length = 192  # the two-matmul path (below CPU_SDPA_MIN_LENGTH), a multiple of the vector width
    assert length < layers.CPU_SDPA_MIN_LENGTH
    qkv = (torch.randn(4, 3 * 2 * 32, length, generator=g) * 3).to(dtype).requires_grad_(True)
    w = torch.randn(4, 2 * 32, length, generator=g).to(dtype)
    out = qkv_attention(qkv, 2, True)
    ref = float32_softmax_attention(qkv, 2)
    assert out.dtype == dtype and torch.equal(out, ref)
    (grad,) = torch.autograd.grad((out.float() * w).sum(), qkv)
    (ref_grad,) = torch.autograd.grad((ref.float() * w).sum(), qkv)
    scale = ref_grad.float().abs().max()
    assert ((grad.float() - ref_grad.float()).abs().max() / scale).item() < 2**-7  # one bf16 epsilon


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_softmax_other_lengths_within_one_ulp(dtype):
    """For key lengths that are not multiples of 8 (7x7 = 49, 14x14 = 196) the CPU softmax's vector tail rounds
    some elements differently from softmax(s.float()) cast back: never by more than one unit in the last place."""
    g = torch.Generator().manual_seed(6)
    for length in (49, 196):
        s = (torch.randn(4, 2, 64, length, generator=g) * 3).to(dtype)
        fast = torch.softmax(s, dim=-1).view(torch.int16).int()
        plain = torch.softmax(s.float(), dim=-1).to(dtype).view(torch.int16).int()
        assert (fast - plain).abs().max().item() <= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_sdpa_path_within_one_rounding(dtype):
    """From CPU_SDPA_MIN_LENGTH on, bf16 / fp16 attention (SDPA's fused kernel, float32 accumulation) stays within
    one rounding of the low precision of the exact float64 result, output and gradient."""
    g = torch.Generator().manual_seed(3)
    length = layers.CPU_SDPA_MIN_LENGTH
    qkv = (torch.randn(4, 3 * 2 * 32, length, generator=g) * 3).to(dtype).requires_grad_(True)
    w = torch.randn(4, 2 * 32, length, generator=g).to(dtype)
    out = qkv_attention(qkv, 2, True)
    assert out.dtype == dtype
    exact = math_reference(qkv, 2, True)
    eps = torch.finfo(dtype).eps
    assert ((out.double() - exact).abs().max() / exact.abs().max()).item() < 2 * eps
    (grad,) = torch.autograd.grad((out.float() * w).sum(), qkv)
    (exact_grad,) = torch.autograd.grad((exact * w.double()).sum(), qkv)
    scale = exact_grad.abs().max()
    assert ((grad.double() - exact_grad).abs().max() / scale).item() < 2 * eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_group_norm_matches_float32_path(dtype):
    """GroupNorm32 on half types skips the float32 round trip on the CPU: outputs and gradients equal the
    official float32-and-cast-back path to one rounding of the half type."""
    g = torch.Generator().manual_seed(3)
    gn = GroupNorm32(8, 64)
    with torch.no_grad():
        gn.weight.normal_(1, 0.3, generator=g)
        gn.bias.normal_(0, 0.3, generator=g)
    x = (torch.randn(4, 64, 16, 16, generator=g) * 2 + 0.5).to(dtype).requires_grad_(True)
    w = torch.randn(4, 64, 16, 16, generator=g)
    out = gn(x)
    ref = torch.nn.functional.group_norm(x.float(), 8, gn.weight, gn.bias, gn.eps).to(dtype)
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert ((out.float() - ref.float()).abs() <= eps * ref.float().abs().clamp_min(1)).all()
    grads = torch.autograd.grad((out.float() * w).sum(), [x, gn.weight, gn.bias])
    ref_grads = torch.autograd.grad((ref.float() * w).sum(), [x, gn.weight, gn.bias])
    for a, b in zip(grads, ref_grads, strict=True):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < eps


def test_channels_last_unet_same_output():
    torch.manual_seed(0)
    net = UNet(get_preset("mnist-tiny"))
    for p in net.parameters():  # zero-initialised output convs would hide differences
        p.data.normal_(0, 0.1)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 700])
    ref = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.to(memory_format=torch.channels_last), t), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pointwise_conv_matches_the_convolution_with_gradients(dims, bias, dtype):
    """The batched-matmul 1x1 convolution gives the convolution's output and gradients (input, weight,
    bias): to float64 rounding in float64, to a few float32 epsilons in float32."""
    g = torch.Generator().manual_seed(5)
    cls, conv = (PointwiseConv1d, F.conv1d) if dims == 1 else (PointwiseConv2d, F.conv2d)
    layer = cls(48, 80, bias=bias).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2, generator=g)
    spatial = (37,) if dims == 1 else (9, 7)
    x = torch.randn(3, 48, *spatial, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(3, 80, *spatial, generator=g, dtype=dtype)
    out = layer(x)
    ref = conv(x, layer.weight, layer.bias)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert out.shape == ref.shape == (3, 80, *spatial)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < tol
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()).item() < tol


def test_pointwise_conv_under_bf16_autocast_and_channels_last():
    """Under CPU bf16 autocast the fast path returns bf16 like the convolution (to bf16 rounding); a
    channels_last input takes the convolution and keeps its layout; the state dict is the convolution's."""
    g = torch.Generator().manual_seed(6)
    layer = PointwiseConv2d(32, 64)
    assert set(layer.state_dict()) == {"weight", "bias"} and layer.weight.shape == (64, 32, 1, 1)
    x = torch.randn(2, 32, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = F.conv2d(x, layer.weight, layer.bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 2**-7
    xl = x.to(memory_format=torch.channels_last)
    out_cl = layer(xl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, F.conv2d(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
