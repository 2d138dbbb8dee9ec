"""``torch.library`` custom ops of sampled BatchNorm (+ activation), with autograd and fake
(meta) implementations, so lowered models run under autograd, ``torch.compile(fullgraph=True)``
and autocast.

``bnrewrite::batch_norm_act(x, weight, bias, region, virtual_weight, eps, activation, slope)
-> (y, stats)`` and ``bnrewrite::update_running_stats_(running_mean!, running_var!, stats, momentum,
unbias)`` (a mutating op cannot carry an autograd formula, so the EMA is its own small launch).

* ``region = [nv, r0, r1, d0, d1, h0, h1, w0, w1]``: virtual rows ``[0, nv)`` and the sampled
  group rows ``[r0, r1)`` x box (spatial dims padded to ``(D, H, W)``), see :mod:`._triton`;
* ``virtual_weight``: β of Eq. 4 (0 without virtual rows);
* the running statistics are updated with ``r = (1 − momentum)·r + momentum·stat`` (the
  variance times ``unbias = n/(n−1)``);
* ``stats = [mean, var, mean_virtual, mean_sampled]``, ``(4, C)`` float32, non-differentiable.

CUDA tensors run the Triton kernels; other devices run :mod:`.reference` (plain torch). With
``BNREWRITE_TRITON_CPU=1`` (and ``TRITON_INTERPRET=1`` set before triton is imported) CPU
tensors run the Triton kernels in triton's interpreter: that is how CI tests the kernels.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from ...errors import InputError, KernelError
from ..base import differentiable_gradients, functorch_active
from . import reference
from .functional import whole_batch_region
from .layout import dense, output_like


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    from . import _triton
    return _triton


def _kernels_for(x: Tensor):
    """The Triton module when the kernels run on ``x``'s device, else None (reference path)."""
    if x.is_cuda:
        return _triton_kernels() if triton_available() else None
    # is_cpu, not device.type: no torch.device built per call (this runs at every eager step)
    if x.is_cpu and os.environ.get("BNREWRITE_TRITON_CPU") == "1" and triton_available():
        return _triton_kernels()
    return None


@torch.library.custom_op("bnrewrite::batch_norm_act", mutates_args=())
def batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], region: list[int],
                   virtual_weight: float, eps: float, activation: str, slope: float) -> tuple[Tensor, Tensor]:
    """Sampled BatchNorm (bn-sampling.txt Eq. 1, 3, 4) + activation; see the module docstring."""
    x = dense(x)
    impl = _kernels_for(x) or reference
    return impl.forward(x, weight, bias, region, virtual_weight, eps, activation, slope)


@batch_norm_act.register_fake
def _batch_norm_act_fake(x, weight, bias, region, virtual_weight, eps, activation, slope):
    return output_like(x), x.new_empty((4, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("bnrewrite::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            stats: Tensor, region: list[int], virtual_weight: float, eps: float,
                            activation: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`batch_norm_act` (App. C Eq. 5–6); dweight/dbias fp32."""
    x = dense(x)
    impl = _kernels_for(x) or reference
    return impl.backward(grad_out, x, weight, bias, stats, region, virtual_weight, eps, activation, slope)


@batch_norm_act_backward.register_fake
def _batch_norm_act_backward_fake(grad_out, x, weight, bias, stats, region, virtual_weight, eps, activation,
                                  slope):
    c = x.shape[1]
    return (output_like(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, region, virtual_weight, eps, activation, slope = inputs
    _y, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(x, weight, bias, stats)
    ctx.config = (list(region), virtual_weight, eps, activation, slope)


def _gradients(ctx, grad_y, backward_fn):
    """The autograd formula both entry points share: ``backward_fn`` computes (dx, dw, db)."""
    x, weight, bias, stats = ctx.saved_tensors
    region, virtual_weight, eps, activation, slope = ctx.config
    dx, dw, db = backward_fn(grad_y, dense(x), weight, bias, stats, region, virtual_weight, eps, activation, slope)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # the kernels' dweight/dbias are fp32; a parameter of another dtype gets its own (.to is not free per call)
    return (dx if need_x else None,
            (dw if dw.dtype == weight.dtype else dw.to(weight.dtype)) if need_w and weight is not None else None,
            (db if db.dtype == bias.dtype else db.to(bias.dtype)) if need_b and bias is not None else None,
            None, None, None, None, None)


def _backward(ctx, grad_y, _grad_stats):
    return _gradients(ctx, grad_y, batch_norm_act_backward)


batch_norm_act.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bnrewrite::update_running_stats_", mutates_args=("running_mean", "running_var"))
def update_running_stats_(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float,
                          unbias: float) -> None:
    """PyTorch's EMA of the running statistics from ``stats`` (variance times ``unbias``)."""
    impl = _kernels_for(running_mean) or reference
    impl.update_running_stats(running_mean, running_var, stats, momentum, unbias)


@update_running_stats_.register_fake
def _update_running_stats_fake(running_mean, running_var, stats, momentum, unbias) -> None:
    return None


class _EagerBatchNormAct(torch.autograd.Function):
    """The same computation as :func:`batch_norm_act` without the custom-op dispatcher.

    Why: on an H100 host, dispatching a ``torch.library.custom_op`` from Python cost about
    0.5 ms per call (``custom_ops.backend_impl``; benchmarks/kernel_overhead.py --profile),
    3 calls per training step of a layer -- several times the kernels' own device time at
    ResNet shapes. Eager mode therefore calls the implementations directly; under
    ``torch.compile`` the custom ops (with their fake implementations) are what gets traced.
    """

    @staticmethod
    def forward(ctx, x_in, weight, bias, region, virtual_weight, eps, activation, slope, running, tracked, site):
        x = dense(x_in)
        impl = _kernels_for(x) or reference
        if impl is not reference:  # torch's own ops check devices on the reference path
            _check_devices(x, site, _OP_TENSORS, (weight, bias, tracked) if running is None else
                           (weight, bias, tracked, running[0], running[1]))
        try:
            y, stats = impl.forward(x, weight, bias, region, virtual_weight, eps, activation, slope, running,
                                    tracked)
        except KernelError as err:
            raise _at_site(err, site) from err.__cause__
        ctx.mark_non_differentiable(stats)
        # the input itself, not a dense copy of it: that would be kept to the backward, and carries no history
        ctx.save_for_backward(x_in, weight, bias, stats)
        # region comes from region_of (the module caches it per draw): a list nothing changes in place
        ctx.config = (impl, region, virtual_weight, eps, activation, slope, site)
        # the stats output never has a gradient: no zeros allocated for it per backward
        ctx.set_materialize_grads(False)
        return y, stats

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        if grad_y is None:  # y unused by what was differentiated
            return (None,) * 11
        x, weight, bias, stats = ctx.saved_tensors
        impl, region, virtual_weight, eps, activation, slope, site = ctx.config
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            def forward_by_autograd(x, weight, bias):
                return reference.forward(dense(x), weight, bias, region, virtual_weight, eps, activation, slope)[0]

            return (*differentiable_gradients(forward_by_autograd, (x, weight, bias), (grad_y,),
                                              ctx.needs_input_grad), *(None,) * 8)
        try:
            dx, dw, db = impl.backward(grad_y, dense(x), weight, bias, stats, region, virtual_weight, eps, activation,
                                       slope)
        except KernelError as err:
            raise _at_site(err, site) from err.__cause__
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # fp32 dweight/dbias: autograd casts them to a 16-bit parameter's dtype itself
        return (dx if need_x else None, dw if need_w and weight is not None else None,
                db if need_b and bias is not None else None, None, None, None, None, None, None, None, None)


def call_batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], region: list[int],
                        virtual_weight: float, eps: float, activation: str, slope: float,
                        running: tuple[Tensor, Tensor, float, float] | None = None,
                        tracked: Optional[Tensor] = None, site=None) -> tuple[Tensor, Tensor]:
    """:func:`batch_norm_act` as a custom op under ``torch.compile``, directly in eager mode.

    ``running = (running_mean, running_var, momentum, unbias)``: update the running statistics
    too -- in eager mode inside the same kernel launch, under compile with
    :func:`update_running_stats_` (a mutating op cannot be part of an op with an autograd formula).
    ``tracked``: a ``num_batches_tracked`` buffer to add 1 to -- in eager mode in that launch too
    (on a GPU, one ``add_`` launch fewer per layer step), under compile with ``add_``.
    ``site``: the module calling, named in a :class:`~bnrewrite.errors.KernelError` of its forward
    or backward launches.
    """
    if torch.compiler.is_compiling():
        y, stats = batch_norm_act(x, weight, bias, region, virtual_weight, eps, activation, slope)
        if running is not None:
            update_running_stats_(running[0], running[1], stats, running[2], running[3])
        if tracked is not None:
            tracked.add_(1)
        return y, stats
    return _EagerBatchNormAct.apply(x, weight, bias, region, virtual_weight, eps, activation, slope, running,
                                    tracked, site)


def _at_site(err: KernelError, site) -> KernelError:
    """``err`` with the module it happened in named first (the site label, as other errors give it)."""
    if site is None:
        return err
    return type(err)(f"{type(site).__name__}{getattr(site, 'site_label', '')}: {err}")


# what the tensors handed to _check_devices are, in its messages
_OP_TENSORS = ("weight", "bias", "num_batches_tracked", "running_mean", "running_var")
_WINDOW_TENSORS = ("weight", "bias", "the past steps' means", "the past steps' squared means")


def _check_devices(x: Tensor, site, names: tuple[str, ...], tensors: tuple[Optional[Tensor], ...]) -> None:
    """Refuse a launch whose tensors are not all on ``x``'s device, as torch's own ops do: a kernel
    handed another device's pointer (or a meta tensor's null) reads memory that is not there.
    (A loop over a tuple: keyword arguments cost several µs per step.)"""
    device = x.device
    for name, t in zip(names, tensors):
        if t is not None and t.device != device:
            raise _at_site(InputError(
                f"the input is on {device} but {name} is on {t.device}; move the model and its inputs to one "
                f"device (model.to({str(device)!r}))"), site)


class _FusedWindowBatchNorm(torch.autograd.Function):
    """Cross-iteration BN's Eqs. 9–12 on the Triton kernels (eager mode): see
    :func:`fused_window_batch_norm`."""

    @staticmethod
    def forward(ctx, x_in, weight, bias, past_mean, past_sq_mean, eps, activation, slope, site):
        x = dense(x_in)
        impl = _kernels_for(x)
        _check_devices(x, site, _WINDOW_TENSORS, (weight, bias, past_mean, past_sq_mean))
        try:
            output = impl.window_forward(x, weight, bias, past_mean, past_sq_mean, eps, activation, slope)
        except KernelError as err:
            raise _at_site(err, site) from err.__cause__
        # the sampled op's backward with the whole batch as its one group, of count k·M
        _setup_context(ctx, (x_in, weight, bias, whole_batch_region(x.shape), 0.0, eps, activation, slope), output)
        ctx.backward = functools.partial(impl.backward,
                                         group_count=(past_mean.shape[0] + 1) * (x.numel() // x.shape[1]))
        ctx.site = site
        ctx.window = past_mean.shape[0] + 1
        return output

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            from ..cross_iteration import window_statistics_of_x

            stats = ctx.saved_tensors[3]
            _region, _wv, eps, activation, slope = ctx.config

            def forward_by_autograd(x, weight, bias):
                x = dense(x)
                _, _, mean, var = window_statistics_of_x(x, stats[0], stats[1], stats[4], stats[5], ctx.window)
                return reference.normalized(x, mean, var, weight, bias, eps, activation, slope)

            return (*differentiable_gradients(forward_by_autograd, ctx.saved_tensors[:3], (grad_y,),
                                              ctx.needs_input_grad), *(None,) * 6)
        try:
            return (*_gradients(ctx, grad_y, ctx.backward), None)
        except KernelError as err:
            raise _at_site(err, ctx.site) from err.__cause__


# what the kernels store; they compute in fp32, so a float64 model keeps the plain-torch path's precision
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_window_available(x: Tensor) -> bool:
    """Whether :func:`fused_window_batch_norm` runs on ``x``: the Triton kernels apply there, this
    is not a ``torch.compile`` trace (which keeps the plain-torch op) nor a ``torch.func`` transform
    (which refuses old-style autograd Functions: :func:`~bnrewrite.runtime.base.functorch_active`), and ``x`` is fp32/bf16/fp16
    (the kernels compute in fp32; float64 keeps the plain-torch op's precision)."""
    return (not torch.compiler.is_compiling() and not functorch_active() and 2 <= x.dim() <= 5
            and x.dtype in KERNEL_DTYPES and _kernels_for(x) is not None)


def fused_window_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], past_mean: Tensor,
                            past_sq_mean: Tensor, eps: float, activation: str = "none",
                            slope: float = 0.0, site=None) -> tuple[Tensor, ...]:
    """:func:`bnrewrite.runtime.cross_iteration.window_batch_norm` on the Triton kernels, then
    ``activation`` in the same pass: ``(y, μ̄, σ̄², μ_t, var_t)``. Its backward is App. C Eq. 6
    of the sampling paper with one group (the whole batch) of count k·M and mean μ̄, i.e. the
    sampled BN backward kernels. ``site``: the module calling, named in a kernel error."""
    y, stats = _FusedWindowBatchNorm.apply(x, weight, bias, past_mean, past_sq_mean, float(eps), activation,
                                           float(slope), site)
    return y, stats[0], stats[1], stats[4], stats[5]
