"""Ghost Batch Normalization (Summers & Dinneen, "Four Things Everyone Should Know to Improve
Batch Normalization", §3.2, Eq. 4; originally Hoffer et al. 2017).

In training, the batch of ``N`` examples is cut into disjoint *ghost batches* of ``size``
consecutive examples and every example is normalised with the mean and variance of its own
ghost batch only (Eq. 4: the statistics of example ``i`` are sums over the examples ``j`` with
``floor(j/B') == floor(i/B')``). The paper assumes ``size`` divides ``N``; here the last ghost
batch simply holds what is left (``N mod size`` examples), exactly like ``torch.split``.

Everything else is stock BatchNorm: the running statistics are updated once per forward from
the *whole* batch (mean and unbiased variance over all ``N`` examples, PyTorch's rule), and
eval mode normalises with them, so a Ghost-BN model folds like a stock one and takes
inference example weighing (§3.1) through ``fold_for_inference(example_weight=α)``; the paper
(Fig. 4) finds the two compound.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .base import BatchNormState, batch_moments, buffer_snapshot, match_memory_format


class GhostBatchNorm(BatchNormState):
    """BatchNorm whose training statistics come from disjoint ghost batches of ``size`` examples.

    * ``size >= N > 1``: one ghost batch, *exactly* ``nn.BatchNorm*d`` (same kernel call); a batch
      of one example is the single-example case below.
    * ``size < N``: ghost batch ``k`` holds examples ``[k*size, (k+1)*size)``; the last one holds
      the remainder. Each ghost batch is normalised as stock BatchNorm would normalise it alone.
    * a ghost batch of a single example has no batch statistics of its own (a single example
      of a ``(N, C)`` input has variance 0; of a conv map it would be Instance Norm, not Batch
      Norm): it is normalised with the running statistics instead, with a warning the first
      time. Without running statistics (``track_running_stats=False``) it uses the statistics
      of the whole batch; a batch of one example then behaves as stock BatchNorm does.
    * running statistics: one update per forward from the whole batch, as stock BatchNorm
      (skipped for a batch holding a single value per channel, where stock BatchNorm raises).
    * eval mode: stock BatchNorm (running statistics, or the whole batch's without them).
    * the output keeps the input's memory format (channels_last in, channels_last out).
    """

    per_process_note = "its ghost batches are taken from each process's own batch"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, size: int = 16):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if int(size) < 2:
            from ..errors import InputError
            raise InputError(f"GhostBatchNorm size must be >= 2, got {size}: a ghost batch of one "
                             "example has no batch statistics")
        self.size = int(size)
        self._warned_single_example = False

    # ---------------------------------------------------------------- training
    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n <= self.size and n > 1:
            return self.stock_forward(x)
        full = (n // self.size) * self.size
        pieces = []
        if full:
            pieces.append(self._normalize_ghost_batches(x[:full]))
        rest = n - full
        if rest >= 2:
            pieces.append(F.batch_norm(x[full:], None, None, self.weight, self.bias, True, 0.0, self.eps))
        elif rest == 1:  # normalised in float32 with the running statistics: back to x's dtype for the cat
            pieces.append(self._normalize_single_example(x, x[full:]).to(x.dtype))
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        y = match_memory_format(y, x)  # the ghost-batch views come out contiguous
        self.update_running_stats_from_batch(x)
        return y

    def _normalize_ghost_batches(self, x: torch.Tensor) -> torch.Tensor:
        """All complete ghost batches at once: ``(k*g, C, *S)`` is viewed as ``(g, k*C, S)``, so
        one BatchNorm kernel call normalises every (ghost batch, channel) pair over its own
        ``g`` examples and spatial positions."""
        g = self.size
        k = x.shape[0] // g
        c = self.num_features
        grouped = x.reshape(k, g, c, -1).transpose(0, 1).reshape(g, k * c, -1)
        weight = self.weight.repeat(k) if self.affine else None
        bias = self.bias.repeat(k) if self.affine else None
        y = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps)
        return y.reshape(g, k, c, -1).transpose(0, 1).reshape(x.shape)

    def _normalize_single_example(self, batch: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
        if not self._warned_single_example:
            self._warned_single_example = True
            source = ("running statistics" if self.track_running_stats
                      else "statistics of the whole batch (no running statistics are tracked)")
            warnings.warn(
                f"GhostBatchNorm{self.site_label}(size={self.size}): a batch of {batch.shape[0]} examples leaves a last "
                f"ghost batch of one example; it is normalised with the {source}. Use a batch size "
                f"that is not 1 more than a multiple of {self.size} (or drop_last=True) to avoid this. "
                "(warned once per layer)", stacklevel=4)
        if self.track_running_stats:
            if self.recomputing():
                # the first call already updated the running statistics this example was normalised with
                from ..errors import InputError
                raise InputError(
                    f"GhostBatchNorm{self.site_label}(size={self.size}) was called again during the backward pass "
                    f"(gradient checkpointing recomputes the forward) with a batch of {batch.shape[0]} examples, "
                    "whose last ghost batch of one example is normalised with the running statistics: the "
                    "first call already updated them, so the recomputed gradients would differ. Use a batch "
                    f"size that is not 1 more than a multiple of {self.size} (or drop_last=True), or checkpoint "
                    "segments that do not contain this layer")
            # snapshots, not clones: the running statistics are updated in place below (see buffer_snapshot)
            return self.normalize(example, buffer_snapshot(self.running_mean), buffer_snapshot(self.running_var))
        if batch.shape[0] == 1:
            return self.stock_forward(example)  # one value per channel: stock's error, naming the site
        var, mean = batch_moments(batch)  # accumulated in at least float32, as stock BatchNorm
        return self.normalize(example, mean, var)

    # ---------------------------------------------------------------- reporting
    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        info = super().describe(input_shape)
        info["ghost_size"] = self.size
        if input_shape:
            n = input_shape[0]
            full, rest = divmod(n, self.size)
            if n <= self.size:
                info["ghost_batches"] = f"1 x {n} (= stock BatchNorm)"
            else:
                info["ghost_batches"] = f"{full} x {self.size}" + (f" + 1 x {rest}" if rest else "")
                if rest == 1:
                    info["note"] = "last ghost batch has one example: it uses the running statistics"
        return info

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, size={self.size}"
