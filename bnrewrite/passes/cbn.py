"""``cbn`` and ``naive-cbn``: Cross-Iteration BatchNorm (cross-iteration-bn.txt §3, Alg. 1, App. B).

For every selected BatchNorm site the pass swaps in a
:class:`~bnrewrite.runtime.cross_iteration.CrossIterationBatchNorm` that shares the BN's
parameters and buffers. When the site has a Conv1d/2d/3d or Linear producer (whose only user
is this BN), the module keeps a *reference* to the producer (its weights θ^l of Eqs. 7–8) and
the graph call ``bn(conv(u))`` becomes ``bn(conv(u), u)``: the module needs the producer's
input u for the closed-form ∂μ/∂θ, ∂ν/∂θ of App. B. Nothing else in the graph changes, so the
conv stays where it was and folding/export see an ordinary producer → norm pair.

Sites the compensation cannot handle are never an error; they run ``naive-cbn`` (the window
without Taylor terms) with a note shown by ``bnrewrite inspect`` and one warning:
no producer (BN after an add or a concat, an eager region), a ConvTranspose producer (its
closed form is not implemented), a Linear producing more than 2-D output (channel dim 1 is
then not the Linear's output features). A BatchNorm module called more than once per forward
keeps k = 1 (stock BatchNorm): one history would mix the calls. Functional ``F.batch_norm``
calls have no module to hold history and are left unchanged.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from torch import fx, nn

from ..capture import set_submodule
from ..runtime.base import MomentumOption, check_momentum_option, resolve_momentum
from ..runtime.cross_iteration import COMPENSABLE_TYPES, CrossIterationBatchNorm, warn_uncompensated


def _check_common(options) -> None:
    if options.k != "auto" and options.k < 1:
        raise ValueError(f"k must be a positive int or 'auto', got {options.k}")
    if options.burnin < 0:
        raise ValueError(f"burnin must be >= 0 steps, got {options.burnin}")
    check_momentum_option(options)


@dataclass(frozen=True)
class CbnOptions:
    """Options of ``cbn`` (paper defaults).

    k: temporal window; ``auto`` = min(ceil(16 / batch), 8) from the first training batch (§4.3).
    burnin: training steps with k = 1, i.e. stock BN, while weights change fast (§3.3).
    order: Taylor order; only 1 (the paper found order 2 no better, Table 9).
    momentum: EMA factor of the running statistics (fed with the window statistics);
        ``keep`` = each BatchNorm's own momentum, ``cumulative`` = PyTorch's ``momentum=None``.
    grad_stride: 1 (default) computes ∂ν/∂θ exactly (App. B: one extra weight-gradient
        convolution per site and step, the bulk of CBN's cost). s > 1 is an approximation that
        is not in the paper: ∂ν/∂θ is averaged over every s-th output position per spatial dim
        (every s-th row for a Linear), dividing that convolution's cost by s² for 2-d maps. It
        only touches the first-order Taylor term, so an iteration's own ν stays exact. Applies
        to sites that store gradients.
    store: what each site's history keeps for Eqs. 7–8. ``gradients``: App. B's ∂μ/∂θ, ∂ν/∂θ
        (|θ| numbers per iteration, one weight-gradient convolution per step). ``inputs``: the
        producer's input and output (|u| + |x| per iteration); the Taylor terms are then the
        same directional derivatives evaluated with one producer call over the stored inputs
        per step (not how the paper computes them; same values). ``auto`` (default): per site,
        whichever a cost model says is cheaper, decided at the first training step.
    backward: ``window`` (default, §3.3): the gradient flows through the current batch's 1/k
        share of the window statistics; the stored iterations get none. ``renorm`` is *not* in
        the CBN paper: Batch Renormalization's backward (extreme-normalization.txt §2, Ioffe
        2017) — same forward, but the current batch's own statistics carry the gradient in
        full, as in stock BN. At small batches and k ≥ 4 the paper's 1/k share removes only
        1/k of the per-channel shift and scale from the gradient, which slows training.
    """

    k: int | Literal["auto"] = "auto"
    burnin: int = 0
    order: int = 1
    momentum: MomentumOption = "keep"
    grad_stride: int = 1
    store: Literal["auto", "gradients", "inputs"] = "auto"
    backward: Literal["window", "renorm"] = "window"

    def __post_init__(self):
        _check_common(self)
        if self.grad_stride < 1:
            raise ValueError(f"grad_stride must be an int >= 1, got {self.grad_stride}")
        if self.order != 1:
            raise ValueError(f"order={self.order} is not supported: only first-order compensation "
                             "(order=1) is implemented (the paper's default; order 2 was no better, Table 9)")


@dataclass(frozen=True)
class NaiveCbnOptions:
    """Options of ``naive-cbn``: the CBN window without compensation (the paper's baseline, §4.3).
    ``k``, ``burnin``, ``momentum`` and ``backward`` as for :class:`CbnOptions`."""

    k: int | Literal["auto"] = "auto"
    burnin: int = 0
    momentum: MomentumOption = "keep"
    backward: Literal["window", "renorm"] = "window"

    def __post_init__(self):
        _check_common(self)


def _graph_of(root: nn.Module, site) -> fx.GraphModule | None:
    if site.graph is None:
        return None
    gm = root.get_submodule(site.graph) if site.graph else root
    return gm if isinstance(gm, fx.GraphModule) else None


def _why_not_compensated(root: nn.Module, site) -> str | None:
    if site.graph is None:
        return "called from eager code (not in a traced graph), so its producer is unknown; runs naive-cbn"
    if site.producer is None:
        return ("no Conv/Linear producer whose only user is this BatchNorm (e.g. BN after an add or "
                "concat); runs naive-cbn (window without Taylor compensation)")
    producer = root.get_submodule(site.producer.name)
    if not isinstance(producer, COMPENSABLE_TYPES):
        return (f"producer {site.producer.name} is {type(producer).__name__}; the closed-form gradients "
                "(App. B) are implemented for Conv1d/2d/3d and Linear; runs naive-cbn")
    if isinstance(producer, nn.Linear) and site.input_shape is not None and len(site.input_shape) != 2:
        return (f"producer {site.producer.name} is a Linear with {len(site.input_shape)}-D output; its "
                "features are not the BatchNorm channels; runs naive-cbn")
    node = site.node
    if node is None or len(node.args) != 1 or node.kwargs or site.producer.node is None:
        return "the BatchNorm call has an unexpected signature; runs naive-cbn"
    prod = site.producer.node
    if not (prod.args and isinstance(prod.args[0], fx.Node)) or len(prod.args) != 1 or prod.kwargs:
        return f"producer {site.producer.name} is called with an unexpected signature; runs naive-cbn"
    return None


def _rewrite(module: nn.Module, sites, options, compensate: bool) -> nn.Module:
    by_name: dict[str, list] = {}
    for site in sites:
        by_name.setdefault(site.name, []).append(site)
    notes: dict[str, str] = {}
    touched: set[fx.GraphModule] = set()
    for name, group in by_name.items():
        site = group[0]
        if site.functional:
            notes[name] = "functional F.batch_norm call: no module to hold the history; left as stock BN"
            continue
        bn = module.get_submodule(name)
        window, note, producer_site = options.k, None, None
        if len(group) > 1:
            window = 1
            note = (f"module called {len(group)} times per forward: one history would mix the calls, "
                    "so it keeps k=1 (stock BatchNorm)")
        elif compensate:
            note = _why_not_compensated(module, site)
            producer_site = site if note is None else None
        new = CrossIterationBatchNorm.from_batchnorm(
            bn, window=window, burnin=options.burnin, compensate=compensate, note=note,
            grad_stride=getattr(options, "grad_stride", 1), store=getattr(options, "store", "auto"),
            backward=options.backward)
        new.momentum = resolve_momentum(options.momentum, bn.momentum)
        new.site_name = name
        if producer_site is not None:
            new.attach_producer(module.get_submodule(site.producer.name), site.producer.name)
            gm = _graph_of(module, site)
            site.node.args = (site.node.args[0], site.producer.node.args[0])
            touched.add(gm)
        else:
            new.compensate = False
        if note is not None:
            notes[name] = note
        set_submodule(module, name, new)
    for gm in touched:
        gm.recompile()
    if compensate:
        warn_uncompensated(notes)
    elif notes:
        warnings.warn("naive-cbn: " + "; ".join(f"{k}: {v}" for k, v in notes.items()), stacklevel=2)
    return module


def rewrite_cbn(module: nn.Module, sites, options: CbnOptions, context=None) -> nn.Module:
    """Replace each site by compensated Cross-Iteration BN (Alg. 1); see the module docstring."""
    return _rewrite(module, sites, options, compensate=True)


def rewrite_naive_cbn(module: nn.Module, sites, options: NaiveCbnOptions, context=None) -> nn.Module:
    """Replace each site by the uncompensated window (Naive CBN, §4.3)."""
    return _rewrite(module, sites, options, compensate=False)
