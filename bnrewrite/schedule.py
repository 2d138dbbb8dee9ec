"""Model-wide hooks into runtime modules: re-draw sampling indices, reset histories,
warm up moving averages. Each calls a method the runtime modules define, so no variant
is special-cased here."""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from .errors import InputError, require_module, warn_at_caller


_NO_BATCH = object()
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _call_each(model: nn.Module, method: str, *args) -> int:
    require_module(model, method)
    count = 0
    for module in model.modules():
        fn = getattr(module, method, None)
        if callable(fn) and getattr(module, "is_bnrewrite_norm", False):
            fn(*args)
            count += 1
    return count


def new_epoch(model: nn.Module) -> int:
    """Re-draw the sampling indices of every sampled BatchNorm (the papers redraw once an epoch).

    Returns how many modules re-drew. Example::

        for epoch in range(epochs):
            bnrewrite.new_epoch(model)
            for x, y in loader: ...
    """
    return _call_each(model, "new_epoch")


def reset_history(model: nn.Module) -> int:
    """Forget the cross-iteration history of every CBN module (e.g. after loading other weights).
    Returns how many modules reset. Example::

        >>> model = bnrewrite.transform(torchvision.models.resnet18(weights=None), "cbn:k=4")
        >>> bnrewrite.reset_history(model)
        20
    """
    return _call_each(model, "reset_history")


def drop_running_stats_(model: nn.Module) -> int:
    """Stop every BatchNorm of ``model``, stock and rewritten, tracking running statistics: what
    ``torch.func.replace_all_batch_norm_modules_`` does to stock BatchNorm (the only kind it sees).
    For a training step under ``torch.func.vmap`` (ensembles, per-example gradients), where one
    set of running statistics cannot take a value per vmapped batch. Eval mode then normalises
    with each batch's own statistics, as stock BatchNorm's does with ``track_running_stats=False``.
    Returns how many modules changed. Extreme Normalization (``brn``, ``two-tower``) normalises
    with its moving averages in training too: an :class:`InputError`, before anything changes. Example::

        >>> model = bnrewrite.transform(torchvision.models.resnet18(weights=None), "fs")
        >>> bnrewrite.drop_running_stats_(model)
        20
    """
    require_module(model, "drop_running_stats_")
    from .runtime.base import is_batchnorm

    norms = [m for m in model.modules() if is_batchnorm(m) and m.track_running_stats]
    for module in norms:  # all refusals before anything changes
        if getattr(module, "normalises_with_running_stats", False):
            raise InputError(
                f"drop_running_stats_: {type(module).__name__}{module.site_label} normalises with its moving "
                "averages (running_mean, running_var) in training too, so they cannot be dropped (nothing was "
                "changed); under torch.func.vmap run this model in eval mode")
    for module in norms:
        for name in _STATISTICS:
            setattr(module, name, None)
        module.track_running_stats = False
    return len(norms)


def warm_up_statistics(model: nn.Module, batches, steps: int = 200) -> int:
    """Fill the moving averages with forward passes only, no weight updates
    (extreme-normalization.txt §5: "the moving averages are initialized by using the first 200
    steps to only update the EMAs but not the weights").

    Runs ``model`` in train mode under ``torch.no_grad()`` on up to ``steps`` batches, then
    restores every module's train/eval mode. Works for any model (stock BatchNorm updates its
    running statistics the same way); it matters most for ``two-tower`` and ``brn``, whose
    forward pass *uses* the moving averages.

    Args:
        model: a (transformed) model.
        batches: an iterable of batches; each is the input tensor, or a tuple/list whose first
            item is the input (what a ``DataLoader`` of ``(x, y)`` yields; a tuple first item is
            unpacked as several inputs). A re-iterable (list, DataLoader) is cycled until
            ``steps`` batches have run. A single tensor is one batch, run ``steps`` times (iterating
            it would feed its rows one by one, without the batch dim).
        steps: number of forward passes (paper: 200).

    Returns the number of forward passes run. Example::

        model = bnrewrite.transform(model, "brn:micro=2+rot")
        bnrewrite.warm_up_statistics(model, loader, steps=200)
    """
    require_module(model, "warm_up_statistics")
    # int(steps) would take "10" and truncate 2.5; True is an int to Python but not a step count
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool):
        raise InputError(f"warm_up_statistics: steps must be an int (number of forward passes), got {steps!r}")
    steps = int(steps)
    if steps < 0:
        raise InputError(f"warm_up_statistics: steps must be >= 0, got {steps}")
    _require_batches(batches, "warm_up_statistics")
    done = _forward_passes(model, batches, steps, cycle=True)
    if done == 0 and steps > 0:
        raise InputError("warm_up_statistics got no batches: pass an iterable of input tensors or (x, y) pairs")
    return done


def update_bn(batches, model: nn.Module, device=None) -> int:
    """``torch.optim.swa_utils.update_bn`` for rewritten models: recompute every running mean and
    variance as the plain average over one pass of ``batches`` (e.g. after weight averaging).

    swa_utils finds BatchNorm by ``isinstance(m, _BatchNorm)``, which runtime modules are not,
    so on a rewritten model it silently changes nothing. Here every stock BatchNorm and every
    runtime module that tracks running statistics is reset and switched to the cumulative
    average (``momentum=None``) for the pass, then its momentum is restored. Each variant
    computes the statistics it would in training (a sampled BN from its sample; CBN from its
    window, whose history is cleared first: it holds other weights' statistics). The training
    schedule is left as it was (CBN's history, burn-in and ring counters, a sampler's draws):
    training continues exactly as without the call, but for the running statistics. ``batches``
    as in :func:`warm_up_statistics`, run once (not cycled); with ``device``, each input is
    moved there first (``.to(device)``, as swa_utils does). Returns the number of batches run.

    Raises :class:`~bnrewrite.errors.InputError`, before resetting anything, on swapped
    arguments, no batches, or Extreme Normalization layers (``brn``, ``two-tower``), which
    normalise with their moving averages: re-estimate those with :func:`warm_up_statistics`.
    A model without BatchNorm is left alone with a warning (no forward pass runs). A forward pass
    that raises leaves the running statistics as they were before the call. Example::

        swa_model = torch.optim.swa_utils.AveragedModel(model)
        ... training with swa_model.update_parameters(model) ...
        bnrewrite.update_bn(loader, swa_model)
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    if isinstance(batches, nn.Module):
        raise InputError(f"update_bn(batches, model) got the model first ({type(batches).__name__}): the order "
                         "is update_bn(batches, model), as in torch.optim.swa_utils.update_bn")
    if not isinstance(model, nn.Module):
        raise InputError(f"update_bn expects an nn.Module as model, got {type(model).__name__}: the order is "
                         "update_bn(batches, model)")
    norms = {name: m for name, m in model.named_modules()
             if (isinstance(m, _BatchNorm) or getattr(m, "is_bnrewrite_norm", False))
             and getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None}
    if not norms:
        warn_at_caller(f"update_bn: {type(model).__name__} has no BatchNorm with running statistics; "
                       "nothing to update, no batch was run")
        return 0
    for name, m in norms.items():
        refusal = getattr(m, "update_bn_refusal", None)
        if refusal:
            raise InputError(f"update_bn: '{name}' {refusal}")
    _require_batches(batches, "update_bn")
    # an empty loader must not leave the statistics reset: look at the first batch before resetting
    iterator = iter([batches] if isinstance(batches, torch.Tensor) else batches)
    first = next(iterator, _NO_BATCH)
    if first is _NO_BATCH:
        raise InputError("update_bn got no batches (nothing was reset): pass an iterable of input tensors "
                         "or (x, y) pairs")
    momenta = {m: m.momentum for m in norms.values()}
    # the pass is train-mode forwards, which advance each variant's training schedule (CBN's
    # burn-in and ring, a sampler's every=N draws): put that back afterwards, so the next training
    # step is the one it would have been
    schedules = {m: m.schedule_state() for m in norms.values() if callable(getattr(m, "schedule_state", None))}
    statistics = {m: {key: t.clone() for key in _STATISTICS if (t := getattr(m, key, None)) is not None}
                  for m in norms.values()}
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None
        if callable(getattr(m, "reset_history", None)):
            m.reset_history()  # CBN: the window must hold this pass's batches only
    try:
        return _forward_passes(model, itertools.chain([first], iterator), None, cycle=False, device=device)
    except BaseException:
        # a batch that fails halfway (wrong shape, Ctrl-C) must not leave the statistics reset or
        # half-averaged, as swa_utils does: the model is as before the call
        with torch.no_grad():
            for m, saved in statistics.items():
                for key, value in saved.items():
                    getattr(m, key).copy_(value)
        raise
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, state in schedules.items():
            m.restore_schedule_state(state)


def _require_batches(batches, function: str) -> None:
    # not iter(): that would start a DataLoader's workers; a container iterable through __getitem__ counts
    if not (isinstance(batches, (torch.Tensor, Iterable)) or hasattr(type(batches), "__getitem__")):
        raise InputError(f"{function} expects the batches as an input tensor or an iterable of batches (a list, a "
                         f"DataLoader), got {type(batches).__name__}")


def _forward_passes(model: nn.Module, batches, steps: int | None, cycle: bool, device=None) -> int:
    """Train-mode forward passes under no_grad, restoring every module's mode afterwards; at
    most ``steps`` (None: no limit), cycling a re-iterable when ``cycle``; each input tensor
    moved with ``.to(device)`` when ``device`` is given."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    modes = {m: m.training for m in model.modules()}
    done = 0
    try:
        model.train()
        with torch.no_grad():
            while steps is None or done < steps:
                before = done
                iterator = iter(batches)
                for batch in iterator:
                    if steps is not None and done >= steps:
                        break
                    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
                    if device is not None:
                        inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
                    model(*inputs)
                    done += 1
                if not cycle or done == before or iterator is batches:
                    break  # one pass asked for, empty, or a one-shot iterator that is now exhausted
    finally:
        for module, mode in modes.items():
            module.training = mode
    return done
