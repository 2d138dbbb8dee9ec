"""Exceptions a user can cause. Every message names the module/node at fault and what to do."""
import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _torch_dir() -> str:
    import torch

    return os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _inside_libraries(filename: str) -> bool:
    """bnrewrite, torch (nn.Module's call machinery) or code torch.fx generated."""
    if filename.startswith("<eval_with_key"):
        return True
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path.startswith(_torch_dir())


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside bnrewrite and torch (the user's
    call of ``transform``, or the training-loop line whose forward raised it), however deep in
    the package -- or in a model's forward -- the warning is raised."""
    level, frame = 2, sys._getframe(1)  # stacklevel 1 is this function, 2 its caller
    while frame is not None and _inside_libraries(frame.f_code.co_filename):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``: a wrapped exception, in one line of a bnrewrite error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


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


class KernelError(BnRewriteError, RuntimeError):
    """A fused Triton kernel that does not compile or launch on this device (``lower="fused"``
    on a GPU the kernels do not support, a Triton that rejects them)."""


class ExportError(BnRewriteError):
    """ONNX export failed, or onnxruntime disagrees with torch."""


def refuse_compiled_wrappers(model, function: str) -> None:
    """A ``torch.compile`` wrapper (``OptimizedModule``) anywhere in a model that ``function``
    rewrites or copies: the wrapper calls the module it was made from, not the rewritten copy, so
    the result would silently run the original model (or raise on the parts the rewrite removed).
    Rewrite the plain module and compile the result."""
    for name, module in model.named_modules():
        if "_orig_mod" not in module._modules:
            continue
        from torch._dynamo.eval_frame import OptimizedModule

        if isinstance(module, OptimizedModule):
            where = f"'{name}' is" if name else "the model is"
            inner = f"{name}._orig_mod" if name else "model._orig_mod"
            raise InputError(
                f"{function}: {where} a torch.compile wrapper, which would keep calling the module it was made "
                f"from, not the rewritten copy. Pass the plain module ({inner}, or the model before "
                f"torch.compile) and compile what {function} returns")


def refuse_hook_based_norms(model, function: str) -> None:
    """The deprecated hook-based ``torch.nn.utils.weight_norm``/``spectral_norm``: the weight they
    compute is a non-leaf tensor that ``copy.deepcopy`` refuses, so a model using them cannot be
    copied (transform copies the model unless ``inplace=True``; folding always does)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for name, module in model.named_modules():
        hook = next((h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))),
                    None)
        if hook is not None:
            kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            raise InputError(f"{function}: '{name}' ({type(module).__name__}) uses the deprecated hook-based "
                             f"torch.nn.utils.{kind}, whose computed weight cannot be copied: apply "
                             f"torch.nn.utils.parametrizations.{kind} instead")


def refuse_batchnorm_root(model, function: str) -> None:
    """A model that is itself a BatchNorm layer: a rewrite replaces BatchNorm modules *inside* a
    model, and a module cannot replace itself in the caller's variable."""
    from .runtime.base import is_batchnorm

    if is_batchnorm(model):
        raise InputError(
            f"{function}: the model is itself a {type(model).__name__} layer; bnrewrite rewrites the BatchNorm "
            "layers inside a model. Wrap it in one, e.g. nn.Sequential(layer)")


def require_module(model, function: str) -> None:
    """The check every public entry point makes first, so a wrong argument is an InputError
    naming the function rather than an AttributeError from deep inside."""
    import torch.nn

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{function} expects an nn.Module, got {type(model).__name__}")
