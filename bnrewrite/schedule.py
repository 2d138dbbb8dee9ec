"""Model-wide hooks into runtime modules: re-draw sampling indices, reset histories,
warm up moving averages. Each calls a method the runtime modules define, so no variant
is special-cased here."""
from __future__ import annotations

from torch import nn


def _call_each(model: nn.Module, method: str, *args) -> int:
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
    """Forget the cross-iteration history of every CBN module. Returns how many reset."""
    return _call_each(model, "reset_history")
