"""Exceptions a user can cause. Every message names the module/node at fault and what to do."""
import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside bnrewrite (the user's call of
    ``transform``…), however deep in the package the warning is raised."""
    level, frame = 2, sys._getframe(1)  # stacklevel 1 is this function, 2 its caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


class BnRewriteError(Exception):
    """Base class of every error bnrewrite raises on purpose."""


class RecipeError(BnRewriteError, ValueError):
    """A recipe string or option that does not parse or does not make sense."""


class CaptureError(BnRewriteError):
    """torch.fx could not capture the part of the model a rewrite needs."""


class UnsupportedPatternError(BnRewriteError):
    """A BatchNorm site whose surroundings a rewrite cannot handle exactly."""


class InputError(BnRewriteError, ValueError):
    """Wrong arguments or inputs given to a bnrewrite function or a rewritten model."""


class ExportError(BnRewriteError):
    """ONNX export failed, or onnxruntime disagrees with torch."""
