"""``rot:kind=hadamard``: a fixed rotation between normalisation and nonlinearity
(extreme-normalization.txt §2.2 "Reducing dependence due to per-node normalization and
nonlinearity", Alg. 1 ``ReLU(Rotate(q ⊙ γ) + β)``, §5).

Each ExtremeNorm placed by ``two-tower`` or ``brn`` becomes a
:class:`~bnrewrite.runtime.extreme.RotatedExtremeNorm`: ``R·(γ ⊙ q) + β`` with ``R`` applied as a
1×1 convolution at every position. ``R`` is the normalised Hadamard matrix when the channel count
is a power of 2 (``kind=hadamard``, the rotation with the smallest maximum entry), otherwise --
or with ``kind=random`` -- a random orthogonal matrix fixed by ``seed`` and the layer's name.
For inference ``R`` is folded into the producer: ``K = (W ⊙ γ/√ν̄)·R`` (via ``inference_matrix``).

A ``post`` component: it runs after the norm pass of the recipe (``brn:micro=2+rot``,
``two-tower+rot``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..capture import set_submodule
from ..runtime.extreme import ExtremeNorm, RotatedExtremeNorm


@dataclass(frozen=True)
class RotOptions:
    """kind: ``hadamard`` (random orthogonal where the channel count is not a power of 2) or
    ``random``; seed: seeds the random rotations (each layer also mixes in its name)."""

    kind: Literal["hadamard", "random"] = "hadamard"
    seed: int = 0


def rewrite_rotation(module: nn.Module, sites, options: RotOptions, context=None) -> nn.Module:
    """Give every selected ExtremeNorm its fixed rotation."""
    done: set[str] = set()
    for site in sites:
        if site.functional or site.name in done:
            continue
        done.add(site.name)
        layer = module.get_submodule(site.name)
        if not isinstance(layer, ExtremeNorm):
            warnings.warn(f"rot: '{site.name}' is a {type(layer).__name__}, not an Extreme Normalization layer "
                          "(two-tower or brn left it as it was), so it gets no rotation", stacklevel=3)
            continue
        if isinstance(layer, RotatedExtremeNorm):
            continue
        set_submodule(module, site.name, RotatedExtremeNorm.from_extreme(layer, options.kind, options.seed))
    return module
