"""Launch a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` binds every argument to the kernel's signature, computes its
specialisation (dtype and 16-byte alignment of each pointer, ``== 1`` / ``% 16`` of each int),
hashes that into a cache key and looks the compiled kernel up, then calls the compiled
kernel's C launcher. On the CPU of the benchmarks that Python is ≈13 µs per launch
(``benchmarks/kernel_overhead.py --host-only --triton-launcher``), as much as all of this
package's own Python for a lowered BN+ReLU step, and small layers are bound by the host.

A layer repeats the same launch (the cached plans of :mod:`._triton`) step after step with
new tensors of the same dtypes. :func:`launch` goes through Triton's path on the first call
of each ``(kernel, launch plan, specialisation of the varying arguments)`` and keeps the
compiled kernel Triton returns; later calls build the same argument list Triton's binder would
(positional arguments, then the constexprs in signature order) and call the C launcher
directly with the current stream and Triton's launch hooks, as ``JITFunction.run`` does
(with no hook installed, None for the hooks and their launch metadata: nothing is called either way).

Off in Triton's interpreter (nothing is compiled there), with ``BNREWRITE_DIRECT_LAUNCH=0``,
and when this Triton's compiled kernels lack the launcher attributes used here; a launcher
that rejects the argument list (a Triton whose launcher signature differs) turns it off for
the process with a warning, and that launch goes through Triton's path.

A launch through Triton's path that raises a Triton error (a kernel that does not compile for
this GPU, or needs more of it than it has) is a :class:`~bnrewrite.errors.KernelError` naming the
kernel, the device and the input, and saying how to train without the kernels.
"""
from __future__ import annotations

import os
import warnings

import torch
from triton.errors import TritonError
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from ...errors import KernelError, first_line

try:
    from triton import knobs  # triton >= 3.4: where the launch hooks live
except ImportError:  # an older triton: its launch path differs, launch through it
    knobs = None
_HookChain = getattr(knobs, "HookChain", ())  # where this triton keeps the launch hooks in chains

_ENABLED = os.environ.get("BNREWRITE_DIRECT_LAUNCH", "1") != "0" and knobs is not None
_CACHE_LIMIT = 4096
# (id(kernel), id(plan launch), device, extra meta, signature of the head)
#   -> (plan launch, kernel, compiled kernel, constexprs, 3-d grid)
_compiled: dict = {}


def enabled() -> bool:
    return _ENABLED


def disable(reason: str) -> None:
    global _ENABLED
    if _ENABLED:
        warnings.warn(f"bnrewrite: direct Triton launches turned off ({reason}); kernels launch through "
                      "Triton's own path", RuntimeWarning, stacklevel=3)
    _ENABLED = False
    _compiled.clear()


def _no_hook(hook) -> bool:
    """Whether calling ``hook`` does nothing: None, or a hook chain holding no hooks."""
    return hook is None or (isinstance(hook, _HookChain) and not hook.calls)


def _signature(head: tuple) -> tuple:
    """At least as fine as Triton's specialisation of the varying arguments (dtype and 16-byte
    alignment of each tensor, ``== 1`` / ``% 16`` / width of each int): calls that agree on it
    get the same compiled kernel from Triton. Ints enter by value (a layer's are few: C, the
    split count, a CBN window length), which is finer and cheaper than classifying them."""
    return tuple([(v.dtype, v.data_ptr() & 15) if isinstance(v, torch.Tensor) else v for v in head])


def _constexprs(kernel, n_positional: int, meta: dict) -> tuple:
    """The values Triton's binder gives the parameters after the positional ones."""
    values = []
    for param in kernel.params[n_positional:]:
        if param.name in meta:
            values.append(meta[param.name])
        elif param.has_default:
            values.append(param.default)
        else:
            raise TypeError(f"{kernel.__name__}: no value for parameter {param.name}")
    return tuple(values)


def launch(kernel, plan_launch, head: tuple, tail: tuple = (), **extra) -> None:
    """``kernel[plan_launch.grid](*head, *plan_launch.args, *tail, **plan_launch.meta, **extra)``.

    ``plan_launch`` is a cached plan's launch (same object step after step: its arguments are
    part of the key by identity); ``head`` holds the tensors and ints that vary per call, ``tail``
    the floats (which Triton does not specialise on)."""
    if not _ENABLED or not isinstance(kernel, JITFunction):  # InterpretedFunction: nothing compiled
        triton_launch(kernel, plan_launch.grid, (*head, *plan_launch.args, *tail), {**plan_launch.meta, **extra})
        return
    active = driver.active
    device = active.get_current_device()
    # ids, not the objects: hashing a JITFunction computes its cache key; the entry holds both
    # objects and is used only when they are the ones of this call
    key = (id(kernel), id(plan_launch), device, *extra.values(), *_signature(head))
    hit = _compiled.get(key)
    if hit is None or hit[0] is not plan_launch or hit[1] is not kernel:
        _compile_and_launch(kernel, plan_launch, head, tail, extra, key)
        return
    _, _, compiled, constexprs, (g0, g1, g2) = hit
    args = (*head, *plan_launch.args, *tail, *constexprs)
    stream = active.get_current_stream(device)
    enter_hook, exit_hook = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if _no_hook(enter_hook) and _no_hook(exit_hook):
        # Triton passes its (empty) hook chains and builds launch metadata for them every launch;
        # the C launcher skips a None hook, which is what an empty chain does when called
        metadata = enter_hook = exit_hook = None
    else:  # a hook is installed (e.g. Triton's profiler): what Triton passes
        metadata = compiled.launch_metadata(plan_launch.grid, stream, *args)
    try:
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, metadata, enter_hook,
                     exit_hook, *args)
    except TypeError as err:  # the launcher parses its arguments before it launches anything
        disable(f"the C launcher rejected the argument list: {err}")
        triton_launch(kernel, plan_launch.grid, (*head, *plan_launch.args, *tail), {**plan_launch.meta, **extra})


def triton_launch(kernel, grid, args: tuple, meta: dict):
    """``kernel[grid](*args, **meta)`` (Triton's own path: it compiles on a first call), a Triton
    error raised there as a :class:`~bnrewrite.errors.KernelError`."""
    try:
        return kernel[grid](*args, **meta)
    except TritonError as err:
        raise KernelError(_failure_message(kernel, args, err)) from err


def _failure_message(kernel, args: tuple, err: Exception) -> str:
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if not isinstance(kernel, JITFunction):
        where = "Triton's CPU interpreter"
    elif torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        where = f"{torch.cuda.get_device_name(index)} (cuda:{index}, sm_{major}{minor})"
    else:
        where = "this device"
    shape = f" for an input of shape {tuple(x.shape)}, {x.dtype}" if x is not None else ""
    return (f"Triton kernel {getattr(kernel, '__name__', kernel)} failed on {where}{shape}: {_reason(err)}. "
            "Transform the model with lower='reference' to train it without the fused kernels")


def _reason(err: Exception) -> str:
    """What went wrong, in one line: Triton wraps an error raised in a ``@triton.jit`` function the
    kernel calls in one CompilationError per call level, each a source excerpt, so the innermost
    error says it."""
    while err.__cause__ is not None:
        err = err.__cause__
    message = getattr(err, "error_message", None)  # a CompilationError's own, below its source excerpt
    return first_line(err) if not message else f"{type(err).__name__}: {message.strip().splitlines()[0]}"


def _compile_and_launch(kernel, plan_launch, head, tail, extra, key) -> None:
    """The first call of a key: Triton's own path, which compiles if needed and returns the kernel."""
    if not all(type(v) is float for v in tail):
        raise TypeError(f"{kernel.__name__}: the tail of a cached launch holds floats only, got "
                        f"{[type(v).__name__ for v in tail]}")
    meta = {**plan_launch.meta, **extra}
    compiled = triton_launch(kernel, plan_launch.grid, (*head, *plan_launch.args, *tail), meta)
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
        disable(f"triton's compiled kernels have no C launcher attributes ({type(compiled).__name__})")
        return
    try:
        constexprs = _constexprs(kernel, len(head) + len(plan_launch.args) + len(tail), meta)
    except Exception as err:  # noqa: BLE001 - this triton's signature objects differ: keep its own path
        disable(f"cannot read {kernel.__name__}'s signature from this triton: {type(err).__name__}: {err}")
        return
    if len(_compiled) >= _CACHE_LIMIT:
        _compiled.clear()
    grid = (*plan_launch.grid, 1, 1)[:3]
    _compiled[key] = (plan_launch, kernel, compiled, constexprs, grid)
