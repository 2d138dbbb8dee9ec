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
    γ ~ U(0.5, 1.5). Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, _BatchNorm):
                continue
            if module.running_mean is not None:
                module.running_mean.normal_(0, shift, generator=generator)
                module.running_var.uniform_(*var_range, generator=generator)
            if module.weight is not None:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, shift, generator=generator)
    return model.eval()
