"""Fused CUDA (Triton) kernels of sampled BatchNorm (+ activation), registered as
``torch.library`` custom ops (bn-sampling.txt §3.2, App. C Eq. 5–6).

* :func:`fused_batch_norm` — functional: statistics from a ``SampleSpec`` (or the full batch),
  normalise + affine + activation in one pass; autograd through ``bnrewrite::batch_norm_act``.
* :class:`FusedBatchNorm`, :func:`lowered_class` — the runtime modules ``passes/lower.py``
  puts in place.
* :func:`triton_available` — whether the Triton path can run at all.

CUDA tensors run Triton; CPU tensors run the plain-torch implementation in
:mod:`.reference` (the same formulas).
"""
from __future__ import annotations

from .functional import ACTIVATION_NAMES, fused_batch_norm, region_of
from .modules import FusedBatchNorm, FusedSampledMixin, activation_name, lowered_class
from .ops import triton_available

__all__ = ["ACTIVATION_NAMES", "FusedBatchNorm", "FusedSampledMixin", "activation_name", "fused_batch_norm",
           "lowered_class", "region_of", "triton_available"]
