"""Runtime modules whose training forward runs the fused op (Triton on CUDA).

* :class:`FusedBatchNorm` — a stock ``nn.BatchNorm*d`` site lowered: full batch statistics and,
  when the lowering pass fused one, the following activation, in one op.
* :func:`lowered_class` — for a :class:`~bnrewrite.runtime.sampled.SampledBatchNorm` class, a
  subclass ``Fused<Name>`` whose training forward runs the fused op on the same sample spec
  (the lowering pass swaps the class of the module in place, so its state, schedule and
  ``new_epoch`` stay as they are).

A fused activation is the module's ``act`` child (as on timm's ``BatchNormAct2d``): eval mode
and folding apply it through :meth:`~bnrewrite.runtime.base.BatchNormState.post_norm`, so
``inference_affine`` keeps meaning "before the activation".
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..base import BatchNormState, functorch_active, has_hooks
from .functional import region_of, running_argument
from .ops import KERNEL_DTYPES, call_batch_norm_act

_ACTIVATION_TYPES = ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu"), (nn.LeakyReLU, "leaky_relu"))


def activation_name(module: nn.Module | None) -> tuple[str, float] | None:
    """``(name, negative_slope)`` of an activation module the kernels implement, else None. A
    subclass counts only with the torch class's own ``forward`` (timm's subclass them for
    ``inplace``); one with its own ``forward`` computes something else."""
    for cls, name in _ACTIVATION_TYPES:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return name, float(getattr(module, "negative_slope", 0.0))
    return None


def kernel_activation(norm: nn.Module) -> tuple[str, float] | None:
    """The activation a norm's kernel applies: ``("none", 0.0)`` without post-norm children, the
    ``act`` child when it is the only one and a kind the kernels implement (``drop`` before it
    would change the order) and no hooks of the model's sit on it (they would not run), else None
    (the kernel cannot apply what follows)."""
    post = getattr(norm, "_post_children", ())
    if post == ():
        return "none", 0.0
    if post == ("act",) and not has_hooks(norm.act):
        return activation_name(norm.act)
    return None


class _FusedForward:
    """What the lowered modules share: which activation is fused, and the running-stat rule."""

    lowered = "triton"
    # under torch.compile: "inductor" traces the plain-torch computation, "ops" the custom ops
    compile_path = "inductor"

    def fused_activation(self) -> tuple[str, float] | None:
        """:func:`kernel_activation`, kept while the ``act`` child, its slope and the post-norm
        order stay the same (every training step asks; the lookup is measurable host time)."""
        if torch.compiler.is_compiling():  # no Python state written while torch.compile traces
            return kernel_activation(self)
        act_module = self._modules.get("act")
        # the slope from __dict__: getattr on a module without one goes through Module.__getattr__'s miss
        slope = act_module.__dict__.get("negative_slope") if act_module is not None else None
        guard = (act_module, slope, self._post_children)
        cached = self.__dict__.get("_fused_activation")
        if cached is None or cached[0] != guard:
            cached = (guard, kernel_activation(self))
            self.__dict__["_fused_activation"] = cached
        return cached[1]

    def runs_plain_torch(self) -> bool:
        """Whether this call runs the plain-torch computation of the unlowered module, not the op:
        a ``torch.compile`` trace with ``compile_path="inductor"`` (inductor then generates its own
        fused kernels for it, as it does for stock BatchNorm, instead of calling our opaque op at
        every layer), or a ``torch.func`` transform (which refuses the op's old-style autograd
        Function: :func:`~bnrewrite.runtime.base.functorch_active`)."""
        if torch.compiler.is_compiling():
            return self.compile_path == "inductor"
        return functorch_active()

    def _region(self, spec, shape: tuple[int, ...]):
        """:func:`region_of` for this step; in eager mode computed once per sample draw and shape
        (host time per step is what small lowered layers are bound by)."""
        if torch.compiler.is_compiling():
            return region_of(spec, shape)
        cached = self.__dict__.get("_fused_region")
        if cached is None or cached[0] is not spec or cached[1] != shape:
            cached = (spec, shape, region_of(spec, shape))
            self.__dict__["_fused_region"] = cached
        return cached[2]

    def _run_fused(self, x: torch.Tensor, spec, act: tuple[str, float]):
        """``(y, stats, count)`` of the fused op (``stats[0]``, ``stats[1]``: mean, variance); in
        training with running statistics also PyTorch's update of those (``momentum``, or the
        cumulative mean when it is None) and of ``num_batches_tracked``, inside the op's launch
        (the count on the host first for the cumulative mean, which divides by it)."""
        region, wv, count = self._region(spec, tuple(x.shape))
        # _parameters/_buffers directly: Module.__getattr__ per attribute is host time per step
        params, buffers = self._parameters, self._buffers
        running = tracked = None
        if self.training and self.track_running_stats and count > 1:
            tracked = buffers["num_batches_tracked"]
            if self.momentum is None:  # the cumulative average needs the new count on the host first
                tracked.add_(1)
                momentum, tracked = 1.0 / float(tracked), None
            else:  # the op's launch adds the 1 (no add_ launch of its own)
                momentum = self.momentum
            running = running_argument(buffers["running_mean"], buffers["running_var"], momentum, count)
        y, stats = call_batch_norm_act(x, params["weight"], params["bias"], region, wv, float(self.eps), act[0],
                                       act[1], running, tracked, self)
        return y, stats, count

    def extra_repr(self) -> str:
        act = self.fused_activation()
        extra = f", activation={act[0]}" if act and act[0] != "none" else ""
        if self.compile_path != "inductor":
            extra += f", compile_path={self.compile_path}"
        return f"{super().extra_repr()}, lowered={self.lowered}{extra}"

    def _lowering_info(self) -> dict:
        act = self.fused_activation()
        return {"lowered": self.lowered,
                "fused_activation": act[0] if act and act[0] != "none" else None,
                "compile_path": self.compile_path}


class FusedBatchNorm(_FusedForward, BatchNormState):
    """Stock BatchNorm (full batch statistics) + optional activation as one fused op.

    Training: ``act(F.batch_norm(x, ...))`` computed by ``bnrewrite::batch_norm_act`` (one
    statistics pass, one normalise+activation pass; backward two passes). Eval: stock
    ``F.batch_norm`` on the running statistics, then the activation.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, dims: int | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.dims = dims

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options):
        from ...sites import _bn_dims

        return super().from_batchnorm(bn, dims=_bn_dims(bn), **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        act = self.fused_activation()
        if (not self.uses_batch_stats() or act is None or x.dim() > 5 or x.dtype not in KERNEL_DTYPES
                or self.runs_plain_torch() or self.empty_batch(x)):
            return super().forward(x)
        self.check_values_per_channel(x)
        return self._run_fused(x, None, act)[0]

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        return self.stock_forward(x)

    def describe(self, input_shape=None) -> dict:
        info = super().describe(input_shape)
        info.update(self._lowering_info())
        return info


class FusedSampledMixin(_FusedForward):
    """Training forward of a SampledBatchNorm through the fused op (same spec, same schedule)."""

    def fused_ready(self, x: torch.Tensor) -> bool:
        return (self.training and self.strategy != "frs" and 2 <= x.dim() <= 5 and x.numel() > 0
                and x.dtype in KERNEL_DTYPES and self.fused_activation() is not None and not self.sync_active()
                and not self.runs_plain_torch())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused_ready(x):
            return super().forward(x)
        self.check_input(x)
        self.advance_schedule()  # the schedule bookkeeping of SampledBatchNorm.forward_train
        shape = tuple(x.shape)
        spec = self.sample_spec(shape)
        full = spec.is_full(shape)
        if not full:
            self._check_values_per_channel(spec, shape)
        else:
            self.check_values_per_channel(x)
        y, stats, count = self._run_fused(x, None if full else spec, self.fused_activation())
        # stats carry no autograd history; a plain attribute, set past Module.__setattr__'s checks
        self.__dict__["last_statistics"] = None if full else (stats[0], stats[1], count)
        if not full:
            self.note_sample_size(count, shape)
        return y

    def describe(self, input_shape=None) -> dict:
        info = super().describe(input_shape)
        info.update(self._lowering_info())
        if self.strategy == "frs":
            info["lowered"] = "reference (frs: random points have no fused kernel)"
        return info



_LOWERED: dict[type, type] = {}


def lowered_class(cls: type) -> type:
    """``Fused<cls.__name__>``: ``cls`` with :class:`FusedSampledMixin`'s training forward.
    Registered in this module under that name, so pickled models load again."""
    if issubclass(cls, FusedSampledMixin):
        return cls
    if cls not in _LOWERED:
        name = f"Fused{cls.__name__}"
        new = type(name, (FusedSampledMixin, cls), {"__module__": __name__, "__qualname__": name,
                                                      "__doc__": f"{cls.__name__} lowered to the fused op."})
        _LOWERED[cls] = new
        setattr(sys.modules[__name__], name, new)
    return _LOWERED[cls]


def __getattr__(name: str):
    # unpickling a lowered model in a fresh process: build Fused<X> from the runtime class X
    if name.startswith("Fused"):
        from .. import sampled

        base = getattr(sampled, name[len("Fused"):], None)
        if isinstance(base, type):
            return lowered_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
