"""Memory layouts the fused kernels read directly (no triton import here: the fake/meta
implementations and the CPU path use these too)."""
from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is dense with channels innermost (and not also plain contiguous)."""
    if x.is_contiguous():
        # (N, C) or maps of a single position: both orders coincide, channels-first code is right
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 3:
        return x.transpose(1, 2).is_contiguous()
    return False


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when dense in channels-first or channels-last order, else a contiguous copy."""
    if x.is_contiguous() or channels_last(x):
        return x
    return x.contiguous()


def output_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor shaped and laid out as the kernels write it for input ``x``."""
    return torch.empty_like(dense(x), dtype=dtype or x.dtype)


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s layout (a gradient may arrive in another memory format)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)
