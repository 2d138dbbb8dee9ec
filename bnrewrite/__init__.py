"""bnrewrite: torch.fx passes that rewrite BatchNorm into the variants from recent papers,
then fold everything back into plain convolutions for inference.

Public API (imported lazily so ``bnrewrite --help`` stays fast)::

    model = bnrewrite.transform(model, recipe="fs+vdn")
    inf = bnrewrite.fold_for_inference(model)
    bnrewrite.export_onnx(inf, (x,), "model.onnx")
"""
from __future__ import annotations

import importlib

from .errors import (BnRewriteError, CaptureError, ExportError, InputError, KernelError, RecipeError,
                     UnsupportedPatternError)

__version__ = "0.1.0"

_LAZY = {
    "transform": ("bnrewrite.api", "transform"),
    "inspect_sites": ("bnrewrite.api", "inspect_sites"),
    "stock_state_dict": ("bnrewrite.api", "stock_state_dict"),
    "Recipe": ("bnrewrite.recipe", "Recipe"),
    "Variant": ("bnrewrite.recipe", "Variant"),
    "register_variant": ("bnrewrite.registry", "register"),
    "parse_recipe": ("bnrewrite.recipe", "parse_recipe"),
    "new_epoch": ("bnrewrite.schedule", "new_epoch"),
    "fold_for_inference": ("bnrewrite.passes.fold", "fold_for_inference"),
    "export_onnx": ("bnrewrite.export", "export_onnx"),
    "dataset_stats": ("bnrewrite.runtime.sampled", "dataset_stats"),
    "param_groups": ("bnrewrite.optim", "param_groups"),
    "tune_example_weight": ("bnrewrite.tuning", "tune_example_weight"),
    "reset_history": ("bnrewrite.schedule", "reset_history"),
    "drop_running_stats_": ("bnrewrite.schedule", "drop_running_stats_"),
    "warm_up_statistics": ("bnrewrite.schedule", "warm_up_statistics"),
    "update_bn": ("bnrewrite.schedule", "update_bn"),
}

__all__ = sorted(list(_LAZY) + ["BnRewriteError", "CaptureError", "ExportError", "InputError", "KernelError",
                                 "RecipeError", "UnsupportedPatternError"])


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnrewrite' has no attribute {name!r}")
