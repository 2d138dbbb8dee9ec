"""``ghost:size=16``: Ghost BatchNorm at every selected site (four-things-bn §3.2, Eq. 4).

Each selected BatchNorm module becomes a :class:`~bnrewrite.runtime.ghost.GhostBatchNorm`
sharing its parameters and buffers, so state dicts load both ways and the model still folds.

Combinations: ``ghost`` is a normalisation (role ``norm``) and stands alone in a recipe. It
does not combine with another norm (``fs``/``bs``/``ns``/``frs``, ``cbn``, ``bgn``, ``brn``, ...:
they all decide where the statistics come from), nor with ``vdn`` (the virtual rows would
land in the first ghost batch only). Inference example weighing (§3.1) is an option of
``fold_for_inference(example_weight=α)`` and weight decay on γ/β (§3.3) is
``bnrewrite.param_groups``; both work with ``ghost``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..capture import set_submodule
from ..runtime.ghost import GhostBatchNorm
from ..runtime.base import MomentumOption, check_momentum_option, resolve_momentum
from ..sites import module_sites


@dataclass(frozen=True)
class GhostOptions:
    """size: examples per ghost batch (paper: 16 is a good medium-batch value, Fig. 3);
    momentum: running-statistics momentum; ``keep`` keeps each BatchNorm's own,
    ``cumulative`` is PyTorch's ``momentum=None`` (cumulative average)."""

    size: int = 16
    momentum: MomentumOption = "keep"

    def __post_init__(self):
        if self.size < 2:
            raise ValueError(f"size must be >= 2 (a ghost batch of one example has no batch statistics), "
                             f"got {self.size}")
        check_momentum_option(self)


def rewrite_ghost(module: nn.Module, sites, options: GhostOptions, context=None) -> nn.Module:
    """Replace every selected BatchNorm module by a GhostBatchNorm of ``options.size``."""
    for site in module_sites(sites, "ghost"):
        bn = module.get_submodule(site.name)
        ghost = GhostBatchNorm.from_batchnorm(bn, size=options.size)
        ghost.momentum = resolve_momentum(options.momentum, bn.momentum)
        ghost.site_name = site.name
        set_submodule(module, site.name, ghost)
    return module
