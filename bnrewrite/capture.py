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

import contextlib
import copy
import inspect
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none

from .errors import CaptureError, InputError, warn_at_caller
from .errors import first_line as _first_line
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


_MODULE_STATE_KEYS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


class CapturedGraphModule(fx.GraphModule):
    """A GraphModule that keeps *all* of the original module's state and may hold a twin graph.

    ``fx.GraphModule`` copies only the attributes its graph uses, and drops the rest again on
    ``deepcopy`` and ``torch.save``; a captured model must keep every submodule, parameter
    and buffer so that ``state_dict()`` has exactly the original keys.

    ``forward`` code that reads ``self.training`` (torchvision's StochasticDepth, timm's
    DropPath, Inception's aux head) is baked into a traced graph. When the train-mode and
    eval-mode traces differ, the module holds both: its own graph for the mode it was
    captured in (``primary_training``) and ``mode_twin``, a GraphModule over the same
    submodules, which ``__call__`` uses in the other mode. Graph passes rewrite the primary
    graph; the twin shares every submodule, so module swaps reach it too.
    """

    primary_training = True

    def __call__(self, *args, **kwargs):
        for guard in self.__dict__.get("argument_guards", ()):
            guard.check(args, kwargs)
        twin = self.__dict__.get("mode_twin")
        if twin is not None and self.training != self.primary_training:
            return twin(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # the twin is not a child (it must not appear in state_dict or modules()), so .to(),
        # .double(), to_empty()... reach it only through here
        result = super()._apply(fn, recurse)
        twin = self.__dict__.get("mode_twin")
        if twin is not None:
            twin._apply(fn, recurse=False)
            self._share_state_with_twin()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._share_state_with_twin()  # load_state_dict(assign=True) replaces the tensors

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.__dict__.get("twin_shared_state", ()):
            self._share_state_with_twin()

    def _share_state_with_twin(self) -> None:
        """Point the twin's copies of the model's own parameters and buffers at the root's."""
        twin = self.__dict__.get("mode_twin")
        if twin is None:
            return
        for name in self.__dict__.get("twin_shared_state", ()):
            for key in ("_parameters", "_buffers"):
                if name in self.__dict__[key]:
                    twin.__dict__[key][name] = self.__dict__[key][name]

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        _restore_state(res, self.__dict__, lambda v: copy.deepcopy(v, memo))
        return res

    def __reduce__(self):
        reducer, args = super().__reduce__()
        return _rebuild_captured, (reducer, args, type(self).__name__)


def _restore_state(target: "CapturedGraphModule", source: dict, copier) -> None:
    for key in ("_modules", "_parameters", "_buffers"):
        for name, value in source[key].items():
            if name not in target.__dict__[key] or target.__dict__[key][name] is None:
                target.__dict__[key][name] = copier(value)
    target._non_persistent_buffers_set = set(source["_non_persistent_buffers_set"])
    for key, value in source.items():
        if key not in target.__dict__ and key not in _MODULE_STATE_KEYS and key != "_graph":
            target.__dict__[key] = copier(value)
    target.training = source.get("training", target.training)


def _rebuild_captured(reducer, args, class_name):
    plain = reducer(*args)
    res = CapturedGraphModule(plain, plain.graph, class_name)
    _restore_state(res, args[0], lambda v: v)
    return res


def graph_module_keeping_state(root: nn.Module, graph: fx.Graph, class_name: str | None = None,
                               training: bool = True) -> CapturedGraphModule:
    """A CapturedGraphModule of ``graph`` sharing every child, parameter and buffer of ``root``."""
    gm = CapturedGraphModule(root, graph, class_name or type(root).__name__)
    for name, child in root.named_children():
        setattr(gm, name, child)
    for name, param in root.named_parameters(recurse=False):
        if name not in gm._parameters:
            gm.register_parameter(name, param)
    own_buffers = dict(root.named_buffers(recurse=False))
    for name, buf in own_buffers.items():
        gm.register_buffer(name, buf, persistent=name not in root._non_persistent_buffers_set)
    for name in gm._buffers:
        if name not in own_buffers:  # fx's _tensor_constantN: plain tensors the code closes over
            gm._non_persistent_buffers_set.add(name)
    gm.primary_training = training
    gm.__dict__["original_class_name"] = root.__dict__.get("original_class_name", type(root).__name__)
    # the root's flag only: its children are shared, and a BatchNorm someone froze with .eval()
    # inside a training model must stay frozen (gm.train() would reset every child's flag)
    gm.training = root.training
    return gm


@dataclass
class ArgumentGuard:
    """A ``forward`` argument that defaults to None whose trace holds for one kind of value only.

    fx traces an argument as a Proxy, which ``arg is not None`` always finds set and
    ``isinstance(arg, torch.Tensor)`` never does, so a graph traced that way silently
    differs from the original for the other kind of call. :func:`trace_region` traces such
    arguments both ways and keeps one graph; the guard turns a call the graph does not hold
    for into an :class:`InputError` instead of a wrong result."""

    name: str
    index: int  # position in forward's signature, self excluded
    must_be_none: bool
    module: str
    reason: str

    def check(self, args: tuple, kwargs: dict) -> None:
        value = args[self.index] if self.index < len(args) else kwargs.get(self.name)
        if (value is None) == self.must_be_none:
            return
        if not self.must_be_none:
            remedy = f"Pass a value for {self.name!r}"
        elif "does not read" in self.reason:
            remedy = (f"If forward ignores {self.name!r}, call it without; if it reads it behind an isinstance() "
                      "test, torch.fx cannot capture that: rewrite the test as `is not None`")
        else:
            remedy = ("Give an example value for it (positionally) in the example_inputs of bnrewrite.transform / "
                      "fold_for_inference, so that it is traced as an input")
        raise InputError(f"{self.module}.forward was captured for calls {'without' if self.must_be_none else 'with'} "
                         f"{self.name!r} ({self.reason}); this call is {'with' if self.must_be_none else 'without'} "
                         f"it, which the traced graph does not hold for. {remedy}")


def _optional_arguments(module: nn.Module) -> dict[str, int]:
    """forward's arguments that default to None, with their positions (self excluded)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: i for i, p in enumerate(params)
            if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _structure(graph: fx.Graph) -> list:
    """The graph's computation with placeholders named by position and fx's
    ``_assert_is_none`` checks left out, so traces with and without concrete None compare."""
    names: dict[fx.Node, tuple] = {}
    body = []
    for node in graph.nodes:
        if node.op == "placeholder":
            names[node] = ("input", len(names))
        elif node.op == "call_function" and node.target is _assert_is_none:
            continue
        else:
            names[node] = ("node", len(body))
            body.append((node.op, node.target, fx.node.map_arg(node.args, names.get),
                         fx.node.map_arg(node.kwargs, names.get)))
    return body


def _without_none_checks(graph: fx.Graph, names: list[str]) -> fx.Graph:
    """Drop fx's ``_assert_is_none`` nodes (raw AssertionErrors): ArgumentGuard checks instead.
    fx renames a concrete argument's placeholder (``mask_1``); ``names`` (forward's argument
    names, in order) restores the signature, so keyword calls still work."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _assert_is_none:
            graph.erase_node(node)
    for node, name in zip([n for n in graph.nodes if n.op == "placeholder"], names):
        node.target = name
    return graph


def _mode_source(module: nn.Module, training: bool) -> nn.Module:
    """What to trace for one mode: a captured module's twin holds the other mode's graph."""
    twin = module.__dict__.get("mode_twin")
    if twin is not None and getattr(module, "primary_training", True) != training:
        return twin
    return module


@contextlib.contextmanager
def _noting_checkpoints(tracer: fx.Tracer, found: dict[str, str]):
    """While tracing, note every ``torch.utils.checkpoint.checkpoint`` call in ``found`` (qualified
    name of the module whose forward called it -> what it checkpointed). torch.fx traces through
    checkpoint: the graph runs the checkpointed ops plainly. User code holds its own reference to
    ``checkpoint``, so the internals it calls are wrapped instead (and restored afterwards)."""
    import torch.utils.checkpoint as ckpt

    def note(function) -> None:
        caller = next(reversed(tracer.module_stack), "") if tracer.module_stack else ""
        try:
            what = tracer.path_of_module(function) if isinstance(function, nn.Module) else None
        except NameError:
            what = None
        what = f"'{what}'" if what else getattr(function, "__qualname__", type(function).__name__)
        found.setdefault(caller, what)

    saved = []
    if hasattr(ckpt, "_checkpoint_impl"):  # torch >= 2.8: checkpoint's one entry point
        impl = ckpt._checkpoint_impl

        def checkpoint_impl(function, args, kwargs, **options):
            note(function)
            return function(*args, **kwargs)  # what tracing through checkpoint records anyway
        saved.append((ckpt, "_checkpoint_impl", impl, checkpoint_impl))
    else:  # older torch: the reentrant Function and the non-reentrant generator
        apply = ckpt.CheckpointFunction.apply
        saved.append((ckpt.CheckpointFunction, "apply", ckpt.CheckpointFunction.__dict__["apply"],
                      staticmethod(lambda function, *args: (note(function), apply(function, *args))[1])))
        gen = getattr(ckpt, "_checkpoint_without_reentrant_generator", None)
        if gen is not None:
            def generator(function, *args, **kwargs):
                note(function)
                return gen(function, *args, **kwargs)
            saved.append((ckpt, "_checkpoint_without_reentrant_generator", gen, generator))
    for owner, name, _, new in saved:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, old, _ in saved:
            setattr(owner, name, old)


def _warn_dropped_checkpoints(found: dict[str, str], label: str, prefix: str) -> None:
    for caller, what in found.items():
        name = _join(prefix, caller) if (prefix or caller) else ""
        where = f"'{name}' (in {label})" if name else label
        warn_at_caller(f"{where}: its forward calls torch.utils.checkpoint on {what}, which torch.fx traces "
                       "through: the rewritten graph runs that block without gradient checkpointing. The numbers "
                       "are unchanged, but the activations are kept for the backward pass (more memory). To "
                       "checkpoint again, wrap the rewritten submodule's call yourself")


def _trace_in_mode(module: nn.Module, training: bool, leaves: set[str],
                   concrete_args: dict | None = None,
                   checkpoints: dict[str, str] | None = None) -> tuple[fx.Graph, dict[str, str]]:
    source = _mode_source(module, training)
    modes = {m: m.training for m in source.modules()}
    source.train(training)
    try:
        tracer = RegionTracer(leaves)
        with _noting_checkpoints(tracer, {} if checkpoints is None else checkpoints):
            graph = tracer.trace(source, concrete_args=concrete_args)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return graph, tracer.failed


def trace_region(module: nn.Module, primary_training: bool = True,
                 given_inputs: frozenset[int] | None = None,
                 prefix: str = "") -> tuple[CapturedGraphModule, dict[str, str]]:
    """Trace ``module`` in train and eval mode with failing submodules as leaves (the same
    leaves for both); raises if its own forward fails. See :class:`CapturedGraphModule`.

    ``given_inputs``: for the model itself, the positions of forward's arguments that its
    ``example_inputs`` give values for (None for a leaf region); see
    :func:`_specialise_optional_arguments`. ``prefix``: ``module``'s qualified name in the
    model, for warnings."""
    leaves: set[str] = set()
    failed: dict[str, str] = {}
    while True:
        graphs = {}
        new = {}
        checkpoints: dict[str, str] = {}
        for training in (True, False):
            graphs[training], fails = _trace_in_mode(module, training, leaves, checkpoints=checkpoints)
            new.update(fails)
        failed.update(new)
        if set(new) <= leaves:
            break
        leaves |= set(new)
    # a checkpoint call inside a leaf region is noted when that region is captured on its own
    checkpoints = {c: w for c, w in checkpoints.items() if not any(c == l or c.startswith(l + ".") for l in leaves)}
    _warn_dropped_checkpoints(checkpoints, module.__dict__.get("original_class_name", type(module).__name__), prefix)
    graphs, guards = _specialise_optional_arguments(module, graphs, leaves, given_inputs)
    gm = graph_module_keeping_state(module, graphs[primary_training], training=primary_training)
    other = graphs[not primary_training]
    if other.python_code("self").src != graphs[primary_training].python_code("self").src:
        # the model's own tensors are one state for both graphs; fx's _tensor_constantN are per graph
        _attach_twin(gm, graph_module_keeping_state(module, other, training=not primary_training), module)
    if guards:
        gm.__dict__["argument_guards"] = guards
    return gm, failed


def _specialise_optional_arguments(module: nn.Module, graphs: dict[bool, fx.Graph], leaves: set[str],
                                   given_inputs: frozenset[int] | None) -> tuple[dict[bool, fx.Graph], list[ArgumentGuard]]:
    """Settle the forward arguments that default to None (``mask=None``), which a Proxy trace
    gets wrong for one kind of call (see :class:`ArgumentGuard`).

    Each one the caller has no example value for is traced once more as concrete None. If
    that trace fails, the argument is needed and the Proxy trace stands. If it equals the
    Proxy trace, the graph does not read it: calls must leave it None. If it differs, its
    None-ness picks a code path: the model itself keeps the None trace (its default call), a
    leaf region (called by eager code with whatever its caller passes) keeps the Proxy trace,
    and calls of the other kind are refused."""
    label = module.__dict__.get("original_class_name", type(module).__name__)
    optional = _optional_arguments(module)
    # the caller's example values were traced as inputs: calls must give them too
    guards = [ArgumentGuard(n, i, False, label, "traced from the example input given for it")
              for n, i in optional.items() if i in (given_inputs or ())]
    _warn_unread_examples(graphs, [g.index for g in guards], label)
    branching = {}
    for name, index in optional.items():
        if index in (given_inputs or ()):
            continue
        none_graphs = _trace_with_none(module, graphs, leaves, [name])
        if none_graphs is None:
            continue
        if all(_structure(none_graphs[t]) == _structure(graphs[t]) for t in graphs):
            guards.append(ArgumentGuard(name, index, True, label, "its traced graph does not read it, and torch.fx "
                                        "cannot see uses behind isinstance() tests"))
        else:
            branching[name] = index
    if not branching:
        return graphs, guards
    branches = "whether it is None picks a code path, and a trace holds one path"
    none_graphs = _trace_with_none(module, graphs, leaves, list(branching)) if given_inputs is not None else None
    if none_graphs is None:  # a leaf region, or the arguments are needed together
        return graphs, guards + [ArgumentGuard(n, i, False, label, branches) for n, i in branching.items()]
    names = list(inspect.signature(module.forward).parameters)
    return ({t: _without_none_checks(g, names) for t, g in none_graphs.items()},
            guards + [ArgumentGuard(n, i, True, label, branches) for n, i in branching.items()])


def _trace_with_none(module: nn.Module, graphs: dict[bool, fx.Graph], leaves: set[str],
                     names: list[str]) -> dict[bool, fx.Graph] | None:
    """Both modes traced with ``names`` as concrete None; None when the code needs a value."""
    traced = {}
    for training in graphs:
        try:
            traced[training], fails = _trace_in_mode(module, training, leaves, dict.fromkeys(names))
        except Exception:  # noqa: BLE001 - the code needs a value for one of them
            return None
        if not set(fails) <= leaves:
            return None
    return traced


def _warn_unread_examples(graphs: dict[bool, fx.Graph], indices: list[int], label: str) -> None:
    """An example value the traced graph never reads: forward ignores it, or reads it behind an
    isinstance() test, which a Proxy never passes. Only the user can tell which."""
    for index in indices:
        nodes = [[n for n in g.nodes if n.op == "placeholder"][index] for g in graphs.values()]
        if all(not node.users for node in nodes):
            warn_at_caller(f"{label}.forward: the traced graph does not read the example input given for "
                           f"{nodes[0].target!r}. If forward uses it behind an isinstance() test, torch.fx "
                           "cannot trace that, and the rewritten model ignores it")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at ``name`` (also in a mode twin, which shares the rest)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    twin = parent.__dict__.get("mode_twin")
    if twin is not None:
        setattr(twin, child, new)


def capture(model: nn.Module, *, training: bool = True, example_inputs: tuple | None = None, _prefix: str = "",
            _regions: list[Region] | None = None) -> Capture:
    """Capture ``model``: a GraphModule at the top when it traces, with every leaf region
    captured separately (recursively), and eager modules only where nothing else works.

    ``training`` picks the mode whose graph passes rewrite (train for ``transform``, eval
    for folding); the other mode's graph is kept as a twin when it differs.
    ``example_inputs``: the model's example inputs, if any (forward's arguments they give
    values for are traced as inputs, see :func:`_specialise_optional_arguments`)."""
    regions = [] if _regions is None else _regions
    try:
        given = frozenset(i for i, v in enumerate(example_inputs or ()) if v is not None)
        gm, failed = trace_region(model, training, None if _prefix else given, prefix=_prefix)
    except Exception as exc:  # noqa: BLE001 - the model's own forward is untraceable
        reason = _first_line(exc)
        for child_name, child in list(model.named_children()):
            if _contains_batchnorm(child) and not is_batchnorm(child):
                sub = capture(child, training=training, _prefix=_join(_prefix, child_name), _regions=regions)
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
        sub = capture(sub_module, training=training, _prefix=full, _regions=regions)
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


def keep_eval_graph(gm: nn.Module) -> bool:
    """Before a pass changes the *training* graph of ``gm`` in a way eval mode must not see
    (extra arguments to a norm, a second tower): keep the graph as it is now as the eval-mode
    twin (see :class:`CapturedGraphModule`), so ``model.eval()`` and the fold pass see the
    plain graph. A module that already holds a twin keeps it. Returns False when ``gm`` cannot
    hold a twin (not a captured module, or captured in eval mode)."""
    if not isinstance(gm, CapturedGraphModule) or not gm.primary_training:
        return False
    if gm.__dict__.get("mode_twin") is None:
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        # a copy of gm's own graph: its constants too are gm's
        _attach_twin(gm, graph_module_keeping_state(gm, graph, training=False), gm)
    return True


def _attach_twin(gm: CapturedGraphModule, twin: CapturedGraphModule, owner: nn.Module) -> None:
    """Make ``twin`` gm's mode twin, sharing ``owner``'s own parameters and buffers with it."""
    gm.__dict__["mode_twin"] = twin
    gm.__dict__["twin_shared_state"] = tuple(dict(owner.named_parameters(recurse=False))) + \
        tuple(dict(owner.named_buffers(recurse=False)))
