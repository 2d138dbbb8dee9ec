"""Optimizer parameter groups that give normalisation parameters their own weight decay
(Summers & Dinneen, "Four Things Everyone Should Know to Improve Batch Normalization", §3.3).

§3.3: weight decay on the scale γ and shift β of the normalisation layers is a regulariser
of its own (γ and β sit on paths to the output that no later normalisation undoes, e.g. the
skip connections of ResNets). It helped ResNets on CIFAR-100 and Caltech-256 and hurt
Inception-v3; the paper found it mattered *whether* γ/β are decayed, not whether γ decays
towards 0 or 1. So: decay them like the weights (``norm_weight_decay=None``, the paper's
"on"), or switch it off (``norm_weight_decay=0``), and tune on validation data.
"""
from __future__ import annotations

import math

from torch import nn

from .errors import InputError, require_module
from .runtime.base import is_batchnorm

# Normalisation layers whose weight/bias are γ/β. Subclasses count (timm's BatchNormAct2d,
# GroupNormAct, LayerNorm2d derive from these); bnrewrite runtime modules via is_batchnorm.
NORM_TYPES: tuple[type, ...] = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                nn.modules.instancenorm._InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_layer(module: nn.Module) -> bool:
    """Stock BatchNorm (any subclass), a bnrewrite runtime module, GroupNorm, LayerNorm,
    InstanceNorm, RMSNorm."""
    return is_batchnorm(module) or isinstance(module, NORM_TYPES)


def _check_decay(name: str, value) -> float:
    try:
        if isinstance(value, (bool, str, bytes)):  # float() would take True (a decay of 1.0) and "5e-4"
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"param_groups: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"param_groups: {name} must be a finite number >= 0, got {value}")
    return value


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None = None, *,
                 bias_weight_decay: float | None = None) -> list[dict]:
    """Parameter groups for any ``torch.optim`` optimizer, with γ/β decay chosen separately.

    Args:
        model: any ``nn.Module``, stock or returned by ``bnrewrite.transform``.
        weight_decay: decay of every other parameter (conv/linear weights, embeddings, ...).
        norm_weight_decay: decay of the ``weight``/``bias`` (γ/β) of every normalisation layer
            (BatchNorm and its bnrewrite rewrites, GroupNorm, LayerNorm, InstanceNorm, RMSNorm).
            ``None``: same as ``weight_decay`` (§3.3's "on"); ``0``: off.
        bias_weight_decay: decay of the biases of the *other* layers. ``None`` (default): same as
            ``weight_decay`` -- §3.3 is about γ/β only, and decaying everything else uniformly
            is what an optimizer built from ``model.parameters()`` does. Pass ``0`` for the
            "no decay on any bias" convention (Goyal et al. 2017).

    Returns a list of dicts ``{"params", "weight_decay", "name"}`` (``name`` is ``"weights"``,
    ``"norm"`` or ``"biases"``; empty groups are left out). Every parameter appears exactly
    once, shared parameters included. The decay is whatever the optimizer makes of its
    ``weight_decay`` (coupled L2 for SGD/Adam, decoupled for AdamW).

    Example::

        >>> import torch, torchvision, bnrewrite
        >>> model = bnrewrite.transform(torchvision.models.resnet18(weights=None), "ghost:size=16")
        >>> opt = torch.optim.SGD(bnrewrite.param_groups(model, 5e-4, norm_weight_decay=0), lr=0.1)
        >>> [g["name"] for g in opt.param_groups]
        ['weights', 'norm']
    """
    require_module(model, "param_groups")
    decay = _check_decay("weight_decay", weight_decay)
    norm_decay = decay if norm_weight_decay is None else _check_decay("norm_weight_decay", norm_weight_decay)
    bias_decay = decay if bias_weight_decay is None else _check_decay("bias_weight_decay", bias_weight_decay)

    seen: set[int] = set()
    norm_params = []
    # first pass: γ/β of norm layers, so a parameter shared with another layer counts as norm
    for module in model.modules():
        if not is_norm_layer(module):
            continue
        for param in module.parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                norm_params.append(param)
    weights, biases = [], []
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        is_bias = name.rpartition(".")[2] == "bias"
        (biases if is_bias and bias_decay != decay else weights).append(param)
    groups = [{"params": weights, "weight_decay": decay, "name": "weights"},
              {"params": norm_params, "weight_decay": norm_decay, "name": "norm"},
              {"params": biases, "weight_decay": bias_decay, "name": "biases"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise InputError(f"param_groups: {type(model).__name__} has no parameters")
    return groups
