"""Lower BatchNorm sites to the fused Triton ops (bn-sampling.txt §3.2: the point of sampling
is speed, App. C.1: a static, regular sample is what makes it fast).

Runs after every other pass of a recipe. For each selected site:

* a stock ``nn.BatchNorm1d/2d/3d`` (or timm's ``BatchNormAct2d``) becomes a
  :class:`~bnrewrite.runtime.kernels.FusedBatchNorm` (full statistics, fused activation);
* a :class:`~bnrewrite.runtime.sampled.SampledBatchNorm` (ns/bs/fs/vdn and their mixtures)
  has its class swapped in place for ``Fused<Class>``, which keeps its state, schedule and
  sample spec and runs the fused op in training (``frs`` stays on the reference path);
* a :class:`~bnrewrite.runtime.cross_iteration.CrossIterationBatchNorm` (``cbn``/``naive-cbn``
  with the paper's backward) is marked ``lowered="triton"``: its window normalisation (Eqs. 9–12)
  runs on the same kernels with a window finalize (and the following activation, as above);
  the history and Eqs. 7–8 stay plain torch;
* other runtime modules (ghost, bgn, extreme, cbn with ``backward=renorm``) have no fused kernel
  and stay as they are.

Where the graph shows the site's only user is a ReLU/ReLU6/SiLU/LeakyReLU (module, function
or method), that node is removed and the activation becomes the norm's ``act`` child, applied
inside the kernel in training and by ``post_norm`` in eval (so folding still sees it).

``mode``: ``"auto"`` lowers when the model lives on an NVIDIA GPU of compute capability 7.0 or
newer (:func:`unsupported_gpu`) and Triton is importable,
``"fused"`` always lowers (CPU runs the op's plain-torch implementation), ``"reference"``
never lowers. ``compile_path`` (see :class:`LowerOptions`) says what a lowered site hands
``torch.compile``: by default its plain-torch computation, so inductor fuses it like stock BN.
"""
from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture import set_submodule
from ..errors import InputError
from ..runtime.base import has_hooks
from ..sites import unfaithful_reason

LowerMode = Literal["auto", "fused", "reference"]
CompilePath = Literal["inductor", "ops"]
_STOCK_NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct2d")
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
                  F.silu: "silu", F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}


@dataclass(frozen=True)
class LowerOptions:
    """``mode``: auto | fused | reference; ``fuse_activation``: fold a following activation in;
    ``compile_path``: what a lowered site runs while ``torch.compile`` traces it — ``"inductor"``
    its plain-torch computation (inductor generates, and fuses with the neighbouring ops, its own
    kernels; no per-call custom-op dispatch, which cost ≈0.5 ms per layer on an H100 host) or
    ``"ops"`` the custom ops (our kernels, opaque to inductor). Eager mode runs the kernels either way."""

    mode: LowerMode = "auto"
    fuse_activation: bool = True
    compile_path: CompilePath = "inductor"

    def __post_init__(self):
        if self.mode not in ("auto", "fused", "reference"):
            raise InputError(f"lower= must be 'auto', 'fused' or 'reference', got {self.mode!r}")
        if self.compile_path not in ("inductor", "ops"):
            raise InputError(f"compile_path= must be 'inductor' or 'ops', got {self.compile_path!r}")


@dataclass
class LoweringRecord:
    site: str
    kind: str
    lowered: bool
    activation: str | None = None
    reason: str | None = None


# The oldest NVIDIA GPUs "auto" lowers on: torch's own Triton check refuses older ones ("Triton only
# supports devices of CUDA Capability >= 7.0", torch._inductor.exc.GPUTooOldForTriton). Every kernel
# of a training step compiles for sm_70 (benchmarks/kernel_resources.py --quick --arch 70).
MIN_CAPABILITY = (7, 0)


def _model_device(module: nn.Module) -> torch.device | None:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if first is None else first.device


def unsupported_gpu(device: torch.device) -> str | None:
    """Why ``lower="auto"`` leaves a model on ``device`` (a CUDA device) on the reference path, or
    None: ROCm builds of torch also call AMD GPUs ``cuda``, and the kernels are built and tested for
    NVIDIA ones; Triton does not support NVIDIA GPUs older than :data:`MIN_CAPABILITY`."""
    if torch.version.hip is not None:
        return ("the GPU is an AMD one (a ROCm build of torch): the fused kernels are tested on NVIDIA GPUs "
                "only; lower='fused' uses them anyway")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{name} is sm_{capability[0]}{capability[1]}: the fused kernels need compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    return None


def should_lower(module: nn.Module, mode: str) -> tuple[bool, str]:
    if mode == "reference":
        return False, "lower='reference'"
    if mode == "fused":
        return True, ""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    device = _model_device(module)
    if device is None or device.type != "cuda":
        return False, "the model is not on a CUDA device (move it with .cuda() before transform, or lower='fused')"
    why = unsupported_gpu(device)
    return (False, why) if why else (True, "")


def _lowered_module(norm: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(the lowered module, or None with the reason it stays)."""
    from ..runtime.cross_iteration import CrossIterationBatchNorm
    from ..runtime.kernels import FusedBatchNorm, FusedSampledMixin, lowered_class
    from ..runtime.sampled import SampledBatchNorm

    if isinstance(norm, (FusedBatchNorm, FusedSampledMixin)):
        return norm, None
    if isinstance(norm, SampledBatchNorm):
        if norm.strategy == "frs":
            return None, "frs samples random points: no fused kernel, kept on the reference path"
        norm.__class__ = lowered_class(type(norm))
        return norm, None
    if isinstance(norm, CrossIterationBatchNorm):
        if norm.backward_mode != "window":
            return None, f"cbn backward={norm.backward_mode} has no fused kernel"
        norm.lowered = "triton"  # Eqs. 9-12 on the kernels; the history stays plain torch
        return norm, None
    if type(norm).__name__ in _STOCK_NAMES and isinstance(norm, nn.modules.batchnorm._BatchNorm):
        unfaithful = unfaithful_reason(norm)
        if unfaithful is not None:  # the fused module would drop it
            return None, f"{unfaithful}: kept as it is"
        if getattr(norm, "drop", None) is not None and not isinstance(norm.drop, nn.Identity):
            return None, "timm BatchNormAct2d with dropout between norm and activation"
        return FusedBatchNorm.from_batchnorm(norm), None
    return None, f"no fused kernel for {type(norm).__name__}"


def _activation_of(gm: fx.GraphModule, user: fx.Node) -> tuple[str, float] | None:
    from ..runtime.kernels import activation_name

    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        # its hooks would not run once the norm applies the activation itself
        return None if has_hooks(module) else activation_name(module)
    if user.op == "call_function" and user.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[user.target]
        slope = 0.01
        if name == "leaky_relu":
            slope = user.args[1] if len(user.args) > 1 else user.kwargs.get("negative_slope", 0.01)
            if not isinstance(slope, (int, float)):
                return None
        return name, float(slope)
    if user.op == "call_method" and user.target in _ACT_METHODS and len(user.args) == 1:
        return _ACT_METHODS[user.target], 0.0
    return None


def _consumer(gm: fx.GraphModule, target: str) -> tuple[list[fx.Node], tuple[str, float] | None]:
    """The call nodes of ``target`` in ``gm`` and, when there is exactly one whose only user is
    a supported activation on it, that activation."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if len(calls) != 1 or len(calls[0].users) != 1:
        return calls, None
    user = next(iter(calls[0].users))
    if not user.args or user.args[0] is not calls[0]:
        return calls, None
    return calls, _activation_of(gm, user)


def _make_activation(name: str, slope: float) -> nn.Module:
    return {"relu": lambda: nn.ReLU(), "relu6": lambda: nn.ReLU6(), "silu": lambda: nn.SiLU(),
            "leaky_relu": lambda: nn.LeakyReLU(slope)}[name]()


def _fuse_activation(root: nn.Module, site, norm: nn.Module) -> str | None:
    """Move the activation after ``site`` into ``norm`` (train graph and eval twin alike)."""
    if site.graph is None or site.functional or site.shared or getattr(norm, "_post_children", ()) != ():
        return None
    if has_hooks(norm, output_only=True):  # they must see the norm's output, not the activation's
        return None
    gm = root.get_submodule(site.graph) if site.graph else root
    if not isinstance(gm, fx.GraphModule):
        return None
    target = site.name[len(site.graph) + 1:] if site.graph else site.name
    graphs = [gm] + ([gm.__dict__["mode_twin"]] if gm.__dict__.get("mode_twin") is not None else [])
    found = [_consumer(g, target) for g in graphs]
    acts = {a for _, a in found}
    if len(acts) != 1 or None in acts:
        return None  # every mode's graph must apply the same activation right after the norm
    name, slope = acts.pop()
    for g, (calls, _) in zip(graphs, found):
        node = calls[0]
        user = next(iter(node.users))
        user.replace_all_uses_with(node)
        g.graph.erase_node(user)
        g.recompile()
    norm.add_module("act", _make_activation(name, slope).train(norm.training))
    norm._post_children = ("act",)
    return name


def lower_model(module: nn.Module, sites, options: LowerOptions | str = "auto") -> nn.Module:
    """Swap the selected sites of ``module`` for fused modules (see the module docstring).

    Returns ``module`` (changed in place); the decisions are in ``module.bnrewrite_lowering``
    (a list of :class:`LoweringRecord`) and in each lowered module's ``describe()``."""
    if isinstance(options, str):
        options = LowerOptions(mode=options)
    records: list[LoweringRecord] = []
    ok, why = should_lower(module, options.mode)
    done: dict[str, nn.Module] = {}
    for site in sites:
        if site.functional:
            records.append(LoweringRecord(site.name, site.kind, False, reason="functional F.batch_norm call"))
            continue
        if not ok:
            records.append(LoweringRecord(site.name, site.kind, False, reason=why))
            continue
        if site.name in done:
            continue
        norm = module.get_submodule(site.name)
        kind, original_class = type(norm).__name__, type(norm)
        new, reason = _lowered_module(norm)
        if new is not None and hasattr(new, "fused_activation") and new.fused_activation() is None:
            # children after the norm (timm's act=GELU, say) that no kernel applies: every training
            # step would run the reference path, so it is not lowered
            children = [getattr(new, n) for n in new._post_children]
            reason = (", ".join(f"{n}={type(c).__name__}" for n, c in zip(new._post_children, children))
                      + (" after the norm has hooks, which the kernel would skip" if any(map(has_hooks, children))
                         else " after the norm: no fused kernel applies it") + "; kept on the reference path")
            new.__dict__.pop("_fused_activation", None)
            norm.__class__, new = original_class, None
        if new is None:
            records.append(LoweringRecord(site.name, kind, False, reason=reason))
            continue
        if new is not norm:
            new.site_name = site.name  # what its error messages name
            set_submodule(module, site.name, new)
        if hasattr(new, "runs_plain_torch"):  # cbn's window op has no custom op: plain torch under compile
            new.compile_path = options.compile_path
        done[site.name] = new
        fusable = options.fuse_activation and hasattr(new, "fused_activation")
        act = _fuse_activation(module, site, new) if fusable else None
        if act is None:
            internal = new.fused_activation() if hasattr(new, "fused_activation") else None
            act = internal[0] if internal and internal[0] != "none" else None
        records.append(LoweringRecord(site.name, kind, True, activation=act))
    object.__setattr__(module, "bnrewrite_lowering", records)
    return module
