"""ONNX export of a folded model, verified with onnxruntime.

Exporter choice (``exporter="auto"``, the default): the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``) first, then the dynamo exporter (torch.export +
onnxscript) if that fails. Measured on torchvision models in torch 2.14 (1 CPU thread), the
TorchScript exporter takes 0.5–1.5 s where dynamo takes 8–35 s (densenet121: 1.0 s vs 34 s),
and it traces any eager Python (models whose top level torch.fx could not capture) without
data-dependent guards. It is deprecated upstream, so when it is missing or fails, ``auto``
falls back to dynamo (with a warning naming the opset written when none was asked: the exporters'
defaults differ); either way the file is then checked in onnxruntime on two batch sizes,
so a wrong trace cannot pass silently. ``exporter="dynamo"`` / ``"torchscript"`` force one.
The file reaches ``path`` only once verified: a failed export leaves ``path`` as it was.
The TorchScript exporter cannot take a ``torch.fx.GraphModule`` directly (it mistakes the fx
``graph`` attribute for a TorchScript graph), so the model is wrapped in a plain module.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import (ExportError, InputError, refuse_batchnorm_root, refuse_compiled_wrappers, require_module,
                     warn_at_caller)
from .errors import first_line as _first_line
from .runtime.base import is_batchnorm

NORMALISATION_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization",
                     "GroupNormalization", "MeanVarianceNormalization")
DEFAULT_TOLERANCE = 1e-4
STATIC_BATCH_HINT = "export cannot have a dynamic batch dim: export with dynamic_batch=False (CLI: --static-batch)"


# ============================================================================ reports
@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how well onnxruntime reproduces torch."""

    path: str
    node_counts: dict[str, int]
    max_abs_error: float | None
    max_rel_error: float | None      # max |ort - torch| / max |torch|, per output, worst output
    providers: list[str]
    batch_sizes: list[int] = field(default_factory=list)
    exporter: str = "torchscript"
    opset: int | None = None
    folded: bool = False             # export_onnx folded the model first
    fold_report: object | None = None

    @property
    def normalisation_nodes(self) -> dict[str, int]:
        return {op: n for op, n in self.node_counts.items() if op in NORMALISATION_OPS}

    def as_dict(self) -> dict:
        out = {k: v for k, v in vars(self).items() if k != "fold_report"}
        out["normalisation_nodes"] = self.normalisation_nodes
        if self.fold_report is not None:
            out["fold"] = self.fold_report.as_dict()
        return out

    def __str__(self) -> str:
        ops = ", ".join(f"{op}×{n}" for op, n in sorted(self.node_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"wrote {self.path} (exporter: {self.exporter}, opset {self.opset})",
                 f"nodes: {sum(self.node_counts.values())} — {ops}",
                 f"normalisation left: {self.normalisation_nodes or 'none'}"]
        if self.max_abs_error is not None:
            lines.append(f"onnxruntime vs torch on batch sizes {self.batch_sizes}: max abs error "
                         f"{self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} "
                         f"(providers: {', '.join(self.providers)})")
        return "\n".join(lines)


class OnnxSummary(dict):
    """``inspect_onnx`` result: a plain dict (JSON-ready) that prints as a short table."""

    def __str__(self) -> str:
        lines = [f"{self['path']}: opset {self['opset']}, {self['num_nodes']} nodes, "
                 f"{self['num_parameters']:,} parameters in {self['num_initializers']} initializers"]
        for io_kind in ("inputs", "outputs"):
            for item in self[io_kind]:
                lines.append(f"  {io_kind[:-1]} {item['name']}: {item['dtype']}[{', '.join(map(str, item['shape']))}]")
        lines.append("op counts:")
        for op, n in sorted(self["node_counts"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {op:<28}{n}")
        norm = self["normalisation_nodes"]
        lines.append("normalisation left: " + (", ".join(f"{op}×{n}" for op, n in norm.items()) if norm else "none"))
        return "\n".join(lines)


def inspect_onnx(path: str | os.PathLike) -> OnnxSummary:
    """Op counts, inputs/outputs and normalisation nodes of an ONNX file (subgraphs included)."""
    import onnx

    if not os.path.exists(path):
        raise InputError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise InputError(f"{path} is not a readable ONNX model: {exc}") from None
    counts = _count_ops(model.graph)
    for fn in model.functions:  # the dynamo exporter may emit local functions
        for op, n in _count_ops_nodes(fn.node).items():
            counts[op] += n
    counts = {op: n for op, n in counts.items() if not _is_function_call(model, op)}

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape})
        return out

    init_names = {i.name for i in model.graph.initializer}
    n_params = sum(int(_numel(i.dims)) for i in model.graph.initializer)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxSummary(
        path=str(path), opset=opset, num_nodes=sum(counts.values()), node_counts=dict(counts),
        normalisation_nodes={op: counts[op] for op in NORMALISATION_OPS if counts.get(op)},
        inputs=describe([i for i in model.graph.input if i.name not in init_names]),
        outputs=describe(model.graph.output), num_initializers=len(init_names), num_parameters=n_params)


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _is_function_call(model, op: str) -> bool:
    return any(fn.name == op for fn in model.functions)


def _count_ops_nodes(nodes) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for node in nodes:
        counts[node.op_type] += 1
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                counts.update(_count_ops(attr.g))
            for g in attr.graphs:
                counts.update(_count_ops(g))
    return counts


def _count_ops(graph) -> collections.Counter:
    return _count_ops_nodes(graph.node)


# ============================================================================ export
def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, dynamic_batch: bool = True,
                opset: int | None = None, verify: bool = True, providers: list[str] | None = None,
                example_weight: float = 0.0, tolerance: float = DEFAULT_TOLERANCE,
                exporter: Literal["auto", "dynamo", "torchscript"] = "auto") -> ExportReport:
    """Export ``model`` to ONNX at ``path`` and check it with onnxruntime.

    Args:
        model: a folded model, or any model still holding normalisation (stock or rewritten),
            which is folded first with ``fold_for_inference(model, example_weight=...)``.
        example_inputs: a tensor or tuple of tensors; dim 0 is the batch.
        dynamic_batch: export the batch dim as symbolic (checked on a second batch size).
        opset: ONNX opset (default: the exporter's).
        verify: run the file in onnxruntime and compare with torch; raise
            :class:`~bnrewrite.errors.ExportError` when, on any output,
            ``max|ort − torch| > tolerance · max(max|torch|, 0.01)`` (relative to the output's
            magnitude, with an absolute floor for outputs near zero).
        providers: onnxruntime providers (default: CUDA when available, else CPU).
        example_weight: α of inference example weighing (four-things-bn §3.1), used when folding.
        exporter: ``"torchscript"`` (fast tracer, deprecated upstream), ``"dynamo"``
            (torch.export + onnxscript), or ``"auto"``: torchscript, then dynamo if it fails.

    Returns an :class:`ExportReport` (path, node counts by op type, max abs/rel error,
    providers).

    Example::

        >>> import torch, torchvision, bnrewrite
        >>> m = torchvision.models.resnet18(weights=None)
        >>> r = bnrewrite.export_onnx(m, torch.randn(1, 3, 64, 64), "/tmp/r18.onnx")
        >>> r.normalisation_nodes, r.max_rel_error < 1e-4
        ({}, True)
    """
    require_module(model, "export_onnx")
    refuse_batchnorm_root(model, "export_onnx")
    refuse_compiled_wrappers(model, "export_onnx")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InputError("export_onnx needs example_inputs: a tensor or a tuple of tensors")
    if dynamic_batch and any(t.dim() == 0 for t in inputs):
        raise InputError("dynamic_batch=True needs every input to have a batch dim (dim 0); "
                         "pass dynamic_batch=False for scalar inputs")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
        raise InputError(f"tolerance must be a number > 0, got {tolerance!r}")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 9):
        raise InputError(f"opset must be None (the exporter's default) or an int >= 9, got {opset!r}")
    if opset is not None:
        import onnx

        if opset > onnx.defs.onnx_opset_version():
            raise InputError(f"opset {opset} is newer than any this onnx {onnx.__version__} knows (the newest is "
                             f"{onnx.defs.onnx_opset_version()})")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise InputError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"export_onnx: {path!r} is a folder; pass the path of the .onnx file to write")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"export_onnx: the folder {parent!r} of {path!r} does not exist; create it first")
    # the file moves into place by a rename, which would replace a device (/dev/null) or a link
    # itself: write to a link's target, and refuse anything there that is not a regular file
    if os.path.exists(path) and not os.path.isfile(path):
        raise InputError(f"export_onnx: {path!r} exists and is not a regular file (a device or a pipe); "
                         "pass the path of the .onnx file to write")
    folded = False
    fold_report = None
    if example_weight and not _has_normalisation(model):
        raise InputError(f"example_weight={example_weight} needs the model's BatchNorm layers, but "
                         f"{type(model).__name__} has none (already folded?): export the unfolded model")
    if _has_normalisation(model):
        from .passes.fold import fold_for_inference

        model = fold_for_inference(model, example_weight=example_weight, example_inputs=inputs)
        folded = True
        fold_report = getattr(model, "bnrewrite_fold_report", None)
    if dynamic_batch:
        _check_batch_independent_trace(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _export_and_verify(model, inputs, path, dynamic_batch, opset, verify, providers, tolerance,
                                  exporter, folded, fold_report)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _export_and_verify(model, inputs, path, dynamic_batch, opset, verify, providers, tolerance, exporter,
                       folded, fold_report) -> ExportReport:
    trace_inputs = inputs
    if dynamic_batch and any(t.shape[0] == 1 for t in inputs):
        # torch.export specialises a size-1 dim to the constant 1; trace on batch 2 instead
        trace_inputs = tuple(torch.cat([t, t]) for t in inputs)
    target = os.path.realpath(path)  # a link keeps pointing at the written file
    folder = os.path.dirname(target)
    # write into a private folder beside `path` and move the file into place only once it is verified:
    # a failed export (or a fallback's rejected first try) never leaves a file at `path` that looks
    # valid, and a file already there stays as it was. Beside it, so the move is an atomic rename;
    # a folder rather than a temp file, so the file gets the permissions a plain write would give it
    try:
        staging = tempfile.mkdtemp(prefix=".bnrewrite-export-", dir=folder)
    except OSError as err:
        raise InputError(f"export_onnx: cannot write into {folder!r} ({err.strerror or err}); pass a path in a "
                         "folder you can write to") from None
    try:
        staged = os.path.join(staging, os.path.basename(target))
        report = _export_verified(model, inputs, trace_inputs, staged, path, dynamic_batch, opset, verify,
                                  providers, tolerance, exporter, folded, fold_report)
        os.replace(staged, target)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_verified(model, inputs, trace_inputs, staged, path, dynamic_batch, opset, verify, providers,
                     tolerance, exporter, folded, fold_report) -> ExportReport:
    """Write ``staged`` with the first exporter whose file verifies; ``path`` is the name reported."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors = []
    for i, kind in enumerate(order):
        log = io.StringIO()
        try:
            with _exporter_log(log):
                traced = _export(model, trace_inputs, staged, dynamic_batch, opset, kind)
        except Exception as exc:  # noqa: BLE001 - report every exporter's failure together
            errors.append(f"{kind}: {_first_line(exc)}")
            continue
        summary = inspect_onnx(staged)
        if opset is not None and summary["opset"] != opset:
            # the dynamo exporter keeps its own opset when it cannot convert to the requested one
            errors.append(f"{kind}: wrote opset {summary['opset']}, not the requested opset {opset}"
                          + _log_tail(log.getvalue()))
            continue
        report = ExportReport(path=path, node_counts=summary["node_counts"], max_abs_error=None, max_rel_error=None,
                              providers=[], exporter=kind, opset=summary["opset"], folded=folded,
                              fold_report=fold_report)
        try:
            if verify:
                _verify(model, inputs, staged, dynamic_batch, providers, tolerance, report)
            if traced:
                _warn_traced_constants(traced)
            if errors and opset is None:
                # the exporters' default opsets differ (TorchScript 17, dynamo 18+): say which one this file got
                warn_at_caller(f"export: the TorchScript exporter failed ({errors[0]}), so the {kind} exporter "
                               f"wrote {path} at its default opset {report.opset}, not the TorchScript exporter's "
                               "17; pass opset=N to require an opset")
            return report
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a TorchScript export onnxruntime cannot load
            if i == len(order) - 1:
                if errors:
                    raise ExportError(f"{_first_line(exc)} (earlier: {' | '.join(errors)})") from None
                raise _as_export_error(exc, path) from None
            errors.append(f"{kind}: exported, but {_first_line(exc)}")
    hint = ""
    if any("not the requested opset" in e for e in errors):
        hint = (f"; the dynamo exporter builds opset {_dynamo_opset()} and converts to an older one only where onnx "
                f"has adapters: ask for opset {_dynamo_opset()} or newer, opset=None, or exporter='torchscript' "
                "for an older one")
    raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: " + " | ".join(errors) + hint)


def _dynamo_opset() -> int:
    """The opset the dynamo exporter's op implementations target (it converts down from there)."""
    try:
        from torch.onnx._internal.exporter import _constants
        return int(_constants.TORCHLIB_OPSET)
    except (ImportError, AttributeError):  # a private module: torch 2.14 has 18 there
        return 18


@contextlib.contextmanager
def _exporter_log(sink: io.StringIO):
    """Collect what the exporters log into ``sink`` instead of stderr: when the dynamo exporter cannot
    convert to the requested opset, torch logs a warning (to sys.stderr, looked up at each record)
    and onnxscript the version converter's traceback (through ``logging``'s root or, with no
    handler configured, its last-resort stderr handler); the ExportError says it instead."""
    handler = logging.StreamHandler(sink)
    logger = logging.getLogger("onnxscript")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _log_tail(text: str, lines: int = 2) -> str:
    """`` (exporter log: …)`` with the last ``lines`` messages of a captured log: its unindented
    lines, which skips a traceback's frames but keeps the exception it ends with."""
    messages = [line.strip() for line in text.splitlines()
                if line.strip() and not line[0].isspace() and not line.startswith("Traceback (most recent call last)")]
    return f" (exporter log: {' / '.join(messages[-lines:])})" if messages else ""


def _check_batch_independent_trace(model: nn.Module) -> None:
    """A BatchGroupNorm without running statistics is kept by the fold (its eval normalises with the
    batch's statistics) and splits the batch into example groups by its size in Python: the traced
    graph holds the example's batch size, and onnxruntime would fail on any other."""
    from .runtime.batch_group import BatchGroupNorm

    kept = [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, BatchGroupNorm) and not m.foldable]
    if kept:
        raise InputError(f"BatchGroupNorm site(s) {', '.join(repr(n) for n in kept)} (track_running_stats=False) "
                         "stay in the folded model and group the examples by the batch size in Python, so the "
                         f"traced graph holds the example's batch size and the {STATIC_BATCH_HINT}")


def _as_export_error(exc: BaseException, path: str) -> ExportError:
    if isinstance(exc, ExportError):
        return exc
    return ExportError(f"{path}: onnxruntime could not run the exported model: {_first_line(exc)}")


def _missing_kernel_error(exc: BaseException, inputs, path: str) -> ExportError | None:
    """onnxruntime found no kernel for an op at the model's dtype: its CPU provider has float64 Gemm,
    Mul and Add but no float64 Conv or GlobalAveragePool (onnxruntime 1.32), so a ``model.double()``
    CNN exports but cannot be run. None when that is not the failure (or the inputs are float32)."""
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in inputs
                     if t.is_floating_point() and t.dtype != torch.float32})
    if "NOT_IMPLEMENTED" not in str(exc) or not dtypes:
        return None
    return ExportError(f"{path}: onnxruntime has no {'/'.join(dtypes)} implementation of an op in this model "
                       f"({_first_line(exc)}); nothing was written: export the float32 model instead, "
                       "export_onnx(model.float(), tuple(x.float() for x in inputs), path), or pass verify=False "
                       "to write the file for a runtime that has such kernels")


def _has_normalisation(model: nn.Module) -> bool:
    return any(is_batchnorm(m) for m in model.modules())


class _Wrapper(nn.Module):
    """Hides a GraphModule's fx ``graph`` attribute from the TorchScript exporter."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def _export(model, inputs, path, dynamic_batch, opset, kind) -> list[str]:
    """Write ``path`` with one exporter (``"torchscript"`` or ``"dynamo"``); returns the tracer's
    warnings (see :func:`_quiet`)."""
    traced: list[str] = []
    with _quiet(traced):
        if kind == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
            program = torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=shapes,
                                        opset_version=opset, verbose=False, optimize=True,
                                        external_data=False)
            program.save(path)
        else:
            names = [f"input_{i}" for i in range(len(inputs))]
            axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
            torch.onnx.export(_Wrapper(model).train(model.training), inputs, path, dynamo=False, input_names=names,
                              dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True)
            _read_initializers_directly(path)
    return traced


def _read_initializers_directly(path: str) -> None:
    """Drop the ``Identity`` nodes through which the TorchScript exporter's initializer
    deduplication reads every copy of an initializer it merged.

    Constants of equal value are merged: under example weighing every site keeps its
    statistics and γ/β as constants, equal wherever BatchNorms are (a model built with
    ``weights=None``: γ=1, β=0, mean 0, var 1). The file is valid ONNX, but onnxruntime's
    level-1 rewrites (EliminateIdentity together with DivMulFusion, which meets rsqrt's
    ``Div(1, Sqrt)`` times γ) leave a node reading a removed Identity's output, so the session
    fails to load ("Node input 'onnx::Mul_…' is not a graph input")."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    inits, outputs = {i.name for i in graph.initializer}, {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(kept)
    _rename_inputs(graph, alias)
    onnx.save(model, path)


def _rename_inputs(graph, alias: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]
        for attr in node.attribute:  # If/Loop bodies may read outer-scope values
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_inputs(g, alias)


@contextlib.contextmanager
def _quiet(traced: list[str]):
    """The exporters print progress lines and deprecation warnings; the report says what matters.

    Except the TorchScript tracer's warnings, collected into ``traced``: a TracerWarning says that
    Python control flow or a Python number came from a tensor's value, so the ONNX graph holds
    what this example input took — maybe wrong for other inputs, which verification (run on the
    same rows) cannot see."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _native_stdout_discarded(), contextlib.redirect_stdout(io.StringIO()):
            yield
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            text = f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message).splitlines()[0]}"
            if text not in traced:
                traced.append(text)


@contextlib.contextmanager
def _native_stdout_discarded():
    """Also silence what C++ writes to file descriptor 1: the TorchScript exporter prints the whole
    IR graph there when it gives up (vgg11_bn at 32×32: 64 lines), before the dynamo exporter is tried."""
    fd = 1  # C++ writes to the process's fd 1 whatever sys.stdout is (pytest, notebooks replace that)
    try:
        saved = os.dup(fd)
    except OSError:  # no fd 1 at all
        yield
        return
    sys.stdout.flush()
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), fd)
            try:
                yield
            finally:
                sys.stdout.flush()
                os.dup2(saved, fd)
    finally:
        os.close(saved)


def _warn_traced_constants(traced: list[str]) -> None:
    shown = "\n  ".join(traced[:5]) + (f"\n  (+{len(traced) - 5} more)" if len(traced) > 5 else "")
    warn_at_caller("export: the TorchScript tracer recorded values of this example input as constants, so the ONNX "
                   "model may be right for this input only (data-dependent control flow or sizes):\n  "
                   f"{shown}\ncheck the model on other inputs, or export with exporter='dynamo', which refuses "
                   "data-dependent branches instead")


def _providers(requested: list[str] | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise InputError(f"onnxruntime providers {missing} are not available here (available: {available})")
        return list(requested)
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _verify(model, inputs, file, dynamic_batch, providers, tolerance, report: ExportReport) -> None:
    """Run ``file`` in onnxruntime; messages name ``report.path``, where it is going."""
    import numpy as np
    import onnxruntime as ort

    path = report.path
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(file, sess_options=options, providers=_providers(providers))
    except Exception as exc:  # noqa: BLE001 - re-raised as is unless it is a missing kernel
        raise _missing_kernel_error(exc, inputs, path) or exc
    report.providers = list(session.get_providers())
    feeds_names = [i.name for i in session.get_inputs()]
    batches = [inputs]
    if dynamic_batch:
        # a second batch size, from the same rows so the values stay in range
        batches.append(tuple(torch.cat([t, t[:1]]) for t in inputs))
    worst_abs, worst_rel = 0.0, 0.0
    failed: list[str] = []
    for batch in batches:
        try:
            with torch.no_grad():
                outputs = model(*batch)
        except Exception as exc:  # noqa: BLE001 - only the second, checking batch size gets here
            if batch is inputs:
                raise
            raise InputError(f"{type(model).__name__} does not run at batch size {batch[0].shape[0]} "
                             f"({_first_line(exc)}), so its {STATIC_BATCH_HINT}") from None
        expected = [t.detach().cpu().float().numpy() for t in pytree.tree_leaves(outputs)
                    if isinstance(t, torch.Tensor)]
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(feeds_names, batch)}
        got = session.run(None, feeds)
        if len(got) != len(expected):
            raise ExportError(f"{path}: onnxruntime returned {len(got)} outputs, torch {len(expected)}")
        for i, (e, g) in enumerate(zip(expected, got)):
            if e.shape != g.shape:
                raise ExportError(f"{path}: output {i} has shape {g.shape} in onnxruntime, {e.shape} in torch "
                                  f"(batch size {batch[0].shape[0]})")
            diff = float(np.abs(e - g.astype(np.float32)).max()) if e.size else 0.0
            scale = float(np.abs(e).max()) if e.size else 0.0
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(scale, 1e-12))
            # relative to the output's magnitude, with an absolute floor for outputs near 0
            if not diff <= tolerance * max(scale, 1e-2):
                failed.append(f"output {i} at batch size {batch[0].shape[0]}: max abs {diff:.3g}, "
                              f"max |torch| {scale:.3g}")
        report.batch_sizes.append(int(batch[0].shape[0]))
    report.max_abs_error, report.max_rel_error = worst_abs, worst_rel
    if failed:
        raise ExportError(f"{path}: onnxruntime differs from torch by more than tolerance {tolerance} × "
                          f"max(max |torch|, 0.01): {'; '.join(failed)} (max abs {worst_abs:.3g}, max rel "
                          f"{worst_rel:.3g}; providers {report.providers}); nothing was written: export with "
                          f"verify=False (CLI --no-verify) to write the file and check its ops with "
                          f"`bnrewrite inspect {path}`")
