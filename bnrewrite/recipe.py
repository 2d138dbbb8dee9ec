"""Recipe strings: ``name[:key=value,...]`` components joined by ``+``.

Examples: ``"bn"``, ``"fs:ratio=1/64+vdn:n=2"``, ``"cbn:k=4,burnin=500"``.

The parser is driven by data: each component is a :class:`Variant` in the registry
(``bnrewrite.registry``) whose ``options`` is a frozen dataclass. Field type hints give
the accepted types (``int``, ``float`` incl. fractions like ``1/32``, ``bool``,
``Literal[...]`` choices and unions such as ``int | Literal["auto"]``), field defaults
are the papers' defaults, and ``__post_init__`` raising ``ValueError`` validates ranges.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Literal

from .errors import RecipeError

Role = Literal["norm", "stats", "post"]


@dataclass(frozen=True)
class Variant:
    """One recipe component: what it is called, its options, its pass and runtime module.

    role: ``norm`` replaces BatchNorm sites (at most one per recipe); ``stats`` changes
    where a norm takes statistics from (e.g. ``vdn``); ``post`` adds something after the
    normalisation (e.g. ``rot``).
    combines_with: names of the components this one may appear with.
    partner_options: options that only act when the recipe holds one of ``combines_with``
    (``vdn``'s ``beta`` mixes into a sampler's statistics); set alone, they are an error.
    keyword_options: ``transform`` keyword arguments the pass reads (``vdn``: ``data_stats``),
    besides the ones every recipe takes (``seed``, ``lower``, ``compile_path``).
    check_keywords: called with transform's keyword arguments before the model is touched, to
    refuse missing or bad ones up front (a late error would leave an ``inplace=True`` model
    half rewritten).
    """

    name: str
    options: type
    rewrite: Callable[..., Any]
    runtime: type | None
    role: Role
    summary: str
    paper: str = ""
    combines_with: frozenset[str] = frozenset()
    partner_options: frozenset[str] = frozenset()
    keyword_options: frozenset[str] = frozenset()
    check_keywords: Callable[[dict], None] | None = None


@dataclass(frozen=True)
class Component:
    name: str
    options: Any

    def __str__(self) -> str:
        changed = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            changed.append(f"{f.name}={_format_value(value)}")
        return self.name + (":" + ",".join(changed) if changed else "")


@dataclass(frozen=True)
class Recipe:
    components: tuple[Component, ...]

    def __str__(self) -> str:
        return "+".join(str(c) for c in self.components)

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def get(self, name: str) -> Component | None:
        for c in self.components:
            if c.name == name:
                return c
        return None

    @classmethod
    def parse(cls, text: str, registry: dict[str, Variant] | None = None) -> "Recipe":
        return parse_recipe(text, registry)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        frac = Fraction(value).limit_denominator(1024)
        if frac.numerator == 1 and frac.denominator > 1 and abs(float(frac) - value) < 1e-12:
            return f"1/{frac.denominator}"
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _coerce(raw: str, hint: Any) -> Any:
    """Convert ``raw`` to ``hint``; raises ValueError with the expected type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        for choice in choices:
            if raw.lower() == str(choice).lower():
                return choice
        raise ValueError(f"must be one of {', '.join(map(str, choices))}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        messages = []
        for member in typing.get_args(hint):
            if member is type(None):
                if raw.lower() == "none":
                    return None
                messages.append("none")
                continue
            try:
                return _coerce(raw, member)
            except ValueError as exc:
                messages.append(str(exc).removeprefix("must be "))
        raise ValueError("must be " + " or ".join(messages))
    if hint is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("must be a bool (true/false)")
    if hint is int:
        if not re.fullmatch(r"[+-]?\d+", raw):
            raise ValueError("must be an int")
        if abs(int(raw)) >= 2 ** 62:  # a torch int64 must hold it (k, n, sizes reach tensor shapes and buffers)
            raise ValueError("must be an int below 2**62")
        return int(raw)
    if hint is float:
        value = None
        if "/" in raw:
            num, _, den = raw.partition("/")
            if _NUMBER.match(num.strip()) and _NUMBER.match(den.strip()) and float(den) != 0:
                value = float(num) / float(den)
        elif _NUMBER.match(raw):
            value = float(raw)
        if value is None:
            raise ValueError("must be a number or a fraction like 1/32")
        if not math.isfinite(value):  # 1e999 overflows to inf
            raise ValueError("must be a finite number")
        return value
    if hint is str:
        if raw:
            return raw
        raise ValueError("must be a non-empty string")
    raise ValueError(f"has an unsupported type {hint!r}")  # pragma: no cover - registry bug


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    # the separator before the list that follows ("known: ...", "options: ...")
    return f" — did you mean '{close[0]}'?" if close else ";"


def default_registry() -> dict[str, Variant]:
    from .registry import VARIANTS

    return VARIANTS


def parse_component(text: str, registry: dict[str, Variant]) -> Component:
    name, sep, params = text.partition(":")
    name = name.strip().lower()
    known = sorted(registry)
    if not name:
        raise RecipeError(f"empty component in recipe; known components: {', '.join(known)}")
    if name not in registry:
        raise RecipeError(f"unknown component '{name}'{_did_you_mean(name, known)} known: {', '.join(known)}")
    variant = registry[name]
    fields = {f.name: f for f in dataclasses.fields(variant.options)}
    hints = typing.get_type_hints(variant.options)
    values: dict[str, Any] = {}
    if sep and not params.strip():
        raise RecipeError(f"{name}: ':' must be followed by key=value options; "
                          f"options: {', '.join(fields) or 'none'}")
    for item in params.split(",") if params.strip() else []:
        key, eq, raw = item.partition("=")
        key, raw = key.strip().lower().replace("-", "_"), raw.strip()
        if not eq or not key:
            raise RecipeError(f"{name}: option '{item.strip()}' must be key=value; "
                              f"options: {', '.join(fields) or 'none'}")
        if key not in fields:
            raise RecipeError(f"{name}: unknown option '{key}'{_did_you_mean(key, list(fields))} "
                              f"options: {', '.join(fields) or 'none'}")
        if key in values:
            raise RecipeError(f"{name}: option '{key}' given twice")
        try:
            values[key] = _coerce(raw, hints[key])
        except ValueError as exc:
            raise RecipeError(f"{name}: {key} {exc}, got '{raw}'") from None
    try:
        options = variant.options(**values)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{name}: {exc}") from None
    return Component(name, options)


def parse_recipe(text: "str | Recipe", registry: dict[str, Variant] | None = None) -> Recipe:
    """Parse and validate a recipe string; raises :class:`RecipeError` naming the bad part. Example::

        >>> str(bnrewrite.parse_recipe("fs:ratio=1/64+vdn:n=2"))
        'fs:ratio=1/64+vdn:n=2'
        >>> bnrewrite.parse_recipe("fss")
        Traceback (most recent call last):
        bnrewrite.errors.RecipeError: unknown component 'fss' — did you mean 'fs'? ...
    """
    registry = default_registry() if registry is None else registry
    if isinstance(text, Recipe):
        return _check_built(text, registry)
    if not isinstance(text, str):
        raise RecipeError(f"recipe must be a string like 'fs+vdn', got {type(text).__name__}")
    parts = [p.strip() for p in text.split("+")]
    if not text.strip():
        raise RecipeError(f"empty recipe; known components: {', '.join(sorted(registry))}")
    for before, after in zip(parts, parts[1:]):
        if before.endswith("=") and after[:1].isdigit():  # 'fs:every=+3': '+' was read as a separator
            value = after.split(",")[0]
            raise RecipeError(f"'{before}+{value}': '+' joins recipe components, so a value cannot start with it; "
                              f"write {before}{value}")
    for i, part in enumerate(parts):
        if not part:
            where = "starts with '+'" if i == 0 else "ends with '+'" if i == len(parts) - 1 else "has '++'"
            raise RecipeError(f"empty component in recipe '{text}' (it {where}): '+' joins two components; "
                              f"known components: {', '.join(sorted(registry))}")
    components = tuple(parse_component(p, registry) for p in parts)
    validate_combination(components, registry)
    return Recipe(components)


def _check_built(recipe: Recipe, registry: dict[str, Variant]) -> Recipe:
    """A Recipe built by hand gets the checks a parsed one had: known names, their options, the combination."""
    known = ", ".join(sorted(registry))
    if not recipe.components:
        raise RecipeError(f"empty recipe; known components: {known}")
    for c in recipe.components:
        if c.name not in registry:
            raise RecipeError(f"unknown component '{c.name}'{_did_you_mean(str(c.name), sorted(registry))} known: {known}")
        if not isinstance(c.options, registry[c.name].options):
            raise RecipeError(f"{c.name}: options must be a {registry[c.name].options.__name__}, "
                              f"got {type(c.options).__name__}")
    validate_combination(recipe.components, registry)
    return recipe


def validate_combination(components: tuple[Component, ...], registry: dict[str, Variant]) -> None:
    names = [c.name for c in components]
    for name in set(names):
        if names.count(name) > 1:
            raise RecipeError(f"component '{name}' appears {names.count(name)} times in the recipe")
    norms = [n for n in names if registry[n].role == "norm"]
    if len(norms) > 1:
        raise RecipeError(f"recipe combines {' and '.join(norms)}: pick one normalisation "
                          f"(components that replace BatchNorm: "
                          f"{', '.join(sorted(k for k, v in registry.items() if v.role == 'norm'))})")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if b not in registry[a].combines_with and a not in registry[b].combines_with:
                ok_a = ", ".join(sorted(registry[a].combines_with)) or "nothing"
                raise RecipeError(f"'{a}' cannot be combined with '{b}' ({a} combines with: {ok_a})")
    for c in components:
        variant = registry[c.name]
        if variant.role == "post" and not norms:
            raise RecipeError(f"'{c.name}' needs a normalisation to follow; combine it with one of: "
                              f"{', '.join(sorted(variant.combines_with))}")
        if variant.combines_with.isdisjoint(names):
            for f in dataclasses.fields(c.options):
                if f.name in variant.partner_options and getattr(c.options, f.name) != f.default:
                    raise RecipeError(f"{c.name}: {f.name} only acts when {c.name} is combined with one of "
                                      f"{', '.join(sorted(variant.combines_with))} (e.g. fs+{c.name}:{f.name}=...); "
                                      f"drop {f.name} or add one of them")
