"""small_conv: convolutions of small feature maps by GEMM must equal the convolution's own outputs and gradients, in
every case they take."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.platform import small_conv

# (in, out, kernel, stride, padding, dilation, input size): resnet 3x3 and 1x1 downsample shapes, a 7x7 stem, dilated
# (DeepLab output stride 8) and rectangular maps.
SHAPES = [
    (16, 24, 3, 1, 1, 1, (4, 4)),
    (16, 24, 3, 2, 1, 1, (8, 8)),
    (16, 24, 1, 2, 0, 1, (8, 8)),
    (3, 8, 7, 2, 3, 1, (16, 16)),
    (16, 16, 3, 1, 2, 2, (6, 6)),
    (8, 12, 3, 1, 1, 1, (3, 5)),
    (8, 12, (3, 1), (2, 1), (1, 0), 1, (7, 4)),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}k{s[2]}s{s[3]}p{s[4]}d{s[5]}")
def test_weight_grad_matches_convolution_backward(shape):
    cin, cout, k, stride, pad, dil, size = shape
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False).double()
    x = torch.randn(3, cin, *size, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = conv(x)
    grad_out = torch.randn_like(out)
    expected = torch.autograd.grad(out, conv.weight, grad_out)[0]
    got = small_conv.weight_grad(grad_out, x, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}k{s[2]}s{s[3]}p{s[4]}d{s[5]}")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_forward_and_input_grad_match_the_convolution(shape, bias):
    cin, cout, k, stride, pad, dil, size = shape
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=bias).double().to(memory_format=torch.channels_last)
    x = torch.randn(3, cin, *size, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    expected = conv(x)
    got = small_conv.conv_forward(x.detach(), conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                  conv.stride, conv.padding, conv.dilation)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(expected)
    expected_gx = torch.autograd.grad(expected, x, grad_out)[0]
    got_gx = small_conv.input_grad(grad_out, x.shape, conv.weight.detach(), conv.stride, conv.padding, conv.dilation)
    assert got_gx.shape == x.shape and got_gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got_gx, expected_gx, rtol=1e-10, atol=1e-10)


def _grads(conv, x, autocast: bool):
    x = x.detach().requires_grad_(x.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = conv(x)
    out.float().square().sum().backward()
    return out, x.grad, {n: p.grad for n, p in conv.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("full", [False, True], ids=["weightgrad", "fullgemm"])
def test_converted_conv_trains_like_nn_conv2d(autocast, bias, stride, full, monkeypatch):
    # full: this small weight takes the all-GEMM path too (in models only weights of 1M+ elements do).
    monkeypatch.setattr(small_conv, "FULL_GEMM_MIN_WEIGHT", 0 if full else 1 << 40)
    torch.manual_seed(0)
    plain = nn.Conv2d(32, 48, 3, stride, 1, bias=bias).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    assert small_conv.convert(fast) == 1 and type(fast) is small_conv.SmallMapConv2d
    x = torch.randn(4, 32, 4 * stride, 4 * stride).to(memory_format=torch.channels_last).requires_grad_()
    out_p, gx_p, gp_p = _grads(plain, x, autocast)
    out_f, gx_f, gp_f = _grads(fast, x, autocast)
    assert out_f.dtype == out_p.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_f, out_p, **tol)
    torch.testing.assert_close(gx_f, gx_p, **tol)
    assert gp_f.keys() == gp_p.keys()
    for name in gp_p:
        assert gp_f[name].dtype == torch.float32  # accumulated into the fp32 parameter, as autocast does
        torch.testing.assert_close(gp_f[name], gp_p[name], **tol)


def test_all_gemm_path_is_taken_only_for_large_weights_on_small_maps(monkeypatch):
    calls = []
    original = small_conv.conv_forward
    monkeypatch.setattr(small_conv, "conv_forward", lambda *a: calls.append(a[1].shape) or original(*a))
    side = int(small_conv.FULL_GEMM_MAX_PIXELS ** 0.5)
    for channels, size, expect in [(512, side, True), (512, side + 1, False), (64, side, False)]:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        assert (conv.weight.numel() >= small_conv.FULL_GEMM_MIN_WEIGHT) is (channels == 512)
        small_conv.convert(conv)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(torch.randn(1, channels, size, size)).float().sum().backward()
        assert bool(calls) is expect, (channels, size)
        assert conv.weight.grad is not None


def test_gemm_path_is_taken_only_for_small_maps_in_training(monkeypatch):
    calls = []
    original = small_conv.weight_grad
    monkeypatch.setattr(small_conv, "weight_grad", lambda *a: calls.append(a[1].shape) or original(*a))
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    small_conv.convert(conv)
    limit = small_conv.MAX_OUTPUT_PIXELS[torch.bfloat16]
    side = int(limit ** 0.5)
    for size, expect in [(side, True), (side + 1, False)]:
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.randn(2, 8, size, size))
        out.float().sum().backward()
        assert bool(calls) is expect, size
    calls.clear()
    conv.eval()
    conv(torch.randn(2, 8, 2, 2)).sum().backward()
    assert not calls


def test_frozen_weight_and_input_without_grad():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    small_conv.convert(conv)
    conv.weight.requires_grad_(False)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    conv(x).sum().backward()
    assert conv.weight.grad is None and x.grad is not None
    conv.weight.requires_grad_(True)
    x = torch.randn(2, 8, 4, 4)
    conv(x).sum().backward()
    assert conv.weight.grad is not None


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_converted_backbone_keeps_state_dict_and_gradients(name):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5, pretrained=False).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    params = {id(p) for p in fast.parameters()}
    converted = small_conv.convert(fast)
    assert converted == sum(type(m) is nn.Conv2d for m in plain.modules()) > 0
    assert {id(p) for p in fast.parameters()} == params  # the optimizer's references stay valid
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    y = torch.tensor([1, 3])
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x).float(), y).backward()
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert (p.grad - q.grad).norm() <= 0.02 * p.grad.norm() + 1e-6, n
    assert small_conv.restore(fast) == converted
    assert not any(type(m) is small_conv.SmallMapConv2d for m in fast.modules())
