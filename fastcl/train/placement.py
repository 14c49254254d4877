"""Where a training run runs: its device, its precision, and the DDP wrapper."""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from ..sentence_model import check_device


def choose_device(requested: str | None) -> torch.device:
    """``--device`` if given (checked); else this process's GPU under torchrun
    (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if requested:
        return check_device(requested, "--device")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def choose_precision(requested: str, device: torch.device) -> str:
    """``--precision``: "auto" is bf16 on GPUs that support it, else fp32; bf16 and fp16
    (autocast) need a CUDA device."""
    precision = requested
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device (autocast on GPU); use fp32 on CPU")
    return precision


def wrap_for_ddp(encoder: nn.Module, device: torch.device) -> nn.Module:
    """``encoder`` in DistributedDataParallel. Buffers (position ids) are constants, so no
    per-forward sync; the flag that says so changed its name in torch 2.13."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
             else {"broadcast_buffers": False})
    return DDP(encoder, device_ids=ids, **quiet)
