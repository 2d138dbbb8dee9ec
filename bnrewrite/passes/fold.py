"""Fold every normalisation of a (stock or rewritten) model away for inference.

In eval mode a BatchNorm -- and every bnrewrite runtime module, through the fold interface
``inference_affine() -> (scale, shift)`` (or ``inference_matrix() -> (M, shift)`` for a full
channel mixing) -- is a fixed per-channel affine map ``y = x * scale + shift``. This pass
moves that map into a neighbouring linear layer wherever doing so is exact:

* **into the producer** (``Conv1d/2d/3d`` of any groups/dilation, ``ConvTranspose1d/2d/3d``
  whose output channels are weight dim 1 per group, ``Linear`` followed by ``BatchNorm1d``
  when the norm's input is known to be ``(N, C)``):
  ``W' = scale * W``, ``b' = scale * b + shift``, always exact;
* **into the consumer** (pre-activation nets: BN directly before a ``Linear`` or a ``Conv``
  with zero padding; a ``Linear`` only when the norm's input is known to be ``(N, C)``):
  ``W'[:, i] = W[:, i] * scale[i]``, ``b' = b + W · shift``. With padding the border would
  see padded zeros instead of padded ``shift``, so it is not exact and the site stays a
  :class:`ChannelAffine`;
* otherwise (after an add, a concat, a pooling; a producer whose output other nodes read
  too; a functional ``F.batch_norm``) the site becomes a :class:`ChannelAffine` (ONNX
  ``Mul`` + ``Add``) or a :class:`ChannelMix` (a channel matrix), never a BatchNorm.

A producer/consumer module that is called at several places, or whose weight something else
reads (a tied Parameter, a ``get_attr``), is cloned before folding so the other callers see
exactly what they saw before; a BatchNorm called at several places is folded per call, and one
whose subclass overrides ``forward`` is kept (its running statistics do not say what it computes).

Inference example weighing (Summers & Dinneen, "Four Things Everyone Should Know to Improve
Batch Normalization", §3.1, Eq. 3): with ``example_weight=α > 0`` every normalisation uses
statistics that mix the example's own moments with the moving averages::

    μ  = α·E[x_example]   + (1−α)·μ_ema
    σ² = α·E[x²_example]  + (1−α)·(σ²_ema + μ²_ema) − μ²
    y  = γ·(x − μ)/sqrt(σ² + ε) + β

which depends on the example and so cannot fold into a convolution; each site becomes an
:class:`ExampleWeightedNorm` made of plain ops (ReduceMean, Mul, Add, Sqrt) that exports to
ONNX. ``α = 0`` is plain folding.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..capture import capture, set_submodule
from ..distributed import deepcopy_model
from ..errors import (InputError, UnsupportedPatternError, refuse_batchnorm_root, refuse_compiled_wrappers,
                      refuse_hook_based_norms, warn_at_caller)
from ..runtime.base import is_batchnorm
from ..sites import Site, find_sites, overrides_forward

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POST_NORM_CHILDREN = ("drop", "act")  # timm BatchNormAct2d applies these after normalising


# ============================================================================ emitted modules
class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1): a BatchNorm in eval mode that had no
    neighbour to fold into. Exports to ONNX as ``Mul`` + ``Add``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, ndim: int | None = None, reason: str = ""):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.ndim = ndim  # known input rank keeps forward traceable by torch.fx
        self.reason = reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(self.ndim if self.ndim is not None else x.dim())
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}" + (f", reason={self.reason!r}" if self.reason else "")


class ChannelMix(nn.Module):
    """``y[:, j] = Σ_i matrix[j, i] x[:, i] + shift[j]``: a normalisation whose inference is a
    full channel mixing (``inference_matrix``) that could not fold into its producer."""

    def __init__(self, matrix: torch.Tensor, shift: torch.Tensor, reason: str = ""):
        super().__init__()
        self.register_buffer("matrix", matrix.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.reason = reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return torch.matmul(x, self.matrix.t()) + self.shift
        # (C_out, C) @ (N, C, L): exports as one MatMul (a movedim exported as a Transpose with a
        # negative axis that onnxruntime rejects)
        y = torch.matmul(self.matrix, x.flatten(2)) + self.shift.unsqueeze(-1)
        return y.reshape((x.shape[0], self.matrix.shape[0]) + tuple(x.shape[2:]))

    def extra_repr(self) -> str:
        return f"{self.matrix.shape[0]}" + (f", reason={self.reason!r}" if self.reason else "")


class ExampleWeightedNorm(nn.Module):
    """Inference example weighing, four-things-bn §3.1 Eq. 3, in plain ops.

    Per example ``n`` and channel ``c`` (moments over the spatial dims of that example only)::

        μ  = α·mean(x[n, c]) + (1−α)·running_mean[c]
        σ² = α·mean(x[n, c]²) + (1−α)·(running_var[c] + running_mean[c]²) − μ²
           = α·var(x[n, c]) + (1−α)·running_var[c] + α(1−α)·(mean(x[n, c]) − running_mean[c])²
        y  = weight[c]·(x − μ)/sqrt(σ² + eps) + bias[c]

    computed in the second form, a sum of non-negative terms (the first cancels in float32 when
    the mean is large against the standard deviation). For ``(N, C)`` inputs (BatchNorm1d after
    Linear) the example's "moments" are the value itself (variance 0).
    """

    def __init__(self, running_mean, running_var, weight, bias, eps: float, alpha: float,
                 ndim: int | None = None):
        super().__init__()
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = self.ndim if self.ndim is not None else x.dim()
        shape = _channel_shape(ndim)
        a = self.alpha
        rm = self.running_mean.reshape(shape)
        rv = self.running_var.reshape(shape)
        if ndim > 2:
            dims = list(range(2, ndim))
            ex_mean = x.mean(dim=dims, keepdim=True)
            centred = x - ex_mean
            ex_var = (centred * centred).mean(dim=dims, keepdim=True)
        else:
            ex_mean, ex_var = x, 0.0
        mean = a * ex_mean + (1.0 - a) * rm
        # Eq. 3's σ² rearranged without its large terms: a·E[x²] + (1−a)(σ²_ema + μ²_ema) − μ²
        # cancels in float32 when |μ| ≫ σ (raw 0–255 pixels: 0.09–0.22 off at μ = 2000, σ = 1)
        shift = ex_mean - rm
        var = a * ex_var + (1.0 - a) * rv + (a * (1.0 - a)) * (shift * shift)
        inv = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            inv = inv * self.weight.reshape(shape)
        y = (x - mean) * inv
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, alpha={self.alpha}, eps={self.eps}"


class BatchStatisticsNorm(nn.Module):
    """A ``track_running_stats=False`` BatchNorm in plain ops: it normalises with the batch's own
    statistics even in eval mode, so there is nothing to fold."""

    def __init__(self, weight, bias, eps: float):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = _channel_shape(x.dim())
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


def _channel_shape(ndim: int) -> list[int]:
    return [1, -1] + [1] * (ndim - 2)


# ============================================================================ report
@dataclass
class FoldRecord:
    """What happened to one normalisation site."""

    site: str          # site name; '@k' marks the k-th call of a shared module
    kind: str          # BatchNorm2d, a runtime class name, F.batch_norm
    action: str        # into-producer | into-consumer | channel-affine | channel-mix |
    #                    example-weighted | batch-statistics | kept
    target: str = ""   # module it was folded into, or the module that replaced it
    reason: str = ""   # why it did not fold into a neighbour (or why it was kept)


@dataclass
class FoldReport:
    example_weight: float = 0.0
    records: list[FoldRecord] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.action] = out.get(r.action, 0) + 1
        return out

    def as_dict(self) -> dict:
        return {"example_weight": self.example_weight, "counts": self.counts(),
                "sites": [vars(r) for r in self.records]}

    def __str__(self) -> str:
        rows = [("site", "kind", "folded", "into / as", "why")]
        rows += [(r.site, r.kind, r.action, r.target or "-", r.reason or "-") for r in self.records]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for j, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ---")
        summary = ", ".join(f"{n} {a}" for a, n in sorted(self.counts().items()))
        lines.append("")
        lines.append(f"{len(self.records)} normalisation sites: {summary or 'none'}"
                     + (f" (example_weight={self.example_weight})" if self.example_weight else ""))
        return "\n".join(lines)


# ============================================================================ options / context
@dataclass(frozen=True)
class FoldOptions:
    """``example_weight``: α of inference example weighing (four-things-bn §3.1); 0 folds."""

    example_weight: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.example_weight <= 1.0:
            raise ValueError(f"example_weight must be in [0, 1], got {self.example_weight}")


@dataclass
class FoldContext:
    root: nn.Module
    report: FoldReport
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # site label -> input shape
    private: set = field(default_factory=set)  # fx nodes whose module this pass owns
    kept: set = field(default_factory=set)     # ids of norm modules left in place on purpose
    uses: dict = field(default_factory=dict)   # id(module) -> places that may call it
    # ids of tensors read other than through their one module: tied weights, get_attr reads
    read_elsewhere: set = field(default_factory=set)
    # id(norm) -> its inference map, read before any weight is changed: a runtime module's map may
    # depend on its producer's weights (Extreme Norm's running mean is ΣW·μ̄ + b), and folding an
    # earlier site forward into that producer changes them
    inferences: dict = field(default_factory=dict)

    def inference(self, norm: nn.Module, name: str) -> "_Inference":
        if id(norm) not in self.inferences:
            self.inferences[id(norm)] = _inference_of(norm, name)
        return self.inferences[id(norm)]


# ============================================================================ public entry point
def fold_for_inference(model: nn.Module, *, example_weight: float = 0.0, example_inputs=None) -> nn.Module:
    """A copy of ``model`` for inference, with every normalisation folded away.

    Args:
        model: any ``nn.Module`` -- a stock model or one returned by ``bnrewrite.transform``.
            It is not changed.
        example_weight: α of inference example weighing (four-things-bn §3.1, Eq. 3). 0 (the
            default) folds every BatchNorm into a neighbouring conv/linear or a per-channel
            affine; α > 0 replaces each by an :class:`ExampleWeightedNorm` (plain ops).
        example_inputs: optional tuple of inputs; gives the input rank of ``BatchNorm1d``
            sites next to a ``Linear`` (folding needs the channel dim to be the last one)
            and of sites whose rank the module type does not say. Without them the shapes
            ``transform(..., example_inputs=)`` recorded in ``model.bnrewrite_info`` are used.

    Returns the folded module in eval mode, with ``bnrewrite_fold_report`` (a
    :class:`FoldReport`: one record per site, what it folded into and why).

    Example::

        >>> import torch, torchvision, bnrewrite
        >>> m = torchvision.models.resnet18(weights=None).eval()
        >>> inf = bnrewrite.fold_for_inference(m)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> bool(torch.allclose(inf(x), m(x), atol=1e-5))
        True
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"fold_for_inference expects an nn.Module, got {type(model).__name__}")
    refuse_batchnorm_root(model, "fold_for_inference")
    refuse_compiled_wrappers(model, "fold_for_inference")
    # their weight is recomputed on every call, so a folded one would be lost too
    refuse_hook_based_norms(model, "fold_for_inference")
    try:
        options = FoldOptions(example_weight=float(example_weight))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    for name, module in model.named_modules():
        if any(isinstance(t, nn.parameter.UninitializedTensorMixin)
               for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))):
            raise InputError(f"'{name}' ({type(module).__name__}) is a lazy module that has not seen an input: "
                             "run the model once on an example batch before folding")
    work = deepcopy_model(model)
    work.eval()
    if options.example_weight == 0.0:
        _as_eval_batchnorms(work)
    report = FoldReport(example_weight=options.example_weight)
    if not any(is_batchnorm(m) for m in work.modules()) and not _has_functional_bn(work):
        object.__setattr__(work, "bnrewrite_fold_report", report)
        return work
    captured = capture(work, training=False, example_inputs=example_inputs)
    for _, gm in captured.graph_modules():
        # the train-mode twin still calls the norms; an inference model only has the eval graph
        gm.__dict__.pop("mode_twin", None)
    sites = find_sites(captured, example_inputs)
    context = FoldContext(root=captured.root, report=report, shapes=_recorded_shapes(model))
    result = fold_sites(captured.root, sites, options, context)
    result.eval()
    object.__setattr__(result, "bnrewrite_fold_report", report)
    return result


def _as_eval_batchnorms(work: nn.Module) -> None:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones) computes exactly an eval-mode
    ``BatchNorm2d`` on its buffers: swapped for one, it folds into its producer like any other.
    Not under example weighing, which would make the frozen layers mix each example's moments in."""
    for name, module in list(work.named_modules()):
        if not name or type(module).__name__ != "FrozenBatchNorm2d" or not type(module).__module__.startswith(
                "torchvision."):
            continue
        bn = nn.BatchNorm2d(module.weight.numel(), eps=module.eps, device=module.weight.device,
                            dtype=module.weight.dtype).eval()
        with torch.no_grad():
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, key).copy_(getattr(module, key))
        parent_name, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, child, bn)


def _recorded_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Site label -> input shape that ``transform(..., example_inputs=)`` recorded in
    ``model.bnrewrite_info``; ``example_inputs`` given to the fold take precedence."""
    info = getattr(model, "bnrewrite_info", None)
    return {s["name"] + (f"@{s['call_index']}" if s.get("shared") else ""): tuple(s["input_shape"])
            for s in getattr(info, "sites", ()) if s.get("input_shape") is not None}


def _has_functional_bn(model: nn.Module) -> bool:
    if isinstance(model, fx.GraphModule):
        return any(n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)
                   for n in model.graph.nodes)
    return True  # an eager forward may call F.batch_norm; capture to find out


# ============================================================================ the pass
def fold_sites(module: nn.Module, sites: list[Site], options: FoldOptions, context: FoldContext) -> nn.Module:
    """The fold pass: ``(module, sites, options, context) -> module``, module in eval mode,
    captured with ``capture(module, training=False)`` and without mode twins."""
    root = module
    _drop_training_only(root, context)
    context.uses = _count_uses(root)
    context.read_elsewhere = _tensors_read_elsewhere(root)
    for site in sites:
        if site.input_shape is not None:
            context.shapes[_label(site)] = site.input_shape
    by_graph: dict[str, list[Site]] = {}
    eager: list[Site] = []
    for site in sites:
        (eager.append(site) if site.graph is None else by_graph.setdefault(site.graph, []).append(site))
        if not site.functional:
            norm = root.get_submodule(site.name)
            if getattr(norm, "foldable", True) is not False and not overrides_forward(norm):
                context.inference(norm, site.name)  # every map before the first weight changes
    for prefix, graph_sites in by_graph.items():
        gm = root.get_submodule(prefix) if prefix else root
        for site in graph_sites:
            if site.functional:
                _fold_functional_site(gm, site, options, context)
            else:
                _fold_module_site(gm, site, options, context)
        gm.graph.lint()
        gm.recompile()
    for site in eager:
        if site.call_index == 0:
            _fold_eager_site(root, site, options, context)
    _drop_unused_norms(root, context)
    return root


def _drop_training_only(root: nn.Module, context: FoldContext) -> None:
    """Modules that only act in training and are the identity in eval (``is_training_only``,
    e.g. vdn's virtual-row injector and stripper) leave the inference graph: each call's uses
    read its input, the node goes, and so does the submodule when no other node calls it. One
    its graph never calls goes too: vdn rewrites the training graph, so a model whose eval graph
    differs (a mode twin: StochasticDepth, say) holds them uncalled."""
    for _, gm in list(_graph_modules(root)):
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for name, child in list(gm.named_children()):
            if getattr(child, "is_training_only", False) is True and name not in called:
                gm._modules.pop(name)
        dropped: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not _has_submodule(gm, node.target):
                continue
            if getattr(gm.get_submodule(node.target), "is_training_only", False) is not True:
                continue
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                continue
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped.add(node.target)
        if not dropped:
            continue
        still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for target in dropped - still_called:
            parent_name, _, child = target.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            parent._modules.pop(child, None)
        gm.graph.lint()
        gm.recompile()


def _qualified(site: Site, target: str) -> str:
    """A module name inside the site's graph (a leaf region's GraphModule) as a name in the model."""
    return f"{site.graph}.{target}" if site.graph and target else target


def _label(site: Site) -> str:
    return site.name + (f"@{site.call_index}" if site.shared else "")


# ---------------------------------------------------------------------------- per-channel transform
@dataclass
class _Inference:
    """The eval-mode map of a norm: per-channel affine, channel matrix, or batch statistics."""

    kind: str                       # 'affine' | 'matrix' | 'batch'
    scale: torch.Tensor | None = None   # affine: (C,)  matrix: (C, C)
    shift: torch.Tensor | None = None


def _inference_of(norm: nn.Module, name: str) -> _Inference:
    if isinstance(norm, _BatchNorm):
        if not norm.track_running_stats or norm.running_mean is None:
            return _Inference("batch")
        var = norm.running_var.double()
        inv = torch.rsqrt(var + norm.eps)
        scale = inv * norm.weight.double() if norm.weight is not None else inv
        shift = -norm.running_mean.double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.double()
        return _Inference("affine", scale, shift)
    if not getattr(norm, "track_running_stats", True):
        return _Inference("batch")
    matrix = getattr(norm, "inference_matrix", None)
    if callable(matrix):
        m, shift = matrix()
        return _Inference("matrix", m.detach().double(), shift.detach().double())
    affine = getattr(norm, "inference_affine", None)
    if not callable(affine):
        raise UnsupportedPatternError(
            f"'{name}' ({type(norm).__name__}) has neither inference_affine() nor inference_matrix(): "
            "a runtime module must implement the fold interface (see runtime/base.py)")
    scale, shift = affine()
    return _Inference("affine", scale.detach().double(), shift.detach().double())


def _post_children(norm: nn.Module) -> list[nn.Module]:
    """Modules a norm applies after normalising (runtime modules' post_norm, timm's act/drop)."""
    names = getattr(norm, "_post_children", None)
    if names is None:
        names = [n for n in _POST_NORM_CHILDREN
                 if isinstance(getattr(norm, n, None), nn.Module) and not isinstance(getattr(norm, n), nn.Identity)]
    return [getattr(norm, n) for n in names]


def _ndim_of(norm: nn.Module | None, label: str, context: FoldContext, gm: fx.GraphModule | None = None,
             src=None) -> int | None:
    """The norm's input rank: example/recorded shapes, else the norm's type, else 2 when its input
    ``src`` (a node of ``gm``) is a flatten to ``(N, features)``, or a Linear of one."""
    shape = context.shapes.get(label)
    if shape is not None:
        return len(shape)
    for base in type(norm).__mro__ if norm is not None else ():
        if base.__name__ in ("BatchNorm2d", "LazyBatchNorm2d"):
            return 4
        if base.__name__ in ("BatchNorm3d", "LazyBatchNorm3d"):
            return 5
    dims = getattr(norm, "dims", None)
    if dims in (2, 3):
        return dims + 2
    kind = getattr(norm, "source_kind", "")  # a runtime module remembers the BatchNorm it replaced
    if kind.endswith("2d"):
        return 4
    if kind.endswith("3d"):
        return 5
    return 2 if gm is not None and _flattened(gm, src) else None


def _flattened(gm: fx.GraphModule, node) -> bool:
    """``node`` is (a Linear of) a flatten to ``(N, features)``: the usual classifier head, which the
    graph alone shows to be 2-D (a Linear keeps its input's rank)."""
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) == (1, -1)
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        dims = list(node.args[1:3])
        start = node.kwargs.get("start_dim", dims[0] if dims else 0)
        return start == 1 and node.kwargs.get("end_dim", dims[1] if len(dims) > 1 else -1) == -1
    return False


def _replacement(inf: _Inference, norm_stats: dict, options: FoldOptions, ndim: int | None,
                 reason: str, norm: nn.Module | None = None) -> tuple[nn.Module, str]:
    """The module a site becomes when nothing absorbs it, and the record's action.

    A runtime module whose example weighing is not the per-channel Eq. 3 (Batch-Group Norm pools
    over channel groups) provides ``example_weighted_inference(alpha)`` and that is used instead."""
    hook = getattr(norm, "example_weighted_inference", None)
    if options.example_weight > 0 and inf.kind != "batch" and callable(hook):
        return hook(options.example_weight), "example-weighted"
    if options.example_weight > 0 and inf.kind != "batch":
        if inf.kind == "matrix":
            raise UnsupportedPatternError(
                f"example weighing (example_weight={options.example_weight}) needs a per-channel "
                f"normalisation, but '{norm_stats['name']}' mixes channels at inference "
                "(inference_matrix); fold it with example_weight=0")
        return ExampleWeightedNorm(norm_stats["running_mean"], norm_stats["running_var"], norm_stats["weight"],
                                   norm_stats["bias"], norm_stats["eps"], options.example_weight, ndim), \
            "example-weighted"
    if inf.kind == "batch":
        return BatchStatisticsNorm(norm_stats["weight"], norm_stats["bias"], norm_stats["eps"]), "batch-statistics"
    dtype = norm_stats["dtype"]
    if inf.kind == "matrix":
        return ChannelMix(inf.scale.to(dtype), inf.shift.to(dtype), reason), "channel-mix"
    return ChannelAffine(inf.scale.to(dtype), inf.shift.to(dtype), ndim, reason), "channel-affine"


def _stats_of(norm: nn.Module, name: str) -> dict:
    weight = getattr(norm, "weight", None) if getattr(norm, "affine", True) else None
    ref = norm.running_mean if getattr(norm, "running_mean", None) is not None else weight
    return {"name": name, "running_mean": getattr(norm, "running_mean", None),
            "running_var": getattr(norm, "running_var", None), "weight": weight,
            "bias": getattr(norm, "bias", None) if getattr(norm, "affine", True) else None,
            "eps": norm.eps, "dtype": ref.dtype if ref is not None else torch.float32}


# ---------------------------------------------------------------------------- weight surgery
def _fold_into_producer(layer: nn.Module, inf: _Inference) -> None:
    """Apply ``y -> scale*y + shift`` (or ``M y + shift``) to the output channels of ``layer``."""
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(
        _out_channels(layer), dtype=torch.float64, device=w.device)
    if inf.kind == "affine":
        s = inf.scale
        if isinstance(layer, _CONV_T):
            g = layer.groups
            view = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            per_group = s.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
            w_new = (view * per_group).reshape(w.shape)
        else:
            w_new = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        b_new = b * s + inf.shift
    else:
        m = inf.scale
        if isinstance(layer, _CONV_T):
            w_new = torch.einsum("ji,ki...->kj...", m, w)
        else:
            w_new = torch.einsum("ji,i...->j...", m, w)
        b_new = m @ b + inf.shift
    _set_weight_bias(layer, w_new, b_new)


def _fold_into_consumer(layer: nn.Module, inf: _Inference) -> None:
    """Apply ``x -> scale*x + shift`` to the input channels of ``layer`` (Linear, or Conv with
    padding 0 so that every output sees only real, shifted inputs)."""
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(
        _out_channels(layer), dtype=torch.float64, device=w.device)
    s, t = inf.scale, inf.shift
    if isinstance(layer, nn.Linear):
        w_new = w * s.reshape(1, -1)
        b_new = b + w @ t
    else:
        g = layer.groups
        out, in_per_group = w.shape[0], w.shape[1]
        k = [1] * (w.dim() - 2)
        s_g = s.reshape(g, 1, in_per_group, *k)
        t_g = t.reshape(g, 1, in_per_group, *k)
        w_g = w.reshape(g, out // g, in_per_group, *w.shape[2:])
        b_new = b + (w_g * t_g).sum(dim=tuple(range(2, w_g.dim()))).reshape(out)
        w_new = (w_g * s_g).reshape(w.shape)
    _set_weight_bias(layer, w_new, b_new)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _drop_weight_norm_key_hook(layer: nn.Module) -> None:
    """parametrizations.weight_norm also puts a load_state_dict pre-hook on the layer that renames
    the old weight_g/weight_v keys to the parametrization's. With the parametrization removed it
    has nothing to rename to, and as a local function it makes the folded model unpicklable."""
    hooks = layer._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        if getattr(getattr(hook, "hook", hook), "__name__", "") == "_weight_norm_compat_hook":
            del hooks[key]


def _set_weight_bias(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
    """A parametrized weight/bias (weight_norm, ...) is recomputed on every access, so a write into
    it would be lost: it is made a plain Parameter first (what deployment wants anyway)."""
    if parametrize.is_parametrized(layer):
        # a deepcopy shares the injected Parametrized<Layer> class with the source model, and removal
        # deletes the property from that class: give this copy a class of its own first
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(layer, name):
            parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
            _drop_weight_norm_key_hook(layer)
    dtype, device = layer.weight.dtype, layer.weight.device
    with torch.no_grad():
        layer.weight.copy_(w.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(dtype=dtype, device=device), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(b.to(layer.bias.dtype))


# ---------------------------------------------------------------------------- graph helpers
def _count_uses(root: nn.Module) -> dict[int, int]:
    """How many places may call each module (by id): graph nodes calling it, plus every extra
    path under which the module tree holds it (an eager parent may call it there)."""
    uses: dict[int, int] = {}
    for _, gm in _graph_modules(root):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                key = id(gm.get_submodule(node.target))
                uses[key] = uses.get(key, 0) + 1
    paths: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        paths[id(m)] = paths.get(id(m), 0) + 1
    for key, n in paths.items():
        if n > 1:
            uses[key] = uses.get(key, 0) + n - 1
    return uses


def _tensors_read_elsewhere(root: nn.Module) -> set[int]:
    """Ids of the parameters and buffers something else reads besides the one module holding them:
    held by two modules (tied weights, ``c2.weight = c1.weight``), or read by a graph's
    ``get_attr`` (``forward`` using ``self.conv.weight``). Folding into their module would change
    what that other reader sees."""
    holders: dict[int, set[int]] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                holders.setdefault(id(t), set()).add(id(m))
    read = {key for key, modules in holders.items() if len(modules) > 1}
    for _, gm in _graph_modules(root):
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = _attribute(gm, node.target)
                if isinstance(value, torch.Tensor):
                    read.add(id(value))
    return read


def _attribute(root: nn.Module, target: str):
    """What a ``get_attr`` target names, or None when it is gone."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _graph_modules(root: nn.Module):
    for name, m in root.named_modules(remove_duplicate=False):
        if isinstance(m, fx.GraphModule):
            yield name, m


def _private_module(gm: fx.GraphModule, node: fx.Node, context: FoldContext) -> nn.Module:
    """The module ``node`` calls, cloned first if anything else can call it, so that folding
    into it changes nothing another caller sees."""
    module = gm.get_submodule(node.target)
    if node in context.private:
        return module
    shares_tensors = any(id(t) in context.read_elsewhere for t in (*module.parameters(), *module.buffers()))
    if context.uses.get(id(module), 0) > 1 or shares_tensors:
        clone = copy.deepcopy(module)
        new_name = _free_name(gm, node.target + "_folded")
        _add_submodule(gm, new_name, clone)
        node.target = new_name
        context.uses[id(module)] -= 1
        context.uses[id(clone)] = 1
        module = clone
    context.private.add(node)
    return module


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while _has_submodule(gm, name):
        i += 1
        name = f"{base}{i}"
    return name


def _has_submodule(gm: nn.Module, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def _add_submodule(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    parent.add_module(child, module)


def _as_module(mods: list[nn.Module]) -> nn.Module | None:
    if not mods:
        return None
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def _replace_call(gm: fx.GraphModule, node: fx.Node, new: nn.Module | None, norm: nn.Module,
                  context: FoldContext) -> str:
    """Make ``node`` call ``new`` instead of the norm (or vanish when ``new`` is None)."""
    if new is None:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return ""
    # the replacement takes the norm's input alone: a training-time extra such as CBN's or
    # brn's producer input (``norm(x, producer_input)``) means nothing in eval
    node.args, node.kwargs = node.args[:1], {}
    if context.uses.get(id(norm), 0) <= 1:
        set_submodule(gm, node.target, new)
        return node.target
    context.uses[id(norm)] -= 1
    name = _free_name(gm, node.target + "_call")
    _add_submodule(gm, name, new)
    node.target = name
    return name


def _channel_dim_matches(layer: nn.Module, ndim: int | None) -> tuple[bool, str]:
    """A Linear's features are the last dim: it meets a norm's channel dim only on 2-D input.
    ``ndim``: the norm's input rank when known (:func:`_ndim_of`: example shapes, shapes
    ``transform`` recorded, or the BN type). An unknown rank does not fold, on either side: a
    ``Linear`` on ``(N, C, L)`` feeding a ``BatchNorm1d(C)`` maps ``L``, and a ``BatchNorm1d(C)``
    on ``(N, C, L)`` before a ``Linear`` feeds it ``L``; with ``C == L`` either fold runs silently
    and is wrong."""
    if not isinstance(layer, nn.Linear) or ndim == 2:
        return True, ""
    if ndim is None:
        return False, ("Linear acts on the last dim and the norm's input rank is unknown (2-D or 3-D): "
                       "pass example_inputs to fold it")
    return False, f"Linear acts on the last dim but the norm normalises dim 1 of a {ndim}-D input"


# ---------------------------------------------------------------------------- site handlers
def _try_neighbours(gm: fx.GraphModule, node: fx.Node, src, inf: _Inference, has_post: bool,
                    label: str, num_features: int | None, context: FoldContext, ndim: int | None):
    """Fold into the producer, else into the consumer. Returns (action, target, reason)."""
    reason = ""
    if isinstance(src, fx.Node) and src.op == "call_module":
        producer = gm.get_submodule(src.target)
        if isinstance(producer, _CONV + _CONV_T + (nn.Linear,)):
            ok, why = _channel_dim_matches(producer, ndim)
            groups = getattr(producer, "groups", 1)
            if len(src.users) > 1:
                users = ", ".join(u.name for u in src.users if u is not node)
                reason = f"producer '{src.target}' output also feeds {users}"
            elif not ok:
                reason = why
            elif num_features is not None and _out_channels(producer) != num_features:
                reason = f"producer '{src.target}' has {_out_channels(producer)} outputs, norm {num_features}"
            elif inf.kind == "matrix" and groups != 1:
                reason = f"channel matrix cannot fold into grouped producer '{src.target}' (groups={groups})"
            else:
                layer = _private_module(gm, src, context)
                _fold_into_producer(layer, inf)
                return "into-producer", src.target, ""
        else:
            reason = f"input comes from {type(producer).__name__} '{src.target}'"
    elif isinstance(src, fx.Node):
        reason = f"input comes from {src.op} '{getattr(src.target, '__name__', src.target)}'"
    # pre-activation: the norm's only user is a Linear / zero-padded Conv reading it as input
    if inf.kind == "affine" and not has_post and len(node.users) == 1:
        user = next(iter(node.users))
        if user.op == "call_module" and user.args and user.args[0] is node and len(user.args) == 1 and not user.kwargs:
            consumer = gm.get_submodule(user.target)
            if isinstance(consumer, _CONV + (nn.Linear,)):
                ok, why = _channel_dim_matches(consumer, ndim)
                padding = getattr(consumer, "padding", (0,))
                zero_pad = padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
                if isinstance(consumer, nn.Linear) or zero_pad:
                    if ok:
                        layer = _private_module(gm, user, context)
                        _fold_into_consumer(layer, inf)
                        return "into-consumer", user.target, ""
                    reason = (reason + "; " if reason else "") + why
                else:
                    reason = (reason + "; " if reason else "") + (
                        f"next layer '{user.target}' pads its input (padding={padding}): folding the shift "
                        "forward would be wrong at the border")
    return None, "", reason or "no conv/linear neighbour"


def _fold_module_site(gm: fx.GraphModule, site: Site, options: FoldOptions, context: FoldContext) -> None:
    node = site.node
    norm = gm.get_submodule(node.target)
    label = _label(site)
    kind = type(norm).__name__
    if getattr(norm, "foldable", True) is False:
        context.kept.add(id(norm))
        context.report.records.append(FoldRecord(label, kind, "kept", node.target,
                                                 "eval output depends on the batch's statistics (foldable=False)"))
        return
    if overrides_forward(norm):
        _keep_own_forward(norm, label, node.target, context)
        return
    inf = context.inference(norm, site.name)
    post = _post_children(norm)
    ndim = _ndim_of(norm, label, context, gm, node.args[0])
    if options.example_weight == 0 and inf.kind != "batch":
        action, target, reason = _try_neighbours(gm, node, node.args[0], inf, bool(post), label,
                                                 site.num_features, context, ndim)
        if action is not None:
            _replace_call(gm, node, _as_module(post), norm, context)
            context.report.records.append(FoldRecord(label, kind, action, _qualified(site, target)))
            return
    else:
        reason = "example weighing uses per-example statistics" if inf.kind != "batch" else \
            "track_running_stats=False: eval uses batch statistics"
    new, action = _replacement(inf, _stats_of(norm, site.name), options, ndim, reason, norm)
    name = _replace_call(gm, node, _as_module([new] + post), norm, context)
    context.report.records.append(FoldRecord(label, kind, action, _qualified(site, name), reason))


def _functional_args(node: fx.Node) -> dict:
    if node.target is torch.batch_norm:
        names = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                 "cudnn_enabled"]
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        return bound
    bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _constant(gm: fx.GraphModule, value):
    """The tensor behind a get_attr node (or a literal); ``False`` when it is computed."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return _attribute(gm, value.target)
    return False


def _fold_functional_site(gm: fx.GraphModule, site: Site, options: FoldOptions, context: FoldContext) -> None:
    node = site.node
    label = site.name
    args = _functional_args(node)
    stats = {k: _constant(gm, args.get(k)) for k in ("running_mean", "running_var", "weight", "bias")}
    training = args.get("training", False)
    problems = [k for k, v in stats.items() if v is False]
    if training is not False:
        problems.append(f"training={training}")
    if stats["running_mean"] is None or stats["running_var"] is None:
        problems.append("no running statistics")
    if problems:
        warnings.warn(f"F.batch_norm at '{label}' left as is: {', '.join(problems)} not constant", stacklevel=3)
        context.report.records.append(FoldRecord(label, "F.batch_norm", "kept", "",
                                                 f"{', '.join(problems)} not a constant attribute"))
        return
    rm, rv, weight, bias = (stats[k] for k in ("running_mean", "running_var", "weight", "bias"))
    eps = float(args.get("eps", 1e-5))
    inv = torch.rsqrt(rv.double() + eps)
    scale = inv * weight.double() if weight is not None else inv
    shift = -rm.double() * scale + (bias.double() if bias is not None else 0.0)
    inf = _Inference("affine", scale, shift)
    src = args["input"]
    inputs = [n for n in node.all_input_nodes if n is not src]
    if options.example_weight == 0:
        action, target, reason = _try_neighbours(gm, node, src, inf, False, label, rm.numel(), context,
                                                 _ndim_of(None, label, context, gm, src))
    else:
        action, target, reason = None, "", "example weighing uses per-example statistics"
    if action is not None:
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    else:
        norm_stats = {"name": label, "running_mean": rm, "running_var": rv, "weight": weight, "bias": bias,
                      "eps": eps, "dtype": rm.dtype}
        new, action = _replacement(inf, norm_stats, options, None, reason)
        target = _free_name(gm, f"{node.name}_folded")
        _add_submodule(gm, target, new)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(target, (src,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    for n in inputs:
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    context.report.records.append(FoldRecord(label, "F.batch_norm", action, _qualified(site, target), reason))


def _fold_eager_site(root: nn.Module, site: Site, options: FoldOptions, context: FoldContext) -> None:
    """A norm called from eager code: swap the module for its affine (nothing to fold into)."""
    norm = root.get_submodule(site.name)
    kind = type(norm).__name__
    if getattr(norm, "foldable", True) is False:
        context.kept.add(id(norm))
        context.report.records.append(FoldRecord(site.name, kind, "kept", site.name,
                                                 "eval output depends on the batch's statistics (foldable=False)"))
        return
    if overrides_forward(norm):
        _keep_own_forward(norm, site.name, site.name, context)
        return
    inf = context.inference(norm, site.name)
    reason = "called from eager code that torch.fx could not trace"
    new, action = _replacement(inf, _stats_of(norm, site.name), options, _ndim_of(norm, _label(site), context),
                               reason, norm)
    set_submodule(root, site.name, _as_module([new] + _post_children(norm)))
    context.report.records.append(FoldRecord(site.name, kind, action, site.name, reason))


def _keep_own_forward(norm: nn.Module, label: str, target: str, context: FoldContext) -> None:
    """A BatchNorm subclass with its own ``forward`` stays as it is: its running statistics say
    nothing certain about what that forward computes, so no fold of them would be exact."""
    context.kept.add(id(norm))
    why = f"{type(norm).__name__} overrides BatchNorm's forward: not folded, kept as it is"
    warn_at_caller(f"fold_for_inference: '{label}': {why}")
    context.report.records.append(FoldRecord(label, type(norm).__name__, "kept", target, why))


def _keep_attribute_reads(root: nn.Module, name: str) -> None:
    """``get_attr`` nodes reading a tensor of the norm module ``name`` (``forward`` using
    ``self.bn.weight``) read it from the graph module instead, so the module can go."""
    for graph_name, gm in list(_graph_modules(root)):
        prefix = f"{graph_name}." if graph_name else ""
        if not name.startswith(prefix):
            continue
        own = name[len(prefix):] + "."
        changed = False
        for node in gm.graph.nodes:
            if node.op != "get_attr" or not node.target.startswith(own):
                continue
            value = _attribute(gm, node.target)
            if not isinstance(value, torch.Tensor):
                continue
            new_name = _free_name(gm, node.target.replace(".", "_"))
            if isinstance(value, nn.Parameter):
                gm.register_parameter(new_name, value)
            else:
                gm.register_buffer(new_name, value)
            node.target = new_name
            changed = True
        if changed:
            gm.recompile()


def _drop_unused_norms(root: nn.Module, context: FoldContext) -> None:
    """Norm modules no node calls any more (shared ones replaced per call) are removed; a tensor
    of theirs that the graph reads stays, on the graph module."""
    for name, module in list(root.named_modules()):
        if not name or not is_batchnorm(module) or id(module) in context.kept:
            continue
        _keep_attribute_reads(root, name)
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        if child in parent._modules:
            del parent._modules[child]
    for name, module in root.named_modules():
        if is_batchnorm(module) and id(module) not in context.kept:
            raise UnsupportedPatternError(f"'{name}' ({type(module).__name__}) is still in the folded model; "
                                          "please report this model")
