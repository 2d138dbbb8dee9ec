"""Functional entry points of the fused op: from a :class:`~bnrewrite.runtime.sampled.SampleSpec`
(or full statistics) to the op's flat arguments."""
from __future__ import annotations

import math

import torch

from ...errors import InputError

ACTIVATION_NAMES = ("none", "relu", "relu6", "silu", "leaky_relu")


def whole_batch_region(input_shape: tuple[int, ...]) -> list[int]:
    """The region of every row and position (no virtual rows): full statistics."""
    spatial = [(0, int(s)) for s in input_shape[2:]]
    box = [(0, 1)] * (3 - len(spatial)) + spatial
    return [0, 0, int(input_shape[0])] + [v for pair in box for v in pair]


def region_of(spec, input_shape: tuple[int, ...]) -> tuple[list[int], float, int]:
    """``(region, virtual_weight, count)`` of ``spec`` for an input of ``input_shape``.

    ``region = [nv, r0, r1, d0, d1, h0, h1, w0, w1]`` with absolute rows and the patch padded to
    three spatial dims; ``count`` is the number of values per channel the statistics come from,
    as :func:`bnrewrite.runtime.sampled.sampled_statistics` counts them (virtual + sampled).
    ``spec=None`` is full statistics (stock BatchNorm)."""
    spatial = tuple(int(s) for s in input_shape[2:])
    pad = [(0, 1)] * (3 - len(spatial))
    n = int(input_shape[0])
    if spec is None:
        return whole_batch_region(input_shape), 0.0, n * math.prod(spatial)
    if spec.points is not None:
        raise InputError("the fused kernels take a sampled block (rows x patch), not random points (frs); "
                         "keep frs sites on the reference path (lower='reference')")
    nv = int(spec.num_virtual)
    patch = list(spec.patch) if spec.patch is not None else [(0, s) for s in spatial]
    box = pad + [(int(a), int(b)) for a, b in patch]
    wv = float(spec.virtual_weight())
    count = 0
    if wv > 0.0:
        count += spec.virtual_count(tuple(input_shape))
    if wv < 1.0:
        count += spec.sample_count(tuple(input_shape))
    region = [nv, nv + int(spec.rows[0]), nv + int(spec.rows[1])] + [v for pair in box for v in pair]
    return region, wv, count


def fused_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None, *,
                     spec=None, momentum: float = 0.1, eps: float = 1e-5, activation: str = "none",
                     negative_slope: float = 0.01):
    """Sampled BatchNorm + activation through the fused op: ``(y, mean, var, count)``.

    Same statistics as :func:`bnrewrite.runtime.sampled.sampled_batch_norm_reference` (``spec=None``:
    full batch statistics, i.e. ``F.batch_norm`` in training), then ``activation`` applied in
    the same pass. ``running_mean``/``running_var`` are updated in place (PyTorch's EMA with the
    unbiased variance of the ``count`` sampled values) when given and ``count > 1``.
    """
    if activation not in ACTIVATION_NAMES:
        raise InputError(f"fused_batch_norm activation must be one of {', '.join(ACTIVATION_NAMES)}, "
                         f"got {activation!r}")
    from . import ops

    region, wv, count = region_of(spec, tuple(x.shape))
    y, stats = ops.call_batch_norm_act(x, weight, bias, region, wv, float(eps), activation, float(negative_slope),
                                       running_argument(running_mean, running_var, momentum, count))
    return y, stats[0], stats[1], count


def running_argument(running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                     count: int) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    """The fused op's ``running`` argument: PyTorch's EMA of the running statistics with the
    unbiased variance of the ``count`` values (``unbias = count/(count-1)``), or None (no update:
    no running statistics, or a single value, which has no unbiased variance)."""
    if running_mean is None or running_var is None or count < 2:
        return None
    return running_mean, running_var, float(momentum), count / (count - 1)
