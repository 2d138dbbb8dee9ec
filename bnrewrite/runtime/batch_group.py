"""Batch-Group Normalization (Summers & Dinneen, "Four Things Everyone Should Know to Improve
Batch Normalization", §3.4): Group Norm whose groups span channels *and* examples.

Training. The ``C`` channels are cut into ``groups`` groups of ``C/groups`` consecutive channels
(as ``nn.GroupNorm``), the ``N`` examples into groups of ``examples`` consecutive examples (the
last group holds the remainder, as Ghost BN, §3.2). Every (example group, channel group) cell
is normalised with its own mean and biased variance over all its examples, channels and
positions, then the per-channel affine ``weight``/``bias`` is applied. Special cases:

* ``N == 1`` (or ``examples == 1``): ``nn.GroupNorm(groups, C)`` per example;
* ``groups == C`` and ``examples >= N``: ``nn.BatchNorm`` in training mode;
* ``groups == C`` and ``examples < N``: Ghost BatchNorm with ghost size ``examples``, except that
  a last example group of one example is normalised over its own positions (Instance Norm),
  where Ghost BN uses the running statistics.

Inference and running statistics. The paper says only that "normalization statistics are
calculated both within groups of channels of each example and across examples in groups"
(§3.4) and evaluates it with inference example weighing (§3.1) "for all approaches", i.e.
with moving averages of the statistics, mixed with the example's own by α. The authors' code
(footnote 4) keeps per-*channel* moving averages of E[x] and E[x²] and, at inference, pools
them over each channel group. We do the same with BatchNorm's own buffers:

* training updates ``running_mean``/``running_var`` per channel from the whole batch exactly as
  ``nn.BatchNorm`` does (so checkpoints load both ways and the buffers mean what they say);
* eval pools them over the channel group of each channel ``c`` in group ``G``::

      μ_G  = mean_{c∈G} running_mean[c]
      σ²_G = mean_{c∈G} (running_var[c] + running_mean[c]²) − μ_G²
      y_c  = weight[c] · (x_c − μ_G) / sqrt(σ²_G + eps) + bias[c]

  which is the population version of what training computes (a channel keeps its offset from
  the group mean, which the network learned to use). Normalising each channel with its own
  running statistics instead (stock BN inference) would remove those offsets: the trained
  network would see different activations at inference than in training whenever
  ``groups < C``. The map is still per-channel affine, so :meth:`inference_affine` folds it
  into the preceding convolution. With ``groups == C`` the pooling is the identity and eval is
  stock BatchNorm.
* without running statistics (``track_running_stats=False``) eval normalises as training does,
  with the batch's own cell statistics (as ``nn.GroupNorm`` would, and as stock BatchNorm uses its
  batch statistics); nothing can be folded then, so ``fold_for_inference`` keeps the module
  (:attr:`foldable` is False) instead of replacing it with per-channel batch statistics.

Small batches: every cell holds at least one example and ``C/groups`` channels; its variance
is ≥ 0 and ``eps`` > 0 keeps ``rsqrt`` finite, so nothing divides by zero (a cell of a single
value normalises to exactly 0, i.e. the output is ``bias``). A batch with a single value per
channel does not update the running statistics (it says nothing about a variance); with
``groups == C`` every cell is then one value and the output does not depend on the input:
that is an InputError, as ``nn.GroupNorm`` and ``nn.BatchNorm`` raise there.

Channel groups must divide ``C``: a layer whose ``C`` is not a multiple of ``groups`` uses the
largest divisor of ``C`` that is ≤ ``groups`` (``C=48, groups=32 -> 24``; ``C=3 -> 3``), shown
by :meth:`describe` and ``extra_repr``.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import BatchNormState, match_memory_format


def channel_groups_for(num_channels: int, groups: int) -> int:
    """The largest divisor of ``num_channels`` that is ≤ ``groups``."""
    for candidate in range(min(groups, num_channels), 0, -1):
        if num_channels % candidate == 0:
            return candidate
    return 1


class BatchGroupNorm(BatchNormState):
    """Batch-Group Norm (§3.4): statistics over groups of channels × groups of examples."""

    per_process_note = "its example groups are taken from each process's own batch"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, groups: int = 32, examples: int = 2):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if int(groups) < 1 or int(examples) < 1:
            from ..errors import InputError
            raise InputError(f"BatchGroupNorm needs groups >= 1 and examples >= 1, got groups={groups}, "
                             f"examples={examples}")
        self.requested_groups = int(groups)
        self.groups = channel_groups_for(num_features, int(groups))
        self.examples = int(examples)

    # ---------------------------------------------------------------- training
    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == self.num_features:
            # one value per channel makes every cell one value (output `bias` whatever the input):
            # nn.GroupNorm's and nn.BatchNorm's error
            self.check_values_per_channel(x)
        n = x.shape[0]
        # statistics and normalisation in at least float32, output in x's dtype (as stock BatchNorm)
        grouped = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(n, self.groups, -1)
        full = (n // self.examples) * self.examples
        pieces = []
        if full:
            pieces.append(self._normalize_cells(grouped[:full], self.examples))
        if full < n:
            pieces.append(self._normalize_cells(grouped[full:], n - full))
        y = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)).reshape(x.shape)
        if self.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        self.update_running_stats_from_batch(x)
        return match_memory_format(y.to(x.dtype), x)

    def _normalize_cells(self, grouped: torch.Tensor, examples: int) -> torch.Tensor:
        """``grouped``: ``(k*examples, G, values)``; normalise each (example group, channel group)."""
        k = grouped.shape[0] // examples
        cells = grouped.reshape(k, examples, self.groups, -1)
        mean = cells.mean(dim=(1, 3), keepdim=True)
        centred = cells - mean
        var = (centred * centred).mean(dim=(1, 3), keepdim=True)
        return (centred * torch.rsqrt(var + self.eps)).reshape(grouped.shape)

    # ---------------------------------------------------------------- inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.empty_batch(x):
            y = self.stock_forward(x)
        elif self.uses_batch_stats():
            y = self.forward_train(x)
        elif self.groups == self.num_features:
            y = self.stock_forward(x)
        else:
            scale, shift = self.inference_affine()
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = (x * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)
        return self.post_norm(y)

    @property
    def foldable(self) -> bool:
        """False without running statistics: eval then depends on the batch (see the module docstring)."""
        return self.track_running_stats

    def group_running_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(mean, var)`` of the channel's group, pooled from the running statistics:
        the group variance is the mean of ``running_var + (running_mean − group mean)²``, the same
        value as ``E[var + mean²] − group mean²`` without its cancellation (float32 gave a variance
        of 0 for means near 1e4, float16 NaN for means near 300), in at least float32."""
        mean, var = self.running_mean, self.running_var
        if self.groups == self.num_features:
            return mean, var
        per = self.num_features // self.groups
        wide = torch.promote_types(mean.dtype, torch.float32)
        cells = mean.to(wide).reshape(self.groups, per)
        group_mean = cells.mean(dim=1, keepdim=True)
        spread = cells - group_mean
        group_var = (var.to(wide).reshape(self.groups, per) + spread * spread).mean(dim=1)
        return (group_mean.flatten().repeat_interleave(per).to(mean.dtype),
                group_var.repeat_interleave(per).to(mean.dtype))

    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.track_running_stats:
            return super().inference_affine()  # raises: eval depends on the batch
        mean, var = self.group_running_moments()
        inv = torch.rsqrt(var + self.eps)
        scale = inv * self.weight if self.affine else inv
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        return scale, shift

    def example_weighted_inference(self, alpha: float) -> nn.Module:
        """Inference example weighing (§3.1, Eq. 3) for this layer, as the authors' code does it
        for Batch-Group Norm: the example's own moments *and* the running moments are pooled
        over the channel group before mixing. A plain-ops module (exports to ONNX)."""
        return GroupExampleWeightedNorm(self.running_mean, self.running_var,
                                        self.weight if self.affine else None,
                                        self.bias if self.affine else None,
                                        self.eps, alpha, self.groups)

    # ---------------------------------------------------------------- reporting
    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        info = super().describe(input_shape)
        info["channel_groups"] = self.groups
        info["channels_per_group"] = self.num_features // self.groups
        if self.groups != self.requested_groups:
            info["note"] = (f"groups={self.requested_groups} does not divide {self.num_features} channels: "
                            f"using {self.groups} (largest divisor <= {self.requested_groups})")
        info["examples_per_group"] = self.examples
        if input_shape:
            full, rest = divmod(input_shape[0], self.examples)
            info["example_groups"] = f"{full} x {self.examples}" + (f" + 1 x {rest}" if rest else "") \
                if full else f"1 x {rest}"
        return info

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, groups={self.groups}, examples={self.examples}"
        if self.groups != self.requested_groups:
            text += f" (requested groups={self.requested_groups})"
        return text


class GroupExampleWeightedNorm(nn.Module):
    """Eval-mode Batch-Group Norm with inference example weighing (four-things-bn §3.1 Eq. 3, with
    the moments pooled over channel groups as in §3.4)::

        m_G  = α·mean_{c∈G,S} x[n, c]   + (1−α)·mean_{c∈G} running_mean[c]
        s_G  = α·mean_{c∈G,S} x[n, c]²  + (1−α)·mean_{c∈G} (running_var[c] + running_mean[c]²)
        y_c  = weight[c]·(x_c − m_G)/sqrt(s_G − m_G² + eps) + bias[c]

    with ``s_G − m_G²`` computed as α·v_n + (1−α)·v_ema + α(1−α)·(e_n − μ_ema)², where e_n, v_n are
    the example's group mean and variance, μ_ema the group's pooled running mean and v_ema its
    pooled running variance (mean of running_var plus the spread of running_mean over the group):
    the same value, without the float32 cancellation of large terms when |mean| ≫ std.
    """

    def __init__(self, running_mean, running_var, weight, bias, eps: float, alpha: float, groups: int):
        super().__init__()
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.groups = int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        g = self.groups
        cells = x.reshape(n, g, -1)
        ex_mean = cells.mean(dim=2, keepdim=True)
        centred = cells - ex_mean
        ex_var = (centred * centred).mean(dim=2, keepdim=True)
        running_mean = self.running_mean.reshape(g, -1)
        group_mean = running_mean.mean(dim=1, keepdim=True)
        spread = running_mean - group_mean
        group_var = (self.running_var.reshape(g, -1) + spread * spread).mean(dim=1).reshape(1, g, 1)
        rm = group_mean.reshape(1, g, 1)
        a = self.alpha
        mean = a * ex_mean + (1.0 - a) * rm
        shift = ex_mean - rm
        var = a * ex_var + (1.0 - a) * group_var + (a * (1.0 - a)) * (shift * shift)
        y = ((cells - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = [1, c] + [1] * (x.dim() - 2)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, groups={self.groups}, alpha={self.alpha}, eps={self.eps}"
