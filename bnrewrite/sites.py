"""Find every BatchNorm site of a captured model and its neighbours.

A *site* is one call of a normalisation: a ``call_module`` node of a BatchNorm (stock,
subclass such as timm's ``BatchNormAct2d``, lazy, sync, or a bnrewrite runtime module), a
functional ``F.batch_norm`` call, or a BatchNorm module called from eager code that could
not be captured. A BN module called twice gives two sites (``shared=True``).
"""
from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .capture import Capture
from .errors import BnRewriteError, InputError, warn_at_caller
from .runtime.base import is_batchnorm

PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish)
ACTIVATION_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu",
    F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu", F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu", F.hardswish: "hardswish",
}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu"}
BATCH_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm)


@dataclass
class Neighbour:
    name: str          # module qualified name, or the fx node name for a function
    kind: str          # e.g. 'Conv2d', 'relu'
    node: fx.Node | None = field(default=None, repr=False, compare=False)
    inplace: bool = False
    internal: bool = False  # applied inside the BN module itself (timm BatchNormAct2d)


@dataclass
class Site:
    name: str                       # module qualified name (functional: '<graph>.<node>')
    kind: str                       # class name of the module, or 'F.batch_norm'
    call_index: int = 0             # which call of a shared module
    shared: bool = False
    functional: bool = False
    graph: str | None = None        # qualified name of the GraphModule holding it; None: eager
    node: fx.Node | None = field(default=None, repr=False, compare=False)
    num_features: int | None = None
    dims: int | None = None         # 1, 2, 3 for BatchNorm1d/2d/3d
    affine: bool = True
    track_running_stats: bool = True
    producer: Neighbour | None = None
    consumer: Neighbour | None = None
    input_shape: tuple[int, ...] | None = None
    # why a variant's module could not stand in for this one (:func:`unfaithful_reason`); None: it can
    unfaithful: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "call_index": self.call_index, "shared": self.shared,
            "functional": self.functional, "graph": self.graph, "num_features": self.num_features,
            "affine": self.affine, "track_running_stats": self.track_running_stats,
            "producer": None if self.producer is None else self.producer.kind,
            "producer_name": None if self.producer is None else self.producer.name,
            "consumer": None if self.consumer is None else self.consumer.kind,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "unfaithful": self.unfaithful,
        }


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# forwards that compute stock BatchNorm (timm's norm+act layers: then their drop and act children,
# which the runtime modules apply too); a subclass overriding forward computes something else
_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_TIMM_NORM_ACT_FORWARDS = ("BatchNormAct2d.forward", "SyncBatchNormAct.forward")


def overrides_forward(module: nn.Module) -> bool:
    """A BatchNorm subclass whose ``forward`` is its own code, not stock BatchNorm's (e.g. timm's
    ``SplitBatchNorm2d``, or ``super().forward(x) * 2``): neither a variant nor a fold knows what it
    computes."""
    if not isinstance(module, _BatchNorm):
        return False
    forward = type(module).forward
    if forward in _STOCK_FORWARDS:
        return False
    return not (getattr(forward, "__module__", "") == "timm.layers.norm_act"
                and forward.__qualname__ in _TIMM_NORM_ACT_FORWARDS)


def unfaithful_reason(module: nn.Module) -> str | None:
    """Why a runtime module built by ``from_batchnorm`` would not compute what ``module`` does, or
    None. A variant takes over BatchNorm's parameters and buffers and computes the normalisation
    itself, so it would silently drop an overridden ``forward`` and a parametrization
    (``torch.nn.utils.parametrize``) of those tensors."""
    if overrides_forward(module):
        return (f"{type(module).__name__} overrides BatchNorm's forward "
                f"({type(module).forward.__module__}.{type(module).forward.__qualname__})")
    if isinstance(module, _BatchNorm) and parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return f"its {names} {'is' if len(module.parametrizations) == 1 else 'are'} parametrized (torch.nn.utils.parametrize)"
    return None


def _bn_dims(module: nn.Module) -> int | None:
    for base in type(module).__mro__:
        if base.__name__ in ("BatchNorm1d", "LazyBatchNorm1d"):
            return 1
        if base.__name__ in ("BatchNorm2d", "LazyBatchNorm2d"):
            return 2
        if base.__name__ in ("BatchNorm3d", "LazyBatchNorm3d"):
            return 3
    return getattr(module, "dims", None)


def find_producer(gm: fx.GraphModule, node: fx.Node, prefix: str) -> Neighbour | None:
    """The Conv/ConvTranspose/Linear module whose output is the BN input and nothing else's."""
    src = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    module = gm.get_submodule(src.target)
    if isinstance(module, PRODUCER_TYPES):
        return Neighbour(_join(prefix, src.target), type(module).__name__, src)
    return None


def find_consumer(gm: fx.GraphModule, node: fx.Node, prefix: str) -> Neighbour | None:
    """The activation that is the only user of the BN output (module, function or method)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if not user.args or user.args[0] is not node:
        return None
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if isinstance(module, ACTIVATION_MODULES):
            return Neighbour(_join(prefix, user.target), type(module).__name__, user,
                             inplace=bool(getattr(module, "inplace", False)))
    if user.op == "call_function" and user.target in ACTIVATION_FUNCTIONS:
        inplace = user.target in (F.relu_, torch.relu_, F.leaky_relu_) or bool(user.kwargs.get("inplace", False))
        return Neighbour(user.name, ACTIVATION_FUNCTIONS[user.target], user, inplace=inplace)
    if user.op == "call_method" and user.target in ACTIVATION_METHODS:
        return Neighbour(user.name, ACTIVATION_METHODS[user.target], user, inplace=user.target.endswith("_"))
    return None


def _internal_consumer(module: nn.Module, name: str) -> Neighbour | None:
    act = getattr(module, "act", None)
    if isinstance(act, ACTIVATION_MODULES):
        return Neighbour(f"{name}.act", type(act).__name__, None,
                         inplace=bool(getattr(act, "inplace", False)), internal=True)
    return None


def find_sites(captured: Capture, example_inputs: tuple | None = None) -> list[Site]:
    """All BatchNorm sites of ``captured``, in graph order, with producer/consumer and shapes."""
    root = captured.root
    sites: list[Site] = []
    seen_modules: set[str] = set()
    for prefix, gm in captured.graph_modules():
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if not is_batchnorm(module):
                    continue
                name = _join(prefix, node.target)
                seen_modules.add(name)
                sites.append(_module_site(module, name, prefix, node,
                                          find_producer(gm, node, prefix),
                                          find_consumer(gm, node, prefix) or _internal_consumer(module, name)))
            elif node.op == "call_function" and node.target in BATCH_NORM_FUNCTIONS:
                sites.append(Site(name=_join(prefix, node.name), kind="F.batch_norm", functional=True,
                                  graph=prefix, node=node, producer=find_producer(gm, node, prefix),
                                  consumer=find_consumer(gm, node, prefix)))
    # BatchNorm modules no graph calls: children of modules whose forward stays eager
    for name, module in root.named_modules():
        if is_batchnorm(module) and name not in seen_modules and not _inside_batchnorm(root, name):
            sites.append(_module_site(module, name, None, None, None, _internal_consumer(module, name)))
    _mark_shared(sites)
    if example_inputs is not None:
        _record_shapes(root, sites, example_inputs)
    return sites


def _inside_batchnorm(root: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(is_batchnorm(root.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


def _module_site(module, name, prefix, node, producer, consumer) -> Site:
    return Site(name=name, kind=type(module).__name__,
                graph=prefix, node=node, num_features=getattr(module, "num_features", None),
                dims=_bn_dims(module), affine=bool(getattr(module, "affine", True)),
                track_running_stats=bool(getattr(module, "track_running_stats", True)),
                producer=producer, consumer=consumer, unfaithful=unfaithful_reason(module))


def _mark_shared(sites: list[Site]) -> None:
    counts: dict[str, int] = {}
    for site in sites:
        if site.functional:
            continue
        site.call_index = counts.get(site.name, 0)
        counts[site.name] = site.call_index + 1
    for site in sites:
        if not site.functional and counts[site.name] > 1:
            site.shared = True


def _record_shapes(root: nn.Module, sites: list[Site], example_inputs: tuple) -> None:
    """Input shape of each module site, from one no-grad eval forward (no state changes)."""
    by_name: dict[str, list[Site]] = {}
    for site in sites:
        if not site.functional:
            by_name.setdefault(site.name, []).append(site)
    seen: dict[str, int] = {}
    handles = []

    def hook_for(name):
        def hook(_module, args):
            i = seen.get(name, 0)
            seen[name] = i + 1
            group = by_name[name]
            if i < len(group) and args and isinstance(args[0], torch.Tensor):
                group[i].input_shape = tuple(args[0].shape)
        return hook

    for name in by_name:
        handles.append(root.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        run_example_inputs(root, example_inputs)
    finally:
        for h in handles:
            h.remove()


def run_example_inputs(model: nn.Module, example_inputs) -> None:
    """One no-grad eval forward of ``model`` on ``example_inputs`` (train/eval modes restored).
    A model that raises on them gets an InputError saying so, not torch's raw trace from the
    depths of a traced graph."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    modes = {m: m.training for m in model.modules()}
    # a traced GraphModule prints its generated code to stderr when a call fails inside it;
    # held back, and written out only when the call succeeds (the user's own output)
    held = io.StringIO()
    try:
        model.eval()
        with torch.no_grad(), contextlib.redirect_stderr(held):
            model(*inputs)
        sys.stderr.write(held.getvalue())
    except BnRewriteError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model on the user's inputs
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"example_inputs ({shapes}) do not run through {type(model).__name__}: "
                         f"{type(exc).__name__}: {first_line[:300]} -- pass inputs the model accepts "
                         "(shape, dtype, device), or leave example_inputs out") from None
    finally:
        for m, mode in modes.items():
            m.training = mode


def producer_input(site: Site) -> fx.Node | None:
    """The graph node feeding the site's producer, when the producer is called with exactly
    that one input (what a pass needs to also read the producer's input, e.g. to take a mean
    before the conv); None for sites without a producer or with other call shapes."""
    if site.producer is None or site.producer.node is None:
        return None
    node = site.producer.node
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0]


def module_sites(sites: list[Site], component: str) -> Iterator[Site]:
    """The sites a module-replacing pass rewrites: each BatchNorm module once (a shared module
    gives several sites), skipping functional ``F.batch_norm`` calls — there is no module to
    replace — with a warning that they stay stock BatchNorm."""
    seen: set[str] = set()
    for site in sites:
        if site.functional:
            warn_at_caller(f"{component}: '{site.name}' is a functional F.batch_norm call, not a module; it stays "
                           "stock BatchNorm (make it an nn.BatchNorm module to rewrite it)")
            continue
        if site.name not in seen:
            seen.add(site.name)
            yield site
