"""Weight gradients of convolutions on small feature maps as one matrix product, for training on CPU.

oneDNN's weight-gradient kernels are slow where a ResNet's feature maps are small: for resnet18's last stage at a
64 px input (2x2 maps, batch 32) the bf16 AMX kernel takes 18 ms per 3x3 conv, the same product written as
im2col + one GEMM 1.5 ms; at 8x8 maps the GEMM still wins 2x, from 16x16 on the kernel wins
(benchmarks/small_conv.py prints the table). The GEMM reads the channels_last input through strided windows, so
the only copy is the im2col matrix, and its result already has the weight's channels_last layout.

`convert(model)` makes every plain `nn.Conv2d` a `SmallMapConv2d`: the same module with the same parameters and
state_dict, whose training forward routes small outputs through `_GemmWeightGrad`. Eval mode, no-grad code and
other devices run `nn.Conv2d.forward` unchanged; `restore(model)` undoes the conversion (before export or pickling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Largest output map (height x width) whose weight gradient the GEMM computes, by compute dtype; measured on a 2-core
# AMX CPU (Sapphire Rapids class). fp16 and other dtypes keep oneDNN's kernel.
MAX_OUTPUT_PIXELS = {torch.bfloat16: 64, torch.float32: 16}


class SmallMapConv2d(nn.Conv2d):
    """An `nn.Conv2d` whose CPU training step computes weight gradients of small output maps with one GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if (self.training and torch.is_grad_enabled() and x.device.type == "cpu" and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and _output_pixels(x, self) <= MAX_OUTPUT_PIXELS.get(dtype, 0)):
            with torch.autocast("cpu", enabled=False):
                weight = self.weight.to(dtype)
                bias = None if self.bias is None else self.bias.to(dtype)
                return _GemmWeightGrad.apply(x.to(dtype), weight, bias, self.stride, self.padding, self.dilation)
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


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: torch.Size, stride, padding,
                dilation) -> torch.Tensor:
    """d(loss)/d(weight) of `conv2d(x, weight)` given d(loss)/d(output), as im2col(x)^T-style GEMM.

    Windows are taken on the NHWC view of x, so the im2col matrix is (N*Ho*Wo, kh*kw*C) and the product
    grad_out(N*Ho*Wo, O)^T @ cols is the weight in (O, kh, kw, C) order: channels_last for (O, C, kh, kw).
    """
    out_ch, in_ch, kh, kw = weight_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    nhwc = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    windows = nhwc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    cols = windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * in_ch)  # (N*Ho*Wo, kh*kw*C)
    grads = grad_out.permute(0, 2, 3, 1).reshape(-1, out_ch)  # (N*Ho*Wo, O); a view for channels_last grad_out
    return (grads.t() @ cols).view(out_ch, kh, kw, in_ch).permute(0, 3, 1, 2)


class _GemmWeightGrad(torch.autograd.Function):
    """conv2d whose backward takes the input gradient from oneDNN and the weight gradient from `weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (tuple(stride), tuple(padding), tuple(dilation))
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], 1, [True, False, False])[0]
        if need_w:
            grad_w = weight_grad(grad_out, x, weight.shape, stride, padding, dilation)
        if need_b:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _output_pixels(x: torch.Tensor, conv: nn.Conv2d) -> int:
    size = 1
    for i, n in enumerate(x.shape[-2:]):
        size *= (n + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
    return size
