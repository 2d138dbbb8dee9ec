"""``vdn:n=1,beta=0.5``: Virtual Dataset Normalization (bn-sampling §4.2, Alg. 3, Eq. 4).

Whole-graph rewrite of the top-level graph:

1. right after the input placeholder, a :class:`~bnrewrite.runtime.sampled.VirtualRowsInput`
   prepends ``n`` virtual samples ~ N(mean, std) per input channel (``data_stats``) to the batch
   — in training mode only, decided at run time;
2. every selected BatchNorm takes its statistics from the virtual rows: alone (``vdn``) or mixed
   with the recipe's sampler by Eq. 4 (``fs+vdn``: X = β·X_virtual + (1−β)·X_sampled);
3. each output leaf goes through a :class:`~bnrewrite.runtime.sampled.VirtualRowsOutput` that
   slices the virtual rows off whatever structure it is (tensor, tuple, dict, namedtuple).

BatchNorm modules that were *not* selected (``exclude=``) would otherwise see the virtual rows:
they become ``SampledBatchNorm(strategy="full")``, whose training statistics are exactly those of
the real rows, i.e. stock BatchNorm on the real batch. Eval mode changes nothing.

Needs ``transform(..., data_stats=bnrewrite.dataset_stats(train_data))``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from torch import fx, nn

from ..capture import require_graph, set_submodule
from ..errors import CaptureError, InputError
from ..runtime.base import is_stock_batchnorm
from ..runtime.sampled import (DatasetStats, SampledBatchNorm, VirtualRowsInput, VirtualRowsOutput,
                               layer_stream)

INPUT_NAME = "bnrewrite_vdn_input"
OUTPUT_NAME = "bnrewrite_vdn_output"


@dataclass(frozen=True)
class VdnOptions:
    """n: virtual samples per training step (paper: 1 of 128, 0.8%); beta: weight of the virtual
    statistics when combined with a sampler (Eq. 4; the paper uses 0.5). ``vdn`` alone takes
    the statistics from the virtual rows only (β = 1)."""

    n: int = 1
    beta: float = 0.5

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1 virtual sample, got {self.n}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


def _input_placeholder(gm: fx.GraphModule) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise CaptureError(f"vdn: the graph of {type(gm).__name__} has no input placeholder to add virtual rows to")
    # Alg. 3 prepends virtual samples to the one input batch; rows for a second input (a
    # mask, another image) are not defined, and the batch sizes would not line up
    others = [str(n.target) for n in placeholders[1:] if n.users]
    if others:
        raise InputError(f"vdn: {type(gm).__name__}.forward takes other inputs besides {placeholders[0].target!r} "
                         f"({', '.join(others)}), and virtual rows (Alg. 3) are defined for one input batch only. "
                         "Use the recipe without vdn, or give vdn a model whose forward takes one input")
    return placeholders[0]


def check_keywords(options: dict) -> None:
    """``data_stats`` is given and valid (finite mean, finite non-negative std)."""
    if options.get("data_stats") is None:
        raise InputError("vdn needs the per-channel mean and std of the training inputs: "
                         "bnrewrite.transform(model, 'vdn', data_stats=bnrewrite.dataset_stats(train_data)) "
                         "(train_data: a tensor or an iterable of batches such as a DataLoader)")
    DatasetStats.coerce(options["data_stats"])


def rewrite_vdn(module: nn.Module, sites, options: VdnOptions, context=None) -> nn.Module:
    """Insert virtual rows at the input, point every BatchNorm at them, strip them from outputs."""
    keywords = context.options if context is not None else {}
    check_keywords(keywords)
    stats = DatasetStats.coerce(context.take("data_stats"))
    seed = int(context.take("seed", 0))
    if not isinstance(module, fx.GraphModule) and context is not None and context.captured.top_error:
        object.__setattr__(module, "_bnrewrite_capture_error", context.captured.top_error)
    gm = require_graph(module, "vdn")
    if hasattr(gm, INPUT_NAME):
        raise InputError(f"vdn: {type(gm).__name__} already has virtual rows ({INPUT_NAME}); apply vdn once")
    placeholder = _input_placeholder(gm)

    selected: set[str] = set()
    for site in sites:
        if site.functional:
            warnings.warn(f"vdn: '{site.name}' is a functional F.batch_norm call; it takes its statistics "
                          "from the whole batch, virtual rows included", stacklevel=3)
            continue
        if site.name in selected:
            continue
        selected.add(site.name)
        bn = gm.get_submodule(site.name)
        if isinstance(bn, SampledBatchNorm):
            bn.num_virtual = options.n
            bn.beta = options.beta
        elif is_stock_batchnorm(bn):
            shape = site.input_shape
            if shape is not None and options.n * math.prod(shape[2:]) < 2:
                # statistics from the virtual rows alone: one value per channel has no variance
                raise InputError(f"vdn: site '{site.name}' sees input {tuple(shape)}, so {options.n} virtual "
                                 "row(s) give one value per channel, which has no variance; use vdn:n=2 or "
                                 f"more, or leave '{site.name}' out of the rewrite (exclude=)")
            new = SampledBatchNorm.from_batchnorm(
                bn, strategy="vdn", num_virtual=options.n, beta=1.0, seed=seed, stream=layer_stream(site.name))
            new.site_name = site.name
            set_submodule(gm, site.name, new)
        else:
            raise InputError(f"vdn: site '{site.name}' is a {type(bn).__name__}, which cannot take virtual "
                             "statistics; combine vdn only with ns, bs, fs or frs")
    # BatchNorms left out of the recipe keep stock behaviour on the real rows
    for name, bn in list(gm.named_modules()):
        if name not in selected and is_stock_batchnorm(bn):
            kept = SampledBatchNorm.from_batchnorm(bn, strategy="full", num_virtual=options.n)
            kept.site_name = name
            set_submodule(gm, name, kept)

    injector = VirtualRowsInput(stats, options.n)
    placed = next(iter(gm.parameters()), None)
    if placed is None:
        placed = next(iter(gm.buffers()), None)
    if placed is not None:
        injector.to(placed.device)  # data_stats arrive on the CPU; the model may already be on a GPU
    injector.site_name = INPUT_NAME
    for layer in gm.modules():
        if isinstance(layer, SampledBatchNorm) and layer.num_virtual:
            layer.attach_virtual_rows(injector)
    stripper = VirtualRowsOutput(injector)
    # new modules start in training mode; they act in the model's (an eval model's forward adds no rows)
    injector.train(gm.training)
    stripper.train(gm.training)
    gm.add_module(INPUT_NAME, injector)
    gm.add_module(OUTPUT_NAME, stripper)
    graph = gm.graph
    with graph.inserting_after(placeholder):
        augmented = graph.call_module(INPUT_NAME, (placeholder,))
    placeholder.replace_all_uses_with(augmented, delete_user_cb=lambda user: user is not augmented)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        new_result = fx.node.map_arg(output.args[0], lambda node: graph.call_module(OUTPUT_NAME, (node,)))
    output.args = (new_result,)
    graph.lint()
    gm.recompile()
    return gm
