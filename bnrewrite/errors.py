"""Exceptions a user can cause. Every message names the module/node at fault and what to do."""


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
