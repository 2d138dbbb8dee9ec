"""``bnrewrite.transform`` and what it records for ``inspect``."""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import numbers
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .capture import Capture, Region, capture
from .distributed import deepcopy_model
from .errors import (InputError, UnsupportedPatternError, refuse_batchnorm_root, refuse_compiled_wrappers,
                     refuse_hook_based_norms, require_module, warn_at_caller)
from .recipe import Recipe, parse_recipe
from .sites import Site, find_sites, run_example_inputs


@dataclass
class TransformInfo:
    """Plain-data record of a transform, kept on the model as ``model.bnrewrite_info``."""

    recipe: str
    sites: list[dict[str, Any]]
    regions: list[Region]
    top_traced: bool
    top_error: str | None
    selected: list[str] = field(default_factory=list)


def _select(sites: list[Site], include, exclude) -> list[Site]:
    def as_list(globs, key):
        globs = [globs] if isinstance(globs, str) else globs or []
        if not isinstance(globs, (list, tuple, set, frozenset)) or not all(isinstance(g, str) for g in globs):
            raise InputError(f"transform: {key}= takes module-name globs like 'layer1.*' (a string or a list of "
                             f"strings), got {globs!r}")
        return list(globs)

    inc, exc = as_list(include, "include"), as_list(exclude, "exclude")
    names = sorted({s.name for s in sites})
    for glob in inc + exc:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise InputError(f"glob '{glob}' matches no BatchNorm site; site names look like: {_sample_names(sites)}")
    chosen = []
    for site in sites:
        if inc and not any(fnmatch.fnmatchcase(site.name, g) for g in inc):
            continue
        if any(fnmatch.fnmatchcase(site.name, g) for g in exc):
            continue
        chosen.append(site)
    return chosen


def _sample_names(sites: list[Site]) -> str:
    names = sorted({s.name for s in sites})
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def transform(model: nn.Module, recipe: "str | Recipe" = "bn", *, example_inputs=None, include=None,
              exclude=None, inplace: bool = False, **options) -> nn.Module:
    """Rewrite every BatchNorm of ``model`` into the variant(s) of ``recipe``.

    Args:
        model: any ``nn.Module``.
        recipe: ``+``-joined components, e.g. ``"fs+vdn"``, ``"ghost:size=16"`` (see README).
        example_inputs: a tuple of example inputs; records shapes and materialises lazy modules.
        include, exclude: module-name globs (``"layer1.*"``) that pick the sites to rewrite.
        inplace: skip the deep copy: the result reuses ``model``'s parameters and submodules and the
            rewrite changes some of them, so ``model`` itself can no longer be called (it raises)
            unless the result *is* ``model``.
        **options: variant-specific arguments the recipe's passes take (e.g. ``data_stats``
            for ``vdn``, ``seed`` for the sampling schedules), and ``lower``: ``"reference"``
            (default: plain-torch ops), ``"auto"`` (fused Triton ops when the model is on a CUDA
            device) or ``"fused"`` (always; CPU runs the ops' reference path); with it
            ``compile_path``: what the lowered sites run under ``torch.compile`` — ``"inductor"``
            (default: the plain-torch computation, from which inductor generates and fuses its own
            kernels) or ``"ops"`` (the bnrewrite custom ops, i.e. our Triton kernels, opaque to inductor).

    Returns a module with every ``state_dict()`` key of ``model`` (a variant with state of its
    own, CBN's history say, adds optional keys: :func:`stock_state_dict` drops them); a model
    without BatchNorm is returned unchanged with a warning.

    Example::

        >>> import torch, torchvision, bnrewrite
        >>> m = bnrewrite.transform(torchvision.models.resnet18(weights=None), "bn")
        >>> m(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1000])
    """
    require_module(model, "transform")
    parsed = parse_recipe(recipe)
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"transform: seed= must be an int, got {seed!r}")
    if not isinstance(inplace, bool):
        raise InputError(f"transform: inplace= must be True or False, got {inplace!r}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if not any(_is_norm(m) for m in model.modules()):
        _warn_unchanged(model)
        return model
    refuse_batchnorm_root(model, "transform")
    refuse_compiled_wrappers(model, "transform")
    # lazy modules cannot be copied before their first input: materialise them on the model
    # itself (what its own first forward would do) before the copy
    _materialise_lazy(model, example_inputs)
    from .registry import VARIANTS

    lowering = _check_keyword_options(parsed, options)
    if not inplace:
        refuse_hook_based_norms(model, "transform")
    work = model if inplace else deepcopy_model(model)
    captured = capture(work, example_inputs=example_inputs)
    sites = find_sites(captured, example_inputs)
    selected = _select(sites, include, exclude)
    _refuse_rewritten_sites(captured.root, sites, selected, parsed)
    _refuse_unfaithful_sites(sites, selected, parsed)
    _refuse_zero_eps(captured.root, sites, selected, parsed, lowering)
    if not selected and any(VARIANTS[c.name].runtime is not None for c in parsed.components):
        raise InputError(f"transform '{parsed}': include/exclude leave no site to rewrite (sites: "
                         f"{_sample_names(sites)}); drop the filter that removes them all")
    context = RewriteContext(captured=captured, example_inputs=example_inputs, options=dict(options))
    result = captured.root
    synced = [name for name, m in result.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    layers_before = [(name, id(m)) for name, m in model.named_modules()] if inplace else None
    try:
        for component in _pipeline_order(parsed):
            variant = VARIANTS[component.name]
            result = variant.rewrite(result, selected, component.options, context)
        _warn_per_process(result, synced, parsed)
        if lowering is not None:
            from .passes.lower import lower_model

            result = lower_model(result, selected, lowering)
    except BaseException:
        # some of its layers rewritten already: it must not run as a mix (untouched, it may run)
        if inplace and [(name, id(m)) for name, m in model.named_modules()] != layers_before:
            model.register_forward_pre_hook(_refuse_half_rewritten)
        raise
    _keep_per_process_buffers_from_ddp(result)
    object.__setattr__(result, "bnrewrite_info", TransformInfo(
        recipe=str(parsed), sites=[s.as_dict() for s in sites], regions=list(captured.regions),
        top_traced=captured.top_traced, top_error=captured.top_error,
        selected=[s.name for s in selected]))
    if captured.top_error is not None:
        object.__setattr__(result, "_bnrewrite_capture_error", captured.top_error)
    if inplace and result is not model:
        model.register_forward_pre_hook(_refuse_rewritten_original)
    return result


def _keep_per_process_buffers_from_ddp(root: nn.Module) -> None:
    """Name the buffers that hold per-process state (CBN's history, cbn §4.2: "statistics in CBN
    are computed within each GPU") in ``_ddp_params_and_buffers_to_ignore``, which
    ``DistributedDataParallel`` reads when it wraps ``root``: with its default
    ``broadcast_buffers=True`` it would otherwise copy rank 0's history to every rank before each
    forward. Names are relative to ``root`` (a container around it before DDP prefixes them)."""
    names = {f"{name}.{key}" for name, m in root.named_modules()
             for key in getattr(m, "per_process_buffers", ())}
    if names:
        names |= set(getattr(root, "_ddp_params_and_buffers_to_ignore", ()))
        object.__setattr__(root, "_ddp_params_and_buffers_to_ignore", sorted(names))


def _refuse_rewritten_sites(root: nn.Module, sites: list[Site], selected: list[Site], recipe: Recipe) -> None:
    """A site an earlier transform rewrote would be wrapped again (fs of fs) or lose what it
    relies on (cbn's wired producer input): one recipe per model, on the original. A whole-graph
    component reaches excluded sites too (vdn's virtual rows would enter a ghost site's
    statistics, two-tower would call a cbn site twice a step), so then every site counts."""
    whole_graph = next((c.name for c in recipe.components if c.name in _WHOLE_GRAPH_COMPONENTS), None)
    done = {}
    for site in sites if whole_graph else selected:
        if not site.functional:
            module = root.get_submodule(site.name)
            if getattr(module, "is_bnrewrite_norm", False):
                done.setdefault(site.name, type(module).__name__)
    if done:
        names = list(done)
        shown = ", ".join(f"{n} ({done[n]})" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        if whole_graph:
            raise InputError(f"transform: {shown} were already rewritten by an earlier bnrewrite.transform, and "
                             f"{whole_graph} rewrites the whole graph, excluded sites too; transform the original "
                             "model once, with the combined recipe (e.g. 'fs+vdn')")
        raise InputError(f"transform: {shown} were already rewritten by an earlier bnrewrite.transform; transform "
                         "the original model once, with the combined recipe (e.g. 'fs+vdn'), or leave those sites "
                         "out with exclude=")


def _refuse_zero_eps(root: nn.Module, sites: list[Site], selected: list[Site], recipe: Recipe,
                     lowering) -> None:
    """eps = 0: a constant sample, ghost batch or group would divide by 0 (stock BatchNorm's
    training forward refuses it; the variants and the fused op compute the normalisation
    themselves). vdn replaces excluded sites too (their statistics leave the virtual rows out)."""
    from .registry import VARIANTS

    if lowering is None and all(VARIANTS[c.name].runtime is None for c in recipe.components):
        return
    for site in sites if "vdn" in recipe.names() else selected:
        eps = None if site.functional else getattr(root.get_submodule(site.name), "eps", None)
        if eps is not None and not eps > 0:
            raise InputError(f"transform '{recipe}': site {site.name!r} ({site.kind}) has eps={eps}; training needs "
                             "eps > 0, as stock BatchNorm's training forward requires: set the layer's eps (1e-5 is "
                             "PyTorch's default)")


def _refuse_unfaithful_sites(sites: list[Site], selected: list[Site], recipe: Recipe) -> None:
    """A site whose BatchNorm a variant's module would not compute faithfully (an overridden
    ``forward``, a parametrized weight: :func:`~bnrewrite.sites.unfaithful_reason`) is refused when
    the recipe replaces it: the selected sites, and under a ``stats`` component (vdn, whose virtual
    rows reach every BatchNorm, selected or not) every site. ``bn`` replaces nothing."""
    from .registry import VARIANTS

    variants = [VARIANTS[c.name] for c in recipe.components]
    if all(v.runtime is None for v in variants):
        return
    whole_graph = next((v.name for v in variants if v.role == "stats"), None)
    chosen = {id(s) for s in selected}
    for site in sites if whole_graph else selected:
        if site.unfaithful is None:
            continue
        if id(site) in chosen:
            fix = (f"leave it out with exclude=[{site.name!r}] (it then stays as it is), or give that site a plain "
                   f"nn.BatchNorm (stock forward, no parametrization)")
        else:
            fix = (f"{whole_graph}'s virtual rows reach every BatchNorm, excluded ones too: give that site a plain "
                   f"nn.BatchNorm (stock forward, no parametrization), or use the recipe without {whole_graph}")
        raise UnsupportedPatternError(
            f"transform '{recipe}': site {site.name!r} ({site.kind}): {site.unfaithful}, which a variant's "
            f"module would silently drop; {fix}")


def _refuse_half_rewritten(module: nn.Module, args) -> None:
    raise InputError(f"bnrewrite.transform(..., inplace=True) failed part way through on this {type(module).__name__} "
                     "(see the error it raised), so some of its BatchNorms are rewritten and others not; build "
                     "the model again (inplace=False keeps the original usable when a transform fails)")


def _check_keyword_options(recipe: Recipe, options: dict):
    """Check transform's keyword options before the model is touched (a late error would leave
    an ``inplace=True`` model half rewritten); returns the lowering options, or None."""
    from .registry import VARIANTS

    known = _GENERAL_OPTIONS | {"lower", "compile_path"}
    for component in recipe.components:
        known |= VARIANTS[component.name].keyword_options
    unused = sorted(set(options) - known)
    if unused:
        option_fields = {c.name: {f.name for f in dataclasses.fields(c.options)} for c in recipe.components}
        hints = [f"{key}: write it into the recipe, '{name}:{key}=...'" for key in unused
                 for name, fields in option_fields.items() if key in fields]
        raise InputError(f"transform got option(s) {', '.join(unused)} that no component of recipe '{recipe}' "
                         f"uses{' (' + '; '.join(hints) + ')' if hints else ''}")
    for component in recipe.components:
        check = VARIANTS[component.name].check_keywords
        if check is not None:
            check(options)
    lower = options.get("lower", DEFAULT_LOWER)
    if lower == "reference":
        if "compile_path" in options:
            raise InputError("compile_path= chooses what lowered sites run under torch.compile; it needs "
                             "lower='auto' or lower='fused'")
        return None
    from .passes.lower import LowerOptions

    return LowerOptions(mode=lower, compile_path=options.get("compile_path", "inductor"))


def _refuse_rewritten_original(module: nn.Module, args) -> None:
    # its nested BatchNorms were swapped in place but not its own children or forward: running it
    # would silently train a mix of stock and rewritten layers
    raise InputError(f"this {type(module).__name__} was rewritten by bnrewrite.transform(..., inplace=True), which "
                     "returned a new module sharing its layers; call the module transform returned (or use "
                     "inplace=False to keep the original usable)")


@dataclass
class RewriteContext:
    """What a pass may need beyond (module, sites, options): the capture, the example inputs,
    and the keyword options given to ``transform`` (checked against the registry entries'
    ``keyword_options`` before any pass runs; ``take`` reads one)."""

    captured: Capture
    example_inputs: tuple | None
    options: dict[str, Any]

    def take(self, key: str, default=None):
        return self.options.get(key, default)


# Fused Triton kernels are opt-in (lower="auto": CUDA models; "fused": always) until they beat
# cuDNN end to end; see benchmarks/RESULTS.md.
DEFAULT_LOWER = "reference"

# accepted by every recipe even when no component of it draws random numbers
_GENERAL_OPTIONS = {"seed"}

# components whose pass rewrites the whole graph, not only the selected sites
_WHOLE_GRAPH_COMPONENTS = ("vdn", "two-tower")

_ROLE_ORDER = {"norm": 0, "stats": 1, "post": 2}


def _pipeline_order(recipe: Recipe):
    from .registry import VARIANTS

    return sorted(recipe.components, key=lambda c: _ROLE_ORDER[VARIANTS[c.name].role])


def _warn_per_process(result: nn.Module, synced: list[str], recipe: Recipe) -> None:
    """One warning naming the SyncBatchNorm sites whose rewritten module computes its statistics
    per process (``synchronises_statistics`` false) instead of over the process group."""
    notes: dict[str, list[str]] = {}
    for name in synced:
        try:
            module = result.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.SyncBatchNorm) or getattr(module, "synchronises_statistics", True):
            continue
        note = getattr(module, "per_process_note", "its statistics are computed within each process")
        notes.setdefault(f"{type(module).__name__}: {note}", []).append(name)
    if not notes:
        return
    count = sum(len(names) for names in notes.values())

    def shown(names):
        return ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = "; ".join(f"{shown(names)} ({note})" for note, names in notes.items())
    warn_at_caller(f"transform '{recipe}': {count} SyncBatchNorm site(s) no longer synchronise statistics across "
                   f"processes under torch.distributed: {parts}")


def _warn_unchanged(model: nn.Module) -> None:
    """The warning for a model without BatchNorm modules, naming its functional ``F.batch_norm``
    calls if it has any: those stay stock (there is no module to replace), and saying "no
    BatchNorm" of such a model would be wrong."""
    functional = [s.name for s in find_sites(capture(copy.deepcopy(model))) if s.functional]
    if functional:
        warn_at_caller(f"{type(model).__name__} has no BatchNorm module, only functional F.batch_norm call(s) "
                       f"({', '.join(functional)}), which stay stock BatchNorm: make them nn.BatchNorm modules "
                       "to rewrite them; returned unchanged")
    else:
        warn_at_caller(f"{type(model).__name__} has no BatchNorm: returned unchanged")


def _is_norm(m: nn.Module) -> bool:
    from .runtime.base import is_batchnorm

    return is_batchnorm(m)


def _materialise_lazy(model: nn.Module, example_inputs: tuple | None) -> None:
    from torch.nn.modules.lazy import LazyModuleMixin

    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        if example_inputs is None:
            raise InputError(f"lazy module(s) {', '.join(lazy[:3])} have not seen an input yet: pass "
                             "example_inputs=(x,) to bnrewrite.transform so their shapes are known")
        run_example_inputs(model, example_inputs)


def inspect_sites(model: nn.Module, example_inputs=None) -> list[Site]:
    """Sites of ``model`` as it is now (stock or transformed), without changing it. Example::

        >>> sites = bnrewrite.inspect_sites(torchvision.models.resnet18(weights=None), torch.randn(1, 3, 64, 64))
        >>> sites[0].name, sites[0].producer.kind, sites[0].consumer.kind, sites[0].input_shape
        ('bn1', 'Conv2d', 'ReLU', (1, 64, 32, 32))
    """
    require_module(model, "inspect_sites")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    captured = capture(copy.deepcopy(model), example_inputs=example_inputs)
    return find_sites(captured, example_inputs)


def stock_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` without the optional keys runtime modules add (sampling schedule,
    CBN history, Extreme-Norm input means): exactly the keys of the original model, so it loads
    into the stock model with ``strict=True``.

    Example::

        >>> stock = torchvision.models.resnet18(weights=None)
        >>> transformed = bnrewrite.transform(stock, "cbn:k=2")
        >>> transformed(torch.randn(2, 3, 64, 64)).sum().backward()  # CBN's history keys appear
        >>> len(transformed.state_dict()) > len(stock.state_dict())
        True
        >>> stock.load_state_dict(bnrewrite.stock_state_dict(transformed), strict=True)
        <All keys matched successfully>
    """
    require_module(model, "stock_state_dict")
    state = model.state_dict()
    for name, module in model.named_modules():
        for key in getattr(module, "optional_state_keys", ()):
            state.pop(f"{name}.{key}" if name else key, None)
    return state
