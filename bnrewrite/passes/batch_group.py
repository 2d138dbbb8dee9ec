"""``bgn:groups=32,examples=2``: Batch-Group Norm at every selected site (four-things-bn §3.4).

Each selected BatchNorm module becomes a :class:`~bnrewrite.runtime.batch_group.BatchGroupNorm`
sharing its parameters and buffers. ``groups`` is the number of channel groups (Group Norm's
hyperparameter; a layer whose channel count it does not divide uses the largest divisor of
the channel count below it, see ``bnrewrite inspect``); ``examples`` the number of
consecutive examples pooled per group. The paper targets batch sizes 1-4 (§3.4: with larger
batches Batch or Ghost BN is the better choice), with ``examples=2``.

Combinations: like ``ghost``, ``bgn`` is a normalisation that stands alone in a recipe
(no other norm, no ``vdn``); inference example weighing and γ/β weight decay work with it
through ``fold_for_inference`` and ``bnrewrite.param_groups``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..capture import set_submodule
from ..runtime.batch_group import BatchGroupNorm
from ..runtime.base import MomentumOption, check_momentum_option, resolve_momentum
from ..sites import module_sites


@dataclass(frozen=True)
class BatchGroupOptions:
    """groups: channel groups per layer (Group Norm's default 32); examples: examples per group
    (the paper's setting for batch 2 is 2); momentum as for ``ghost``."""

    groups: int = 32
    examples: int = 2
    momentum: MomentumOption = "keep"

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.examples < 1:
            raise ValueError(f"examples must be >= 1, got {self.examples}")
        check_momentum_option(self)


def rewrite_batch_group(module: nn.Module, sites, options: BatchGroupOptions, context=None) -> nn.Module:
    """Replace every selected BatchNorm module by a BatchGroupNorm."""
    for site in module_sites(sites, "bgn"):
        bn = module.get_submodule(site.name)
        bgn = BatchGroupNorm.from_batchnorm(bn, groups=options.groups, examples=options.examples)
        bgn.momentum = resolve_momentum(options.momentum, bn.momentum)
        bgn.site_name = site.name
        set_submodule(module, site.name, bgn)
    return module
