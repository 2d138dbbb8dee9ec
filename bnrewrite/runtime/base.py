"""State shared by every runtime module: exactly BatchNorm's parameters and buffers.

A rewritten site keeps ``weight``, ``bias``, ``running_mean``, ``running_var`` and
``num_batches_tracked`` under the same names as ``torch.nn.BatchNorm*d``, so a stock
checkpoint loads into a rewritten model with ``strict=True`` and back. Variants that
need more state (CBN history, schedule counters) list it in ``optional_state_keys``:
those keys are written by ``state_dict`` but may be absent when loading.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

@torch.library.custom_op("bnrewrite::buffer_snapshot", mutates_args=())
def buffer_snapshot(buffer: torch.Tensor) -> torch.Tensor:
    """A copy of ``buffer`` taken now, for use in a graph that later updates ``buffer`` in place.

    Why not ``buffer.clone()``: torch.compile's partitioners (aot_eager and inductor, torch 2.14)
    may recompute a clone in the backward pass from the buffer itself -- after the in-place
    update -- which silently changes the gradients. An opaque custom op is saved, not recomputed.
    """
    return buffer.clone()


@buffer_snapshot.register_fake
def _buffer_snapshot_fake(buffer: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(buffer)


# timm's BatchNormAct2d (and similar subclasses) apply these children after normalising.
_POST_NORM_CHILDREN = ("drop", "act")


class BatchNormState(nn.Module):
    """Base of all runtime normalisation modules.

    Subclasses implement :meth:`forward_train` (training mode); eval mode is stock BatchNorm:
    the running statistics or, with ``track_running_stats=False``, the whole batch's statistics
    — never a sample or ghost batches of it, so eval output does not depend on a draw and a
    folded model (``fold_for_inference``) computes the same.
    Every subclass exposes :meth:`inference_affine`, the per-channel ``(scale, shift)``
    that eval mode computes, which is all ``fold_for_inference`` needs.
    """

    _version = 2  # same as _BatchNorm: num_batches_tracked exists
    optional_state_keys: tuple[str, ...] = ()
    # passes and the fold pass look at this instead of isinstance checks per variant
    is_bnrewrite_norm = True
    site_name = ""  # qualified name of the site; passes set it, error messages use it
    # spatial dims of the BatchNorm*d this replaced (1, 2, 3): its input rank, checked as stock
    # BatchNorm does; None (SyncBatchNorm, built directly) checks only (N, C, ...)
    dims: int | None = None
    # Gradient checkpointing (torch.utils.checkpoint) re-runs a checkpointed forward during the
    # backward pass. True: this variant's training forward, run again then, computes what the first
    # call did (it holds no state the first call advanced, or it holds that state still while
    # recomputing, see :meth:`recomputing`); running statistics are updated again, as stock
    # BatchNorm's are. False: its forward depends on state the first call advanced (CBN history,
    # EMAs), so a recomputation would silently change the gradients: :meth:`check_input` refuses it.
    checkpoint_recompute_safe = True
    recompute_state_name = "variant state"  # what a refusal says the first call advanced
    step_state_name = "variant state"  # what a training step updates besides the running statistics
    # under torch.distributed: whether the training statistics are all-reduced over a process
    # group (as SyncBatchNorm's are) or computed per process; transform warns when a
    # SyncBatchNorm becomes a per-process module, with the variant's ``per_process_note``
    synchronises_statistics = False
    per_process_note = "its statistics are computed within each process"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.source_kind = "BatchNorm"
        self.channel_dim = 1
        self._post_children: tuple[str, ...] = ()
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **options):
        """Build the runtime module for ``bn``, sharing its Parameter and buffer objects."""
        if isinstance(bn, BatchNormState):
            src_kind = bn.source_kind
        else:
            src_kind = type(bn).__name__
        if getattr(bn, "weight", None) is not None and isinstance(bn.weight, nn.parameter.UninitializedParameter):
            from ..errors import InputError
            raise InputError(f"{src_kind} is a lazy module that has not seen an input yet: pass "
                             "example_inputs= to bnrewrite.transform so its shape is known")
        # on bn's device: the state a variant adds (a sampling schedule, say) must not land on a
        # default device (torch.set_default_device) other than the model's
        source = next((t for t in (getattr(bn, "weight", None), getattr(bn, "running_mean", None)) if t is not None),
                      None)
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, device=None if source is None else source.device,
                  **options)
        new.source_kind = src_kind
        from ..sites import _bn_dims

        new.dims = _bn_dims(bn)
        if bn.affine:
            new.weight = bn.weight
            new.bias = bn.bias
        if bn.track_running_stats:
            new.running_mean = bn.running_mean
            new.running_var = bn.running_var
            new.num_batches_tracked = bn.num_batches_tracked
        post = []
        # timm's BatchNormAct2d applies them, a runtime module those it applies (rot built from brn);
        # a subclass keeping stock BatchNorm's forward applies none (they move on as its own state)
        if isinstance(bn, BatchNormState):
            applied = tuple(n for n in _POST_NORM_CHILDREN if n in bn._post_children or isinstance(
                bn._modules.get(n), nn.Identity))
        elif type(bn).forward not in (_BatchNorm.forward, nn.SyncBatchNorm.forward):
            applied = _POST_NORM_CHILDREN
        else:
            applied = ()
        for name in applied:
            child = getattr(bn, name, None)
            if isinstance(child, nn.Module) and not isinstance(child, nn.Identity):
                new.add_module(name, child)
                post.append(name)
            elif isinstance(child, nn.Identity):
                new.add_module(name, child)
        new._post_children = tuple(post)
        _take_over_extra_state(new, bn, src_kind)
        _take_over_hooks(new, bn)
        new.train(bn.training)
        return new

    # ---------------------------------------------------------------- numerics shared by variants
    def reduce_dims(self, x: torch.Tensor) -> list[int]:
        return [d for d in range(x.dim()) if d != 1]

    @property
    def site_label(self) -> str:
        """`` 'name'`` of the site for messages (empty when no pass set it)."""
        return f" '{self.site_name}'" if self.site_name else ""

    def check_input(self, x: torch.Tensor) -> None:
        rank, dims = x.dim(), self.dims
        if (rank < 2 or x.shape[1] != self.num_features
                or (dims is not None and rank != dims + 2 and not (dims == 1 and rank == 2))):
            from ..errors import InputError
            c = self.num_features
            expected = {1: f"(N, {c}) or (N, {c}, L)", 2: f"(N, {c}, H, W)",
                        3: f"(N, {c}, D, H, W)"}.get(dims, f"(N, {c}, ...)")
            raise InputError(f"{type(self).__name__}{self.site_label} (replacing {self.source_kind}) expects "
                             f"{expected} input, got shape {tuple(x.shape)}; give it the input the "
                             f"{self.source_kind} took")
        if self.training and not self.checkpoint_recompute_safe and self.recomputing():
            self._refuse_recomputation()
        if self.training and functorch_active() and vmapped(x):
            self._refuse_vmap()

    @staticmethod
    def recomputing() -> bool:
        """True while this forward runs inside the autograd engine's backward pass: gradient
        checkpointing (``torch.utils.checkpoint``, reentrant or not) recomputing a checkpointed
        segment. Every forward calls :meth:`check_input` first, which refuses a recomputation for
        variants with ``checkpoint_recompute_safe = False``; stateful variants that can recompute
        exactly (samplers: the same draw) ask this to hold their state still. Under torch.compile
        (whose checkpointing recomputes inside the compiled graph) it is False: no graph break."""
        if torch.compiler.is_compiling():
            return False
        return torch._C._current_graph_task_id() != -1

    def _refuse_recomputation(self) -> None:
        from ..errors import InputError
        raise InputError(
            f"{type(self).__name__}{self.site_label} (replacing {self.source_kind}) was called again during the "
            "backward pass: gradient checkpointing (torch.utils.checkpoint) recomputes the forward, and this "
            "variant's training forward depends on state the first call already advanced (the "
            f"{self.recompute_state_name}), so the recomputed gradients would be silently wrong. Checkpoint "
            "segments that do not contain this layer, or use a stateless recipe (bn, ghost, bgn, the samplers)")

    def keep_statistics(self, mean: torch.Tensor, var: torch.Tensor, count) -> None:
        """``last_statistics = (mean, var, count)``, detached: the statistics a training step
        normalised with, for inspection. Under a ``torch.func`` transform, their values without the
        transform's wrappers, which die with it (a module holding a dead one can no longer be
        copied or saved); under ``vmap``, where there is one value per vmapped batch, None."""
        mean, var = mean.detach(), var.detach()
        if functorch_active():
            if vmapped(mean):
                self.last_statistics = None
                return
            mean, var = plain_value(mean), plain_value(var)
        self.last_statistics = (mean, var, count)

    def release_transform_wrappers(self) -> None:
        """Replace state tensors created inside a ``torch.func`` transform (lazily allocated
        history, say) by their values: a transform wraps every tensor made under it, the wrappers
        die with it, and a module holding a dead one can no longer be copied or saved. Called at
        the end of a training step under a transform (the step itself updates them wrapped)."""
        for name, t in self._buffers.items():
            if t is not None:
                self._buffers[name] = plain_value(t)

    def refuse_export_of_first_step(self, made_at_first_step: str) -> None:
        """``torch.export`` of this variant's first training step: the program would repeat what
        the first step does (make its ``made_at_first_step``) at every step, silently, since an
        exported program cannot branch on the Python state that says it is done."""
        from ..errors import InputError
        raise InputError(
            f"{type(self).__name__}{self.site_label} (replacing {self.source_kind}): torch.export of its first "
            f"training step, which makes its {made_at_first_step}: the exported program would make it again at "
            "every step. Run one training step eagerly first (model.train(); model(x)), or export in eval mode")

    def _refuse_vmap(self) -> None:
        """A training step under ``torch.func.vmap`` (model ensembles, per-example gradients): one
        module's state, which a step updates in place, cannot take a value per vmapped batch.
        Stock BatchNorm refuses it too; for its running statistics torch offers
        ``replace_all_batch_norm_modules_``, which does not see bnrewrite's modules."""
        from ..errors import InputError
        where = f"{type(self).__name__}{self.site_label} (replacing {self.source_kind})"
        if not self.checkpoint_recompute_safe:
            raise InputError(
                f"{where} cannot train under torch.func.vmap: a step updates its {self.step_state_name}, "
                "one set for all the vmapped batches. Vmap it in eval mode, or use a stateless recipe (bn, ghost, "
                "bgn, the samplers) with running statistics off")
        if self.track_running_stats and self.running_mean is not None:
            raise InputError(
                f"{where} cannot train under torch.func.vmap with running statistics: a step updates them in "
                "place, one set for all the vmapped batches. Turn them off first with "
                "bnrewrite.drop_running_stats_(model) (torch.func.replace_all_batch_norm_modules_ does it for "
                "stock BatchNorm only), or vmap it in eval mode")

    def empty_batch(self, x: torch.Tensor) -> bool:
        """True for an input without values (N = 0) where the statistics would come from the batch.
        Every variant's forward then runs :meth:`stock_forward`, as stock BatchNorm does: an empty
        output (gradients flow, empty), ``num_batches_tracked`` counts the step, the running
        statistics stay -- and no variant state moves (CBN history, sampling schedule, EMAs)."""
        return x.numel() == 0 and self.uses_batch_stats()

    def check_values_per_channel(self, x: torch.Tensor) -> None:
        """Batch statistics of one value per channel have no variance: stock BatchNorm's ValueError,
        as an InputError naming the site."""
        if x.numel() == x.shape[1]:
            from ..errors import InputError
            raise InputError(f"{type(self).__name__}{self.site_label}: expected more than 1 value per channel "
                             f"when training, got input size {tuple(x.shape)}; use a batch of 2 or more "
                             "examples (or drop_last=True in the DataLoader)")

    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """PyTorch's rule: EMA with ``momentum`` (or the cumulative mean when None) of the
        batch mean and the *unbiased* variance of the ``count`` values the statistics came from."""
        if not (self.training and self.track_running_stats):
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            unbiased = var.detach() * (count / max(count - 1, 1))
            # Stock BatchNorm updates its running statistics inside the batch_norm op, which leaves
            # autograd's version counter alone; an in-place op on the buffer bumps it, and the backward
            # of an earlier call that saved the buffer (F.batch_norm saves it, even in training, where it
            # is not used) then raises -- two calls before one backward (siamese, contrastive, a CBN
            # step after a stock burn-in call). So update through .data, as the op does. Values read
            # in a training forward are snapshots (buffer_snapshot), which no update reaches.
            running_mean, running_var = ((self.running_mean, self.running_var) if torch.compiler.is_compiling()
                                         else (self.running_mean.data, self.running_var.data))
            running_mean.mul_(1 - factor).add_(mean.detach().to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)

    def update_running_stats_from_batch(self, x: torch.Tensor) -> None:
        """Running statistics from the whole batch, for variants that normalise with other
        statistics (ghost batches, batch groups) but, like stock BN, estimate the inference
        statistics from every value. One value per channel says nothing about the variance:
        the averages are left alone then. Accumulated in at least float32, as stock BatchNorm does
        for a bfloat16/float16 input (``torch.var_mean`` would round the mean to bfloat16)."""
        count = x.numel() // self.num_features
        if self.training and self.track_running_stats and count > 1:
            with torch.no_grad():
                var, mean = batch_moments(x)
            self.update_running_stats(mean, var, count)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """y = (x - mean) / sqrt(var + eps) * weight + bias, broadcast over the channel dim."""
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = (inv * self.weight).reshape(shape)
            return (x - mean.reshape(shape)) * scale + self.bias.reshape(shape)
        return (x - mean.reshape(shape)) * inv.reshape(shape)

    def uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly ``nn.BatchNorm*d.forward`` on this state."""
        bn_training = self.uses_batch_stats()
        if bn_training:
            self.check_values_per_channel(x)
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps)

    def post_norm(self, y: torch.Tensor) -> torch.Tensor:
        for name in self._post_children:
            y = getattr(self, name)(y)
        return y

    # ---------------------------------------------------------------- module protocol
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        y = self.forward_train(x) if self.training and not self.empty_batch(x) else self.stock_forward(x)
        return self.post_norm(y)

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)`` with eval output ``x * scale + shift``."""
        if not self.track_running_stats:
            from ..errors import UnsupportedPatternError
            raise UnsupportedPatternError(
                f"{type(self).__name__} has track_running_stats=False: its eval output depends on the "
                "batch, so it has no per-channel affine to fold")
        inv = torch.rsqrt(self.running_var + self.eps)
        scale = inv * self.weight if self.affine else inv
        shift = -self.running_mean * scale
        if self.affine:
            shift = shift + self.bias
        return scale, shift

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        # ``last_statistics`` (a step's (mean, var, count), set by variants that normalise with other
        # statistics than the batch's) is a plain attribute, which nn.Module does not convert: convert
        # it as the buffers are, so .to()/.double()/.cuda() never leave it on another device or dtype
        stats = self.__dict__.get("last_statistics")
        if stats is not None:
            with torch.no_grad():
                self.last_statistics = tuple(fn(t.detach()) if isinstance(t, torch.Tensor) else t for t in stats)
        return result

    # attributes (Python values or tensors) a training forward advances that are schedule, not
    # statistics: CBN's history and counters, a sampler's draw and step count
    schedule_attributes: tuple[str, ...] = ()

    def schedule_state(self) -> dict:
        """A copy of the :attr:`schedule_attributes`, for :meth:`restore_schedule_state`:
        ``bnrewrite.update_bn`` runs training-mode forward passes that must not advance them."""
        return {name: _detached_copy(getattr(self, name)) for name in self.schedule_attributes}

    def restore_schedule_state(self, state: dict) -> None:
        """Put back what :meth:`schedule_state` copied. A tensor of unchanged shape is copied into
        in place (compiled graphs keep their buffer), anything else is re-assigned."""
        with torch.no_grad():
            for name, value in state.items():
                current = getattr(self, name)
                if (isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor)
                        and (current.shape, current.dtype, current.device) == (value.shape, value.dtype, value.device)):
                    current.copy_(value)
                else:
                    setattr(self, name, value)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        """What ``bnrewrite inspect`` shows for this site; variants add their own keys."""
        return {"variant": type(self).__name__}

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in self.optional_state_keys:
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)


def _detached_copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


# a recipe's ``momentum`` option, the same words for every component; ``none`` (None) reads as ``keep``
MomentumOption = float | Literal["keep", "cumulative"] | None


def check_momentum_option(options) -> None:
    """Validate the ``momentum`` option of a recipe component's (frozen dataclass) ``options``: a
    float in (0, 1], ``keep`` or ``cumulative``; ``none`` is stored as ``keep``, the meaning it has,
    so both print and compare the same."""
    momentum = options.momentum
    if momentum is None:
        object.__setattr__(options, "momentum", "keep")
    elif isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0.0 < momentum <= 1.0:
        object.__setattr__(options, "momentum", float(momentum))
    elif momentum not in ("keep", "cumulative"):  # options built by hand skip the parser's type checks
        raise ValueError(f"momentum must be in (0, 1], 'keep' or 'cumulative', got {momentum!r}")


def resolve_momentum(option, current: float | None) -> float | None:
    """The running-statistics momentum a rewritten BatchNorm gets from a recipe's ``momentum``
    option: ``keep`` (or None) = the BatchNorm's own (``current``), ``cumulative`` = PyTorch's ``None``."""
    if option is None or option == "keep":
        return current
    if option == "cumulative":
        return None
    return float(option)


def match_memory_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s layout, contiguous or channels-last (stock BatchNorm keeps the input's
    layout; reshapes over channel groups come out contiguous, einsum over channels in whatever
    layout it picks, and a model's own ``.view()`` after the layer needs the input's)."""
    if y.dim() != x.dim():
        return y
    if x.is_contiguous():
        return y.contiguous()
    for dims, layout in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dims and x.is_contiguous(memory_format=layout):
            return y.contiguous(memory_format=layout)
    return y


# the per-module hooks a model's own code may have put on its BatchNorm (register_forward_hook,
# register_full_backward_hook, ...: feature extraction, activation statistics)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


_BATCHNORM_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _take_over_extra_state(new: nn.Module, bn: nn.Module, kind: str) -> None:
    """A BatchNorm subclass's own parameters, buffers and children (calibration data, an observer)
    move to ``new`` unchanged: stock BatchNorm's forward never reads them, so the variant need not
    either, but the model's checkpoints and optimizer still hold them. A name the variant uses
    itself cannot be kept, and is refused rather than dropped. From a runtime module (``rot`` on
    top of ``brn``), what the new module lacks moves on the same way."""
    stock = isinstance(bn, _BatchNorm)
    moved = set() if stock else set(bn.__dict__.get("_extra_state_names", ()))
    extra = [(n, "parameter", p) for n, p in bn._parameters.items() if n not in _BATCHNORM_STATE]
    extra += [(n, "buffer", b) for n, b in bn._buffers.items() if n not in _BATCHNORM_STATE]
    extra += [(n, "child", m) for n, m in bn._modules.items() if n not in new._modules]
    kept = []
    for name, what, value in extra:
        # optional_state_keys: what the variant registers later (brn's input_mean, once its producer is known)
        if hasattr(new, name) or name in getattr(new, "optional_state_keys", ()):
            if not stock and name not in moved:  # the variant's own state, which new has too
                continue
            from ..errors import UnsupportedPatternError
            raise UnsupportedPatternError(
                f"{kind} has a {what} '{name}' of its own, a name {type(new).__name__} uses too; rename it, or leave "
                "the site out with exclude=[...]")
        if what == "parameter":
            new.register_parameter(name, value)
        elif what == "buffer":
            new.register_buffer(name, value, persistent=name not in bn._non_persistent_buffers_set)
        else:
            new.add_module(name, value)
        kept.append(name)
    new.__dict__["_extra_state_names"] = tuple(kept)  # a rebuild from new (rot on brn) keeps checking them


def has_hooks(module: nn.Module, output_only: bool = False) -> bool:
    """Whether the model's code registered hooks on ``module``; ``output_only``: only those that
    see its output or gradients (forward pre-hooks see the input alone)."""
    names = [n for n in _HOOK_DICTS if not (output_only and n.startswith("_forward_pre"))]
    return any(module.__dict__.get(name) for name in names)


def _take_over_hooks(new: nn.Module, bn: nn.Module) -> None:
    """``new`` stands in for ``bn``, so the hooks registered on ``bn`` run on ``new``: the same hook
    dicts, so a handle from ``bn.register_forward_hook`` still removes its hook."""
    for name in _HOOK_DICTS:
        hooks = bn.__dict__.get(name)
        if hooks:
            new.__dict__[name] = hooks
    if bn.__dict__.get("_is_full_backward_hook") is not None:
        new._is_full_backward_hook = bn._is_full_backward_hook


def is_batchnorm(module: nn.Module) -> bool:
    """A stock BatchNorm (any subclass, lazy or sync) or a bnrewrite runtime module."""
    return isinstance(module, _BatchNorm) or getattr(module, "is_bnrewrite_norm", False)


def is_stock_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


def differentiable_gradients(recompute, inputs: tuple, grad_outputs: tuple, needs_input_grad) -> list:
    """The gradients an ``autograd.Function``'s backward returns when it runs with
    ``create_graph=True`` (grad mode is then on inside it): by autograd through
    ``recompute(*inputs)``, a plain-torch forward of the same function, so that they are
    differentiable again. A closed-form backward is not: it reads statistics its forward saved,
    which carry no history, so a second derivative (a gradient penalty, MAML's meta-gradient)
    would silently miss their terms. ``inputs`` are the saved inputs (they unpack with their
    history); ``grad_outputs`` pair with ``recompute``'s outputs. One gradient (or None) per input."""
    wanted = [i for i, t in enumerate(inputs) if needs_input_grad[i] and isinstance(t, torch.Tensor)]
    gradients: list = [None] * len(inputs)
    if not wanted:
        return gradients
    with torch.enable_grad():
        outputs = recompute(*inputs)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    for i, g in zip(wanted, found):
        gradients[i] = g
    return gradients


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap).

    Our ``autograd.Function`` s are old-style (``forward(ctx, ...)``), which those transforms
    refuse. The setup_context style they need costs ~30 µs more per call in eager mode (torch
    binds its arguments with ``inspect.signature`` at every call: several times a lowered layer's
    whole host time). So under a transform each op runs its plain-torch formulation instead,
    which the transforms differentiate, in reverse and forward mode, like any torch code."""
    return torch._C._are_functorch_transforms_active()


def _transform_layers(t: torch.Tensor):
    """``t`` and, inward, each tensor a ``torch.func`` transform's wrapper around it holds; the
    last one holds the values."""
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

    yield t
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
        yield t


def vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` has a dimension ``torch.func.vmap`` maps over, at any level of nested
    transforms (``vmap(grad(f))``). Not the tangents jacfwd vmaps over: a primal has none."""
    from torch._C._functorch import is_batchedtensor

    return any(is_batchedtensor(layer) for layer in _transform_layers(t))


def plain_value(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the wrappers a ``torch.func`` transform's forward sees (grad, jvp): the
    tensor holding its values."""
    *_, value = _transform_layers(t)
    return value


def outside_transforms():
    """A context outside every ``torch.func`` transform (none when there is none): tensors made
    there are plain, and a value made there outlives the transform (its wrappers die with it)."""
    if not functorch_active():
        return contextlib.nullcontext()
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def _two_pass_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, dtype=torch.promote_types(x.dtype, torch.float32))
    var = (x - mean.reshape(shape)).square().mean(dims)
    return var, mean


class _BatchMoments(torch.autograd.Function):
    """(biased var, mean) per channel; backward saves only x, which the normalisation keeps anyway
    (autograd through the two passes would also keep x − μ, one more activation-sized tensor)."""

    @staticmethod
    def forward(ctx, x):
        var, mean = _two_pass_moments(x)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var, grad_mean):
        x, mean = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1]
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        # ∂var/∂x = 2(x − μ)/M, ∂μ/∂x = 1/M
        scale = (2.0 / count) * grad_var
        shift = grad_mean / count - scale * mean
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).to(x.dtype)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) biased variance and mean of x, accumulated in at least fp32.

    Two passes (mean, then mean of squared deviations): as exact as ``torch.var_mean`` and, on
    a CPU, 5–20× faster than its Welford reduction over the non-contiguous N, H, W dims.
    Differentiable (double backward too). Used by CBN (the current batch's part of its
    Eqs. 9–11) and sampled BN (the sample's moments, Eq. 3). Under a ``torch.func`` transform,
    the same two passes in plain torch (:func:`functorch_active`).
    """
    if functorch_active():
        return _two_pass_moments(x)
    return _BatchMoments.apply(x)
