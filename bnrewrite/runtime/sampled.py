"""Sampled BatchNorm and Virtual Dataset Normalization (Chen et al., "Batch Normalization
Sampling", bn-sampling.txt §3.2, §4.1–4.3, Alg. 1–3, App. C–D).

Training statistics are estimated from a *sample* of the activations (Eq. 3) and used to
normalise the *whole* tensor (Eq. 1). Which values form the sample is described, per layer
and per step, by a :class:`SampleSpec`:

* ``ns``  – the first ``n`` examples (Alg. 1, "NS": begin = 0);
* ``bs``  – ``n`` *contiguous* examples at a random offset (Alg. 1, "BS");
* ``fs``  – one rectangular patch of every feature map, its location shared by all channels
  and examples of the layer, area ≈ ``ratio``·H·W with the map's aspect ratio (Alg. 2);
* ``frs`` – fully random points over examples × positions (§5.1, the unstable baseline);
* ``vdn`` – the statistics of ``num_virtual`` synthetic rows prepended to the batch (Alg. 3),
  alone or mixed with a sampler: X = β·X_virtual + (1−β)·X_sampled for mean and variance (Eq. 4).

The indices are static until re-drawn (§4.1 "updated only once for each epoch", App. C.1
"static sampling index"), independent per layer (App. C.2 inter-layer correlation) and drawn
from a generator seeded by ``(seed, layer stream, draw number)``, so a run is reproducible and a
checkpoint resumes the same schedule.

Gradients: :func:`sampled_batch_norm_reference` computes the statistics from a slice of the
input with plain torch ops, so autograd gives exactly App. C Eq. 6 — points outside the
sample receive only ``dy·γ/σ``; points inside also receive the mean and variance terms with
``1/s`` in place of ``1/m``.

Eval mode is stock BatchNorm on the running statistics (``BatchNormState.stock_forward``); with
``track_running_stats=False`` on the whole batch's statistics, as stock BatchNorm (not the sample).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from ..errors import InputError, warn_at_caller
from .base import BatchNormState, batch_moments, outside_transforms

STRATEGIES = ("ns", "bs", "fs", "frs", "vdn", "full")


# ====================================================================== the sample of one step
@dataclass(frozen=True, eq=False)
class SampleSpec:
    """The values a sampled BatchNorm takes its statistics from, for one layer and one step.

    For an input ``x`` of shape ``(num_virtual + N, C, *S)``:

    * ``num_virtual``: rows ``x[:num_virtual]`` are virtual samples (VDN, Alg. 3).
    * ``rows = (start, stop)``: the sampled examples are the *real* rows
      ``x[num_virtual + start : num_virtual + stop]``.
    * ``patch``: ``((start, stop), ...)`` per spatial dim of ``S`` (FS, Alg. 2); ``None`` = whole map.
    * ``points``: for ``frs``, a sorted 1-d long tensor of flat indices into the positions of the
      selection above, flattened as ``(example, *spatial)`` — i.e. the columns of
      ``x_sel.transpose(0, 1).reshape(C, -1)``; ``None`` = every position.
    * ``beta``: weight of the virtual statistics (Eq. 4): mean = β·mean_v + (1−β)·mean_s and the
      same for the variance. ``beta = 1`` uses the virtual rows only; it only applies when
      ``num_virtual > 0``.
    """

    rows: tuple[int, int]
    patch: tuple[tuple[int, int], ...] | None = None
    points: torch.Tensor | None = None
    num_virtual: int = 0
    beta: float = 0.0

    def virtual_weight(self) -> float:
        return float(self.beta) if self.num_virtual > 0 else 0.0

    def uses_sample(self) -> bool:
        return self.virtual_weight() < 1.0

    def is_full(self, input_shape: tuple[int, ...]) -> bool:
        """True when the statistics are exactly those of the whole batch (= stock BatchNorm)."""
        n = input_shape[0] - self.num_virtual
        return (self.num_virtual == 0 and self.rows == (0, n) and self.patch is None and self.points is None)

    def sample_count(self, input_shape: tuple[int, ...]) -> int:
        """Values per channel the sampled statistics come from (s of Eq. 3)."""
        if self.points is not None:
            return int(self.points.numel())
        spatial = input_shape[2:]
        if self.patch is not None:
            spatial = tuple(b - a for a, b in self.patch)
        return (self.rows[1] - self.rows[0]) * math.prod(spatial)

    def virtual_count(self, input_shape: tuple[int, ...]) -> int:
        return self.num_virtual * math.prod(input_shape[2:])

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled real values as a view ``(n_s, C, *patch)`` (FRS: a ``(C, s)`` copy)."""
        start = self.num_virtual
        sel = x[start + self.rows[0]:start + self.rows[1]]
        if self.patch is not None:
            sel = sel[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in self.patch)]
        if self.points is not None:
            flat = sel.transpose(0, 1).reshape(sel.shape[1], -1)
            return flat.index_select(1, self.points.to(x.device))
        return sel


# strategies whose sample is drawn at random (ns takes the first rows; vdn's rows come from torch ops)
_DRAWN = ("bs", "fs", "frs")


def _moments(values: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    # two-pass moments (torch.var_mean's Welford reduction is several times slower on a CPU), kept
    # in at least float32 as stock BatchNorm keeps them for a bfloat16/float16 input: rounded to
    # bfloat16, the mean of values near 100 is off by up to 0.25 (a quarter σ for unit variance)
    var, mean = batch_moments(values.movedim(channel_dim, 1) if channel_dim != 1 else values)
    return mean, var


def sampled_statistics(x: torch.Tensor, spec: SampleSpec, process_group: Any = None,
                       sync: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and biased variance per channel from the sample (Eq. 3), mixed with the virtual
    rows' statistics by Eq. 4; returns ``(mean, var, count)`` where ``count`` is the number of
    values per channel they came from (used for the unbiased running variance).

    With ``sync=True`` under ``torch.distributed`` the per-rank sums, sums of squares and counts
    of the sample (and, separately, of the virtual rows) are all-reduced (§4.3), so every rank
    gets the statistics of the union of the ranks' samples.
    """
    wv = spec.virtual_weight()
    if sync:
        from ..distributed import synced_moments

        return synced_moments(x, spec, process_group)
    parts = []
    if wv > 0.0:
        mean_v, var_v = _moments(x[:spec.num_virtual], 1)
        parts.append((wv, mean_v, var_v, spec.virtual_count(tuple(x.shape))))
    if wv < 1.0:
        sel = spec.select(x)
        mean_s, var_s = _moments(sel, 0 if spec.points is not None else 1)
        parts.append((1.0 - wv, mean_s, var_s, spec.sample_count(tuple(x.shape))))
    return mix_statistics(parts)


def mix_statistics(parts) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Eq. 4: X = β·X_virtual + (1−β)·X_sampled, for X = mean and X = variance."""
    if len(parts) == 1:
        _, mean, var, count = parts[0]
        return mean, var, count
    mean = sum(w * m for w, m, _, _ in parts)
    var = sum(w * v for w, _, v, _ in parts)
    return mean, var, sum(c for *_, c in parts)


def normalize_with(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Eq. 1 over the whole tensor with the estimated statistics, computed in at least float32
    and returned in ``x``'s dtype, as stock BatchNorm does for a bfloat16/float16 input."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    inv = torch.rsqrt(var.to(xc.dtype) + eps)
    if weight is not None:
        scale = (inv * weight).reshape(shape)
        y = (xc - mean.reshape(shape)) * scale
        y = y + bias.reshape(shape) if bias is not None else y
    else:
        y = (xc - mean.reshape(shape)) * inv.reshape(shape)
    return y.to(x.dtype)


def sampled_batch_norm_reference(x: torch.Tensor, spec: SampleSpec, weight: torch.Tensor | None,
                                 bias: torch.Tensor | None, eps: float):
    """Plain-torch reference of sampled BatchNorm: ``(y, mean, var, count)``.

    ``mean``/``var`` are the estimated statistics (Eq. 3, mixed by Eq. 4 when the spec has virtual
    rows), ``y`` is the whole of ``x`` normalised with them (Eq. 1), ``count`` the number of values
    per channel they came from. Autograd through the sampled slice is App. C Eq. 6.
    """
    mean, var, count = sampled_statistics(x, spec)
    return normalize_with(x, mean, var, weight, bias, eps), mean, var, count


# ====================================================================== seeded, static draws
# A variance from s values scatters like χ²(s−1)/(s−1): with 4 values, one channel in ~730 gets
# below 1/100 of the batch's and normalising with it multiplies that channel by 10 or more --
# enough to make a deep net diverge (timm efficientnet_b0 at 64×64, batch 4, fs:1/32 gives NaN
# at the second step). With 16 values, one channel in a thousand stays above 0.23 of it.
FEW_SAMPLE_VALUES = 16


class SmallSampleCheck:
    """Shared by the sampled sites of one rewrite: one warning, at the second training step, that
    names every site whose first step's sample held fewer than :data:`FEW_SAMPLE_VALUES` values
    per channel. At run time because the training batch decides the count (``example_inputs``
    often have a batch of 1 or 2)."""

    def __init__(self, strategy: str):
        self.strategy = strategy
        self.first: str | None = None
        self.few: list[tuple[str, int, tuple[int, ...]]] = []
        self.done = False

    def observe(self, site: str, count: int, shape: tuple[int, ...]) -> None:
        if self.done:
            return
        if self.first is None:
            self.first = site
        elif site == self.first:  # the next step has begun: every site was seen once
            self.done = True
            self._report()
            return
        if count < FEW_SAMPLE_VALUES:
            self.few.append((site, count, shape))

    def _report(self) -> None:
        if not self.few:
            return
        from ..errors import warn_at_caller

        shown = ", ".join(f"'{name}' ({count} from {shape})" for name, count, shape in self.few[:3])
        more = f" and {len(self.few) - 3} more" if len(self.few) > 3 else ""
        warn_at_caller(
            f"{self.strategy}: {len(self.few)} site(s) took their statistics from fewer than {FEW_SAMPLE_VALUES} "
            f"values per channel in the first training step: {shown}{more}. A variance from so few values can "
            "be far below the batch's and blow up the activations (training may diverge); use a larger ratio "
            "or n, a larger batch or input, or exclude these sites (transform(..., exclude=[...])).")


def draw_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from ``key`` (e.g. seed, layer stream, draw number) via numpy's
    SeedSequence, so nearby keys give independent streams."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator()
    gen.manual_seed(int(words[0]) << 32 | int(words[1]))
    return gen


def layer_stream(name: str) -> int:
    """Stream id of a layer, from its qualified name: independent of which sites were selected."""
    return zlib.crc32(name.encode())


def patch_shape(spatial: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """Patch sides with area ≈ ratio·prod(spatial) and the map's aspect ratio (§4.1, Alg. 2)."""
    factor = ratio ** (1.0 / len(spatial))
    return tuple(min(size, max(1, round(size * factor))) for size in spatial)


def _offset(u: float, room: int) -> int:
    # randint(0, room) of Alg. 1–2 from one uniform number, so a draw fits every batch size
    return min(room, int(u * (room + 1)))


class SampledBatchNorm(BatchNormState):
    """BatchNorm whose training statistics come from a sample (bn-sampling §4.1–4.2, Alg. 1–3).

    Args (besides BatchNorm's):
        strategy: ``ns``, ``bs``, ``fs``, ``frs``, ``vdn`` (virtual rows only) or ``full``
            (the real rows' full statistics: stock BatchNorm that ignores virtual rows).
        n: examples per sample for ``ns``/``bs`` (None: from ``ratio``).
        ratio: fraction sampled for ``fs``/``frs`` (and ``ns``/``bs`` when ``n`` is None).
        every: re-draw every ``every`` training forward calls; 0 = only on :meth:`new_epoch`.
        seed: the per-model seed of the draws; ``stream`` the per-layer stream id.
        num_virtual, beta: VDN rows at the front of a training batch and their weight (Eq. 4).
        sync: all-reduce the sampled statistics under ``torch.distributed`` (§4.3).

    The schedule (seed, stream, draw number, step count) is the ``sample_schedule`` buffer: it is
    written by ``state_dict`` and optional when loading, so a stock checkpoint loads strictly.
    """

    optional_state_keys = ("sample_schedule",)
    schedule_attributes = ("_draw", "_steps", "_cache")  # the every=N re-draws

    @property
    def synchronises_statistics(self) -> bool:
        return self.sync

    @property
    def per_process_note(self) -> str:
        if self.strategy in ("vdn", "full"):
            return ("its statistics are computed within each process (vdn has no sync option; "
                    "'fs:sync=true+vdn' and the other samplers do)")
        return (f"its sampled statistics are computed within each process; use '{self.strategy}:sync=true' to "
                "all-reduce them over the SyncBatchNorm's process group (bn-sampling §4.3)")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 strategy: str = "fs", n: int | None = None, ratio: float | None = None, every: int = 0,
                 seed: int = 0, stream: int = 0, num_virtual: int = 0, beta: float = 0.0,
                 sync: bool = False, process_group: Any = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if strategy not in STRATEGIES:
            raise InputError(f"SampledBatchNorm strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if n is not None and n < 1:
            raise InputError(f"SampledBatchNorm n must be >= 1, got {n}")
        if ratio is not None and not 0.0 < ratio <= 1.0:
            raise InputError(f"SampledBatchNorm ratio must be in (0, 1], got {ratio}")
        if strategy in ("ns", "bs") and n is None and ratio is None:
            n = 4
        if strategy in ("fs", "frs") and ratio is None:
            ratio = 1.0 / 32
        self.strategy = strategy
        self.n = n
        self.ratio = ratio
        self.every = int(every)
        self.num_virtual = int(num_virtual)
        self.beta = float(beta)
        self.sync = bool(sync)
        self.process_group = process_group
        self._seed = int(seed)
        self._stream = int(stream)
        self._draw = 0
        self._steps = 0
        self.register_buffer("sample_schedule", torch.zeros(4, dtype=torch.long, device=device))
        self._cache: tuple[tuple, SampleSpec] | None = None
        self.last_statistics: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # ---------------------------------------------------------------- schedule
    @property
    def draw(self) -> int:
        """How many times the indices have been re-drawn."""
        return self._draw

    def new_epoch(self) -> None:
        """Re-draw the sample indices (the paper updates them once per epoch, §4.1).

        The new sample for the last input shape is drawn here, outside any compiled region, so a
        ``torch.compile(fullgraph=True)`` model finds it cached (dynamo cannot trace the draw)."""
        previous = self._cache
        self._draw += 1
        self._cache = None
        if previous is not None:
            _draw, input_shape, _nv = previous[0]
            self.sample_spec(input_shape)

    def reseed(self, seed: int, stream: int | None = None) -> None:
        self._seed = int(seed)
        if stream is not None:
            self._stream = int(stream)
        self._draw = 0
        self._steps = 0
        self._cache = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with torch.no_grad():
            self.sample_schedule.copy_(self.sample_schedule.new_tensor([self._seed, self._stream, self._draw,
                                                                        self._steps]))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "sample_schedule" in state_dict:
            seed, stream, draw, steps = (int(v) for v in state_dict[prefix + "sample_schedule"].tolist())
            self._seed, self._stream, self._draw, self._steps = seed, stream, draw, steps
            self._cache = None

    # ---------------------------------------------------------------- the sample
    def virtual_rows(self) -> int:
        """Virtual rows at the front of the current input: VDN adds them in training only.

        The rows are added by the model's :class:`VirtualRowsInput`, which follows its own
        mode: with it in eval mode (``model.eval()`` and then this layer alone put back in
        training) the batch has none, and the first real examples would be taken for them."""
        if not self.training or not self.num_virtual:
            return 0
        source = self.__dict__.get("_virtual_rows_source")
        if source is not None and not source.training:
            raise InputError(
                f"SampledBatchNorm{self.site_label} is in training mode but the model's virtual-row "
                f"input ('{source.site_name}') is in eval mode, so the batch holds no virtual rows (Alg. 3) "
                f"for it to take statistics from. Put that module in training mode too "
                f"(model.{source.site_name}.train()), or this layer in eval mode")
        return self.num_virtual

    def attach_virtual_rows(self, source: "VirtualRowsInput") -> None:
        """Tell this layer which module adds its virtual rows (a reference, not a child)."""
        self.__dict__["_virtual_rows_source"] = source

    def sample_spec(self, input_shape: tuple[int, ...]) -> SampleSpec:
        """The sample of the current step for an input of ``input_shape`` (incl. virtual rows)."""
        input_shape = tuple(int(s) for s in input_shape)
        nv = self.virtual_rows()
        key = (self._draw, input_shape, nv)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        n_real = input_shape[0] - nv
        if n_real < 1:
            raise InputError(f"SampledBatchNorm({self.strategy}) got {input_shape[0]} rows of which {nv} are "
                             "virtual: the batch holds no real example")
        if torch.compiler.is_dynamo_compiling():
            rows, patch, points = self._draw_sample(n_real, input_shape[2:])
        else:
            # a draw is host randomness, a schedule, not part of the computation: under a tracer's
            # dispatch modes (torch.export's fake tensors) its random numbers would be symbols it
            # cannot read, and under torch.func.vmap random ops it refuses (randomness="error")
            # and under inference_mode frs's points would be inference tensors, which the training
            # steps reusing this draw could not save for backward
            with _disable_current_modes(), outside_transforms(), torch.inference_mode(False):
                rows, patch, points = self._draw_sample(n_real, input_shape[2:])
        beta = 1.0 if self.strategy == "vdn" else (self.beta if nv else 0.0)
        spec = SampleSpec(rows=rows, patch=patch, points=points, num_virtual=nv, beta=beta)
        self._cache = (key, spec)
        return spec

    def effective_strategy(self, input_shape: tuple[int, ...]) -> str:
        """FS on a map with a single position (e.g. BatchNorm1d on (N, C)) falls back to BS."""
        if self.strategy == "fs" and math.prod(input_shape[2:]) <= 1:
            return "bs"
        return self.strategy

    def _rows_for(self, n_real: int) -> int:
        if self.n is not None:
            return min(self.n, n_real)
        # from a ratio: at least 2 examples where there are 2, so a (N, C) sample has a variance
        return min(n_real, max(min(2, n_real), math.ceil(self.ratio * n_real - 1e-9)))

    def _draw_sample(self, n_real: int, spatial: tuple[int, ...]):
        strategy = self.effective_strategy((n_real, self.num_features) + tuple(spatial))
        # device="cpu": the generator's; a default device (torch.set_default_device("cuda")) would
        # otherwise take the draw there, where a CPU generator cannot draw
        u = torch.rand(4, generator=draw_generator(self._seed, self._stream, self._draw), dtype=torch.float64,
                       device="cpu").tolist()
        if strategy in ("vdn", "full"):
            return (0, n_real), None, None
        if strategy == "ns":
            return (0, self._rows_for(n_real)), None, None
        if strategy == "bs":
            size = self._rows_for(n_real)
            start = _offset(u[0], n_real - size)
            return (start, start + size), None, None
        if strategy == "fs":
            sides = patch_shape(spatial, self.ratio)
            if sides == tuple(spatial):
                return (0, n_real), None, None
            patch = []
            for i, (size, side) in enumerate(zip(spatial, sides)):
                start = _offset(u[1 + i % 3], size - side)
                patch.append((start, start + side))
            return (0, n_real), tuple(patch), None
        # frs: fully random points over (example, position); the draw depends on the shape
        total = n_real * math.prod(spatial)
        count = min(total, max(2, round(self.ratio * total)))
        if count >= total:
            return (0, n_real), None, None
        gen = draw_generator(self._seed, self._stream, self._draw, n_real, *spatial)
        points = torch.randperm(total, generator=gen, device="cpu")[:count].sort().values
        return (0, n_real), None, points

    # ---------------------------------------------------------------- training forward
    def sync_active(self) -> bool:
        if not self.sync:
            return False
        from ..distributed import sync_available

        return sync_available(self.process_group)

    @torch.compiler.disable
    def _count_step(self) -> None:
        # outside compiled code: a Python int attribute that changes every step would make
        # torch.compile recompile every step (it guards on module int attributes)
        if self._steps > 0 and self._steps % self.every == 0:
            self.new_epoch()
        self._steps += 1

    def advance_schedule(self) -> None:
        """One training step of the ``every=N`` schedule; nothing to count when draws change only
        on ``new_epoch()`` (the default), which keeps the step free of Python state. A gradient
        checkpointing recomputation (:meth:`recomputing`) is the same step again: it counts nothing,
        so it draws the same sample and recomputes the first call's output bit for bit."""
        if self.training and self.every > 0 and not self.recomputing():
            self._count_step()

    def _check_values_per_channel(self, spec: SampleSpec, shape: tuple[int, ...]) -> None:
        """The statistics need ≥ 2 values per channel: one has no variance (stock BatchNorm refuses
        it too). Pure VDN takes them from the virtual rows alone (vdn:n=1 on a BatchNorm1d over
        (N, C) or a 1×1 map gives one value). In a mix, one virtual value per channel puts a
        variance of 0 into Eq. 4, which scales the mixed variance by 1 − β: a warning, once."""
        if spec.uses_sample():
            values, source, fix = spec.sample_count(shape), "the sample", "use a larger n/ratio or batch"
        else:
            values, source, fix = (spec.virtual_count(shape), f"{self.num_virtual} virtual row(s)",
                                   "use vdn:n=2 or more, or exclude this layer from the recipe")
        if values < 2:
            raise InputError(f"SampledBatchNorm({self.strategy}){self.site_label} on input {shape}: {source} holds one "
                             f"value per channel, which has no variance; {fix}")
        # cheap tests first (every training step asks); eager only: a compiled step does not guard
        # on the flag and would warn at every call
        if (0.0 < spec.virtual_weight() < 1.0 and not self.__dict__.get("_warned_one_virtual_value")
                and spec.virtual_count(shape) < 2 and not torch.compiler.is_compiling()):
            self.__dict__["_warned_one_virtual_value"] = True
            warn_at_caller(f"SampledBatchNorm({self.strategy}+vdn){self.site_label} on input {shape}: the "
                           f"{self.num_virtual} virtual row(s) hold one value per channel, whose variance is 0, so "
                           f"Eq. 4 normalises with {1 - spec.virtual_weight():g} of the sample's variance here; use "
                           "vdn:n=2 or more, or exclude this layer from the recipe")

    def empty_batch(self, x: torch.Tensor) -> bool:
        """An empty batch is stock BatchNorm's (:meth:`BatchNormState.empty_batch`), except with
        ``sync=True`` under ``torch.distributed``: there it still joins its peers' all-reduce with a
        zero count, as SyncBatchNorm does; skipping it would pair their collective with this
        rank's next one (wrong statistics on every rank, then a hang)."""
        return super().empty_batch(x) and not (self.training and self.sync_active())

    def forward_train(self, x: torch.Tensor) -> torch.Tensor:
        self.advance_schedule()
        sync = self.sync_active()
        if sync and x.numel() == 0:
            # nothing to draw from; the block layout (virtual rows reduced or not) must be the
            # peers', which follows the configuration, not this batch (which holds no virtual rows)
            weight = (1.0 if self.strategy == "vdn" else self.beta) if self.num_virtual else 0.0
            spec = SampleSpec(rows=(0, 0), num_virtual=1 if weight else 0, beta=weight)
        else:
            spec = self.sample_spec(tuple(x.shape))
        if not sync and spec.is_full(tuple(x.shape)):
            self.last_statistics = None
            return self.stock_forward(x)
        if not sync:
            self._check_values_per_channel(spec, tuple(x.shape))
        if self.strategy in _DRAWN and spec.uses_sample() and torch.compiler.is_exporting():
            self._warn_exported_draw()
        mean, var, count = sampled_statistics(x, spec, self.process_group, sync=sync)
        self.note_sample_size(count, tuple(x.shape))
        self.keep_statistics(mean, var, count)
        if self.track_running_stats and count > 1:
            self.update_running_stats(mean, var, count)
        return normalize_with(x, mean, var, self.weight, self.bias, self.eps)

    def _warn_exported_draw(self) -> None:
        """``torch.export`` of a training step (a QAT flow, say) records this draw's sample positions
        as constants, where the model re-draws: say so (non-strict export, torch's default;
        strict export's tracer drops warnings)."""
        redraw = f"every {self.every} steps and " if self.every > 0 else ""
        warn_at_caller(
            f"SampledBatchNorm({self.strategy}){self.site_label} exported in training mode: the program samples "
            f"the positions of the current draw at every step, while the model re-draws {redraw}at "
            "bnrewrite.new_epoch(model); export in eval mode (or fold_for_inference first) for inference, or "
            "export again after each new draw")

    def note_sample_size(self, count: int, shape: tuple[int, ...]) -> None:
        """Tell the rewrite's :class:`SmallSampleCheck` (if any) how many values this step's
        statistics came from; eager steps only (it keeps Python state)."""
        if torch.compiler.is_compiling() or self.recomputing():  # a recomputation is the same step
            return
        check = self.__dict__.get("small_sample_check")
        if check is not None:
            check.observe(self.site_name or "?", int(count), shape)

    # ---------------------------------------------------------------- reporting
    def describe(self, input_shape: tuple[int, ...] | None = None) -> dict:
        info: dict[str, Any] = {"variant": type(self).__name__, "strategy": self.strategy}
        if self.strategy in ("ns", "bs"):
            info["n"] = self.n if self.n is not None else f"ceil({self.ratio:g}*N)"
        if self.strategy in ("fs", "frs"):
            info["ratio"] = self.ratio
        info["redraw"] = f"every {self.every} steps" if self.every else "on new_epoch()"
        info["draw"] = self._draw
        if self.num_virtual:
            info["virtual_rows"] = self.num_virtual
            info["beta"] = 1.0 if self.strategy == "vdn" else self.beta
        if self.sync:
            info["sync"] = True
        if input_shape:
            shape = tuple(input_shape)
            was = self.training
            self.training = False  # the recorded shape is the real batch: no virtual rows in it
            try:
                spec = self.sample_spec(shape)
            finally:
                self.training = was
            effective = self.effective_strategy(shape)
            total = shape[0] * math.prod(shape[2:])
            count = spec.sample_count(shape)
            if self.strategy == "vdn":
                info["sample"] = f"{self.num_virtual} virtual row(s) x {'x'.join(map(str, shape[2:])) or '1'}"
                info["sampling_ratio"] = round(self.num_virtual / shape[0], 6)
            else:
                if spec.patch is not None:
                    side = "x".join(str(b - a) for a, b in spec.patch)
                    info["sample"] = f"{shape[0]} x {side} patch of {'x'.join(map(str, shape[2:]))}"
                elif spec.points is not None:
                    info["sample"] = f"{count} random points of {total}"
                else:
                    info["sample"] = f"rows {spec.rows[0]}:{spec.rows[1]} of {shape[0]}"
                info["sampling_ratio"] = round(count / total, 6)
            if effective != self.strategy:
                info["note"] = (f"fs falls back to bs: input {shape} has no spatial positions to sample, "
                                "so whole examples are sampled")
        return info

    def extra_repr(self) -> str:
        opts = [f"strategy={self.strategy}"]
        if self.n is not None:
            opts.append(f"n={self.n}")
        if self.ratio is not None and self.strategy not in ("vdn", "full"):
            opts.append(f"ratio={self.ratio:g}")
        if self.every:
            opts.append(f"every={self.every}")
        if self.num_virtual:
            opts.append(f"num_virtual={self.num_virtual}, beta={1.0 if self.strategy == 'vdn' else self.beta:g}")
        if self.sync:
            opts.append("sync=True")
        return f"{super().extra_repr()}, " + ", ".join(opts)


# ====================================================================== VDN: data statistics
@dataclass(frozen=True)
class DatasetStats:
    """Per-input-channel mean and standard deviation of a dataset (VDN, Alg. 3 line 1)."""

    mean: torch.Tensor
    std: torch.Tensor
    count: int

    def __post_init__(self):
        # a NaN pixel in the data (or a hand-written negative std) would reach every BatchNorm
        # through the virtual rows and train on NaN
        if self.mean.shape != self.std.shape or self.mean.numel() == 0:
            raise InputError(f"data_stats: mean and std need one value per input channel each, got "
                             f"{self.mean.numel()} and {self.std.numel()}")
        for what, values, bad in (("mean", self.mean, ~torch.isfinite(self.mean)),
                                  ("std", self.std, ~torch.isfinite(self.std) | (self.std < 0))):
            if bad.any():
                channels = bad.nonzero().flatten().tolist()
                raise InputError(f"data_stats: the {what} of input channel(s) {channels[:8]} is "
                                 f"{values[channels[0]].item()} (it must be finite{' and >= 0' if what == 'std' else ''}); "
                                 "the data holds NaN or inf values, or the values given are wrong")

    @classmethod
    def coerce(cls, value: Any) -> "DatasetStats":
        if isinstance(value, DatasetStats):
            return value
        if isinstance(value, dict) and "mean" in value and "std" in value:
            return cls(_host_values(value["mean"]), _host_values(value["std"]), int(value.get("count", 0)))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(_host_values(value[0]), _host_values(value[1]), 0)
        raise InputError("data_stats must come from bnrewrite.dataset_stats(data) (or be a (mean, std) pair "
                         f"of per-channel values), got {type(value).__name__}")


def _batch_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch)
    if isinstance(batch, dict):
        for key in ("input", "inputs", "image", "images", "x"):
            if key in batch:
                return _batch_tensor(batch[key])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_tensor(batch[0])
    raise InputError(f"dataset_stats: cannot find the input tensor in a batch of type {type(batch).__name__}; "
                     "give a tensor, or an iterable of tensors or of (input, target) pairs")


def _host_values(value) -> torch.Tensor:
    # per-channel statistics are host values (the VDN pass moves them to the model's device),
    # whatever the default device (torch.set_default_device)
    return torch.as_tensor(value, dtype=torch.float64, device="cpu").flatten()


def dataset_stats(data: Any) -> DatasetStats:
    """Per-input-channel mean and (population) std of ``data`` for ``vdn`` (Alg. 3 line 1).

    ``data``: a tensor ``(N, C, ...)`` or any iterable of batches — tensors, ``(input, target)``
    pairs (a DataLoader) or dicts with an ``input``/``image`` key. Batches are streamed and
    combined with Chan's parallel formula in float64, so the dataset never has to fit in memory.

    Example::

        stats = bnrewrite.dataset_stats(train_loader)
        model = bnrewrite.transform(model, "fs+vdn", data_stats=stats)
    """
    batches: Iterable = [data] if isinstance(data, (torch.Tensor, np.ndarray)) else data
    # not iter(): that would start a DataLoader's workers; a container iterable through __getitem__ counts
    if not (isinstance(batches, Iterable) or hasattr(type(batches), "__getitem__")):
        raise InputError(f"dataset_stats expects a tensor or an iterable of batches (a DataLoader), got "
                         f"{type(data).__name__}")
    count = 0
    mean = m2 = None
    for batch in batches:
        x = _batch_tensor(batch)
        if x.dim() < 2:
            raise InputError(f"dataset_stats expects batches shaped (N, C, ...), got shape {tuple(x.shape)}")
        flat = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
        k = flat.shape[1]
        if k == 0:
            continue
        b_mean = flat.mean(dim=1)
        b_m2 = ((flat - b_mean[:, None]) ** 2).sum(dim=1)
        if mean is None:
            mean, m2, count = b_mean.cpu(), b_m2.cpu(), k
            continue
        if b_mean.shape != mean.shape:
            raise InputError(f"dataset_stats: batches have {mean.numel()} and {b_mean.numel()} channels")
        total = count + k
        delta = b_mean.cpu() - mean
        mean = mean + delta * (k / total)
        m2 = m2 + b_m2.cpu() + delta ** 2 * (count * k / total)
        count = total
    if mean is None:
        raise InputError("dataset_stats got no data (an empty tensor or iterable)")
    return DatasetStats(mean=mean, std=(m2 / count).sqrt(), count=count)


# ====================================================================== VDN: graph-side modules
class VirtualRowsInput(nn.Module):
    """Prepends ``num_virtual`` virtual samples ~ N(mean, std) per channel to the batch, in
    training mode only (Alg. 3: "Create virtual samples V ... B = [V, B]"). Called from the
    rewritten graph right after the input placeholder; eval mode returns the input unchanged.

    ``mean``/``std`` are non-persistent buffers: they follow ``.to()`` but add no
    ``state_dict`` keys (they come from ``transform(..., data_stats=...)``)."""

    is_bnrewrite_leaf = True  # the capture tracer keeps it as one call: its forward reads self.training
    is_training_only = True  # the identity in eval mode: fold_for_inference drops its calls
    site_name = ""  # its name on the rewritten model (the vdn pass sets it), for error messages

    def __init__(self, stats: DatasetStats, num_virtual: int):
        super().__init__()
        self.num_virtual = int(num_virtual)
        self.register_buffer("mean", stats.mean.to(torch.float32).clone(), persistent=False)
        self.register_buffer("std", stats.std.to(torch.float32).clone(), persistent=False)
        # no checkpoint holds them, so a model built on the meta device and materialised with
        # to_empty() would train on garbage statistics: keep the values, and refill from them
        self.data_stats = (self.mean.detach().cpu().clone(), self.std.detach().cpu().clone())
        self.last_rows: tuple[int, int] | None = None  # (virtual, total) of the current forward

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        with torch.no_grad():
            for buffer, value in zip((self.mean, self.std), self.data_stats):
                if buffer.device.type != "meta" and value.device.type != "meta":
                    buffer.copy_(value)
        return result

    def make_virtual(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.mean.numel():
            raise InputError(f"vdn: data_stats has {self.mean.numel()} channels but the model input has shape "
                             f"{tuple(x.shape)}; compute data_stats from the same inputs the model gets")
        shape = [1, -1] + [1] * (x.dim() - 2)
        noise = torch.randn((self.num_virtual,) + tuple(x.shape[1:]), device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype).reshape(shape)
        return noise * std + self.mean.to(device=x.device, dtype=x.dtype).reshape(shape)

    def forward(self, x):
        if not self.training or not isinstance(x, torch.Tensor) or x.numel() == 0:
            # an empty batch gets no virtual rows: every BatchNorm sees it empty, as stock BN would
            self.last_rows = None
            return x
        out = torch.cat([self.make_virtual(x).detach(), x], dim=0)
        self.last_rows = (self.num_virtual, out.shape[0])
        return out

    def extra_repr(self) -> str:
        return f"num_virtual={self.num_virtual}, channels={self.mean.numel()}"


class VirtualRowsOutput(nn.Module):
    """Slices the virtual rows off a model output of any structure (tensor, tuple, list, dict,
    namedtuple): every tensor whose first dim is the augmented batch size loses its first
    ``num_virtual`` rows. Does nothing when the input module added no rows (eval mode)."""

    is_bnrewrite_leaf = True
    is_training_only = True  # the identity in eval mode (no rows were added): fold drops its calls

    def __init__(self, source: VirtualRowsInput):
        super().__init__()
        object.__setattr__(self, "_source", source)  # a reference, not a child: no duplicate entries

    def forward(self, out):
        rows = self.__dict__["_source"].last_rows
        if rows is None:
            return out
        return _strip(out, *rows)


def _strip(value, num_virtual: int, total: int):
    if isinstance(value, torch.Tensor):
        return value[num_virtual:] if value.dim() >= 1 and value.shape[0] == total else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_strip(v, num_virtual, total) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_strip(v, num_virtual, total) for v in value)
    if isinstance(value, dict):
        out = value.copy()
        for k, v in value.items():
            out[k] = _strip(v, num_virtual, total)
        return out
    return value
