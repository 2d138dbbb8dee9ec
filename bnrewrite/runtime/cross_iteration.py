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

Two ways to store what Eqs. 7–8 need (``store``), with the same values up to rounding:

* ``gradients`` — the paper's: ∂μ/∂θ, ∂ν/∂θ of App. B, |θ| numbers per iteration; each step
  costs one weight-gradient convolution plus reading the k−1 stored gradients.
* ``inputs`` — the producer's input u_{t−τ} and output x_{t−τ}. The Taylor terms are
  directional derivatives, and by App. B's closed forms
  ⟨∂ν_j/∂θ_j, Δθ_j⟩ + ∂ν_j/∂b_j Δb_j = (2/M) Σ_m x_{j,m} Δx_{j,m} and
  ⟨∂μ_j/∂θ_j, Δθ_j⟩ + Δb_j = (1/M) Σ_m Δx_{j,m}, where Δx = producer(u_{t−τ}; θ_t) − x_{t−τ}
  (:func:`compensate_from_inputs`): one producer call over the k−1 stored inputs per step,
  (|u| + |x|) numbers per iteration. Cheaper where activations are small next to the weights
  — the small batches and small deep maps CBN is for.
* ``auto`` picks per site at the first training step with :func:`choose_store`.

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

import contextlib
import math
import warnings
from typing import Literal

import torch
from torch import nn

from ..errors import InputError, UnsupportedPatternError, warn_at_caller
from .base import BatchNormState, batch_moments, functorch_active

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
COMPENSABLE_TYPES = CONV_TYPES + (nn.Linear,)

# state_dict keys beyond BatchNorm's; absent until the first training step (so a freshly
# rewritten model has exactly the original keys) and optional when loading.
GRADIENT_KEYS = ("cbn_grad_mean", "cbn_grad_sq_mean", "cbn_mean_offset", "cbn_sq_mean_offset")
INPUT_KEYS = ("cbn_input", "cbn_output", "cbn_rows")
HISTORY_KEYS = ("cbn_steps", "cbn_filled", "cbn_next", "cbn_mean", "cbn_sq_mean") + GRADIENT_KEYS + INPUT_KEYS
STORES = ("auto", "gradients", "inputs")
BACKWARDS = ("window", "renorm")

# Cost of moving one number through memory, in multiply-adds, for choose_store: a single CPU
# core streams ~2.5 G floats/s and does ~20 G multiply-adds/s at these shapes; a GPU's ratio of
# arithmetic to bandwidth is about ten times that.
MOVE_COST = {"cpu": 8.0, "cuda": 64.0}


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
                          weight_shape, groups: int, every: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
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
        # Σ_n g_n cols_nᵀ as one matrix product, written straight into ``out`` (the history slot)
        lhs = g.transpose(0, 1).reshape(g.shape[1], -1)                       # (C, N·L)
        rhs = cols.transpose(1, 2).reshape(-1, cols.shape[1])                 # (N·L, patch)
        if out is None:
            return lhs.matmul(rhs).reshape(weight_shape)
        torch.matmul(lhs, rhs, out=out.view(lhs.shape[0], rhs.shape[1]))
        return out
    weight = grad_output.new_empty(1).expand(weight_shape)
    result = torch.ops.aten.convolution_backward(
        grad_output, u, weight, None, stride, padding, tuple(conv.dilation), False,
        (0,) * dims, groups, (False, True, False))[1]
    return result if out is None else out.copy_(result)


def producer_groups(producer: nn.Module) -> int:
    return int(getattr(producer, "groups", 1))


def mean_gradient(producer: nn.Module, producer_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """∂μ/∂θ of App. B Eq. 15 in its compact form: the mean input patch, per group.

    μ_j = E[x_j] depends only on row j of the producer weight, and
    ∂μ_j/∂θ_{j,p,η} = (1/M) Σ_positions patch_{p,η}, identical for every output channel of
    a group. Returns shape ``(groups, C_in/groups, *kernel)`` for a convolution and
    ``(1, C_in)`` for a Linear; :func:`expand_mean_gradient` gives the per-channel rows.

    The batch is summed first (the gradient is linear in the input). The sum over output
    positions of the patch entry at kernel offset η is the sum of the (padded) input over the
    positions that offset visits; it is taken one spatial dim at a time over a strided window
    view, O(C_in·K_1·H·W) for a 2-d kernel, with no im2col of the image.
    """
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            return producer_input.reshape(-1, producer_input.shape[-1]).mean(0, keepdim=True)
        count = output.numel() // output.shape[1]
        summed, padding = _conv_input_and_padding(producer, producer_input.sum(0, keepdim=True))
        if any(padding):
            summed = nn.functional.pad(summed, [p for p in reversed(padding) for _ in (0, 1)])
        sums = summed[0]                    # (C_in, *spatial), then (C_in, *spatial_left, *K_done)
        for size, stride, dilation in zip(producer.kernel_size, producer.stride, producer.dilation):
            # windows of the kernel's extent at the output positions (a view), every dilation-th
            # entry of each = the kernel offsets; summed over the positions
            windows = sums.unfold(1, (size - 1) * dilation + 1, stride)[..., ::dilation]
            sums = windows.sum(1)
        weight = producer.weight
        return (sums / count).reshape(producer_groups(producer), weight.shape[1], *weight.shape[2:])


def expand_mean_gradient(compact: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Rows of ∂μ_j/∂θ_j for every output channel j from :func:`mean_gradient`'s compact form."""
    return compact.repeat_interleave(out_channels // compact.shape[0], dim=0)


def sq_mean_gradient(producer: nn.Module, producer_input: torch.Tensor, output: torch.Tensor,
                     stride: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """∂ν/∂θ (App. B): ∂ν_j/∂θ_{j,p,η} = (2/M) Σ_positions x_j · patch_{p,η}.

    This is the producer's weight gradient for the output gradient 2x/M, computed with one
    weight-gradient convolution (a matmul for Linear). Shape: the producer weight's
    ``(C_out, C_in/groups, *kernel)``; entries ∂ν_j/∂θ_{q≠j} are zero and not stored.
    ``output`` is the BN input x = producer(producer_input), bias included.

    ``stride`` > 1 is *not* in the paper: the average over positions is estimated from every
    ``stride``-th output position along each spatial dim (every ``stride``-th row for a Linear),
    which divides the cost of this convolution by stride^dims. Only the Taylor term of Eq. 8
    uses it, so the stored iteration's own ν stays exact (see ``CbnOptions.grad_stride``).
    ``out``: a contiguous tensor of the weight's shape to write the result into.
    """
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            rows = strided_positions(output, stride, linear=True)
            inputs = strided_positions(producer_input, stride, linear=True)
            lhs = (2.0 / rows.shape[0]) * rows.transpose(0, 1)
            return lhs.matmul(inputs) if out is None else torch.matmul(lhs, inputs, out=out)
        output = strided_positions(output, stride)
        scale = 2.0 / (output.numel() // output.shape[1])
        weight = producer.weight
        if output.numel() <= weight.numel():  # scale whichever of the two tensors is smaller
            return _conv_weight_gradient(producer, producer_input, output * scale, weight.shape,
                                         producer_groups(producer), stride, out)
        return _conv_weight_gradient(producer, producer_input, output, weight.shape,
                                     producer_groups(producer), stride, out).mul_(scale)


def strided_positions(output: torch.Tensor, stride: int, linear: bool = False) -> torch.Tensor:
    """The output positions ``grad_stride`` = ``stride`` estimates ∂ν/∂θ from: every stride-th
    position of each spatial dim (every stride-th row for a Linear)."""
    if stride == 1:
        return output
    if linear:
        return output[::stride]
    return output[(slice(None), slice(None)) + (slice(None, None, stride),) * (output.dim() - 2)]


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


def choose_store(weight_numel: int, input_numel: int, output_numel: int, positions: int, history: int,
                 device_type: str = "cpu", grad_stride_positions: int | None = None) -> str:
    """``"inputs"`` or ``"gradients"``, whichever a cost model says is cheaper per training step.

    Costs in multiply-adds, with moving a number counted as ``MOVE_COST[device]`` of them
    (W = |θ|, M = output positions per channel, U = |u|, X = |x|, h = k − 1 stored iterations):

    * gradients: the weight-gradient convolution of App. B (M·W; fewer positions with
      ``grad_stride``) + writing this step's gradient into the ring and reading the h stored
      ones and θ ≈ (h+2)·W numbers + reading u and x;
    * inputs: the producer over the h stored inputs (h·M·W) + copying u, x into the ring and
      reading them back ≈ (h+1)·(U+X) + h·X numbers + reading θ.

    A heuristic, measured in ``benchmarks/cbn_overhead.py``; ``store=`` overrides it.
    """
    move = MOVE_COST.get(device_type, MOVE_COST["cuda"])
    wgrad_positions = positions if grad_stride_positions is None else grad_stride_positions
    gradients = wgrad_positions * weight_numel + move * ((history + 2) * weight_numel + input_numel + output_numel)
    inputs = history * positions * weight_numel + move * ((history + 1) * (input_numel + output_numel)
                                                          + history * output_numel + weight_numel)
    return "inputs" if inputs < gradients else "gradients"


def run_producer(producer: nn.Module, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """producer(u) with the given weights (its own padding mode, stride, groups…), no autocast."""
    # devices without autocast (meta) cannot even disable it
    off = torch.autocast(u.device.type, enabled=False) if torch.amp.is_autocast_available(u.device.type) \
        else contextlib.nullcontext()
    with off:
        if isinstance(producer, nn.Linear):
            return nn.functional.linear(u, weight, bias)
        return producer._conv_forward(u, weight, bias)


def compensate_from_inputs(producer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                           mean: torch.Tensor, sq_mean: torch.Tensor, inputs: torch.Tensor,
                           outputs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 7–8 from stored producer inputs and outputs instead of stored gradients.

    With Δx = producer(u_τ; θ_t) − x_τ (x_τ = producer(u_τ; θ_τ)), App. B's closed forms give the
    first-order terms as directional derivatives (j a channel, m one of its M output values)::

        ⟨∂μ_j/∂θ, θ_t − θ_τ⟩ = (1/M) Σ_m Δx_{j,m}          (Eq. 15: the mean patch · Δθ_j)
        ⟨∂ν_j/∂θ, θ_t − θ_τ⟩ = (2/M) Σ_m x_{τ,j,m} Δx_{j,m}  ((2/M) Σ x·patch · Δθ_j)

    bias included (∂μ_j/∂b_j = 1, ∂ν_j/∂b_j = 2μ_j). This is still first order: the term
    (1/M) Σ Δx², which an exact recomputation would add, is left out as in the paper.

    ``inputs`` (h, N, *u) and ``outputs`` (h, N, C, *spatial) hold h iterations of up to N rows;
    ``rows`` (h,) says how many rows of each are real (a smaller last batch is zero-padded).
    Returns the compensated (μ, ν), (h, C) each.
    """
    h, n, c = outputs.shape[:3]
    with torch.no_grad():
        x_hat = run_producer(producer, inputs.flatten(0, 1), weight, bias).reshape(h, n, c, -1)
        x_old = outputs.reshape(h, n, c, -1)
        delta = x_hat - x_old
        valid = (torch.arange(n, device=rows.device) < rows[:, None]).to(delta.dtype)       # (h, N)
        # clamped: a slot not yet filled (rows = 0) gives 0, not NaN (the compiled step masks it out)
        count = (rows * x_old.shape[-1]).clamp_min(1).to(delta.dtype)[:, None]               # (h, 1)
        mean_term = torch.einsum("hn,hnc->hc", valid, delta.sum(-1)) / count
        sq_mean_term = 2.0 * torch.einsum("hn,hnc->hc", valid, torch.linalg.vecdot(delta, x_old)) / count
    return mean + mean_term, sq_mean + sq_mean_term


def window_statistics(x: torch.Tensor, past_mean: torch.Tensor, past_sq_mean: torch.Tensor,
                      moments: tuple[torch.Tensor, torch.Tensor] | None = None, valid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 9–11: (μ̄, σ̄²) over the current batch and h (compensated) past iterations.

    ``past_mean``/``past_sq_mean`` are (h, C) constants; ``moments`` is the current batch's
    :func:`batch_moments` when the caller already has them. Computed in the algebraically equal,
    cancellation-free form σ̄² = (1/k)Σ_τ max(ν_τ − μ_τ², 0) + (1/k)Σ_τ (μ_τ − μ̄)², since
    max(ν, μ²) − μ² = max(ν − μ², 0); for the current batch ν_t − μ_t² is its (biased)
    variance, computed as BatchNorm does. The result is in at least fp32.

    ``valid`` (h,) bool: only these past rows count (k = 1 + their number); the others are left
    out as if absent, whatever they hold. The compiled training step passes the whole ring so that
    its shapes do not change while it fills or during the burn-in.
    """
    var_now, mean_now = batch_moments(x) if moments is None else moments
    dtype = var_now.dtype
    past_mean = past_mean.to(dtype)
    means = torch.cat([mean_now.unsqueeze(0), past_mean], 0)
    past_var = (past_sq_mean.to(dtype) - past_mean.square()).clamp_min(0)                 # Eq. 10
    if valid is None:
        spread, mean = torch.var_mean(means, 0, correction=0)                              # Eq. 9
        var = torch.cat([var_now.unsqueeze(0), past_var], 0).mean(0) + spread              # Eq. 11
        return mean, var
    keep = torch.cat([valid.new_ones(1), valid])[:, None]                                  # (k, 1)
    k = keep.sum().to(dtype)
    mean = means.where(keep, 0).sum(0) / k                                                 # Eq. 9
    spread = (means - mean).square().where(keep, 0).sum(0) / k
    var = torch.cat([var_now.unsqueeze(0), past_var], 0).where(keep, 0).sum(0) / k + spread  # Eq. 11
    return mean, var


def window_statistics_of_x(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, mean_now: torch.Tensor,
                           var_now: torch.Tensor, k) -> tuple[torch.Tensor, ...]:
    """``(var_t, μ_t, μ̄, σ̄²)`` recomputed from ``x`` with autograd history, the past iterations
    held constant (§3.3): for a backward under ``create_graph=True``. ``mean``, ``var``,
    ``mean_now``, ``var_now``: what the forward computed from the same x (no history), ``k``: the
    iterations in the window. The past rows themselves are not needed (a ring slot may hold the
    next step's statistics by the time backward runs): Eqs. 9 and 11 are, in μ_t and var_t,

        μ̄ = μ_t / k + const,   σ̄² = (var_t + μ_t²) / k − μ̄² + const,

    written as the saved value plus the change since the forward, which is exact in any precision
    at the saved point."""
    var_x, mean_x = batch_moments(x)
    change = mean_x - mean_now
    mean_x_bar = mean + change / k
    var_x_bar = var + (var_x - var_now) / k + change / k * (mean_x + mean_now - mean_x_bar - mean)
    return var_x, mean_x, mean_x_bar, var_x_bar


def _native_kernels_apply(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ATen's BatchNorm kernels can compute the fused op's moments and normalisation:
    they return fp16/bf16 statistics for fp16/bf16 input, which Eqs. 9–11 must not use."""
    return x.dtype in (torch.float32, torch.float64) and (weight is None or weight.dtype == x.dtype)


class _WindowBatchNorm(torch.autograd.Function):
    """Eqs. 9–12 as one op with a closed-form backward: the window statistics (μ̄, σ̄²) from the
    current batch and h constant past iterations, then y = γ(x − μ̄)/√(σ̄² + ε) + β.

    Autograd through :func:`window_statistics` and the normalisation records ~25 small ops per
    site and step; here backward is two reductions (Σg, Σg·x) and one pass for dx. The gradient
    reaches x through the normalised value and through the current batch's (μ_t, var_t) only
    (the history is constant, §3.3). With M values per channel, k = h + 1 and r = 1/√(σ̄² + ε)::

        ∂L/∂μ̄ = −γ r Σg            ∂L/∂σ̄² = −½ γ r² Σg x̂
        ∂L/∂μ_t = ∂L/∂μ̄ / k + ∂L/∂σ̄² · 2(μ_t − μ̄)/k      ∂L/∂var_t = ∂L/∂σ̄² / k
        ∂L/∂x = γ r g + ∂L/∂var_t · 2(x − μ_t)/M + ∂L/∂μ_t / M

    ``renorm=True`` (``backward="renorm"``, not CBN's): the same forward values, differentiated
    as Batch Renormalization's x̂ = (x − μ_t)/σ_t · SG(σ_t/σ̄) + SG((μ_t − μ̄)/σ̄) with
    σ_t = √(var_t + ε) (extreme-normalization.txt §2; Ioffe 2017): the gradient goes through the
    current batch's own statistics in full, i.e. stock BN's backward scaled by σ_t/σ̄::

        ∂L/∂x = (γ/σ̄) (g − mean(g) − x̂_t · mean(g·x̂_t)),  x̂_t = (x − μ_t)/σ_t
    """

    @staticmethod
    def forward(ctx, x, weight, bias, past_mean, past_sq_mean, eps, renorm=False, valid=None):
        shape = [1, -1] + [1] * (x.dim() - 2)
        native = _native_kernels_apply(x, weight)
        if native:
            # ATen's BatchNorm kernels: one pass for (μ_t, 1/√(var_t + ε)), one for Eq. 12 with
            # (μ̄, σ̄²) as "running" statistics — ~2× faster on a CPU than the broadcasting ops
            _, mean_now, rstd_now = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
            var_now = rstd_now.pow(-2).sub_(eps).clamp_min_(0)
        else:
            var_now, mean_now = batch_moments(x)
        # k: a tensor when only the ``valid`` past rows count (see window_statistics)
        k = past_mean.shape[0] + 1 if valid is None else valid.sum() + 1
        mean, var = window_statistics(x, past_mean, past_sq_mean, (var_now, mean_now), valid)  # Eqs. 9-11
        rstd = torch.rsqrt(var + eps)
        if native:
            y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]        # Eq. 12
        else:
            scale = rstd if weight is None else rstd * weight
            shift = -mean * scale if bias is None else bias - mean * scale
            y = torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))  # Eq. 12
        ctx.save_for_backward(x, weight, mean_now, mean, rstd, var_now, None if valid is None else k, var)
        ctx.native = native
        ctx.k = k if valid is None else None
        ctx.renorm = renorm
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var, mean_now, var_now)
        return y, mean, var, mean_now, var_now

    @staticmethod
    def backward(ctx, grad_y, *_statistics):
        x, weight, mean_now, mean, rstd, var_now, k, var = ctx.saved_tensors
        k = ctx.k if k is None else k
        native = ctx.native
        if torch.is_grad_enabled():
            # create_graph=True: the statistics again as functions of x, with their history (the
            # saved ones carry none), and the formulas below in differentiable ops, so that the
            # gradients can be differentiated again (a gradient penalty, MAML), as stock BatchNorm's can
            var_now, mean_now, mean, var = window_statistics_of_x(x, mean, var, mean_now, var_now, k)
            rstd, native = torch.rsqrt(var + ctx.eps), False
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        stat_dtype = mean.dtype
        count = x.numel() // x.shape[1]
        if native:
            # ATen's BatchNorm backward reductions alone: Σ g·(x − μ̄)·r and Σ g in one pass
            _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, weight, None, None, mean, rstd, True, ctx.eps, [False, True, True])
        else:
            sum_g = grad_y.sum(dims, dtype=stat_dtype)
            sum_g_xhat = rstd * ((grad_y * x).sum(dims, dtype=stat_dtype) - mean * sum_g)  # Σ g·x̂ = ∂L/∂γ
        scale = rstd if weight is None else rstd * weight.to(stat_dtype)   # a = γr
        if ctx.renorm:
            # Σ g·x̂_t / M = (Σgx − μ_t Σg) / (M σ_t); dx = (γ/σ̄)(g − Σg/M − x̂_t Σg·x̂_t / M)
            # Σ g·(x − μ_t) = Σ g·x̂ / r + (μ̄ − μ_t) Σg
            c_x = -scale * (sum_g_xhat / rstd + (mean - mean_now) * sum_g) / (count * (var_now + ctx.eps))
            c_0 = -scale * sum_g / count - c_x * mean_now
        else:
            # the chain of the class docstring, collapsed (μ_t cancels): dx = a·g + c_x·x + c_0 with
            # c_x = −a r Σg·x̂ / (kM) and c_0 = −a Σg / (kM) − c_x μ̄ — a few ops per site, not ~20
            inv = -1.0 / (k * count) if ctx.k is not None else (k * count).to(stat_dtype).reciprocal().neg()
            c_x = (scale * rstd * sum_g_xhat).mul_(inv)
            c_0 = torch.addcmul((scale * sum_g).mul_(inv), c_x, mean, value=-1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(c_0.reshape(shape), x, c_x.reshape(shape))
            grad_x = dx.addcmul_(grad_y, scale.reshape(shape)).to(x.dtype)
        grad_w = sum_g_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def window_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      past_mean: torch.Tensor, past_sq_mean: torch.Tensor, eps: float, renorm: bool = False,
                      valid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Eqs. 9–12 fused: returns (y, μ̄, σ̄², μ_t, var_t), the last two the current batch's own
    (biased) moments; equal to :func:`window_statistics` followed by the normalisation, with a
    closed-form backward (:class:`_WindowBatchNorm`). ``past_*`` are the (h, C) compensated
    statistics, constants; only y carries gradients. ``renorm``: Batch Renormalization's
    backward instead of CBN's (see :class:`_WindowBatchNorm`). ``valid``: see :func:`window_statistics`.
    Under a ``torch.func`` transform: :func:`window_batch_norm_by_autograd`."""
    if functorch_active():
        return window_batch_norm_by_autograd(x, weight, bias, past_mean, past_sq_mean, eps, renorm, valid)
    return _WindowBatchNorm.apply(x, weight, bias, past_mean, past_sq_mean, eps, renorm, valid)


def window_batch_norm_by_autograd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                  past_mean: torch.Tensor, past_sq_mean: torch.Tensor, eps: float,
                                  renorm: bool = False, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`window_batch_norm` in plain torch ops, which autograd and the ``torch.func``
    transforms differentiate as written: Eqs. 9–12 with the history constant (§3.3), or for
    ``renorm`` Batch Renormalization's x̂ = (x − μ_t)/σ_t · SG(σ_t/σ̄) + SG((μ_t − μ̄)/σ̄)
    (extreme-normalization.txt §2). The same values and first derivatives as the closed form
    :class:`_WindowBatchNorm`, which keeps ~25 small ops' worth of autograd records fewer."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    var_now, mean_now = batch_moments(x)
    mean, var = window_statistics(x, past_mean.detach(), past_sq_mean.detach(), (var_now, mean_now), valid)
    if renorm:
        sigma_now, sigma = torch.sqrt(var_now + eps), torch.sqrt(var + eps)
        x_hat = ((x - mean_now.reshape(shape)) / sigma_now.reshape(shape) * (sigma_now / sigma).detach().reshape(shape)
                 + ((mean_now - mean) / sigma).detach().reshape(shape))
    else:
        x_hat = (x - mean.reshape(shape)) * torch.rsqrt(var + eps).reshape(shape)  # Eq. 12
    y = x_hat if weight is None else x_hat * weight.reshape(shape)
    y = y if bias is None else y + bias.reshape(shape)
    return y.to(x.dtype), mean.detach(), var.detach(), mean_now.detach(), var_now.detach()


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
            Used where the site stores gradients; the ``inputs`` store is always exact.
        store: what the history keeps for Eqs. 7–8: ``"gradients"`` (App. B's ∂μ/∂θ, ∂ν/∂θ),
            ``"inputs"`` (the producer's input and output, :func:`compensate_from_inputs`) or
            ``"auto"`` (:func:`choose_store` at the first training step).
        backward: ``"window"`` (the paper, §3.3): the gradient flows through the current batch's
            1/k share of the window statistics. ``"renorm"`` (not in the CBN paper): Batch
            Renormalization's backward — the current batch's statistics carry the gradient in
            full, the window's difference from them is a constant (extreme-normalization.txt §2).

    The history (``cbn_*`` buffers) is module state: written to ``state_dict`` once the first
    training step allocates it, optional when loading, moved by ``.to()``, cleared by
    :meth:`reset_history`. The producer is referenced, not registered, so its parameters
    keep their original ``state_dict`` keys.
    """

    # the history slot already holds this batch when checkpointing re-runs the forward
    checkpoint_recompute_safe = False
    recompute_state_name = "history of past iterations' statistics, which already holds this batch"
    step_state_name = "history of past iterations' statistics"
    # buffers DistributedDataParallel must not copy from rank 0 (transform names them for it)
    per_process_buffers = HISTORY_KEYS
    # cbn §4.2: "statistics in CBN are computed within each GPU"
    per_process_note = ("its statistics are computed within each process, as in the paper (cbn §4.2: k iterations "
                        "of the process's own batch)")

    optional_state_keys = HISTORY_KEYS
    # the burn-in step, the ring and how the first training step resolved k and the store
    schedule_attributes = HISTORY_KEYS + ("_steps", "_filled", "_next", "_resolved_window", "_resolved_store",
                                          "store")
    # "triton" once the lowering pass has chosen the fused kernels for Eqs. 9-12 (used where they
    # run: CUDA tensors, not under torch.compile, backward="window"); None = plain torch ops
    lowered: str | None = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 window: int | Literal["auto"] = "auto", burnin: int = 0, compensate: bool = True,
                 note: str | None = None, grad_stride: int = 1, store: str = "auto", backward: str = "window"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if window != "auto" and (not isinstance(window, int) or window < 1):
            raise InputError(f"CrossIterationBatchNorm window must be a positive int or 'auto', got {window!r}")
        if not isinstance(burnin, int) or burnin < 0:
            raise InputError(f"CrossIterationBatchNorm burnin must be an int >= 0, got {burnin!r}")
        if not isinstance(grad_stride, int) or grad_stride < 1:
            raise InputError(f"CrossIterationBatchNorm grad_stride must be an int >= 1, got {grad_stride!r}")
        if store not in STORES:
            raise InputError(f"CrossIterationBatchNorm store must be one of {STORES}, got {store!r}")
        if backward not in BACKWARDS:
            raise InputError(f"CrossIterationBatchNorm backward must be one of {BACKWARDS}, got {backward!r}")
        self.backward_mode = backward
        self.window = window
        self.burnin = burnin
        self.grad_stride = grad_stride
        self.store = store
        self._resolved_store: str | None = None  # "gradients" / "inputs" once the history exists
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

    def _apply(self, fn, recurse=True):
        # the history is records of (k − 1) past steps, not images: a memory-format conversion of the
        # model (.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor, and refuses
        # the 5-D ones) must not reach them. They go through ``fn`` as 2-D views, so they still get
        # its device and dtype, then take their shape back (the same object when nothing changed).
        shaped = {}
        for key in HISTORY_KEYS:
            t = self._buffers.get(key)
            if t is not None and t.dim() in (4, 5):
                shaped[key] = (t, t.reshape(t.shape[0], -1))
                self._buffers[key] = shaped[key][1]
        try:
            return super()._apply(fn, recurse)
        finally:
            for key, (original, flat) in shaped.items():
                applied = self._buffers[key]
                self._buffers[key] = original if applied is flat else applied.reshape(original.shape)

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

    @property
    def resolved_store(self) -> str | None:
        """``"gradients"`` or ``"inputs"`` once the first training step allocated the history."""
        return self._resolved_store

    def _pick_store(self, x: torch.Tensor, producer_input: torch.Tensor) -> str:
        if self.store != "auto":
            return self.store
        return self._auto_store(tuple(x.shape), producer_input.numel(), x.device.type)

    def _auto_store(self, x_shape: tuple[int, ...], u_numel: int, device_type: str) -> str:
        """:func:`choose_store` for a BN input of shape ``x_shape`` and a producer input of |u| numbers."""
        positions = math.prod(x_shape) // x_shape[1]
        if isinstance(self.producer, nn.Linear):  # grad_stride keeps every s-th row
            strided = math.ceil(x_shape[0] / self.grad_stride)
        else:
            strided = x_shape[0] * math.prod([math.ceil(s / self.grad_stride) for s in x_shape[2:]])
        k = self._resolved_window or auto_window(x_shape[0])
        return choose_store(self.producer.weight.numel(), u_numel, math.prod(x_shape), positions, k - 1,
                            device_type, strided)

    def _allocate(self, x: torch.Tensor, producer_input: torch.Tensor | None = None) -> None:
        if _in_inference_mode():
            # a train-mode forward under inference_mode (a statistics pass) would make the history
            # inference tensors, which no later step could update in place: allocate normal ones
            with torch.inference_mode(False):
                return self._allocate(x, producer_input)
        if self._resolved_window is None:
            self._resolved_window = auto_window(x.shape[0])
        h = self._resolved_window - 1
        dtype = torch.promote_types(x.dtype, torch.float32)
        factory = {"device": x.device, "dtype": dtype}
        long = {"device": x.device, "dtype": torch.long}
        if self.cbn_steps is None:  # a new store keeps the burn-in count
            self.cbn_steps = torch.zeros((), **long)
        self.cbn_filled = torch.zeros((), **long)
        self.cbn_next = torch.zeros((), **long)
        self.cbn_mean = torch.zeros(h, self.num_features, **factory)
        self.cbn_sq_mean = torch.zeros(h, self.num_features, **factory)
        for key in GRADIENT_KEYS + INPUT_KEYS:
            setattr(self, key, None)
        self._resolved_store = None
        producer = self.producer
        if self.compensate and producer is not None and producer_input is not None:
            self._resolved_store = self._pick_store(x, producer_input)
            if self._resolved_store == "inputs":
                self.cbn_input = torch.zeros(h, *producer_input.shape, **factory)
                self.cbn_output = torch.zeros(h, *x.shape, **factory)
                self.cbn_rows = torch.zeros(h, **long)
                return
            w = producer.weight
            self.cbn_grad_mean = torch.zeros(h, producer_groups(producer), *w.shape[1:], **factory)
            self.cbn_grad_sq_mean = torch.zeros(h, *w.shape, **factory)
            self.cbn_mean_offset = torch.zeros(h, self.num_features, **factory)
            self.cbn_sq_mean_offset = torch.zeros(h, self.num_features, **factory)

    def _fits_input_store(self, x: torch.Tensor, producer_input: torch.Tensor) -> bool:
        """A batch the ``inputs`` ring can hold, after growing it to more rows if need be: the same
        per-example shapes of the producer's input and output."""
        stored_u, stored_x = self.cbn_input.shape[1:], self.cbn_output.shape[1:]
        return (x.shape[1:] == stored_x[1:] and producer_input.shape[1:] == stored_u[1:]
                and producer_input.shape[0] == x.shape[0])

    def _grow_input_store(self, rows: int) -> None:
        """Room for ``rows`` examples per slot: a batch larger than the first one. The stored
        iterations keep their rows (the new ones are zero padding, not counted: ``cbn_rows``)."""
        if rows <= self.cbn_input.shape[1]:
            return
        if _in_inference_mode():
            with torch.inference_mode(False):  # see _allocate
                return self._grow_input_store(rows)
        for key in ("cbn_input", "cbn_output"):
            old = getattr(self, key)
            grown = old.new_zeros((old.shape[0], rows) + tuple(old.shape[2:]))
            grown[:, :old.shape[1]] = old
            setattr(self, key, grown)

    def _switch_to_gradient_store(self, x: torch.Tensor, producer_input: torch.Tensor) -> None:
        warnings.warn(
            f"cbn site {self.site_name or '?'}: the input shape changed from "
            f"{tuple(self.cbn_output.shape[1:])} to {tuple(x.shape)}, which the 'inputs' history cannot hold; "
            "switching this site to store='gradients' and starting its window afresh", stacklevel=3)
        self.store = "gradients"
        self._filled = 0
        self._next = 0
        self._allocate(x, producer_input)

    def _stop_compensating(self, why: str) -> None:
        """Run naive-cbn from now on (warned once, shown by ``describe``); the stored statistics
        stay, the stored gradients or inputs are dropped."""
        warn_at_caller(f"cbn site {self.site_name or '?'}: {why}; it runs naive-cbn (no Taylor compensation)")
        self.compensate = False
        self.note = why
        for key in GRADIENT_KEYS + INPUT_KEYS:
            setattr(self, key, None)
        self._resolved_store = None

    def reset_history(self) -> None:
        """Forget the stored iterations (``bnrewrite.reset_history(model)`` calls this)."""
        self._read_counters()
        self._filled = 0
        self._next = 0
        for key in HISTORY_KEYS:
            buf = getattr(self, key)
            if buf is not None:
                buf.zero_()
        self._sync_counters()

    # The counters (burn-in step, fill count, ring position) are the buffers cbn_steps, cbn_filled,
    # cbn_next, which every training step updates. The eager step branches on Python copies (no
    # device sync per step); a compiled step cannot update those without dynamo guarding on their
    # values, so it sets them to None and the next eager use reads the buffers once.
    def _read_counters(self) -> None:
        if self._steps is None:
            self._steps, self._filled, self._next = (int(self.cbn_steps), int(self.cbn_filled), int(self.cbn_next))

    def _sync_counters(self) -> None:
        if self.cbn_steps is not None:
            self.cbn_steps.fill_(self._steps)
            self.cbn_filled.fill_(self._filled)
            self.cbn_next.fill_(self._next)

    @property
    def history_filled(self) -> int:
        """How many past iterations the ring holds (at most k − 1)."""
        self._read_counters()
        return self._filled

    def _producer_params(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        producer = self.producer
        bias = None if producer.bias is None else producer.bias.detach().to(dtype)
        return producer.weight.detach().to(dtype), bias

    def _record(self, x: torch.Tensor, producer_input: torch.Tensor | None,
                moments: tuple[torch.Tensor, torch.Tensor] | None, slot: int | torch.Tensor) -> None:
        """Store this iteration's μ, ν and, when compensating, ∂μ/∂θ, ∂ν/∂θ (App. B) and the
        θ-independent parts of Eqs. 7–8 (:func:`taylor_offsets`) in ring slot ``slot`` (see :func:`_put`).
        ``moments`` = the batch's (biased var, mean) when the forward pass computed them."""
        with torch.no_grad():
            dtype = self.cbn_mean.dtype
            var, mean = batch_moments(x.detach()) if moments is None else moments
            mean, sq_mean = mean.to(dtype), (var + mean.square()).to(dtype)
            _put(self.cbn_mean, slot, mean)
            _put(self.cbn_sq_mean, slot, sq_mean)
            if self.cbn_input is not None:
                rows = self.cbn_input.shape[1]  # a smaller batch is zero-padded, its real rows counted
                _put(self.cbn_rows, slot, x.shape[0])
                u = producer_input.detach().to(dtype)
                _put(self.cbn_input, slot, _zero_padded(u, rows))
                if x.dtype == dtype:
                    _put(self.cbn_output, slot, _zero_padded(x.detach(), rows))
                else:  # x came from a reduced-precision producer (autocast): keep Δx free of its rounding
                    weight, bias = self._producer_params(dtype)
                    _put(self.cbn_output, slot, _zero_padded(run_producer(self.producer, u, weight, bias), rows))
            elif self.cbn_grad_sq_mean is not None:
                producer = self.producer
                xs = x.detach().to(dtype)
                u = producer_input.detach().to(dtype)
                grad_mean = mean_gradient(producer, u, xs)
                _put(self.cbn_grad_mean, slot, grad_mean)
                # eager: straight into the ring slot (a view), saving a copy of |θ| numbers
                view = self.cbn_grad_sq_mean[slot] if isinstance(slot, int) else None
                grad_sq_mean = sq_mean_gradient(producer, u, xs, self.grad_stride, out=view)
                if view is None:
                    _put(self.cbn_grad_sq_mean, slot, grad_sq_mean)
                weight, bias = self._producer_params(dtype)
                if x.dtype == dtype:
                    # x = θ·patch + b exactly as computed, so ⟨∂μ/∂θ, θ⟩ = μ − b and, over the
                    # positions P that ∂ν/∂θ averages, ⟨∂ν/∂θ, θ⟩ = 2(ν_P − μ_P b): taylor_offsets'
                    # values without reading ∂ν/∂θ again (P = all positions unless grad_stride > 1)
                    _put(self.cbn_mean_offset, slot, 0.0)
                    if self.grad_stride == 1:
                        _put(self.cbn_sq_mean_offset, slot, -sq_mean)
                    else:
                        sampled = strided_positions(xs, self.grad_stride, isinstance(producer, nn.Linear))
                        sampled_var, sampled_mean = batch_moments(sampled)
                        sampled_sq_mean = sampled_var + sampled_mean.square()
                        offset = sq_mean - 2 * sampled_sq_mean
                        if bias is not None:
                            offset += 2 * bias * (sampled_mean - mean)
                        _put(self.cbn_sq_mean_offset, slot, offset)
                else:  # x rounded below the history's precision
                    offsets = taylor_offsets(weight, bias, mean[None], sq_mean[None], grad_mean[None],
                                             grad_sq_mean[None], producer_groups(producer))
                    _put(self.cbn_mean_offset, slot, offsets[0][0])
                    _put(self.cbn_sq_mean_offset, slot, offsets[1][0])

    def past_statistics(self, compensate: bool | None = None, h: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (μ, ν) of the last iterations, compensated to the current producer
        weights (Eqs. 7–8) unless ``compensate`` is False. Shapes (h, C); detached.
        ``h``: the first h slots (the whole ring for the compiled step) instead of the filled ones."""
        if h is None:
            self._read_counters()
            h = self._filled
        mean = self.cbn_mean[:h]
        sq_mean = self.cbn_sq_mean[:h]
        compensate = self.compensate if compensate is None else compensate
        if compensate and self.cbn_input is not None and h > 0:
            weight, bias = self._producer_params(mean.dtype)
            return compensate_from_inputs(self.producer, weight, bias, mean, sq_mean, self.cbn_input[:h],
                                          self.cbn_output[:h], self.cbn_rows[:h])
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
        if self.uses_batch_stats() and not self.empty_batch(x):
            return self.forward_train(x, producer_input, post_norm=True)
        return self.post_norm(self.stock_forward(x))

    def fused_activation(self) -> tuple[str, float] | None:
        """The activation a lowered window op applies in its normalise pass (see
        :func:`~bnrewrite.runtime.kernels.modules.kernel_activation`)."""
        from .kernels.modules import kernel_activation

        return kernel_activation(self)

    def _fused_window_op(self, x: torch.Tensor):
        """The Triton window op when this site is lowered and the kernels run on ``x``, else None."""
        if self.lowered != "triton" or self.backward_mode != "window":
            return None
        from .kernels import ops

        return ops.fused_window_batch_norm if ops.fused_window_available(x) else None

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

    def forward_train(self, x: torch.Tensor, producer_input: torch.Tensor | None = None,
                      post_norm: bool = False) -> torch.Tensor:
        """One training step; ``post_norm``: also apply the post-norm children (a lowered window op
        applies a fused activation in its normalise pass)."""
        if not self.training:  # track_running_stats=False in eval: plain batch statistics
            y = self.stock_forward(x)
            return self.post_norm(y) if post_norm else y
        compensating = self.compensate and self.producer is not None
        if compensating and producer_input is None:
            raise InputError(
                f"CrossIterationBatchNorm{self.site_label} (producer {self.producer_name}) compensates with the producer's "
                "input: call it as module(x, producer_input), as the cbn pass wires it, or rewrite the "
                "site with naive-cbn")
        if compensating and isinstance(self.producer, nn.Linear) and producer_input.dim() != 2:
            self._stop_compensating(
                f"producer Linear {self.producer_name} got a {producer_input.dim()}-D input: it acts on the last dim, "
                "not on the BatchNorm's channels (dim 1), so App. B's closed forms do not apply")
            compensating = False
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self._read_counters()
            if self._steps < self.burnin or self._filled == 0:
                self.check_values_per_channel(x)  # this step is stock BN's: refuse before the history moves
        elif x.numel() == x.shape[1]:  # a static shape: only the graphs of such batches get the check
            self._check_values_per_channel_outside_graph(x)
        if self.cbn_mean is None:
            if torch.compiler.is_exporting():
                self.refuse_export_of_first_step("history of past iterations' statistics")
            self._allocate(x, producer_input if compensating else None)
        elif self.cbn_input is not None:
            if self._fits_input_store(x, producer_input):
                self._grow_input_store(x.shape[0])
            else:
                self._switch_to_gradient_store(x, producer_input)
        if compiling and self._resolved_window > 1:
            y = self._compiled_step(x, producer_input if compensating else None)
            return self.post_norm(y) if post_norm else y
        k = self._resolved_window
        in_burnin = self._steps < self.burnin
        moments = None
        activated = False
        if in_burnin or self._filled == 0:
            y = self.stock_forward(x)  # k = 1 is exactly BatchNorm, running statistics included
            self.last_statistics = None
        else:
            past_mean, past_sq_mean = self.past_statistics()
            fused = self._fused_window_op(x)
            if fused is not None:
                act = (self.fused_activation() if post_norm else None) or ("none", 0.0)
                y, mean, var, mean_now, var_now = fused(x, self.weight, self.bias, past_mean, past_sq_mean, self.eps,
                                                        *act, site=self)
                activated = act[0] != "none"
            else:
                y, mean, var, mean_now, var_now = window_batch_norm(x, self.weight, self.bias, past_mean,
                                                                    past_sq_mean, self.eps,
                                                                    self.backward_mode == "renorm")
            moments = (var_now, mean_now)
            count = x.numel() // x.shape[1]
            self.update_running_stats(mean, var, count * (past_mean.shape[0] + 1))
            self.keep_statistics(mean, var, past_mean.shape[0] + 1)
        if k > 1 and self._steps >= self.burnin - (k - 1):
            self._record(x, producer_input if compensating else None, moments, self._next)
            self._next = (self._next + 1) % (k - 1)
            self._filled = min(self._filled + 1, k - 1)
        self._steps = min(self._steps + 1, self.burnin)  # counted up to the burn-in only
        self._sync_counters()
        if functorch_active():
            self.release_transform_wrappers()
        return self.post_norm(y) if post_norm and not activated else y

    @torch.compiler.disable
    def _check_values_per_channel_outside_graph(self, x: torch.Tensor) -> None:
        """The eager step's refusal of one value per channel in a step without history (burn-in, or
        an empty ring), for a compiled step: whether there is history is in the counter buffers'
        values, which a graph cannot branch on, so this runs outside it (a graph break in the graphs
        of one-value-per-channel batches only; dynamo specialises sizes of 1, so those graphs are
        separate anyway). With ``fullgraph=True`` dynamo refuses such a batch itself."""
        if self.cbn_filled is None or int(self.cbn_filled) == 0 or int(self.cbn_steps) < self.burnin:
            self.check_values_per_channel(x)

    def _compiled_step(self, x: torch.Tensor, producer_input: torch.Tensor | None) -> torch.Tensor:
        """A training step under torch.compile (k > 1): one graph for every step.

        Dynamo guards on the Python ints the eager step branches on and slices with (one graph per
        ring position, fill count and burn-in step), so here the counters are read and advanced as
        tensors: the whole ring is compensated, and the slots not yet filled, or all of them during
        the burn-in, are masked out of Eqs. 9–11 (:func:`window_statistics`), and this step's slot is
        written with ``index_copy_``. A burn-in step is then the window op over the current batch
        alone — stock BN's values up to rounding — and it costs what a window step costs: it
        compensates the ring it does not use and records every step (the ring keeps the last k − 1,
        as the eager step's does). One value per channel in a step without history is refused
        before this, as the eager step refuses it (:meth:`_check_values_per_channel_outside_graph`).
        """
        capacity = self.cbn_mean.shape[0]
        slots = torch.arange(capacity, device=self.cbn_filled.device)
        valid = (slots < self.cbn_filled) & (self.cbn_steps >= self.burnin)
        past_mean, past_sq_mean = self.past_statistics(h=capacity)
        y, mean, var, mean_now, var_now = window_batch_norm(x, self.weight, self.bias, past_mean, past_sq_mean,
                                                            self.eps, self.backward_mode == "renorm", valid)
        k = valid.sum() + 1
        self._update_window_running_stats(mean, var, k * (x.numel() // x.shape[1]))
        self.last_statistics = (mean, var, k)
        self._record(x, producer_input, (var_now, mean_now), self.cbn_next.view(1))
        with torch.no_grad():
            self.cbn_next.add_(1).remainder_(capacity)
            self.cbn_filled.add_(1).clamp_(max=capacity)
            self.cbn_steps.add_(1).clamp_(max=self.burnin)
        self._steps = self._filled = self._next = None  # see _read_counters
        return y

    def _update_window_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """:meth:`update_running_stats` for a count k·M that is a tensor (the compiled step's)."""
        if not self.track_running_stats:
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else self.num_batches_tracked.reciprocal()
            unbiased = var * (count / (count - 1).clamp_min(1))
            self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype) * factor)
            self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype) * factor)

    def estimate(self, x: torch.Tensor, producer_input: torch.Tensor | None = None, *,
                 compensate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The (μ̄, σ̄²) a training step on ``x`` would normalise with, without changing any
        state (for diagnostics and benchmarks). ``compensate=False`` gives naive CBN's."""
        with torch.no_grad():
            if self.cbn_mean is None or self.history_filled == 0:
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
            # the checkpoint's store wins: drop the other store's buffers
            has = {key for key in GRADIENT_KEYS + INPUT_KEYS if prefix + key in state_dict}
            for key in GRADIENT_KEYS + INPUT_KEYS:
                if key not in has:
                    setattr(self, key, None)
            self._resolved_store = ("inputs" if "cbn_input" in has else "gradients" if "cbn_grad_sq_mean" in has
                                    else None)
            self._resolved_window = int(self.cbn_mean.shape[0]) + 1
            self._steps = int(self.cbn_steps)
            self._filled = int(self.cbn_filled)
            self._next = int(self.cbn_next)
        elif (self.cbn_mean is not None and self.cbn_mean.device.type != "meta"
              and any(prefix + key in state_dict for key in ("running_mean", "weight"))):
            # a checkpoint of this layer without history (a stock one): the stored iterations were
            # computed with weights it has just replaced, and compensating from those would mix two
            # models. A partial load that leaves this layer out keeps them.
            self.reset_history()

    def _estimated_store(self, input_shape: tuple[int, ...] | None) -> tuple[str, int | None, int | None]:
        """(store, |u|, |x|) a first training batch of BN-input shape ``input_shape`` would give;
        |u| estimated from the producer's strides (exact up to its padding and kernel overhang)."""
        store = self._resolved_store or self.store
        if not input_shape or not (self.compensate and self.producer is not None):
            return store, None, None
        producer = self.producer
        x_numel = math.prod(input_shape)
        if isinstance(producer, nn.Linear):
            u_numel = input_shape[0] * producer.in_features
        else:
            u_numel = (input_shape[0] * producer.in_channels
                       * math.prod(s * st for s, st in zip(input_shape[2:], producer.stride)))
        if store == "auto":
            store = self._auto_store(tuple(input_shape), u_numel, producer.weight.device.type)
        return store, u_numel, x_numel

    def history_bytes(self, batch_size: int | None = None, input_shape: tuple[int, ...] | None = None) -> int | None:
        """Bytes of history this site keeps (k−1 iterations), or None while k is unknown.

        Counted from the buffers once the first training step allocated them; before that
        estimated for a batch of ``batch_size`` (or the BN-input ``input_shape``)."""
        if self.cbn_mean is not None:
            return sum(buf.numel() * buf.element_size() for key in HISTORY_KEYS[3:]
                       if (buf := getattr(self, key)) is not None)
        batch_size = input_shape[0] if input_shape else batch_size
        k = self._resolved_window or (auto_window(batch_size) if batch_size else None)
        if k is None:
            return None
        size = torch.finfo(torch.promote_types(self.running_mean.dtype if self.running_mean is not None
                                               else torch.float32, torch.float32)).bits // 8
        per_iteration = 2 * self.num_features  # μ, ν
        producer = self.producer
        store, u_numel, x_numel = self._estimated_store(input_shape)
        if self.compensate and producer is not None:
            if store == "inputs" and u_numel is not None:
                return (k - 1) * ((per_iteration + u_numel + x_numel) * size + 8)  # + the row count
            w = producer.weight
            per_iteration += w.numel()  # ∂ν/∂θ
            per_iteration += producer_groups(producer) * w[0].numel()  # ∂μ/∂θ (compact)
            per_iteration += 2 * self.num_features  # the offsets of Eqs. 7-8
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
            "backward": self.backward_mode,
            "producer": self.producer_name if compensated else None,
            "store": (self._resolved_store or self._estimated_store(input_shape)[0]) if compensated else None,
            "history_bytes": self.history_bytes(batch, input_shape),
            "history_filled": self.history_filled,
        }
        if self.lowered:
            info["lowered"] = self.lowered
        if input_shape and info["history_bytes"] is not None:
            activation = math.prod(input_shape) * 4
            info["history_vs_activation"] = round(info["history_bytes"] / activation, 4)
        if self.note:
            info["note"] = self.note
        return info

    def extra_repr(self) -> str:
        mode = "compensated" if self.compensate and self.producer is not None else "naive"
        return (f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}, {mode}"
                + (f", store={self._resolved_store or self.store}" if mode == "compensated" else "")
                + (f", grad_stride={self.grad_stride}" if self.grad_stride != 1 else "")
                + (f", backward={self.backward_mode}" if self.backward_mode != "window" else "")
                + (f", producer={self.producer_name}" if self.producer_name and mode == "compensated" else "")
                + (f", lowered={self.lowered}" if self.lowered else ""))


def _put(ring: torch.Tensor, slot: int | torch.Tensor, value: torch.Tensor | float) -> None:
    """ring[slot] = value. ``slot`` is a Python int in eager mode (no device sync) or a (1,) long
    tensor under torch.compile, where an int would be specialised on: one graph per ring position."""
    if isinstance(slot, int):
        ring[slot] = value
    elif isinstance(value, torch.Tensor):
        ring.index_copy_(0, slot, value.to(ring.dtype).unsqueeze(0))
    else:
        ring.index_fill_(0, slot, value)


def _zero_padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows`` (a smaller batch in the ``inputs`` ring)."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _in_inference_mode() -> bool:
    # dynamo cannot trace the query; a compiled training step does not run under inference_mode
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def warn_uncompensated(notes: dict[str, str]) -> None:
    """One warning listing the sites that run naive-cbn instead of cbn, and why."""
    if notes:
        lines = "\n".join(f"  {name}: {why}" for name, why in notes.items())
        warnings.warn(f"cbn: {len(notes)} site(s) run without Taylor compensation:\n{lines}", stacklevel=3)
