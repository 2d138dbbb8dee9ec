"""``ns``, ``bs``, ``fs``, ``frs``: sampled BatchNorm at every selected site (bn-sampling §4.1,
Alg. 1–2, App. C–D).

Each selected BatchNorm module becomes a :class:`~bnrewrite.runtime.sampled.SampledBatchNorm`
sharing its parameters and buffers. Draws are seeded per model (``transform(..., seed=0)``)
and per layer (a stream id from the layer's qualified name), so layers sample independently
(App. C.2) and a run is reproducible.

Options (all components): ``every`` re-draws every N training steps (0: only on
``bnrewrite.new_epoch``, the paper's once-per-epoch schedule); ``momentum`` of the running
statistics, as for every component (``keep`` the BatchNorm's own, ``cumulative`` PyTorch's
``momentum=None``, or a number; ``none`` is read as ``keep``, the meaning it had here before;
App. D found 0.3 better than 0.1 for sampled BN);
``sync`` all-reduces the sampled sums under ``torch.distributed`` (§4.3).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..capture import set_submodule
from ..runtime.base import MomentumOption as Momentum
from ..runtime.base import check_momentum_option, resolve_momentum
from ..runtime.sampled import SampledBatchNorm, SmallSampleCheck, layer_stream
from ..sites import module_sites


def _check_common(options) -> None:
    if options.every < 0:
        raise ValueError(f"every must be >= 0 (0 = re-draw only on new_epoch), got {options.every}")
    check_momentum_option(options)


def _check_ratio(ratio: float | None) -> None:
    if ratio is not None and not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], e.g. 1/32, got {ratio}")


@dataclass(frozen=True)
class RowSamplingOptions:
    """n: examples in the sample (Alg. 1, paper default 4 of 128); ratio: alternatively a fraction
    of the batch (ceil(ratio·N), at least 2); every, momentum, sync: see the module docstring."""

    n: int | None = None
    ratio: float | None = None
    every: int = 0
    momentum: Momentum = "keep"
    sync: bool = False

    def __post_init__(self):
        if self.n is not None and self.ratio is not None:
            raise ValueError("give n or ratio, not both")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        _check_ratio(self.ratio)
        _check_common(self)


@dataclass(frozen=True)
class NsOptions(RowSamplingOptions):
    pass


@dataclass(frozen=True)
class BsOptions(RowSamplingOptions):
    pass


@dataclass(frozen=True)
class FsOptions:
    """ratio: area of the patch as a fraction of the feature map (Alg. 2; paper default 1/32)."""

    ratio: float = 1.0 / 32
    every: int = 0
    momentum: Momentum = "keep"
    sync: bool = False

    def __post_init__(self):
        _check_ratio(self.ratio)
        _check_common(self)


@dataclass(frozen=True)
class FrsOptions(FsOptions):
    """ratio: fraction of all (example, position) points drawn at random (§5.1 baseline)."""


def _rewrite(module: nn.Module, sites, strategy: str, options, context) -> nn.Module:
    seed = int(context.take("seed", 0)) if context is not None else 0
    check = SmallSampleCheck(strategy)  # one warning for all sites of this rewrite
    for site in module_sites(sites, strategy):
        bn = module.get_submodule(site.name)
        kwargs = {"n": getattr(options, "n", None), "ratio": options.ratio}
        sampled = SampledBatchNorm.from_batchnorm(bn, strategy=strategy, every=options.every, seed=seed,
                                                  stream=layer_stream(site.name), sync=options.sync,
                                                  # a SyncBatchNorm's own group (None: the whole world)
                                                  process_group=getattr(bn, "process_group", None), **kwargs)
        sampled.momentum = resolve_momentum(options.momentum, sampled.momentum)
        sampled.site_name = site.name
        set_submodule(module, site.name, sampled)
        sampled.__dict__["small_sample_check"] = check
    return module


def rewrite_ns(module, sites, options: NsOptions, context=None):
    """NS: the first n examples of every batch (Alg. 1, begin = 0)."""
    return _rewrite(module, sites, "ns", options, context)


def rewrite_bs(module, sites, options: BsOptions, context=None):
    """BS: n contiguous examples at a random offset per layer (Alg. 1)."""
    return _rewrite(module, sites, "bs", options, context)


def rewrite_fs(module, sites, options: FsOptions, context=None):
    """FS: one rectangular patch per feature map, shared by channels and examples (Alg. 2)."""
    return _rewrite(module, sites, "fs", options, context)


def rewrite_frs(module, sites, options: FrsOptions, context=None):
    """FRS: fully random points over examples and positions (§5.1 baseline)."""
    return _rewrite(module, sites, "frs", options, context)
