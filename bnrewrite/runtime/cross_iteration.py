"""Cross-Iteration BatchNorm (CBN) with first-order Taylor compensation.

Paper: ``shared/papers/cross-iteration-bn.txt`` (Yao et al., "Cross-Iteration Batch
Normalization"), §3.2–3.3 Eqs. 5–12, Algorithm 1, Appendix B.

A CBN site is a producer (Conv1d/2d/3d or Linear, weights θ) whose output x is the
BatchNorm input. Each training step the module

1. computes μ_t = E[x], ν_t = E[x²] of the current batch (Eqs. 2–3);
2. compensates each of the last k−1 iterations' statistics to the current producer
   weights with the first-order Taylor term in the producer's own weights only
   (Eqs. 7–8; the truncation at layer l of §3.2)::

       μ_{t−τ}(θ_t) ≈ μ_{t−τ} + ∂μ_{t−τ}/∂θ_{t−τ} · (θ_t − θ_{t−τ})
       ν_{t−τ}(θ_t) ≈ ν_{t−τ} + ∂ν_{t−τ}/∂θ_{t−τ} · (θ_t − θ_{t−τ})

3. averages them with the current ones, clamping each iteration's ν to at least μ²
   (Eqs. 9–10), takes σ̄² = ν̄ − μ̄² (Eq. 11) and normalises x with (μ̄, σ̄²) (Eq. 12);
4. stores μ_t, ν_t and the closed-form gradients ∂μ_t/∂θ_t, ∂ν_t/∂θ_t (App. B) as
   detached history for the next k−1 steps. Instead of θ_t itself it stores the two
   per-channel numbers of Eqs. 7–8 that do not depend on the later weights
   (:func:`taylor_offsets`): same values, half the memory of keeping θ_{t−τ}, and one pass
   over the history per step.

Gradients flow into the current activations x (hence θ_t through the producer) only; the
history and the Taylor terms are constants (§3.3: "Those of the previous iterations are
fixed and do not receive gradients"; the authors' code reads ``weight.data``).

The closed forms (App. B, Eq. 15) exploit that μ_j and ν_j depend only on row j of θ:

* ∂μ_j/∂θ_{j,p,η} = mean over all output positions of the input patch value (p, η) — the
  same C_in×K tensor for every output channel of a group (:func:`mean_gradient`);
* ∂ν_j/∂θ_{j,p,η} = (2/M) Σ x_j · patch_{p,η} — exactly the weight gradient of the
  producer for the output gradient 2x/M, one weight-gradient convolution
  (:func:`sq_mean_gradient`);
* for a bias b: ∂μ_j/∂b_j = 1 and ∂ν_j/∂b_j = 2μ_j, so the stored μ suffices.

Running statistics (used at inference, and what ``fold_for_inference`` folds) are an EMA
of the *window* statistics (μ̄, σ̄²) the module normalised with, Bessel-corrected over the
k·M values they summarise. Those are the statistics the following layers were trained
against, and they are less noisy than one small batch's; with k = 1 (or during burn-in)
they are exactly stock BatchNorm's update. Inference is therefore stock BatchNorm.

``naive-cbn`` (the paper's "Naive CBN" baseline, §4.3) is the same window without the
Taylor terms. A site whose producer is missing or unsupported runs naive-cbn and says so
in :meth:`CrossIterationBatchNorm.describe`.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import nn

from ..errors import InputError, UnsupportedPatternError
from .base import BatchNormState

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
COMPENSABLE_TYPES = CONV_TYPES + (nn.Linear,)

# state_dict keys beyond BatchNorm's; absent until the first training step (so a freshly
# rewritten model has exactly the original keys) and optional when loading.
HISTORY_KEYS = ("cbn_steps", "cbn_filled", "cbn_next", "cbn_mean", "cbn_sq_mean", "cbn_grad_mean",
                "cbn_grad_sq_mean", "cbn_mean_offset", "cbn_sq_mean_offset")


def auto_window(batch_size: int) -> int:
    """§4.3: k = min(ceil(16 / batch per device), 8), so that ≥ 16 examples feed the statistics."""
    return min(math.ceil(16 / max(int(batch_size), 1)), 8)


# ------------------------------------------------------------------------ closed forms (App. B)
def _conv_input_and_padding(conv: nn.Module, producer_input: torch.Tensor):
    """The (possibly pre-padded) input and the zero padding the convolution applies to it."""
    dims = producer_input.dim() - 2
    if conv.padding_mode != "zeros":
        return (nn.functional.pad(producer_input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode),
                (0,) * dims)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return producer_input, (0,) * dims
        # 'same' may be asymmetric; the module records the exact split it uses
        return nn.functional.pad(producer_input, conv._reversed_padding_repeated_twice), (0,) * dims
    return producer_input, tuple(conv.padding)


def _conv_weight_gradient(conv: nn.Module, producer_input: torch.Tensor, grad_output: torch.Tensor,
                          weight_shape, groups: int, every: int = 1) -> torch.Tensor:
    """∂/∂W of Σ grad_output·conv(input, W): one weight-gradient convolution.

    ``every`` > 1: ``grad_output`` holds only every ``every``-th output position of each spatial
    dim; the same convolution with its stride multiplied by ``every`` visits exactly those."""
    u, padding = _conv_input_and_padding(conv, producer_input)
    dims = u.dim() - 2
    stride = tuple(s * every for s in conv.stride)
    positions = grad_output.numel() // grad_output.shape[1]
    patch = math.prod(weight_shape[1:])
    if dims == 2 and groups == 1 and 16 * positions <= patch and u.device.type == "cpu":
        # few output positions, long patches (deep layers of a small-batch CNN): oneDNN's
        # weight-gradient kernel is up to 4x slower there than im2col and one matrix product
        cols = nn.functional.unfold(u, conv.kernel_size, conv.dilation, padding, stride)  # (N, patch, L)
        g = grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1)
        return torch.einsum("ncl,npl->cp", g, cols).reshape(weight_shape)
    weight = grad_output.new_empty(1).expand(weight_shape)
    return torch.ops.aten.convolution_backward(
        grad_output, u, weight, None, stride, padding, tuple(conv.dilation), False,
        (0,) * dims, groups, (False, True, False))[1]


def producer_groups(producer: nn.Module) -> int:
    return int(getattr(producer, "groups", 1))


def mean_gradient(producer: nn.Module, producer_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """∂μ/∂θ of App. B Eq. 15 in its compact form: the mean input patch, per group.

    μ_j = E[x_j] depends only on row j of the producer weight, and
    ∂μ_j/∂θ_{j,p,η} = (1/M) Σ_positions patch_{p,η}, identical for every output channel of
    a group. Returns shape ``(groups, C_in/groups, *kernel)`` for a convolution and
    ``(1, C_in)`` for a Linear; :func:`expand_mean_gradient` gives the per-channel rows.
    Cost O(C_in·K·positions): the batch is summed first (the gradient is linear in the input).
    """
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            return producer_input.reshape(-1, producer_input.shape[-1]).mean(0, keepdim=True)
        groups = producer_groups(producer)
        count = output.numel() // output.shape[1]
        summed = producer_input.sum(0, keepdim=True)
        if isinstance(producer, nn.Conv2d):  # im2col of one summed image: cheaper than a 1-channel conv
            padded, padding = _conv_input_and_padding(producer, summed)
            cols = nn.functional.unfold(padded, producer.kernel_size, producer.dilation, padding, producer.stride)
            return (cols.sum(-1) / count).reshape(groups, producer.weight.shape[1], *producer.weight.shape[2:])
        grad_output = output.new_full((1, groups, *output.shape[2:]), 1.0 / count)
        weight = producer.weight
        shape = (groups, weight.shape[1], *weight.shape[2:])
        return _conv_weight_gradient(producer, summed, grad_output, shape, groups)


def expand_mean_gradient(compact: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Rows of ∂μ_j/∂θ_j for every output channel j from :func:`mean_gradient`'s compact form."""
    return compact.repeat_interleave(out_channels // compact.shape[0], dim=0)


def sq_mean_gradient(producer: nn.Module, producer_input: torch.Tensor, output: torch.Tensor,
                     stride: int = 1) -> torch.Tensor:
    """∂ν/∂θ (App. B): ∂ν_j/∂θ_{j,p,η} = (2/M) Σ_positions x_j · patch_{p,η}.

    This is the producer's weight gradient for the output gradient 2x/M, computed with one
    weight-gradient convolution (a matmul for Linear). Shape: the producer weight's
    ``(C_out, C_in/groups, *kernel)``; entries ∂ν_j/∂θ_{q≠j} are zero and not stored.
    ``output`` is the BN input x = producer(producer_input), bias included.

    ``stride`` > 1 is *not* in the paper: the average over positions is estimated from every
    ``stride``-th output position along each spatial dim (every ``stride``-th row for a Linear),
    which divides the cost of this convolution by stride^dims. Only the Taylor term of Eq. 8
    uses it, so the stored iteration's own ν stays exact (see ``CbnOptions.grad_stride``).
    """
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            rows = output[::stride]
            return (2.0 / rows.shape[0]) * rows.transpose(0, 1).matmul(producer_input[::stride])
        if stride > 1:
            output = output[(slice(None), slice(None)) + (slice(None, None, stride),) * (output.dim() - 2)]
        scale = 2.0 / (output.numel() // output.shape[1])
        weight = producer.weight
        if output.numel() <= weight.numel():  # scale whichever of the two tensors is smaller
            return _conv_weight_gradient(producer, producer_input, output * scale, weight.shape,
                                         producer_groups(producer), stride)
        return _conv_weight_gradient(producer, producer_input, output, weight.shape,
                                     producer_groups(producer), stride).mul_(scale)


def _row_dot(compact_grad_mean: torch.Tensor, grad_sq_mean: torch.Tensor, weight: torch.Tensor,
             groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel j: ⟨∂μ_j/∂θ_j, θ_j⟩ and ⟨∂ν_j/∂θ_j, θ_j⟩ for h stored iterations.

    compact_grad_mean (h, g, C_in/g, *K); grad_sq_mean (h, C_out, C_in/g, *K); weight
    (C_out, C_in/g, *K). Returns two (h, C_out) tensors.

    Written as batched matrix products over strided views: an elementwise product and sum
    would allocate an h·|θ| temporary per call, and on a CPU that (page faults included) cost
    more than the extra weight-gradient convolution of App. B.
    """
    h, c_out = grad_sq_mean.shape[0], grad_sq_mean.shape[1]
    rows = weight.reshape(c_out, -1)
    per_group = rows.reshape(groups, c_out // groups, -1)
    # (g, h, d) @ (g, d, c/g) -> (g, h, c/g): the mean patch of each group through its rows
    dot_mean = torch.bmm(compact_grad_mean.reshape(h, groups, -1).transpose(0, 1), per_group.transpose(1, 2))
    dot_mean = dot_mean.transpose(0, 1).reshape(h, c_out)
    # (c, 1, d) @ (c, d, h) -> (c, 1, h): one row dot per channel and stored iteration
    dot_sq_mean = torch.bmm(rows.unsqueeze(1), grad_sq_mean.reshape(h, c_out, -1).permute(1, 2, 0))
    return dot_mean, dot_sq_mean.reshape(c_out, h).transpose(0, 1)


def taylor_offsets(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, sq_mean: torch.Tensor,
                   grad_mean: torch.Tensor, grad_sq_mean: torch.Tensor, groups: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of Eqs. 7–8 that do not depend on θ_t, computed once when an iteration is stored.

    Eq. 7 is μ_τ(θ_t) = μ_τ + ⟨∂μ_τ/∂θ, θ_t − θ_τ⟩ + (b_t − b_τ) = a_τ + ⟨∂μ_τ/∂θ, θ_t⟩ + b_t with
    a_τ = μ_τ − ⟨∂μ_τ/∂θ, θ_τ⟩ − b_τ; Eq. 8 likewise with c_τ = ν_τ − ⟨∂ν_τ/∂θ, θ_τ⟩ − 2μ_τ b_τ
    (∂ν_j/∂b_j = 2μ_j). Storing (a_τ, c_τ) instead of θ_τ gives the same values with half the
    history memory and a single pass over it per step. Shapes: (h, C_out) for h iterations.
    """
    dot_mean, dot_sq_mean = _row_dot(grad_mean, grad_sq_mean, weight, groups)
    mean_offset, sq_mean_offset = mean - dot_mean, sq_mean - dot_sq_mean
    if bias is not None:
        mean_offset = mean_offset - bias
        sq_mean_offset = sq_mean_offset - 2.0 * mean * bias
    return mean_offset, sq_mean_offset


def compensate_statistics(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, grad_mean: torch.Tensor,
               grad_sq_mean: torch.Tensor, mean_offset: torch.Tensor, sq_mean_offset: torch.Tensor,
               groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 7–8: the stored iterations' (μ, ν) moved to the current producer weights θ_t = (weight,
    bias) to first order, from the offsets of :func:`taylor_offsets`. Returns (h, C_out) each."""
    dot_mean, dot_sq_mean = _row_dot(grad_mean, grad_sq_mean, weight, groups)
    mean_now, sq_mean_now = mean_offset + dot_mean, sq_mean_offset + dot_sq_mean
    if bias is not None:
        mean_now = mean_now + bias
        sq_mean_now = sq_mean_now + 2.0 * mean * bias
    return mean_now, sq_mean_now


class _BatchMoments(torch.autograd.Function):
    """(biased var, mean) per channel; backward saves only x, which the normalisation keeps anyway
    (autograd through the two passes would also keep x − μ, one more activation-sized tensor)."""

    @staticmethod
    def forward(ctx, x):
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, dtype=torch.promote_types(x.dtype, torch.float32))
        var = (x - mean.reshape(shape)).square().mean(dims)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var, grad_mean):
        x, mean = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1]
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        # ∂var/∂x = 2(x − μ)/M, ∂μ/∂x = 1/M
        scale = (2.0 / count) * grad_var
        shift = grad_mean / count - scale * mean
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).to(x.dtype)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) biased variance and mean of x, accumulated in at least fp32.

    Two passes (mean, then mean of squared deviations): as exact as ``torch.var_mean`` and, on
    a CPU, 5–20× faster than its Welford reduction over the non-contiguous N, H, W dims.
    Differentiable (double backward too); the current batch's part of Eqs. 9–11.
    """
    return _BatchMoments.apply(x)


def window_statistics(x: torch.Tensor, past_mean: torch.Tensor, past_sq_mean: torch.Tensor,
                      moments: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 9–11: (μ̄, σ̄²) over the current batch and h (compensated) past iterations.

    ``past_mean``/``past_sq_mean`` are (h, C) constants; ``moments`` is the current batch's
    :func:`batch_moments` when the caller already has them. Computed in the algebraically equal,
    cancellation-free form σ̄² = (1/k)Σ_τ max(ν_τ − μ_τ², 0) + (1/k)Σ_τ (μ_τ − μ̄)², since
    max(ν, μ²) − μ² = max(ν − μ², 0); for the current batch ν_t − μ_t² is its (biased)
    variance, computed as BatchNorm does. The result is in at least fp32.
    """
    var_now, mean_now = batch_moments(x) if moments is None else moments
    dtype = var_now.dtype
    k = past_mean.shape[0] + 1
    past_mean = past_mean.to(dtype)
    means = torch.cat([mean_now.unsqueeze(0), past_mean], 0)
    past_var = (past_sq_mean.to(dtype) - past_mean.square()).clamp_min(0)                 # Eq. 10
    mean = means.mean(0)                                                                   # Eq. 9
    var = (var_now + past_var.sum(0)) / k + (means - mean).square().mean(0)                # Eq. 11
    return mean, var


# ------------------------------------------------------------------------ runtime module
class CrossIterationBatchNorm(BatchNormState):
    """BatchNorm whose training statistics span the last k iterations (CBN, §3.3, Alg. 1).

    Called as ``module(x, producer_input)`` where ``x = producer(producer_input)``; the
    ``cbn`` pass wires the producer's input into the graph. Without a producer
    (``compensate=False``) it is ``naive-cbn`` and takes ``module(x)``.

    Args:
        window: k, or ``"auto"`` = min(ceil(16/batch), 8) from the first training batch (§4.3).
        burnin: training steps with k = 1, i.e. stock BatchNorm (§3.3 burn-in period).
        compensate: apply the first-order Taylor compensation (Eqs. 7–8); False = naive CBN.
        note: why this site is not compensated (shown by :meth:`describe`).
        grad_stride: 1 = the exact ∂ν/∂θ of App. B; s > 1 estimates it from every s-th output
            position per spatial dim (not in the paper; cost of that convolution / s^dims).

    The history (``cbn_*`` buffers) is module state: written to ``state_dict`` once the first
    training step allocates it, optional when loading, moved by ``.to()``, cleared by
    :meth:`reset_history`. The producer is referenced, not registered, so its parameters
    keep their original ``state_dict`` keys.
    """

    optional_state_keys = HISTORY_KEYS

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 window: int | Literal["auto"] = "auto", burnin: int = 0, compensate: bool = True,
                 note: str | None = None, grad_stride: int = 1):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if window != "auto" and (not isinstance(window, int) or window < 1):
            raise InputError(f"CrossIterationBatchNorm window must be a positive int or 'auto', got {window!r}")
        if not isinstance(burnin, int) or burnin < 0:
            raise InputError(f"CrossIterationBatchNorm burnin must be an int >= 0, got {burnin!r}")
        if not isinstance(grad_stride, int) or grad_stride < 1:
            raise InputError(f"CrossIterationBatchNorm grad_stride must be an int >= 1, got {grad_stride!r}")
        self.window = window
        self.burnin = burnin
        self.grad_stride = grad_stride
        self.compensate = compensate
        self.note = note
        self.producer_name: str | None = None
        object.__setattr__(self, "_producer", None)  # a reference, not a child: no duplicate keys
        for key in HISTORY_KEYS:
            self.register_buffer(key, None)
        self._steps = 0
        self._filled = 0
        self._next = 0
        self._resolved_window: int | None = None if window == "auto" else window
        self.last_statistics: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # ---------------------------------------------------------------- producer
    @property
    def producer(self) -> nn.Module | None:
        return self.__dict__.get("_producer")

    def attach_producer(self, producer: nn.Module, name: str | None = None) -> None:
        """Compensate with ``producer``'s weights (a Conv1d/2d/3d or Linear feeding this BN)."""
        if not isinstance(producer, COMPENSABLE_TYPES):
            raise UnsupportedPatternError(
                f"CBN compensates through Conv1d/2d/3d or Linear producers, got {type(producer).__name__} "
                f"({name}); use naive-cbn for this site")
        if producer.weight.shape[0] != self.num_features:
            raise UnsupportedPatternError(
                f"producer {name} has {producer.weight.shape[0]} outputs but the BatchNorm has "
                f"{self.num_features} channels")
        object.__setattr__(self, "_producer", producer)
        self.producer_name = name
        self.compensate = True

    # ---------------------------------------------------------------- window and history
    @property
    def resolved_window(self) -> int | None:
        return self._resolved_window

    def _allocate(self, x: torch.Tensor) -> None:
        if self._resolved_window is None:
            self._resolved_window = auto_window(x.shape[0])
        h = self._resolved_window - 1
        dtype = torch.promote_types(x.dtype, torch.float32)
        factory = {"device": x.device, "dtype": dtype}
        long = {"device": x.device, "dtype": torch.long}
        self.cbn_steps = torch.zeros((), **long)
        self.cbn_filled = torch.zeros((), **long)
        self.cbn_next = torch.zeros((), **long)
        self.cbn_mean = torch.zeros(h, self.num_features, **factory)
        self.cbn_sq_mean = torch.zeros(h, self.num_features, **factory)
        producer = self.producer
        if self.compensate and producer is not None:
            w = producer.weight
            self.cbn_grad_mean = torch.zeros(h, producer_groups(producer), *w.shape[1:], **factory)
            self.cbn_grad_sq_mean = torch.zeros(h, *w.shape, **factory)
            self.cbn_mean_offset = torch.zeros(h, self.num_features, **factory)
            self.cbn_sq_mean_offset = torch.zeros(h, self.num_features, **factory)

    def reset_history(self) -> None:
        """Forget the stored iterations (``bnrewrite.reset_history(model)`` calls this)."""
        self._filled = 0
        self._next = 0
        for key in HISTORY_KEYS:
            buf = getattr(self, key)
            if buf is not None:
                buf.zero_()
        self._sync_counters()

    def _sync_counters(self) -> None:
        # python ints are the source of truth (no device sync or launch per step); the buffers
        # mirror them whenever the state is saved
        if self.cbn_steps is not None:
            self.cbn_steps.fill_(self._steps)
            self.cbn_filled.fill_(self._filled)
            self.cbn_next.fill_(self._next)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_counters()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _producer_params(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        producer = self.producer
        bias = None if producer.bias is None else producer.bias.detach().to(dtype)
        return producer.weight.detach().to(dtype), bias

    def _record(self, x: torch.Tensor, producer_input: torch.Tensor | None,
                moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store this iteration's μ, ν and, when compensating, ∂μ/∂θ, ∂ν/∂θ (App. B) and the
        θ-independent parts of Eqs. 7–8 (:func:`taylor_offsets`) in the ring of k−1 slots.
        ``moments`` = the batch's (biased var, mean) when the forward pass computed them."""
        capacity = self.cbn_mean.shape[0]
        if capacity == 0:
            return
        with torch.no_grad():
            slot = self._next
            dtype = self.cbn_mean.dtype
            var, mean = batch_moments(x.detach()) if moments is None else moments
            mean, sq_mean = mean.to(dtype), (var + mean.square()).to(dtype)
            self.cbn_mean[slot] = mean
            self.cbn_sq_mean[slot] = sq_mean
            if self.cbn_grad_sq_mean is not None:
                producer = self.producer
                xs = x.detach().to(dtype)
                u = producer_input.detach().to(dtype)
                grad_mean = self.cbn_grad_mean[slot]
                grad_mean.copy_(mean_gradient(producer, u, xs))
                grad_sq_mean = self.cbn_grad_sq_mean[slot]
                grad_sq_mean.copy_(sq_mean_gradient(producer, u, xs, self.grad_stride))
                weight, bias = self._producer_params(dtype)
                offsets = taylor_offsets(weight, bias, mean[None], sq_mean[None], grad_mean[None],
                                         grad_sq_mean[None], producer_groups(producer))
                self.cbn_mean_offset[slot] = offsets[0][0]
                self.cbn_sq_mean_offset[slot] = offsets[1][0]
            self._next = (slot + 1) % capacity
            self._filled = min(self._filled + 1, capacity)

    def past_statistics(self, compensate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (μ, ν) of the last iterations, compensated to the current producer
        weights (Eqs. 7–8) unless ``compensate`` is False. Shapes (h, C); detached."""
        h = self._filled
        mean = self.cbn_mean[:h]
        sq_mean = self.cbn_sq_mean[:h]
        compensate = self.compensate if compensate is None else compensate
        if compensate and self.cbn_grad_sq_mean is not None and h > 0:
            with torch.no_grad():
                weight, bias = self._producer_params(mean.dtype)
                return compensate_statistics(weight, bias, mean, self.cbn_grad_mean[:h], self.cbn_grad_sq_mean[:h],
                                             self.cbn_mean_offset[:h], self.cbn_sq_mean_offset[:h],
                                             producer_groups(self.producer))
        return mean, sq_mean

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, producer_input: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        if self.uses_batch_stats():
            y = self.forward_train(x, producer_input)
        else:
            y = self.stock_forward(x)
        return self.post_norm(y)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Eq. 12 and Eq. 4 as one pass over x: y = x·scale + shift per channel."""
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        # statistics are fp32 (or fp64); the output keeps the input's dtype, as stock BatchNorm's
        return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))

    def forward_train(self, x: torch.Tensor, producer_input: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:  # track_running_stats=False in eval: plain batch statistics
            return self.stock_forward(x)
        compensating = self.compensate and self.producer is not None
        if compensating and producer_input is None:
            raise InputError(
                f"CrossIterationBatchNorm (producer {self.producer_name}) compensates with the producer's "
                "input: call it as module(x, producer_input), as the cbn pass wires it, or rewrite the "
                "site with naive-cbn")
        if self.cbn_mean is None:
            self._allocate(x)
        k = self._resolved_window
        in_burnin = self._steps < self.burnin
        moments = None
        if in_burnin or self._filled == 0:
            y = self.stock_forward(x)  # k = 1 is exactly BatchNorm, running statistics included
            self.last_statistics = None
        else:
            past_mean, past_sq_mean = self.past_statistics()
            moments = batch_moments(x)
            mean, var = window_statistics(x, past_mean, past_sq_mean, moments)
            count = x.numel() // x.shape[1]
            self.update_running_stats(mean, var, count * (past_mean.shape[0] + 1))
            self.last_statistics = (mean.detach(), var.detach(), past_mean.shape[0] + 1)
            y = self.normalize(x, mean, var)
        if k > 1 and self._steps >= self.burnin - (k - 1):
            self._record(x, producer_input if compensating else None,
                         None if moments is None else (moments[0].detach(), moments[1].detach()))
        if self._steps < self.burnin:
            # counted only up to the burn-in: a Python int that changed every step would make
            # torch.compile recompile every step (it guards on module int attributes)
            self._steps += 1
        return y

    def estimate(self, x: torch.Tensor, producer_input: torch.Tensor | None = None, *,
                 compensate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The (μ̄, σ̄²) a training step on ``x`` would normalise with, without changing any
        state (for diagnostics and benchmarks). ``compensate=False`` gives naive CBN's."""
        with torch.no_grad():
            if self.cbn_mean is None or self._filled == 0:
                empty = x.new_zeros(0, self.num_features)
                return window_statistics(x, empty, empty)
            return window_statistics(x, *self.past_statistics(compensate))

    # ---------------------------------------------------------------- state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # allocate the history buffers the checkpoint has, with its shapes (its k), first
        device = next((t.device for t in (self.weight, self.running_mean) if t is not None), None)
        for key in HISTORY_KEYS:
            value = state_dict.get(prefix + key)
            if value is not None and (getattr(self, key) is None or getattr(self, key).shape != value.shape):
                setattr(self, key, torch.empty_like(value, device=device or value.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "cbn_mean" in state_dict:
            self._resolved_window = int(self.cbn_mean.shape[0]) + 1
            self._steps = int(self.cbn_steps)
            self._filled = int(self.cbn_filled)
            self._next = int(self.cbn_next)

    def history_bytes(self, batch_size: int | None = None) -> int | None:
        """Bytes of history this site keeps (k−1 iterations), or None while k is unknown."""
        k = self._resolved_window or (auto_window(batch_size) if batch_size else None)
        if k is None:
            return None
        per_iteration = 2 * self.num_features  # μ, ν
        producer = self.producer
        if self.compensate and producer is not None:
            w = producer.weight
            per_iteration += w.numel()  # ∂ν/∂θ
            per_iteration += producer_groups(producer) * w[0].numel()  # ∂μ/∂θ (compact)
            per_iteration += 2 * self.num_features  # the offsets of Eqs. 7-8
        size = torch.finfo(torch.promote_types(self.running_mean.dtype if self.running_mean is not None
                                               else torch.float32, torch.float32)).bits // 8
        return (k - 1) * per_iteration * size

    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        compensated = self.compensate and self.producer is not None
        batch = input_shape[0] if input_shape else None
        k = self._resolved_window
        info = {
            "variant": "cbn" if compensated else "naive-cbn",
            "window": k if k is not None else (f"auto={auto_window(batch)} (batch {batch})" if batch else
                                               "auto: min(ceil(16/batch), 8) at the first training batch"),
            "burnin": self.burnin,
            "grad_stride": self.grad_stride,
            "producer": self.producer_name if compensated else None,
            "history_bytes": self.history_bytes(batch),
            "history_filled": self._filled,
        }
        if input_shape and info["history_bytes"] is not None:
            activation = math.prod(input_shape) * 4
            info["history_vs_activation"] = round(info["history_bytes"] / activation, 4)
        if self.note:
            info["note"] = self.note
        return info

    def extra_repr(self) -> str:
        mode = "compensated" if self.compensate and self.producer is not None else "naive"
        return (f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}, {mode}"
                + (f", grad_stride={self.grad_stride}" if self.grad_stride != 1 else "")
                + (f", producer={self.producer_name}" if self.producer_name and mode == "compensated" else ""))


def warn_uncompensated(notes: dict[str, str]) -> None:
    """One warning listing the sites that run naive-cbn instead of cbn, and why."""
    if notes:
        lines = "\n".join(f"  {name}: {why}" for name, why in notes.items())
        warnings.warn(f"cbn: {len(notes)} site(s) run without Taylor compensation:\n{lines}", stacklevel=3)
