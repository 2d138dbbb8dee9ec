"""Extreme Normalization (anonymous, "Extreme Normalization: approximating full-data batch
normalization with single examples", ``extreme-normalization.txt``): the runtime layer.

The paper's Alg. 1 (ConvLayer_Train / ConvLayer_Inference) is the specification. A layer
normalises with the *moving averages* in the forward pass -- the same normalisers training and
inference use -- and defines the gradient through the per-example (or per-micro-batch) moments:

* ``μ̄`` (EMA of per-example means) is taken **before** the producer conv/linear, per *input*
  channel, and subtracted after it as ``μ·ΣW`` (§3.3): the moving mean then does not depend on
  the layer's own weights. ``ν̄`` (EMA of per-example second moments ``E p² + ε``) is taken after.
* ``μ† = ScaleGrad(μ̄, μ_b, r_m)``, ``ν† = ScaleGrad(ν̄, ν_b, r_v·min(ν̄/ν_b, f_max))`` (§3.1,
  §2.2 "scaling the second moment gradients" and "shrinking the gradients").
* ``q = p/√ν† · StopGradient(min(1, u_max·√(ν̄/ν)))`` -- the clip bounds the per-example second
  moment of the normalised activations during training only (§3.4, §5).
* optional fixed rotation ``R`` between ``γ`` and ``β`` (§2.2): ``R(γ ⊙ q) + β``, then the
  activation that follows the site in the model.
* EMA update ``x̄ ← (1−rate)·x̄ + rate·E_b x_b`` (§5: rate 0.2).

Modes: ``two-tower`` (§3.4; the pass duplicates the graph, tower A calls this layer with
``first_tower=True`` and gets the aggregated ``μ‡, ν‡`` back, tower B passes them in as
``moments``) and ``brn`` (§5 "improving batch renormalization": one tower, ``μ‡, ν‡`` per
micro-batch of ``micro`` examples; ``micro=1`` is per-example training, no interaction at all).

State (``state_dict``) -- the original BatchNorm keys, all with their stock meaning in eval:

* ``running_var`` = ``ν̄ − ε``: stock BN's eval divides by ``√(running_var + ε) = √ν̄``;
* ``running_mean`` = the per-output-channel mean the layer subtracts in eval,
  ``ΣW·μ̄ + b`` (producer weight ``W``, bias ``b``), re-derived from the current weights whenever
  it is read (eval forward, ``inference_affine``, ``state_dict``). Without a producer it *is* ``μ̄``;
* ``input_mean`` (extra, optional at load, only with a producer, written once ``μ̄`` is known):
  ``μ̄`` per input channel;
* ``rotation`` (extra, optional at load, only with ``rot``): ``R``.

``μ̄`` is unknown right after the transform and after loading a checkpoint without
``input_mean`` (a stock one, which loads with ``strict=True``): eval then uses the BatchNorm's
``running_mean`` as is, and the first training forward starts ``μ̄`` at that batch's mean (then
the EMA as usual; ``bnrewrite.warm_up_statistics`` does this before training, §5). A stock
BatchNorm loading this layer's checkpoint (``strict=False``, or without the extra keys) computes
the same eval output as long as no rotation is used.

``torch.autograd.gradcheck`` does not apply to this layer: ScaleGrad defines a gradient that is
deliberately not the derivative of the forward value (the moving averages); the tests compare
forward and backward with Alg. 1 written out in float64.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, UnsupportedPatternError
from .base import BatchNormState, buffer_snapshot, match_memory_format


# ================================================================================ primitives
def scale_grad(value: torch.Tensor, source: torch.Tensor, rate) -> torch.Tensor:
    """``ScaleGrad(S, Q, r) = StopGradient(r)·Q + StopGradient(S − r·Q)`` (§3.1).

    The forward value is exactly ``value`` (``S``, broadcast against ``source``); in
    backpropagation the gradient reaches ``source`` (``Q``) multiplied by ``rate`` (``r``, a
    scalar or a tensor broadcasting against ``Q``) and nothing reaches ``value`` or ``rate``.
    Written as ``S + r·(Q − StopGradient(Q))`` so that the forward value is ``S`` bit for bit
    (``Q − Q`` is exactly 0), which the two towers' equal forward values rely on.

    Example::

        >>> from bnrewrite.runtime.extreme import scale_grad
        >>> S, Q = torch.tensor([1.0, 2.0]), torch.tensor([[3.0, 5.0]], requires_grad=True)
        >>> y = scale_grad(S, Q, 0.5); y
        tensor([[1., 2.]], grad_fn=<AddBackward0>)
        >>> y.sum().backward(); Q.grad
        tensor([[0.5000, 0.5000]])
    """
    if isinstance(rate, torch.Tensor):
        rate = rate.detach()
    return value.detach() + rate * (source - source.detach())


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix ``H/√n`` (orthogonal) for ``n`` a power of 2 (§2.2:
    the rotation with the smallest maximum absolute entry)."""
    if n < 1 or n & (n - 1):
        raise InputError(f"a Hadamard matrix here needs a power-of-2 size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")  # built on the host, whatever the default device
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def random_rotation(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A random orthogonal ``n × n`` matrix (Haar: QR of a Gaussian with the sign fix), fixed by
    ``seed`` (§2.2 "a random and fixed rotation matrix")."""
    gen = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    a = torch.randn(n, n, generator=gen, dtype=torch.float64, device="cpu")  # the generator's device
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, a.new_ones(()))
    return q.to(dtype)


def rotation_matrix(kind: str, n: int, seed: int, name: str = "") -> tuple[torch.Tensor, str]:
    """The fixed rotation of a layer with ``n`` channels and what it is: ``"hadamard"`` when
    asked for and ``n`` is a power of 2, else a random rotation seeded by ``seed`` and the
    layer ``name`` (so every layer gets its own, reproducibly)."""
    if kind == "hadamard" and n >= 1 and not n & (n - 1):
        return hadamard_matrix(n), "hadamard"
    if kind not in ("hadamard", "random"):
        raise InputError(f"rotation kind must be 'hadamard' or 'random', got {kind!r}")
    return random_rotation(n, int(seed) * 1_000_003 + zlib.crc32(name.encode())), "random"


def _group_mean(values: torch.Tensor, group: int) -> torch.Tensor:
    """Mean of ``values`` (B, C) over consecutive groups of ``group`` examples, broadcast back to
    every example of the group (the last group holds what is left). ``group=1``: the values."""
    n = values.shape[0]
    if group <= 1:
        return values
    if group >= n:
        return values.mean(0, keepdim=True).expand_as(values)
    full = (n // group) * group
    parts = [values[:full].reshape(n // group, group, -1).mean(1, keepdim=True)
             .expand(n // group, group, values.shape[1]).reshape(full, -1)]
    if full < n:
        parts.append(values[full:].mean(0, keepdim=True).expand(n - full, -1))
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


def check_options(micro: int = 1, rate: float = 0.2, r_m: float = 1.0, r_v: float = 1.0,
                  f_max: float = 2.0, u_max: float = 5.0) -> None:
    """Ranges of the Extreme Normalization constants; raises ValueError naming the bad one."""
    if micro < 1:
        raise ValueError(f"micro must be >= 1 example per micro-batch, got {micro}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate (EMA update rate, paper: 0.2) must be in [0, 1], got {rate}")
    for key, value in (("r_m", r_m), ("r_v", r_v)):
        if value < 0:
            raise ValueError(f"{key} (gradient shrinkage) must be >= 0, got {value}")
    if f_max <= 0:
        raise ValueError(f"f_max (cap of the second-moment gradient scaling) must be > 0, got {f_max}")
    if u_max <= 0:
        raise ValueError(f"u_max (bound on the normalised second moment) must be > 0, got {u_max}")


_MEAN_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ================================================================================ the layer
class ExtremeNorm(BatchNormState):
    """One producer → BatchNorm (→ activation) site of Alg. 1, in ``two-tower`` or ``brn`` mode.

    Call protocol (the passes wire it; eval mode ignores the extra arguments and is the
    inference layer of Alg. 1, exactly what ``inference_affine`` folds into the producer):

    * ``layer(x, conv_input)`` -- ``brn``: normalise with ``μ‡, ν‡`` of each micro-batch;
    * ``layer(x, conv_input, first_tower=True) -> (y, μ‡, ν‡)`` -- two-tower, tower A: normalise
      with the per-example ``μ†, ν†``, update the EMAs, return the aggregated moments;
    * ``layer(x, conv_input, (μ‡, ν‡))`` -- two-tower, tower B: normalise with them.

    ``x`` is the BatchNorm input (the producer's output) and ``conv_input`` the producer's input
    (``None`` for a site without a producer, whose mean is then taken after, from ``x``).
    """

    optional_state_keys = ("input_mean",)
    # the EMAs the forward normalises with were already updated with this batch
    checkpoint_recompute_safe = False
    recompute_state_name = "moving averages it normalises with, already updated with this batch"
    step_state_name = "moving averages, which it normalises with"
    normalises_with_running_stats = True  # in training too: bnrewrite.drop_running_stats_ refuses it

    @property
    def update_bn_refusal(self) -> str:
        """Why ``bnrewrite.update_bn`` (reset, then a cumulative average over one pass) cannot
        recompute this layer's statistics, and what to do instead."""
        return (f"is an Extreme Normalization layer ({self.mode}): its training forward normalises with its "
                "moving averages and updates them with its own EMA (rate, μ̄ taken before the producer), so "
                "reset statistics would normalise the pass itself; re-estimate them for the new weights with "
                "bnrewrite.warm_up_statistics(model, batches, steps=200) (extreme-normalization.txt §5)")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 mode: str = "brn", micro: int = 2, rate: float = 0.2, r_m: float = 1.0, r_v: float = 1.0,
                 f_max: float = 2.0, u_max: float = 5.0):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not track_running_stats:
            raise UnsupportedPatternError(
                "Extreme Normalization normalises with moving averages; a BatchNorm with "
                "track_running_stats=False has none (exclude the site from the recipe)")
        if mode not in ("brn", "two-tower"):
            raise InputError(f"ExtremeNorm mode must be 'brn' or 'two-tower', got {mode!r}")
        try:
            check_options(micro, rate, r_m, r_v, f_max, u_max)
        except ValueError as exc:
            raise InputError(f"ExtremeNorm: {exc}") from None
        self.mode = mode
        self.micro = int(micro)
        self.rate = float(rate)
        self.r_m = float(r_m)
        self.r_v = float(r_v)
        self.f_max = float(f_max)
        self.u_max = float(u_max)
        self.producer_name = ""
        self.__dict__["producer"] = None  # not a child: the producer stays where the model has it
        self.input_mean_known = True

    # ------------------------------------------------------------------ construction
    def options(self) -> dict:
        return {"mode": self.mode, "micro": self.micro, "rate": self.rate, "r_m": self.r_m,
                "r_v": self.r_v, "f_max": self.f_max, "u_max": self.u_max}

    @property
    def mean_before_conv(self) -> bool:
        return self.__dict__.get("producer") is not None

    def attach_producer(self, producer: nn.Module, name: str) -> None:
        """Take the mean before ``producer`` (§3.3): ``μ̄`` per input channel, subtracted as
        ``μ·ΣW``. The producer is referenced, not owned (``state_dict`` keys stay the model's)."""
        if not isinstance(producer, _MEAN_PRODUCERS):
            raise UnsupportedPatternError(
                f"'{self.site_name}': the mean can be taken before Conv1d/2d/3d or Linear only, "
                f"not {type(producer).__name__} '{name}'")
        out = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        if out != self.num_features:
            raise UnsupportedPatternError(f"'{self.site_name}': producer '{name}' has {out} outputs but the "
                                          f"BatchNorm has {self.num_features} channels")
        cin = producer.in_features if isinstance(producer, nn.Linear) else producer.in_channels
        self.__dict__["producer"] = producer
        self.producer_name = name
        ref = self.running_mean
        self.register_buffer("input_mean", torch.zeros(cin, dtype=ref.dtype, device=ref.device))
        # μ̄ is not known yet: eval keeps the BatchNorm's running_mean until the first training
        # batch gives the first estimate (see _restart_input_mean)
        self.input_mean_known = False

    def adopt(self, other: "ExtremeNorm") -> None:
        """Share ``other``'s producer link and extra state (used when ``rot`` swaps the class)."""
        self.site_name = other.site_name
        self.producer_name = other.producer_name
        self.__dict__["producer"] = other.__dict__.get("producer")
        if "input_mean" in other._buffers:
            self.register_buffer("input_mean", other.input_mean)
        self.input_mean_known = other.input_mean_known

    # ------------------------------------------------------------------ μ·ΣW (§3.3)
    def _mean_map(self, mean: torch.Tensor) -> torch.Tensor:
        """``(..., C_in) -> (..., C_out)``: the conv (kernel summed over space) or linear applied to
        a constant input ``mean``; the identity without a producer."""
        producer = self.__dict__.get("producer")
        if producer is None:
            return mean
        if torch.is_autocast_enabled(mean.device.type):
            # autocast would run this matmul in bfloat16: μ·ΣW, subtracted from outputs near it,
            # would then be off by |μ·ΣW|·2⁻⁹ (15% of the output's range for values near 75)
            with torch.autocast(mean.device.type, enabled=False):
                return self._mean_map(mean)
        w = producer.weight
        dtype = torch.promote_types(torch.promote_types(mean.dtype, w.dtype), torch.float32)
        mean, w = mean.to(dtype), w.to(dtype)
        if isinstance(producer, nn.Linear):
            return mean @ w.t()
        groups = producer.groups
        w_sum = w.flatten(2).sum(-1)
        cout, cin_g = w_sum.shape
        lead = mean.shape[:-1]
        out = torch.einsum("...gi,goi->...go", mean.reshape(*lead, groups, cin_g),
                           w_sum.reshape(groups, cout // groups, cin_g))
        return out.reshape(*lead, cout)

    def _producer_bias(self):
        producer = self.__dict__.get("producer")
        return None if producer is None else producer.bias

    def output_mean(self) -> torch.Tensor:
        """The per-output-channel mean eval mode subtracts: ``ΣW·μ̄ + b`` for the current weights."""
        if not self.mean_before_conv or not self.input_mean_known:
            return self.running_mean.clone()
        with torch.no_grad():
            mean = self._mean_map(self.input_mean)
            bias = self._producer_bias()
            if bias is not None:
                mean = mean + bias
        return mean.to(self.running_mean.dtype)

    def _sync_running_mean(self) -> None:
        if self.mean_before_conv and self.input_mean_known:
            with torch.no_grad():
                self.running_mean.copy_(self.output_mean())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, conv_input: torch.Tensor | None = None, moments=None,
                first_tower: bool = False):
        self.check_input(x)
        if not self.training:  # in x's dtype, as stock BatchNorm (float32 state, bfloat16 input under autocast)
            y = self.post_norm(self._inference(x).to(x.dtype))
            return (y, None, None) if first_tower else y
        if self.mean_before_conv and conv_input is None:
            raise InputError(
                f"ExtremeNorm '{self.site_name}' is in training mode but was called without the input of its "
                f"producer '{self.producer_name}': it trains only in a model in training mode, whose graph "
                "passes that input (the eval graph does not, so this layer cannot be put back in training "
                "alone in an eval model). Call the transformed model itself in train mode (model.train()), "
                "not this layer on its own, or keep this layer in eval mode")
        if self.empty_batch(x):  # stock BatchNorm's empty batch; tower B (moments given) counts no second step
            y = self.stock_forward(x) if moments is None else F.batch_norm(x, None, None, self.weight, self.bias,
                                                                           True, 0.0, self.eps)
            y = self.post_norm(y)
            return (y, None, None) if first_tower else y
        if not self.input_mean_known:
            if torch.compiler.is_exporting():
                self.refuse_export_of_first_step("first estimate of the mean before its producer (μ̄, §3.3)")
            self._restart_input_mean(conv_input)
        aggregated = (None, None)
        if moments is not None and moments[0] is not None:
            q = self._second_tower(x, *moments)
        else:
            mean_ema, nu_ema = self._ema_values()
            group = 1 if first_tower else self.micro
            q, mu_b, nu_b = self._normalise(x, conv_input, mean_ema, nu_ema, group)
            if first_tower:
                aggregated = self._aggregate(mu_b, nu_b, mean_ema, nu_ema)
            self._update_ema(mu_b, nu_b)
        y = self.post_norm(self._finish(q).to(x.dtype))
        return (y, *aggregated) if first_tower else y

    def _ema_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        # snapshots: the EMA buffers are updated in place below, after being used in the graph
        # (and the backward pass needs their values from before the update)
        mean = self.input_mean if self.mean_before_conv else self.running_mean
        return buffer_snapshot(mean), buffer_snapshot(self.running_var) + self.eps

    def _example_means(self, source: torch.Tensor) -> torch.Tensor:
        if source.dim() == 2:
            return source
        if self.mean_before_conv and isinstance(self.__dict__["producer"], nn.Linear):
            raise InputError(f"ExtremeNorm '{self.site_name}': producer Linear '{self.producer_name}' got a "
                             f"{source.dim()}-D input; the mean-before-linear step needs (N, C) inputs")
        return source.mean(dim=tuple(range(2, source.dim())))

    def _channel_view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """(C,) or (B, C) -> broadcastable against an (N, C, *S) tensor of rank ``ndim``."""
        lead = t.shape[0] if t.dim() == 2 else 1
        return t.reshape(lead, -1, *([1] * (ndim - 2)))

    def _centre(self, x: torch.Tensor, mean_value: torch.Tensor, mean_dagger: torch.Tensor) -> torch.Tensor:
        """``p = conv(x, W) − μ†·ΣW`` (Alg. 1). ``μ†`` has forward value ``mean_value`` (the EMA),
        so ``μ̄·ΣW`` is computed once on the (C_in,) vector and ``(μ† − μ̄)·ΣW`` -- exactly 0 in
        the forward pass -- carries the gradient: both towers then subtract the same bits."""
        bias = self._producer_bias()
        if bias is not None:
            # the conv bias is part of the mean (as with BatchNorm, it gets no gradient)
            x = x - self._channel_view(bias, x.dim())
        shift = self._channel_view(self._mean_map(mean_value), x.dim())
        carrier = self._channel_view(self._mean_map(mean_dagger - mean_value), x.dim())
        return x - shift - carrier

    def _second_moments(self, p: torch.Tensor) -> torch.Tensor:
        sq = p * p
        if p.dim() > 2:
            sq = sq.mean(dim=tuple(range(2, p.dim())))
        return sq + self.eps

    def _scale(self, p: torch.Tensor, nu_dagger: torch.Tensor, nu_ema: torch.Tensor,
               nu_example: torch.Tensor) -> torch.Tensor:
        """``q = p/√ν† · StopGradient(min(1, u_max·√(ν̄/ν)))`` with the per-example ``ν``."""
        clip = torch.clamp(self.u_max * torch.sqrt(nu_ema / nu_example.detach()), max=1.0)
        factor = torch.rsqrt(nu_dagger) * clip
        return p * self._channel_view(factor, p.dim())

    def _normalise(self, x, conv_input, mean_ema, nu_ema, group: int):
        """One tower normalising with moments of groups of ``group`` examples (1: ``μ†, ν†``)."""
        mu_b = self._example_means(conv_input if self.mean_before_conv else x)
        mu_dagger = scale_grad(mean_ema, _group_mean(mu_b, group), self.r_m)
        p = self._centre(x, mean_ema, mu_dagger)
        nu_b = self._second_moments(p)
        nu_group = _group_mean(nu_b, group)
        nu_dagger = scale_grad(nu_ema, nu_group, self._nu_rate(nu_ema, nu_group))
        return self._scale(p, nu_dagger, nu_ema, nu_b), mu_b, nu_b

    def _nu_rate(self, nu_ema: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
        """``r_v·min(ν̄/ν, f_max)`` (§2.2: the Jacobian through ν scaled by S/Q, capped)."""
        return self.r_v * torch.clamp(nu_ema / nu.detach(), max=self.f_max)

    def _aggregate(self, mu_b, nu_b, mean_ema, nu_ema):
        """``μ‡ = ScaleGrad(μ̄, E_b μ_b, r_m)``, ``ν‡ = ScaleGrad(ν̄, E_b ν_b, r_v·min(ν̄/E_b ν_b, f_max))``."""
        mu_mean = mu_b.mean(0)
        nu_mean = nu_b.mean(0)
        return (scale_grad(mean_ema, mu_mean, self.r_m),
                scale_grad(nu_ema, nu_mean, self._nu_rate(nu_ema, nu_mean)))

    def _second_tower(self, x, mu_agg, nu_agg):
        """Tower B: ``q' = (conv(x', W) − μ‡ΣW)/√ν‡ · clip``. The forward values of ``μ‡, ν‡`` are
        the EMAs tower A used (before its update); the clip uses this tower's own per-example
        ``ν`` (equal to tower A's when the inputs are equal, and defined when ``stats_batch``
        gives tower A fewer examples)."""
        mean_value = mu_agg.detach()
        nu_ema = nu_agg.detach()
        p = self._centre(x, mean_value, mu_agg)
        with torch.no_grad():
            nu_example = self._second_moments(p)
        return self._scale(p, nu_agg, nu_ema, nu_example)

    def _finish(self, q: torch.Tensor) -> torch.Tensor:
        """``Rotate(q ⊙ γ) + β`` (Alg. 1; no rotation in this class)."""
        if self.affine:
            q = q * self._channel_view(self.weight, q.dim())
        q = self._rotate(q)
        if self.affine:
            q = q + self._channel_view(self.bias, q.dim())
        return q

    def _rotate(self, q: torch.Tensor) -> torch.Tensor:
        return q

    @torch.no_grad()
    def _update_ema(self, mu_b: torch.Tensor, nu_b: torch.Tensor) -> None:
        rate = self.rate
        target = self.input_mean if self.mean_before_conv else self.running_mean
        target.mul_(1 - rate).add_(mu_b.mean(0).to(target.dtype), alpha=rate)
        self.running_var.mul_(1 - rate).add_((nu_b.mean(0) - self.eps).to(self.running_var.dtype), alpha=rate)
        self.num_batches_tracked.add_(1)
        self._sync_running_mean()

    @torch.no_grad()
    def _restart_input_mean(self, conv_input) -> None:
        """After loading a checkpoint without ``input_mean`` (a stock one): start ``μ̄`` from this batch."""
        if self.mean_before_conv:
            self.input_mean.copy_(self._example_means(conv_input).mean(0).to(self.input_mean.dtype))
        self.input_mean_known = True

    # ------------------------------------------------------------------ inference (Alg. 1)
    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.inference_affine()
        return x * self._channel_view(scale, x.dim()) + self._channel_view(shift, x.dim())

    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ConvLayer_Inference without rotation: ``y = x·γ/√ν̄ + (β − (ΣW·μ̄ + b)·γ/√ν̄)`` on the
        producer output ``x``; folded into the producer it is ``K = W ⊙ γ/√ν̄`` and bias
        ``−μ̄·ΣK + β``."""
        self._sync_running_mean()
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -self.output_mean() * scale
        if self.affine:
            shift = shift + self.bias
        return scale, shift

    # ------------------------------------------------------------------ state
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_running_mean()  # running_mean always holds ΣW·μ̄ + b for the saved weights
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mean_before_conv and not self.input_mean_known:
            # μ̄ unknown: the buffer is a placeholder; without the key a reload stays unknown too
            # (same eval output, and its first training batch restarts μ̄ as this model's would)
            destination.pop(prefix + "input_mean", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.mean_before_conv:
            self.input_mean_known = prefix + "input_mean" in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ reporting
    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        info = super().describe(input_shape)
        info["mode"] = ("two towers (μ†, ν† per example in tower A; tower B uses μ‡, ν‡)"
                        if self.mode == "two-tower" else
                        ("per example (micro=1, no interaction between examples)" if self.micro == 1
                         else f"μ‡, ν‡ over micro-batches of {self.micro}"))
        if self.mean_before_conv:
            info["mean"] = (f"before {type(self.__dict__['producer']).__name__} '{self.producer_name}' "
                            f"({self.input_mean.numel()} input channels), subtracted as μ·ΣW")
        else:
            info["mean"] = "after (no conv/linear producer: the mean-before-conv step of §3.3 is not applied)"
        info["options"] = (f"rate={self.rate}, r_m={self.r_m}, r_v={self.r_v}, f_max={self.f_max}, "
                           f"u_max={self.u_max}")
        return info

    def extra_repr(self) -> str:
        text = (f"{super().extra_repr()}, mode={self.mode}"
                + (f", micro={self.micro}" if self.mode == "brn" else "")
                + f", rate={self.rate}, r_m={self.r_m}, r_v={self.r_v}, f_max={self.f_max}, u_max={self.u_max}")
        if self.mean_before_conv:
            text += f", mean_before={self.producer_name!r}"
        return text


class RotatedExtremeNorm(ExtremeNorm):
    """:class:`ExtremeNorm` with the fixed rotation ``R`` (§2.2) between ``γ`` and ``β``:
    ``ReLU(R·(γ ⊙ q) + β)``, applied at every position as a 1×1 convolution. Eval mode is the
    full channel mixing ``inference_matrix() -> (M, shift)`` with ``M = R·diag(γ/√ν̄)``, which the
    fold pass puts into the producer: ``K = (W ⊙ γ/√ν̄)·R``, bias ``−μ̄·ΣK + β`` (Alg. 1)."""

    optional_state_keys = ("input_mean", "rotation")

    def __init__(self, *args, rotation_kind: str = "hadamard", **kwargs):
        super().__init__(*args, **kwargs)
        self.rotation_kind = rotation_kind
        ref = self.running_mean
        self.register_buffer("rotation", torch.eye(self.num_features, dtype=ref.dtype, device=ref.device))

    @classmethod
    def from_extreme(cls, layer: ExtremeNorm, kind: str, seed: int = 0) -> "RotatedExtremeNorm":
        """``layer`` with a rotation: shares every parameter, buffer and the producer link."""
        new = cls.from_batchnorm(layer, **layer.options())
        new.adopt(layer)
        matrix, used = rotation_matrix(kind, layer.num_features, seed, layer.site_name)
        ref = layer.running_mean
        new.register_buffer("rotation", matrix.to(dtype=ref.dtype, device=ref.device))
        new.rotation_kind = used
        new.rotation_seed = int(seed)
        return new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # a stock checkpoint has no rotation: R is a function of (kind, seed, site), so rebuild it
        # rather than trust the buffer, which after to_empty() (meta-device init) is garbage
        if prefix + "rotation" not in state_dict and self.rotation.device.type != "meta":
            matrix, _ = rotation_matrix(self.rotation_kind, self.num_features,
                                        getattr(self, "rotation_seed", 0), self.site_name)
            with torch.no_grad():
                self.rotation.copy_(matrix)

    def _rotate(self, q: torch.Tensor) -> torch.Tensor:
        # q is computed in fp32 (or wider) even for a 16-bit model, whose rotation is 16-bit: einsum
        # does not promote
        return match_memory_format(torch.einsum("ji,bi...->bj...", self.rotation.to(q.dtype), q), q)

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        matrix, shift = self.inference_matrix()
        return match_memory_format(torch.einsum("ji,bi...->bj...", matrix, x) + self._channel_view(shift, x.dim()), x)

    def inference_affine(self):
        raise UnsupportedPatternError(
            f"'{self.site_name}' rotates its channels (rot): its inference is the channel matrix of "
            "inference_matrix(), not a per-channel affine")

    def inference_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = M·x + shift`` on the producer output: ``M = R·diag(γ/√ν̄)``,
        ``shift = β − M·(ΣW·μ̄ + b)``."""
        self._sync_running_mean()
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        matrix = self.rotation * scale.reshape(1, -1)
        shift = -(matrix @ self.output_mean())
        if self.affine:
            shift = shift + self.bias
        return matrix, shift

    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        info = super().describe(input_shape)
        n = self.num_features
        info["rotation"] = f"{self.rotation_kind} {n}x{n}" + (
            "" if self.rotation_kind == "hadamard" else
            (" (channel count is not a power of 2)" if n & (n - 1) else ""))
        return info

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rotation={self.rotation_kind}"


def mean_before_supported(producer: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[bool, str]:
    """Whether the mean can be taken before ``producer`` (§3.3), and why not."""
    if not isinstance(producer, _MEAN_PRODUCERS):
        return False, f"producer is a {type(producer).__name__} (mean before Conv1d/2d/3d or Linear only)"
    if isinstance(producer, nn.Linear) and input_shape is not None and len(input_shape) != 2:
        return False, f"Linear producer with a {len(input_shape)}-D BatchNorm input (channels are not its features)"
    return True, ""
