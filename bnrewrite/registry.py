"""Recipe components as data: name -> (options, pass, runtime module).

Adding a variant = one runtime module, one pass, one line here (see DESIGN.md).
"""
from __future__ import annotations

import dataclasses
import re
import typing

from .passes import stock
from .errors import RecipeError
from .recipe import Role, Variant

VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    """Add a recipe component (``bnrewrite.register_variant``): after it, ``transform(model,
    "<name>:<option>=...")`` runs ``variant.rewrite`` on the selected sites. The name must be one
    the recipe parser can read (lower case, digits, '-' and '_'; no '+', ':', ',' or '='); a
    malformed entry is a :class:`RecipeError`."""
    if not isinstance(variant, Variant):
        raise RecipeError(f"register takes a bnrewrite.Variant, got {type(variant).__name__}")
    if not isinstance(variant.name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", variant.name):
        raise RecipeError(f"component name {variant.name!r} cannot appear in a recipe: use lower-case letters, digits, "
                         "'-' and '_', starting with a letter")
    if variant.role not in typing.get_args(Role):
        raise RecipeError(f"component {variant.name!r}: role must be one of {', '.join(typing.get_args(Role))}, "
                         f"got {variant.role!r}")
    if not (isinstance(variant.options, type) and dataclasses.is_dataclass(variant.options)):
        raise RecipeError(f"component {variant.name!r}: options must be a dataclass class (its fields are the recipe's "
                         f"key=value options), got {variant.options!r}")
    upper = [f.name for f in dataclasses.fields(variant.options) if f.name != f.name.lower()]
    if upper:  # the parser reads option keys in lower case
        raise RecipeError(f"component {variant.name!r}: option field(s) {', '.join(upper)} must be lower case")
    if not callable(variant.rewrite):
        raise RecipeError(f"component {variant.name!r}: rewrite must be the pass, a function, got {variant.rewrite!r}")
    sets = {}
    for key in ("combines_with", "partner_options", "keyword_options"):
        value = getattr(variant, key)
        if not isinstance(value, (set, frozenset, list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"component {variant.name!r}: {key} must be a collection of names, got {value!r}")
        sets[key] = frozenset(value)
    if variant.name in VARIANTS:
        raise RecipeError(f"component {variant.name!r} registered twice")
    variant = dataclasses.replace(variant, **sets)
    VARIANTS[variant.name] = variant
    return variant


register(Variant("bn", stock.StockOptions, stock.keep_batchnorm, None, "norm",
                 "stock BatchNorm, the control", combines_with=frozenset()))

# issue 6: Cross-Iteration BatchNorm (cross-iteration-bn.txt §3, Alg. 1, App. B)
from .passes import cbn as _cbn  # noqa: E402
from .runtime.cross_iteration import CrossIterationBatchNorm as _CrossIterationBatchNorm  # noqa: E402

register(Variant("cbn", _cbn.CbnOptions, _cbn.rewrite_cbn, _CrossIterationBatchNorm, "norm",
                 "Cross-Iteration BN: statistics of the last k iterations, Taylor-compensated to the "
                 "current producer weights", paper="cross-iteration-bn.txt §3, Alg. 1, App. B",
                 combines_with=frozenset()))
register(Variant("naive-cbn", _cbn.NaiveCbnOptions, _cbn.rewrite_naive_cbn, _CrossIterationBatchNorm, "norm",
                 "Naive CBN: statistics of the last k iterations without compensation (baseline)",
                 paper="cross-iteration-bn.txt §4.3", combines_with=frozenset()))

# --- four-things-bn (issue 5): Ghost BN §3.2 and Batch-Group Norm §3.4. Both are norms that stand
# alone in a recipe; example weighing (fold_for_inference) and γ/β decay (param_groups) go with them.
from .passes import batch_group as _batch_group  # noqa: E402
from .passes import ghost as _ghost  # noqa: E402
from .runtime.batch_group import BatchGroupNorm as _BatchGroupNorm  # noqa: E402
from .runtime.ghost import GhostBatchNorm as _GhostBatchNorm  # noqa: E402

register(Variant("ghost", _ghost.GhostOptions, _ghost.rewrite_ghost, _GhostBatchNorm, "norm",
                 "Ghost BN: statistics per disjoint ghost batch of `size` examples",
                 paper="four-things-bn.txt §3.2, Eq. 4", combines_with=frozenset()))
register(Variant("bgn", _batch_group.BatchGroupOptions, _batch_group.rewrite_batch_group, _BatchGroupNorm,
                 "norm", "Batch-Group Norm: statistics over groups of channels x groups of examples",
                 paper="four-things-bn.txt §3.4", combines_with=frozenset()))

# issue 3: Sampled BatchNorm and Virtual Dataset Normalization (bn-sampling.txt §4.1–4.3, Alg. 1–3)
from .passes import sampling as _sampling  # noqa: E402
from .passes import vdn as _vdn  # noqa: E402
from .runtime.sampled import SampledBatchNorm as _SampledBatchNorm  # noqa: E402

register(Variant("ns", _sampling.NsOptions, _sampling.rewrite_ns, _SampledBatchNorm, "norm",
                 "Naive Sampling: statistics of the first n examples (baseline)",
                 paper="bn-sampling.txt §4.1, Alg. 1", combines_with=frozenset({"vdn"})))
register(Variant("bs", _sampling.BsOptions, _sampling.rewrite_bs, _SampledBatchNorm, "norm",
                 "Batch Sampling: statistics of n contiguous examples at a random offset per layer",
                 paper="bn-sampling.txt §4.1, Alg. 1", combines_with=frozenset({"vdn"})))
register(Variant("fs", _sampling.FsOptions, _sampling.rewrite_fs, _SampledBatchNorm, "norm",
                 "Feature Sampling: statistics of one random patch (area ratio) of every feature map",
                 paper="bn-sampling.txt §4.1, Alg. 2", combines_with=frozenset({"vdn"})))
register(Variant("frs", _sampling.FrsOptions, _sampling.rewrite_frs, _SampledBatchNorm, "norm",
                 "Fully Random Sampling: statistics of random points over examples and positions (baseline)",
                 paper="bn-sampling.txt §5.1", combines_with=frozenset({"vdn"})))
register(Variant("vdn", _vdn.VdnOptions, _vdn.rewrite_vdn, _SampledBatchNorm, "stats",
                 "Virtual Dataset Normalization: n virtual rows ~ N(data mean, std) give (or mix into, "
                 "by beta) every BatchNorm's statistics",
                 paper="bn-sampling.txt §4.2, Alg. 3, Eq. 4", combines_with=frozenset({"ns", "bs", "fs", "frs"}),
                 partner_options=frozenset({"beta"}), keyword_options=frozenset({"data_stats"}),
                 check_keywords=_vdn.check_keywords))

# issue 7: Extreme Normalization (extreme-normalization.txt §2.2, §3, Alg. 1, §5)
from .passes import batch_renorm as _batch_renorm  # noqa: E402
from .passes import rotation as _rotation  # noqa: E402
from .passes import two_tower as _two_tower  # noqa: E402
from .runtime.extreme import ExtremeNorm as _ExtremeNorm  # noqa: E402
from .runtime.extreme import RotatedExtremeNorm as _RotatedExtremeNorm  # noqa: E402

register(Variant("two-tower", _two_tower.TwoTowerOptions, _two_tower.rewrite_two_tower, _ExtremeNorm, "norm",
                 "Extreme Normalization, two towers: EMA statistics forward; tower A's per-example moments "
                 "give the aggregated moments tower B normalises with (ScaleGrad, mean before the conv)",
                 paper="extreme-normalization.txt §3, Alg. 1, §5", combines_with=frozenset({"rot"})))
register(Variant("brn", _batch_renorm.BrnOptions, _batch_renorm.rewrite_brn, _ExtremeNorm, "norm",
                 "Improved batch renormalization: EMA statistics forward, gradient through the moments of "
                 "micro-batches of `micro` examples (micro=1: per-example, no interaction)",
                 paper="extreme-normalization.txt §5, §3.1, Alg. 1", combines_with=frozenset({"rot"})))
register(Variant("rot", _rotation.RotOptions, _rotation.rewrite_rotation, _RotatedExtremeNorm, "post",
                 "fixed Hadamard (or random orthogonal) rotation between normalisation and nonlinearity, "
                 "folded into the conv for inference",
                 paper="extreme-normalization.txt §2.2, Alg. 1", combines_with=frozenset({"two-tower", "brn"})))
