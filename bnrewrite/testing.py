"""Helpers for checking a rewrite or a fold on models built with ``weights=None``.

A freshly built BatchNorm has running mean 0, running variance 1, γ = 1 and β = 0: its eval
mode is the identity, so a fold that ignored the statistics or the affine parameters would pass
a comparison of outputs. Randomising them first makes such a comparison able to fail.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_batchnorm(model: nn.Module, seed: int = 0, shift: float = 0.2,
                        var_range: tuple[float, float] = (0.5, 2.0)) -> nn.Module:
    """Give every BatchNorm of ``model`` (in place) non-trivial running statistics and affine
    parameters, reproducibly from ``seed``: mean, β ~ N(0, shift²), variance ~ U(var_range),
    γ ~ U(0.5, 1.5). Returns the model in eval mode.

    bnrewrite's runtime modules (a transformed model) count as BatchNorm: they keep BatchNorm's
    parameter and buffer names, and a check of a rewritten model needs them randomised too."""
    from .errors import InputError, require_module

    require_module(model, "randomize_batchnorm")
    low, high = var_range
    if not (0 < low <= high) or not shift >= 0:
        raise InputError(f"randomize_batchnorm: need 0 < var_range[0] <= var_range[1] and shift >= 0, "
                         f"got var_range={tuple(var_range)}, shift={shift}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not (isinstance(module, _BatchNorm) or getattr(module, "is_bnrewrite_norm", False)):
                continue
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.normal_(0, shift, generator=generator)
                module.running_var.uniform_(low, high, generator=generator)
            if getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, shift, generator=generator)
    return model.eval()
