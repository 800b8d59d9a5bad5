"""Convolutions on small feature maps as matrix products, for training on CPU.

oneDNN's kernels are slow where a ResNet's feature maps are small. Its weight-gradient kernel is the worst: for
resnet18's last stage at a 64 px input (2x2 maps, batch 32) the bf16 AMX kernel takes 18 ms per 3x3 conv, the same
product written as im2col + one GEMM 1.5 ms; at 8x8 maps the GEMM still wins 2x, from 16x16 on the kernel wins. Where
the weight is also large, forward and input gradient are slow too: 4.5 ms each for 512x512x3x3 at 2x2, where one GEMM
takes 1 ms. Inside a training step (weights out of cache) that holds down to 256x256x3x3 at 4x4. In whole steps at
64 px, resnet18 trains 1.6-1.9x faster than with plain convs in bf16 and 1.3x in fp32, resnet50 1.7-1.9x and 1.3-1.5x;
at 128 px 1.3-1.8x and 1.0-1.3x (benchmarks/small_conv.py prints the tables). The GEMMs read the channels_last
input through strided windows, so the only copy is the im2col matrix, and their results are channels_last.

`convert(model)` makes every plain `nn.Conv2d` a `SmallMapConv2d`: the same module with the same parameters and
state_dict, whose training forward routes small outputs through `_GemmConv`: weight gradient by GEMM and, for large
weights, forward and input gradient too. Eval mode, no-grad code and other devices run `nn.Conv2d.forward`
unchanged; `restore(model)` undoes the conversion (before export or pickling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Largest output map (height x width) whose weight gradient the GEMM computes, by compute dtype; measured on a 2-core
# AMX CPU (Sapphire Rapids class). fp16 and other dtypes keep oneDNN's kernel.
MAX_OUTPUT_PIXELS = {torch.bfloat16: 64, torch.float32: 16}
# Forward and input gradient by GEMM too: output maps up to this size, for weights of at least FULL_GEMM_MIN_WEIGHT
# elements (resnet's 3x3 convs of 256 and 512 channels, resnet50's 1x1 convs of 1024 and 2048), set by whole
# training steps of resnet18 and resnet50 at 64 px: 2^19 was as fast, 2^20 slower (resnet50 -20%).
FULL_GEMM_MAX_PIXELS = 16
FULL_GEMM_MIN_WEIGHT = 1 << 18


class SmallMapConv2d(nn.Conv2d):
    """An `nn.Conv2d` whose CPU training step computes small output maps with GEMMs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if (self.training and torch.is_grad_enabled() and x.device.type == "cpu" and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            pixels = _output_pixels(x, self)
            if pixels <= MAX_OUTPUT_PIXELS.get(dtype, 0):
                full = pixels <= FULL_GEMM_MAX_PIXELS and self.weight.numel() >= FULL_GEMM_MIN_WEIGHT
                with torch.autocast("cpu", enabled=False):
                    weight = self.weight.to(dtype)
                    bias = None if self.bias is None else self.bias.to(dtype)
                    return _GemmConv.apply(x.to(dtype), weight, bias, self.stride, self.padding, self.dilation, full)
        return super().forward(x)


def convert(model: nn.Module) -> int:
    """Turn every plain `nn.Conv2d` in `model` into a `SmallMapConv2d` in place; return how many.

    The class is swapped on the existing modules (as torch.nn.utils.parametrize does), so parameters, buffers, hooks
    and optimizer references stay exactly as they were.
    """
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    for m in convs:
        m.__class__ = SmallMapConv2d
    return len(convs)


def restore(model: nn.Module) -> int:
    """Turn every `SmallMapConv2d` in `model` back into a plain `nn.Conv2d`; return how many."""
    convs = [m for m in model.modules() if type(m) is SmallMapConv2d]
    for m in convs:
        m.__class__ = nn.Conv2d
    return len(convs)


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride, padding, dilation) -> torch.Tensor:
    """The conv's input windows as an (N, Ho, Wo, kh, kw, C) tensor, taken on the NHWC view of x (one copy at most,
    by whoever reshapes it): row (n, i, j) of its (N*Ho*Wo, kh*kw*C) matrix is the window of output pixel (i, j)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    nhwc = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    windows = nhwc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    return windows.permute(0, 1, 2, 4, 5, 3)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    # (O, kh*kw*C): the columns in im2col's order; a view when the weight is channels_last.
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _pixel_rows(t: torch.Tensor) -> torch.Tensor:
    # (N*H*W, C); a view for a channels_last tensor.
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                 dilation) -> torch.Tensor:
    """conv2d(x, weight, bias) as im2col(x) @ weight^T; the result is channels_last."""
    cols = im2col(x, weight.shape[2:], stride, padding, dilation)
    n, ho, wo = cols.shape[:3]
    mat = cols.reshape(n * ho * wo, -1)
    out = mat @ _weight_matrix(weight).t() if bias is None else torch.addmm(bias, mat, _weight_matrix(weight).t())
    return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)


def input_grad(grad_out: torch.Tensor, x_shape: torch.Size, weight: torch.Tensor, stride, padding,
               dilation) -> torch.Tensor:
    """d(loss)/d(x) of `conv2d(x, weight)`: grad_out @ weight gives each window's gradient, and every window adds
    its part back where it was read (col2im, one strided add per kernel tap); the result is channels_last."""
    out_ch, in_ch, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, _, h, w = x_shape
    ho, wo = grad_out.shape[2:]
    windows = (_pixel_rows(grad_out) @ _weight_matrix(weight)).view(n, ho, wo, kh, kw, in_ch)
    padded = grad_out.new_zeros(n, h + 2 * ph, w + 2 * pw, in_ch)
    for i in range(kh):
        for j in range(kw):
            padded[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw] += \
                windows[:, :, :, i, j]
    return padded[:, ph: ph + h, pw: pw + w].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size, stride, padding,
                dilation) -> torch.Tensor:
    """d(loss)/d(weight) of `conv2d(x, weight)` given d(loss)/d(output), as grad_out^T @ im2col(x).

    The im2col matrix is (N*Ho*Wo, kh*kw*C), so the product is the weight in (O, kh, kw, C) order: channels_last
    for (O, C, kh, kw).
    """
    out_ch, in_ch, kh, kw = weight_shape
    cols = im2col(x, (kh, kw), stride, padding, dilation).reshape(-1, kh * kw * in_ch)
    return (_pixel_rows(grad_out).t() @ cols).view(out_ch, kh, kw, in_ch).permute(0, 3, 1, 2)


class _GemmConv(torch.autograd.Function):
    """conv2d whose weight gradient is a GEMM (`weight_grad`); with `full`, forward and input gradient are GEMMs too
    (`conv_forward`, `input_grad`), else they are oneDNN's."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, full: bool):
        ctx.save_for_backward(x, weight)
        ctx.conv = (tuple(stride), tuple(padding), tuple(dilation))
        ctx.full = full
        if full:
            return conv_forward(x, weight, bias, stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x and ctx.full:
            grad_x = input_grad(grad_out, x.shape, weight, stride, padding, dilation)
        elif need_x:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], 1, [True, False, False])[0]
        if need_w:
            grad_w = weight_grad(grad_out, x, weight.shape, stride, padding, dilation)
        if need_b:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _output_pixels(x: torch.Tensor, conv: nn.Conv2d) -> int:
    size = 1
    for i, n in enumerate(x.shape[-2:]):
        size *= (n + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
    return size
