"""Tune the inference example weight α on held-out data (Summers & Dinneen, "Four Things
Everyone Should Know to Improve Batch Normalization", §3.1, Eq. 3, Figs. 1, 2, 4).

In training every example takes part in its own normalisation statistics; with moving
averages at inference it does not. Eq. 3 mixes the example's own moments into the moving
averages with weight α (α = 0: classical inference). The best α is *not* 1/B; the paper
treats it as a hyperparameter "best optimized on a validation set, whose optimal value may
depend on the model, dataset, and metric" -- accuracy and cross-entropy can disagree wildly
(§3.2, Fig. 4). Because it only changes inference it applies retroactively to any model
trained with BatchNorm (or a bnrewrite variant): this module folds the model with
``bnrewrite.fold_for_inference(model, example_weight=α)`` for each α of a grid and scores
the folded model on held-out data.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, refuse_batchnorm_root, refuse_compiled_wrappers, require_module, warn_at_caller

DEFAULT_GRID: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


@dataclass
class ExampleWeightCurve:
    """Scores of the folded model for every α of the grid, and the best α.

    ``best_alpha`` is the best-scoring α (the smallest one on ties, i.e. the one closest to
    classical inference); ``baseline_score`` is the score at α = 0 when the grid holds it.
    """

    metric: str
    higher_is_better: bool
    alphas: list[float]
    scores: list[float]
    best_alpha: float
    best_score: float
    baseline_score: float | None = None
    plot_path: str | None = None
    examples: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "alphas": self.alphas,
                "scores": self.scores, "best_alpha": self.best_alpha, "best_score": self.best_score,
                "baseline_score": self.baseline_score, "plot_path": self.plot_path, "examples": self.examples}

    def __str__(self) -> str:
        lines = [f"example weight α vs {self.metric} on {self.examples} held-out examples "
                 f"({'higher' if self.higher_is_better else 'lower'} is better)"]
        for a, s in zip(self.alphas, self.scores):
            lines.append(f"  α={a:<6g} {s:.6g}" + ("  <- best" if a == self.best_alpha else ""))
        return "\n".join(lines)


def _batches(data, batch_size: int) -> Iterable:
    """``(inputs, targets)`` pair of tensors -> chunks of it (``inputs`` may be a tuple of tensors, for
    a model taking several: a batch of a list of batches is a pair, never a tensor, so a pair whose
    second item is a tensor is the data itself); anything else is iterated as batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        inputs, targets = data
        tensors = (inputs,) if isinstance(inputs, torch.Tensor) else inputs
        if isinstance(tensors, (tuple, list)) and tensors and all(isinstance(t, torch.Tensor) for t in tensors):
            for t in tensors:
                if t.shape[0] != targets.shape[0]:
                    raise InputError(f"tune_example_weight: inputs hold {t.shape[0]} examples but targets "
                                     f"{targets.shape[0]}")
            return [(_rows(inputs, i, batch_size), targets[i:i + batch_size])
                    for i in range(0, targets.shape[0], batch_size)]
    try:
        iter(data)
    except TypeError:
        raise InputError("tune_example_weight: data must be an (inputs, targets) pair of tensors or an "
                         f"iterable of (inputs, targets) batches (e.g. a DataLoader), got {type(data).__name__}") from None
    return data


def _rows(value, start: int, count: int):
    """Rows ``start:start + count`` of a tensor, or of each tensor of a tuple/list."""
    if isinstance(value, torch.Tensor):
        return value[start:start + count]
    return type(value)(_rows(v, start, count) for v in value)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _collect(model: nn.Module, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, targets = [], []
    with torch.no_grad():
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise InputError("tune_example_weight: each batch must be (inputs, targets), got "
                                 f"{type(batch).__name__}")
            inputs, target = _to(batch[0], device), batch[1]
            out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            if not isinstance(out, torch.Tensor):
                raise InputError("tune_example_weight: the model must return a tensor of outputs (logits); "
                                 f"got {type(out).__name__}")
            outputs.append(out.detach().float().cpu())
            targets.append(target.detach().cpu() if isinstance(target, torch.Tensor) else torch.as_tensor(target))
    if not outputs:
        raise InputError("tune_example_weight: data holds no batches")
    return torch.cat(outputs), torch.cat(targets)


def _metric(metric) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], float], bool | None]:
    if metric == "accuracy":
        return "accuracy", lambda out, y: (out.argmax(dim=1) == y).float().mean().item(), True
    if metric == "loss":
        return "loss", lambda out, y: F.cross_entropy(out, y).item(), False
    if callable(metric):
        return getattr(metric, "__name__", "metric"), lambda out, y: float(metric(out, y)), None
    raise InputError(f"tune_example_weight: metric must be 'accuracy', 'loss' or a callable "
                     f"(outputs, targets) -> float, got {metric!r}")


def _weighed_fold(model: nn.Module, alpha: float, example_inputs) -> nn.Module:
    """The fold at ``alpha``. Sites that normalise with the batch's own statistics (no running
    statistics; Batch-Group Norm is then kept as it is) ignore α: a model made only of such sites
    would give a flat curve and a meaningless best α of 0, so it is refused; some of them, a warning."""
    from .passes.fold import fold_for_inference

    folded = fold_for_inference(model, example_weight=alpha, example_inputs=example_inputs)
    records = folded.bnrewrite_fold_report.records
    ignored = [r for r in records if r.action != "example-weighted"]
    shown = "; ".join(f"'{r.site}' ({r.kind}: {r.reason})" for r in ignored[:3]) + \
        (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
    if not records:
        raise InputError(f"tune_example_weight: {type(model).__name__} has no BatchNorm; α has nothing to tune")
    if len(ignored) == len(records):
        raise InputError(f"tune_example_weight: example weighing changes no normalisation site of "
                         f"{type(model).__name__}, so α has nothing to tune: {shown}")
    if ignored:
        warn_at_caller(f"tune_example_weight: α does not change {len(ignored)} of {len(records)} normalisation "
                       f"sites: {shown}")
    return folded


def tune_example_weight(model: nn.Module, data, metric="accuracy", grid: Sequence[float] = DEFAULT_GRID, *,
                        higher_is_better: bool | None = None, plot: str | None = None,
                        batch_size: int = 256, example_inputs=None) -> ExampleWeightCurve:
    """Score ``fold_for_inference(model, example_weight=α)`` on held-out data for every α in ``grid``.

    Args:
        model: a model trained with BatchNorm or a bnrewrite variant (not changed). Sites
            without running statistics ignore α: a warning names them, and a model whose
            every site is such is an InputError.
        data: held-out data: an ``(inputs, targets)`` pair of tensors, or an iterable of
            ``(inputs, targets)`` batches (a DataLoader). ``inputs`` may be a tuple of tensors.
        metric: ``"accuracy"`` (top-1 of the output logits, higher is better), ``"loss"``
            (cross-entropy, lower is better) or a callable ``(outputs, targets) -> float``
            applied to *all* held-out outputs at once (higher is better unless
            ``higher_is_better=False``).
        grid: the α values to try, each in ``[0, 1]``.
        plot: a file path; when given and matplotlib is installed, the curve is saved there.
        batch_size: chunk size when ``data`` is a tensor pair (example weighing uses per-example
            statistics, so the result does not depend on it).
        example_inputs: passed on to ``fold_for_inference``.

    Returns an :class:`ExampleWeightCurve` (``best_alpha``, ``best_score``, ``alphas``, ``scores``).

    Example (``model`` trained, ``x_val, y_val`` held-out data)::

        >>> curve = bnrewrite.tune_example_weight(model, (x_val, y_val), metric="loss")
        >>> inference_model = bnrewrite.fold_for_inference(model, example_weight=curve.best_alpha)
    """
    from .passes.fold import fold_for_inference

    require_module(model, "tune_example_weight")
    refuse_batchnorm_root(model, "tune_example_weight")
    refuse_compiled_wrappers(model, "tune_example_weight")
    try:
        alphas = sorted({float(a) for a in grid})
    except (TypeError, ValueError):
        raise InputError(f"tune_example_weight: grid must be a sequence of numbers in [0, 1], got {grid!r}") from None
    if not alphas:
        raise InputError("tune_example_weight: grid is empty; give the α values to try, e.g. (0, 0.05, 0.1)")
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise InputError(f"tune_example_weight: every α must be in [0, 1], got {bad}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"tune_example_weight: batch_size must be an int >= 1, got {batch_size!r}")
    name, score_fn, default_direction = _metric(metric)
    if higher_is_better is None:
        higher_is_better = True if default_direction is None else default_direction
    elif default_direction is not None and bool(higher_is_better) != default_direction:
        # a silently inverted built-in metric would pick the worst α
        raise InputError(f"tune_example_weight: metric={name!r} is {'higher' if default_direction else 'lower'} "
                         f"is better; drop higher_is_better={higher_is_better!r} or pass a callable metric")
    if plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(plot))):
        raise InputError(f"tune_example_weight: the folder of plot={str(plot)!r} does not exist; create it first "
                         "(checked before tuning, so no work is lost)")
    batches = _batches(data, batch_size)
    if not isinstance(batches, (list, tuple)):
        batches = list(batches)  # iterated once per α
    device = _device_of(model)

    scores = []
    count = 0
    # the largest α is folded first: its report says whether α changes the model at all
    folds = {alphas[-1]: _weighed_fold(model, alphas[-1], example_inputs)} if alphas[-1] > 0 else {}
    for alpha in alphas:
        folded = folds.pop(alpha) if alpha in folds else \
            fold_for_inference(model, example_weight=alpha, example_inputs=example_inputs)
        outputs, targets = _collect(folded, batches, device)
        count = outputs.shape[0]
        scores.append(score_fn(outputs, targets))

    def key(i):
        s = scores[i]
        if math.isnan(s):
            return -math.inf
        return s if higher_is_better else -s

    best = max(range(len(alphas)), key=lambda i: (key(i), -i))
    curve = ExampleWeightCurve(metric=name, higher_is_better=higher_is_better, alphas=alphas, scores=scores,
                               best_alpha=alphas[best], best_score=scores[best],
                               baseline_score=scores[alphas.index(0.0)] if 0.0 in alphas else None,
                               examples=count)
    if plot is not None:
        curve.plot_path = _plot(curve, plot)
    return curve


def _plot(curve: ExampleWeightCurve, path: str) -> str | None:
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
    except ImportError:
        warnings.warn(f"matplotlib is not installed: no plot written to {path}", stacklevel=3)
        return None
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(curve.alphas, curve.scores, marker="o")
    ax.axvline(curve.best_alpha, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("inference example weight α (four-things-bn §3.1)")
    ax.set_ylabel(curve.metric)
    ax.set_title(f"best α = {curve.best_alpha:g} ({curve.metric} {curve.best_score:.4g})")
    fig.tight_layout()
    fig.savefig(path)
    return str(path)
