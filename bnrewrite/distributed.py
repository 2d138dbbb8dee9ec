"""Synchronised sampled statistics under ``torch.distributed`` (bn-sampling §4.3, micro-BN).

SyncBatchNorm all-reduces the statistics of every activation. A sampled BatchNorm with
``sync=True`` only needs the *sample*'s sums: each rank reduces its own sample to
``(Σx, Σx², count)`` per channel, one all-reduce of ``2C + 1`` values combines them, and every
rank normalises with the statistics of the union of the ranks' samples. With FS every rank
uses the same patch (§4.3 (1)). Virtual rows (VDN) are reduced in a second block (§4.3 (3)): a
rank whose batch holds none (an empty batch) contributes a zero count to it, and the virtual
statistics still reach every rank. Every rank must run the same recipe: the blocks' layout
follows it, and ranks with different layouts fail in the collective itself (gloo aborts).
An empty batch still joins the all-reduce, forward and backward, as SyncBatchNorm's does.

Gradient: the global sums are the sum of the ranks' sums, and the training loss is the sum of
the ranks' losses, so the backward of the all-reduce is an all-reduce of the gradient (as in
SyncBatchNorm's backward).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .runtime.base import functorch_active


def sync_available(process_group: Any = None) -> bool:
    """True when a process group of more than one rank is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # the sum over ranks is its own adjoint: through this op again, so that the gradient is
        # differentiable again under create_graph=True (a plain all_reduce would cut that graph)
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


class _TransformableAllReduceSum(torch.autograd.Function):
    """:class:`_AllReduceSum` in the setup_context style that ``torch.func`` transforms need (it
    costs ~30 µs more per call in eager mode; see :func:`~bnrewrite.runtime.base.functorch_active`),
    with forward mode too: the tangent of a sum over ranks is the sum of the ranks' tangents."""

    @staticmethod
    def forward(tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.contiguous(), ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _group_tangent):
        return all_reduce_sum(tangent.contiguous(), ctx.group)


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Differentiable sum over ranks (backward: sum of the ranks' gradients), under ``torch.func``
    transforms too."""
    if functorch_active():
        return _TransformableAllReduceSum.apply(tensor, group)
    return _AllReduceSum.apply(tensor, group)


def _local_sums(values: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    dims = [d for d in range(values.dim()) if d != channel_dim]
    # Σx and Σx² in float64: var = Σx²/n − mean² cancels (in float32, values near 1000 with unit
    # variance lose ~15% of it); MPS has no float64
    acc = values.to(torch.float32 if values.device.type == "mps" else torch.float64)
    count = values.numel() // max(values.shape[channel_dim], 1)
    # an empty selection sums to zeros through the graph: its backward still all-reduces, as every
    # peer's does (a rank with an empty batch, or without virtual rows, would otherwise skip it)
    return acc.sum(dim=dims), (acc * acc).sum(dim=dims), count


def synced_moments(x: torch.Tensor, spec, process_group: Any = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(mean, var, count)`` of the union over ranks of each rank's sample (Eq. 3), and of the
    virtual rows, mixed by Eq. 4 — with one all-reduce of ``[Σx, Σx², n]`` for each part."""
    c = x.shape[1]
    w_virtual = float(spec.beta)
    sel = spec.select(x)
    s_sum, s_sq, s_count = _local_sums(sel, 0 if spec.points is not None else 1)
    pieces = [s_sum, s_sq, s_sum.new_tensor([float(s_count)])]
    with_virtual = w_virtual > 0.0
    if with_virtual:
        # every rank takes part in the same collective, holding virtual rows or not
        virtual = x[:spec.num_virtual]
        v_sum, v_sq, v_count = _local_sums(virtual, 1)
        pieces += [v_sum, v_sq, v_sum.new_tensor([float(v_count)])]
    packed = all_reduce_sum(torch.cat(pieces), process_group)
    parts = []
    counts = []
    for i, weight in enumerate([1.0 - w_virtual] + ([w_virtual] if with_virtual else [])):
        chunk = packed[i * (2 * c + 1):(i + 1) * (2 * c + 1)]
        count = chunk[2 * c].detach()
        counts.append(int(round(float(count))))
        if counts[-1] == 0 or weight == 0.0:
            continue
        mean = chunk[:c] / count
        var = (chunk[c:2 * c] / count - mean * mean).clamp_min(0.0)
        # at least float32, as the unsynced statistics and stock BatchNorm keep them for 16-bit inputs
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        parts.append((weight, mean.to(stat_dtype), var.to(stat_dtype), counts[-1]))
    if not parts:
        from .errors import InputError

        raise InputError("sampled BatchNorm with sync=True: no rank holds any sampled value")
    if len(parts) == 1:
        _, mean, var, count = parts[0]
        return mean, var, count
    total = sum(w for w, *_ in parts)
    mean = sum(w * m for w, m, _, _ in parts) / total
    var = sum(w * v for w, _, v, _ in parts) / total
    return mean, var, sum(cnt for *_, cnt in parts)


def deepcopy_model(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy(model)`` that shares the process groups of its modules (a SyncBatchNorm's
    or a synced sampler's ``process_group``) instead of copying them: a group is a handle to the
    communicator, which cannot be copied (or pickled)."""
    import copy

    memo = {}
    for module in model.modules():
        group = getattr(module, "process_group", None)
        if group is not None:
            memo[id(group)] = group
    return copy.deepcopy(model, memo)
