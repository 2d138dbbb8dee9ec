"""``two-tower``: two-stage backpropagation as two towers sharing every parameter
(extreme-normalization.txt §3.2, §3.4, Alg. 1; ``stats_batch``: §5 "different minibatches for
two stages").

The training graph of the (top-level, traced) model is duplicated:

* **tower A** runs the model on the batch (or its first ``stats_batch`` examples); each selected
  BatchNorm, now an :class:`~bnrewrite.runtime.extreme.ExtremeNorm`, normalises with the
  per-example ``μ†, ν†`` (no interaction between examples), updates the moving averages and
  returns the aggregated ``μ‡ = ScaleGrad(μ̄, E_b μ_b, r_m)`` and
  ``ν‡ = ScaleGrad(ν̄, E_b ν_b, r_v·min(ν̄/E_b ν_b, f_max))``;
* **tower B** runs the model on the whole batch and normalises each site with tower A's ``μ‡, ν‡``;
  its outputs are the model's outputs, so ``loss = crit(model(x), y); loss.backward()`` gives
  ``g^W + h^W`` of §3.2: the gradient reaches the weights directly in tower B (step a) and
  through ``μ‡, ν‡`` into tower A (step b).

Both towers compute the same forward values (every normaliser's forward value is the moving
average), and they equal the inference model's output when the clip ``u_max`` is not active.
Tower A's nodes that feed nothing (its head after the last BatchNorm) are dropped.

Eval mode runs the original single-tower graph (kept as the module's eval twin), which is what
``fold_for_inference`` folds. Every selected site must be in the top-level graph.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..capture import keep_eval_graph, require_graph, set_submodule
from ..errors import CaptureError, UnsupportedPatternError
from ..runtime.extreme import ExtremeNorm, check_options, mean_before_supported
from ..sites import producer_input


@dataclass(frozen=True)
class TwoTowerOptions:
    """stats_batch: examples tower A runs on (the first k of the batch; 0 = the whole batch; the
    paper used 4 with 32); rate: EMA update rate (§5: 0.2); r_m, r_v: gradient shrinkage (1);
    f_max: cap of the second-moment gradient scaling (2); u_max: bound on the per-example
    second moment of the normalised activations (5)."""

    stats_batch: int = 0
    rate: float = 0.2
    r_m: float = 1.0
    r_v: float = 1.0
    f_max: float = 2.0
    u_max: float = 5.0

    def __post_init__(self):
        if self.stats_batch < 0:
            raise ValueError(f"stats_batch must be >= 0 (0 = the whole batch), got {self.stats_batch}")
        check_options(1, self.rate, self.r_m, self.r_v, self.f_max, self.u_max)


def first_examples(value, count: int):
    """Tower A's input when ``stats_batch=count``: the first ``count`` examples of a tensor input
    (other inputs pass through)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[:count]
    return value


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _mutates_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace", False))
                or (name.endswith("_") and not name.endswith("__")))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return False


def _drop_dead_nodes(graph: fx.Graph, gm: fx.GraphModule, candidates: set[fx.Node]) -> None:
    """Remove tower-A nodes no one reads (its head after the last norm). An in-place op goes only
    when nothing else reads the tensor it changes; impure nodes stay."""
    for node in reversed(list(graph.nodes)):
        if node not in candidates or node.users or node.op not in ("call_module", "call_function",
                                                                   "call_method", "get_attr"):
            continue
        if node.is_impure() and not _mutates_input(gm, node):
            continue
        if _mutates_input(gm, node):
            target = node.args[0] if node.args else None
            if not isinstance(target, fx.Node) or len(target.users) != 1:
                continue
        graph.erase_node(node)


def rewrite_two_tower(module: nn.Module, sites, options: TwoTowerOptions, context=None) -> nn.Module:
    """Swap each selected BatchNorm for an ExtremeNorm and rebuild the top-level training graph as
    tower A (statistics) + tower B (outputs)."""
    if not isinstance(module, fx.GraphModule) and context is not None and context.captured.top_error:
        object.__setattr__(module, "_bnrewrite_capture_error", context.captured.top_error)
    gm = require_graph(module, "two-tower")
    settings = dict(mode="two-tower", micro=1, rate=options.rate, r_m=options.r_m, r_v=options.r_v,
                    f_max=options.f_max, u_max=options.u_max)
    by_node: dict[fx.Node, fx.Node | None] = {}  # bn node -> producer input node (None: mean after)
    done: set[str] = set()
    for site in sites:
        if site.functional:
            warnings.warn(f"two-tower: '{site.name}' is a functional F.batch_norm call, not a module; it stays "
                          "stock BatchNorm and normalises each tower with that tower's batch", stacklevel=3)
            continue
        if not site.track_running_stats:
            warnings.warn(f"two-tower: '{site.name}' has track_running_stats=False, so no moving averages to "
                          "normalise with; it stays stock BatchNorm in both towers", stacklevel=3)
            continue
        if site.graph != "":
            where = "eager code torch.fx could not trace" if site.graph is None else f"leaf region '{site.graph}'"
            raise UnsupportedPatternError(
                f"two-tower: BatchNorm '{site.name}' is called from {where}, not from the top-level graph, so "
                f"its two towers cannot be told apart. Exclude it (exclude=['{site.name}']), make that code "
                "traceable, or use brn, which works per site")
        conv_input = None if site.shared else producer_input(site)
        if site.name not in done:
            done.add(site.name)
            layer = ExtremeNorm.from_batchnorm(module.get_submodule(site.name), **settings)
            layer.site_name = site.name
            if conv_input is not None and mean_before_supported(
                    module.get_submodule(site.producer.name), site.input_shape)[0]:
                layer.attach_producer(module.get_submodule(site.producer.name), site.producer.name)
            set_submodule(module, site.name, layer)
        layer = module.get_submodule(site.name)
        by_node[site.node] = conv_input if layer.mean_before_conv else None
    if not by_node:
        return module
    if not keep_eval_graph(gm):
        raise CaptureError("two-tower: the top-level graph was not captured in training mode, so the "
                           "towers cannot be kept out of eval mode; call bnrewrite.transform on the model")
    gm.graph = _two_towers(gm, by_node, options.stats_batch)
    gm.graph.lint()
    gm.recompile()
    return module


def _two_towers(gm: fx.GraphModule, by_node: dict, stats_batch: int) -> fx.Graph:
    old = gm.graph
    new = fx.Graph(owning_module=gm)
    env_a: dict[fx.Node, fx.Node] = {}
    env_b: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in old.nodes if n.op == "placeholder"]
    for ph in placeholders:
        env_b[ph] = env_a[ph] = new.node_copy(ph, lambda n: env_b[n])
    tower_a: set[fx.Node] = set()
    if stats_batch:
        for ph in placeholders:
            env_a[ph] = new.call_function(first_examples, (env_b[ph], stats_batch))
            tower_a.add(env_a[ph])
    body = [n for n in old.nodes if n.op not in ("placeholder", "output")]
    moments: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for node in body:  # tower A
        if node in by_node:
            conv_input = by_node[node]
            call = new.call_module(node.target, (env_a[node.args[0]], env_a[conv_input] if conv_input else None),
                                   {"first_tower": True})
            outputs = [new.call_function(operator.getitem, (call, i)) for i in range(3)]
            env_a[node] = outputs[0]
            moments[node] = (outputs[1], outputs[2])
            tower_a.update([call, *outputs])
        else:
            env_a[node] = new.node_copy(node, lambda n: env_a[n])
            tower_a.add(env_a[node])
    for node in body:  # tower B
        if node in by_node:
            conv_input = by_node[node]
            env_b[node] = new.call_module(
                node.target, (env_b[node.args[0]], env_b[conv_input] if conv_input else None, moments[node]))
        else:
            env_b[node] = new.node_copy(node, lambda n: env_b[n])
    new.node_copy(next(n for n in old.nodes if n.op == "output"), lambda n: env_b[n])
    _drop_dead_nodes(new, gm, tower_a)
    return new
