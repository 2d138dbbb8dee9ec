"""torch.fx capture of any model, giving up on as little as possible.

``torch.fx.symbolic_trace`` fails on models with data-dependent control flow. Instead of
giving up on the whole model, :class:`RegionTracer` turns the *innermost* submodule whose
``forward`` fails into a leaf (dropping the nodes its failed attempt created), finishes the
trace around it, and :func:`capture` then captures that leaf on its own, recursively. A
module whose own ``forward`` cannot be traced even with leaves stays eager, and each of its
children is captured instead. Every BatchNorm is thereby reached by some graph (or is a
direct child of an eager module, where it can still be swapped).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import fx, nn

from .errors import CaptureError
from .runtime.base import is_batchnorm


@dataclass
class Region:
    """A submodule captured on its own (or left eager) because its caller could not trace it."""

    name: str
    reason: str
    traced: bool  # False: its own forward stays eager; its children were captured instead


@dataclass
class Capture:
    root: nn.Module
    top_traced: bool
    top_error: str | None = None
    regions: list[Region] = field(default_factory=list)

    def graph_modules(self) -> Iterator[tuple[str, fx.GraphModule]]:
        """Every GraphModule in the captured model, with its qualified name ('' for the root)."""
        for name, module in self.root.named_modules(remove_duplicate=False):
            if isinstance(module, fx.GraphModule):
                yield name, module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class RegionTracer(fx.Tracer):
    """Keeps BatchNorm (stock, subclasses, runtime modules) as leaves and turns submodules
    whose forward fails to trace into leaves, recording why."""

    def __init__(self, extra_leaves: set[str] | None = None):
        super().__init__()
        self.extra_leaves: set[str] = set(extra_leaves or ())
        self.failed: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_batchnorm(m) or getattr(m, "is_bnrewrite_leaf", False):
            return True
        if module_qualified_name in self.extra_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # newest node before the attempt
        stack = dict(self.module_stack)
        calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure inside m makes m a leaf
            self.failed.setdefault(name, _first_line(exc))
            self.extra_leaves.add(name)
            self._erase_after(last)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls = calls
            return super().call_module(m, forward, args, kwargs)

    def _erase_after(self, last: fx.Node) -> None:
        doomed = []
        node = last.next
        while node is not self.graph._root:
            doomed.append(node)
            node = node.next
        for node in reversed(doomed):
            self.graph.erase_node(node)


def graph_module_keeping_state(root: nn.Module, graph: fx.Graph, class_name: str | None = None) -> fx.GraphModule:
    """``fx.GraphModule`` copies only what the graph uses; keep every submodule, parameter and
    buffer of ``root`` so ``state_dict()`` has exactly the original keys."""
    gm = fx.GraphModule(root, graph, class_name or type(root).__name__)
    for name, child in root.named_children():
        setattr(gm, name, child)
    for name, param in root.named_parameters(recurse=False):
        if name not in gm._parameters:
            gm.register_parameter(name, param)
    for name, buf in root.named_buffers(recurse=False):
        gm.register_buffer(name, buf, persistent=name not in root._non_persistent_buffers_set)
    gm.train(root.training)
    return gm


def trace_region(module: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``module`` with failing submodules as leaves; raises if its own forward fails."""
    tracer = RegionTracer()
    graph = tracer.trace(module)
    return graph_module_keeping_state(module, graph), dict(tracer.failed)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def capture(model: nn.Module, _prefix: str = "", _regions: list[Region] | None = None) -> Capture:
    """Capture ``model``: a GraphModule at the top when it traces, with every leaf region
    captured separately (recursively), and eager modules only where nothing else works."""
    regions = [] if _regions is None else _regions
    try:
        gm, failed = trace_region(model)
    except Exception as exc:  # noqa: BLE001 - the model's own forward is untraceable
        reason = _first_line(exc)
        for child_name, child in list(model.named_children()):
            if _contains_batchnorm(child) and not is_batchnorm(child):
                sub = capture(child, _join(_prefix, child_name), regions)
                setattr(model, child_name, sub.root)
        return Capture(model, False, reason, regions)
    for name, reason in failed.items():
        full = _join(_prefix, name)
        sub_module = gm.get_submodule(name)
        if not _contains_batchnorm(sub_module):
            regions.append(Region(full, reason, traced=False))
            continue
        first = len(regions)
        regions.append(Region(full, reason, traced=True))
        sub = capture(sub_module, full, regions)
        regions[first].traced = sub.top_traced
        set_submodule(gm, name, sub.root)
    return Capture(gm, True, None, regions)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _contains_batchnorm(module: nn.Module) -> bool:
    return any(is_batchnorm(m) for m in module.modules())


def require_graph(module: nn.Module, what: str) -> fx.GraphModule:
    """Whole-graph rewrites (VDN input injection, two towers) need the top level traced."""
    if isinstance(module, fx.GraphModule):
        return module
    reason = getattr(module, "_bnrewrite_capture_error", None) or "its forward could not be traced"
    raise CaptureError(
        f"'{what}' rewrites the whole graph, but the top level of {type(module).__name__} did not "
        f"trace with torch.fx ({reason}). Make the top-level forward traceable (move data-dependent "
        f"control flow into a submodule), or use a recipe that works per site.")
