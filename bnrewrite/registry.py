"""Recipe components as data: name -> (options, pass, runtime module).

Adding a variant = one runtime module, one pass, one line here (see DESIGN.md).
"""
from __future__ import annotations

from .passes import stock
from .recipe import Variant

VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    if variant.name in VARIANTS:
        raise ValueError(f"component {variant.name!r} registered twice")
    VARIANTS[variant.name] = variant
    return variant


register(Variant("bn", stock.StockOptions, stock.keep_batchnorm, None, "norm",
                 "stock BatchNorm, the control", combines_with=frozenset()))
