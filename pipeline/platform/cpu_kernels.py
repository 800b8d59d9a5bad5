"""The CPU fast paths behind one switch (`train.cpu_kernels: auto | off`), applied here and nowhere else.

Each path replaces a stock PyTorch or torchvision operation whose CPU kernel is slow for this pipeline's shapes, and
each is tested against that operation:
- allocator.py: glibc keeps freed memory between steps instead of faulting it back in (process-wide).
- small_conv.py: convolutions of small feature maps as GEMMs in CPU training (tests/test_small_conv.py).
- dense_adamw.py: fused AdamW without a copy of every channels_last weight (tests/test_dense_adamw.py).
- tasks/detection/roi_align.py: RoIAlign as one weighted gather (tests/tasks/test_detection_model.py).
`auto` turns them on for a CPU device; `off`, and any other device, keep the stock operations (CUDA's own kernels are
fast, and torchvision's RoIAlign is what export wants).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline.platform import allocator, small_conv

MODES = ("auto", "off")


class FastPath:
    """A module with a CPU fast path of its own (a mixin for `nn.Module`s): off until `apply` turns it on, and the
    module still takes its stock path on any device but the CPU. A class attribute, so modules pickled before the
    switch existed load with it off."""

    fast_path: bool = False
    fast_path_name: ClassVar[str]  # for the log line of `apply`


def enabled(mode: str, device: torch.device) -> bool:
    """Whether `mode` turns the fast paths on for `device`: `auto` on the CPU only."""
    if mode not in MODES:
        raise ValueError(f"cpu_kernels mode {mode!r}; valid: {', '.join(MODES)}")
    return mode == "auto" and device.type == "cpu"


def prepare_process(mode: str) -> bool:
    """Keep freed host memory for reuse (allocator.keep_freed_memory) unless `mode` is off; whether it applied.
    Called once, before training or prediction allocates: glibc's settings hold for the whole process, whatever the
    device (CUDA runs allocate host memory too)."""
    if mode not in MODES:
        raise ValueError(f"cpu_kernels mode {mode!r}; valid: {', '.join(MODES)}")
    return mode == "auto" and allocator.keep_freed_memory()


def apply(model: nn.Module, device: torch.device, mode: str, compile: bool) -> list[str]:
    """Turn on the model's fast paths where `enabled`; return their names (e.g. ["small_conv", "roi_align"]).

    Call it after the model is on `device` and before `model.compile()`. A compiled model keeps plain convolutions:
    through small_conv's autograd functions torch.compile compiled resnet18 for over 4 minutes.
    """
    if not enabled(mode, device):
        return []
    applied = []
    if not compile and small_conv.convert(model):
        applied.append("small_conv")
    return applied + sorted({_switch(m, True) for m in model.modules() if isinstance(m, FastPath)})


def restore(model: nn.Module) -> None:
    """Put every stock operation back (before export, pickling or logging the model): plain convolutions, torchvision's
    RoIAlign."""
    small_conv.restore(model)
    for m in model.modules():
        if isinstance(m, FastPath):
            _switch(m, False)


def _switch(module: FastPath, on: bool) -> str:
    module.fast_path = on
    return module.fast_path_name
