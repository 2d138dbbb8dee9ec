"""``brn:micro=2``: improved batch renormalization over micro-batches (extreme-normalization.txt
§5 "Improving batch renormalization", §3.1, Alg. 1 with one tower).

Every selected BatchNorm becomes an :class:`~bnrewrite.runtime.extreme.ExtremeNorm` that
normalises with the moving averages in the forward pass and takes the gradient through
``μ‡ = ScaleGrad(μ̄, E_b μ_b, r_m)`` and ``ν‡ = ScaleGrad(ν̄, E_b ν_b, r_v·min(ν̄/E_b ν_b, f_max))``,
the expectations ``E_b`` taken over micro-batches of ``micro`` consecutive examples. ``micro=1``
is the paper's "single examples" mode: no interaction between examples at all, the parameter
gradient is the plain average of per-example gradients.

Where the BatchNorm follows a Conv1d/2d/3d or Linear (its only user), the mean is taken before
it (§3.3): the pass passes the producer's input to the layer as a second argument in the
*training* graph; the eval graph keeps the plain ``bn(conv(x))`` call (kept as the module's eval
twin), which is what ``fold_for_inference`` folds.

Combines with ``rot`` (the Hadamard/random rotation of §2.2; the paper's best small-batch
setting is ``brn:micro=2+rot`` with ``r_m=r_v=0.5``, and ``brn:micro=1+rot`` with
``r_m=0, r_v=0.8``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from ..capture import keep_eval_graph, set_submodule
from ..runtime.extreme import ExtremeNorm, check_options, mean_before_supported
from ..sites import module_sites, producer_input


@dataclass(frozen=True)
class BrnOptions:
    """micro: examples per micro-batch that share ``μ‡, ν‡`` (paper: 2 or 4; 1 = per-example);
    rate: EMA update rate (§5: 0.2); r_m, r_v: gradient shrinkage through the means and second
    moments (§2.2; paper default 1); f_max: cap of the second-moment gradient scaling (2);
    u_max: bound on the per-example second moment of the normalised activations (5)."""

    micro: int = 2
    rate: float = 0.2
    r_m: float = 1.0
    r_v: float = 1.0
    f_max: float = 2.0
    u_max: float = 5.0

    def __post_init__(self):
        check_options(self.micro, self.rate, self.r_m, self.r_v, self.f_max, self.u_max)


def rewrite_brn(module: nn.Module, sites, options: BrnOptions, context=None) -> nn.Module:
    """Replace each selected BatchNorm by an ExtremeNorm in ``brn`` mode and wire the producer's
    input into its training-graph call."""
    settings = dict(mode="brn", micro=options.micro, rate=options.rate, r_m=options.r_m, r_v=options.r_v,
                    f_max=options.f_max, u_max=options.u_max)
    rewire: dict[str, list] = {}  # graph name -> [(bn node, producer input node)]
    for site in module_sites(sites, "brn"):
        if not site.track_running_stats:
            warnings.warn(f"brn: '{site.name}' has track_running_stats=False, so no moving averages to "
                          "normalise with; it stays stock BatchNorm", stacklevel=3)
            continue
        if options.micro == 1 and options.r_m > 0 and site.input_shape is not None and len(site.input_shape) == 2:
            warnings.warn(f"brn:micro=1: '{site.name}' normalises (N, C) inputs, where an example's mean is the "
                          f"value itself; with r_m={options.r_m} the gradient through the mean cancels the "
                          "gradient to the input (only r_m=0, as the paper's best per-example setting "
                          "r_m=0,r_v=0.8, passes the full gradient)", stacklevel=3)
        layer = ExtremeNorm.from_batchnorm(module.get_submodule(site.name), **settings)
        layer.site_name = site.name
        conv_input = None if site.shared or site.graph is None else producer_input(site)
        if conv_input is not None:
            producer = module.get_submodule(site.producer.name)
            ok, _why = mean_before_supported(producer, site.input_shape)
            gm = module.get_submodule(site.graph) if site.graph else module
            if ok and keep_eval_graph(gm):
                layer.attach_producer(producer, site.producer.name)
                rewire.setdefault(site.graph, []).append((site.node, conv_input))
        set_submodule(module, site.name, layer)
    for graph_name, pairs in rewire.items():
        gm = module.get_submodule(graph_name) if graph_name else module
        for node, conv_input in pairs:
            node.args = (node.args[0], conv_input)
        gm.graph.lint()
        gm.recompile()
    return module
