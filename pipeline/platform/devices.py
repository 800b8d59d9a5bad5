"""The device a run trains on and the precision it computes in: CUDA when visible, bf16 where the hardware runs it
natively (AMX / AVX512-BF16 CPUs, Ampere+ GPUs); moving batches there."""
from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: '{name}' asked for but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    # AMX and AVX512-BF16 run bf16 matmuls natively: about 3x the fp32 training speed of a ResNet here.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("train.precision: fp16 is for CUDA; on CPU use bf16 (or auto)")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch, device: torch.device, channels_last: bool):
    """Move tensors anywhere in a batch (tuples, lists, dicts) to the device; images go channels_last."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def batch_len(batch) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first)
