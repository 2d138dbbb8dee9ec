"""``bnrewrite`` command line: inspect | fold | export | demo.

Imports of torch and friends happen inside the commands so ``bnrewrite --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys

MODEL_HELP = ("torchvision:NAME, timm:NAME, path/to/file.py:factory (a function returning the "
              "model), or a saved whole module (.pt)")


# ---------------------------------------------------------------------------- model loading
def load_model(spec: str):
    """Build the model named by ``spec`` (see MODEL_HELP); never downloads weights."""
    from .errors import InputError, first_line

    kind, sep, name = spec.partition(":")
    if sep and kind == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError) as exc:
            raise InputError(f"torchvision has no model '{name}' ({exc}); "
                             "see torchvision.models.list_models()") from None
    if sep and kind == "timm":
        try:
            import timm
        except ImportError:
            raise InputError("timm is not installed: pip install timm") from None
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise InputError(f"timm cannot build '{name}': {exc}") from None
    if spec.endswith(".pt") or spec.endswith(".pth"):
        import torch

        try:
            model = torch.load(spec, weights_only=False)
        except FileNotFoundError:
            raise InputError(f"no such file: {spec}") from None
        except Exception as exc:  # noqa: BLE001 - unpickling can fail in many ways: a bad file for the user
            raise InputError(f"{spec} is not a file torch.load can read ({first_line(exc)})") from None
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"{spec} holds an object of type {type(model).__name__}, not a whole module (a "
                             "state_dict?): save the model with torch.save(model, path), or give path/to/file.py:factory")
        return model
    path, sep, factory = spec.rpartition(":")
    if spec.endswith(".py") or (sep and path.endswith(".py") and not factory.strip()):
        raise InputError(f"{path or spec}: name the function that returns the model, as "
                         f"{path or spec}:FACTORY")
    if sep and path.endswith(".py"):
        return _call_factory(path, factory)
    raise InputError(f"cannot load model '{spec}': use {MODEL_HELP}")


def _call_factory(path: str, factory: str):
    """``factory()`` from the Python file ``path``; anything that goes wrong names the file or factory."""
    import importlib.util
    import inspect
    import os

    from torch import nn

    from .errors import InputError, first_line

    if not os.path.exists(path):
        raise InputError(f"no such file: {path}")
    module_spec = importlib.util.spec_from_file_location("bnrewrite_user_model", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise InputError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except SystemExit as exc:  # sys.exit() at import time: the module is a script, not a model file
        raise InputError(f"importing {path} called sys.exit({exc.code!r}); a model file must define the "
                         "factory without running a script") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed to import
        raise InputError(f"importing {path} failed: {first_line(exc)}") from None
    fn = getattr(module, factory, None)
    if fn is None:
        raise InputError(f"{path} has no '{factory}'")
    name = f"{path}:{factory}"
    if not callable(fn):
        raise InputError(f"{name} is of type {type(fn).__name__}, not a function returning the model")
    try:
        inspect.signature(fn).bind()
    except TypeError as exc:
        raise InputError(f"{name} must be callable with no arguments ({exc})") from None
    except ValueError:  # no signature to check (some builtins): just call it
        pass
    try:
        model = fn()
    except SystemExit as exc:
        raise InputError(f"{name}() called sys.exit({exc.code!r}) instead of returning the model") from None
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise InputError(f"{name}() raised {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{name}() returned an object of type {type(model).__name__}, not an nn.Module")
    return model


def example_input(shape):
    """``torch.randn(*shape)``, or None without a shape; a shape too large to allocate is an InputError."""
    import torch

    from .errors import InputError, first_line

    if shape is None:
        return None
    try:
        return torch.randn(*shape)
    except (RuntimeError, MemoryError, TypeError) as exc:
        raise InputError(f"--input-shape {','.join(map(str, shape))}: cannot allocate an example input of that "
                         f"size ({first_line(exc)}); use a smaller shape") from None


def parse_shape(text: str | None):
    from .errors import InputError

    if text is None or text.lower() == "none":
        return None
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise InputError(f"--input-shape must be comma-separated ints like 1,3,224,224, got '{text}'") from None
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape must be positive ints, got '{text}'")
    return shape


# ---------------------------------------------------------------------------- inspect
def site_rows(model, shape):
    """Transform-free report rows for a (possibly transformed) model."""
    from .api import inspect_sites

    example = (example_input(shape),) if shape else None
    sites = inspect_sites(model, example)
    rows = []
    for site in sites:
        module = None if site.functional else model.get_submodule(site.name)
        details = {}
        if module is not None and hasattr(module, "describe"):
            details = module.describe(site.input_shape)
        rows.append({**site.as_dict(), "rewritten_to": details.get("variant", site.kind),
                     "details": {k: v for k, v in details.items() if k != "variant"}})
    return rows


def merge_added_calls(rows: list[dict], original_sites: list[dict]) -> list[dict]:
    """One row per site of the *original* model. A rewrite can call a module more often than the
    model did (two-tower runs every BatchNorm once per tower): the extra calls of a module with n
    original calls are merged into them in order (call i, i + n, i + 2n…), each field taken from
    the first call that has it, and the row says how many calls the rewritten graph makes."""
    calls = {}
    for site in original_sites:
        calls[site["name"]] = calls.get(site["name"], 0) + 1
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    merged, emitted = [], set()
    for row in rows:
        name, group = row["name"], by_name[row["name"]]
        n = calls.get(name, len(group))
        if n >= len(group):
            merged.append(row)
            continue
        if name in emitted:
            continue
        emitted.add(name)
        for i in range(n):
            parts = group[i::n]
            out = dict(parts[0])
            for key, value in out.items():
                if value in (None, "", [], ()):
                    out[key] = next((p[key] for p in parts if p[key] not in (None, "", [], ())), value)
            out.update(call_index=i, shared=n > 1)
            out["details"] = {**out["details"], "calls": len(parts)}
            merged.append(out)
    return merged


def _format_table(rows, columns):
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def to_dot(model) -> str:
    """Graphviz text of the top-level graph; nodes calling bnrewrite runtime modules are filled."""
    from torch import fx

    if not isinstance(model, fx.GraphModule):
        return "digraph G {\n  label=\"top level not traced\";\n}\n"
    lines = ["digraph G {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
    for node in model.graph.nodes:
        label = f"{node.name}\\n{node.op}: {node.target if node.op != 'call_function' else getattr(node.target, '__name__', node.target)}"
        style = ""
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            label += f"\\n{type(module).__name__}"
            if getattr(module, "is_bnrewrite_norm", False) or getattr(module, "is_bnrewrite_leaf", False):
                style = ", style=filled, fillcolor=orange"
        lines.append(f'  "{node.name}" [label="{label}"{style}];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def cmd_inspect(args) -> int:
    if args.model.endswith(".onnx"):
        return _inspect_onnx(args)
    from .api import transform

    model = load_model(args.model)
    shape = parse_shape(args.input_shape)
    example = (example_input(shape),) if shape else None
    transformed = transform(model, args.recipe, example_inputs=example, include=args.include, exclude=args.exclude,
                            **_inspection_options(args, shape))
    info = getattr(transformed, "bnrewrite_info", None)
    rows = site_rows(transformed, shape)
    if info:
        rows = merge_added_calls(rows, info.sites)
    selected = set(info.selected) if info else set()
    original_kind = {(s["name"], s["call_index"]): s["kind"] for s in (info.sites if info else [])}
    for row in rows:
        row["kind"] = original_kind.get((row["name"], row["call_index"]), row["kind"])
        row["rewritten"] = row["name"] in selected and row["rewritten_to"] != row["kind"]
        if row["name"] not in selected:
            row["rewritten_to"] = "(excluded)"
    lowering = {r.site: r for r in getattr(transformed, "bnrewrite_lowering", [])}
    for row in rows:
        record = lowering.get(row["name"])
        if record is not None:
            row["lowered"] = (f"fused (+{record.activation})" if record.activation else "fused") \
                if record.lowered else f"no: {record.reason}"
    n_regions = len(info.regions) if info else 0
    summary = {"sites": len(rows), "rewritten": sum(r["rewritten"] for r in rows),
               "leaf_regions": n_regions, "recipe": info.recipe if info else args.recipe,
               "top_level_traced": info.top_traced if info else None}
    if args.format == "json":
        out = {"model": args.model, "summary": summary, "sites": rows,
               "regions": [vars(r) for r in (info.regions if info else [])]}
        text = json.dumps(out, indent=2, default=str)
    elif args.format == "dot":
        text = to_dot(transformed)
    else:
        table_rows = []
        for r in rows:
            details = ", ".join(f"{k}={v}" for k, v in r["details"].items())
            table_rows.append({"name": r["name"] + (f" @{r['call_index']}" if r["shared"] else ""),
                               "kind": r["kind"],
                               "shape": "x".join(map(str, r["input_shape"])) if r["input_shape"] else "-",
                               "producer": r["producer"] or "-", "consumer": r["consumer"] or "-",
                               "rewritten to": r["rewritten_to"], "lowered": r.get("lowered", "-"),
                               "details": details or "-"})
        columns = ["name", "kind", "shape", "producer", "consumer", "rewritten to", "details"]
        if lowering:
            columns.insert(6, "lowered")
        text = _format_table(table_rows, columns)
        if info and info.regions:
            text += "\n\nleaf regions (captured separately because their caller did not trace):\n"
            text += "\n".join(f"  {r.name}: {'traced' if r.traced else 'eager'} — {r.reason}" for r in info.regions)
        if info and not info.top_traced:
            text += f"\n\ntop level not traced: {info.top_error}"
        text += (f"\n\n{summary['sites']} sites, {summary['rewritten']} rewritten, "
                 f"{summary['leaf_regions']} leaf regions (recipe: {summary['recipe']})")
    _emit(text, args.out)
    return 0


def _inspection_options(args, shape) -> dict:
    """Transform options a recipe needs that an inspection has no data for: vdn gets unit
    data statistics (:func:`unit_data_stats`)."""
    from .recipe import parse_recipe

    names = parse_recipe(args.recipe).names()
    options = {}
    if args.seed is not None and names != ("bn",):
        options["seed"] = args.seed
    if args.lower != "reference":
        options["lower"] = args.lower
    options.update(unit_data_stats(args.recipe, shape))
    return options


def unit_data_stats(recipe: str, shape) -> dict:
    """``data_stats`` for a vdn recipe where the command has no training data: zero mean, unit std per
    input channel. Only training uses the virtual rows drawn from them: the graph and the sites
    (inspect) and the eval forward (fold, export) do not depend on their values."""
    from .recipe import parse_recipe

    if "vdn" not in parse_recipe(recipe).names():
        return {}
    channels = shape[1] if shape and len(shape) > 1 else 3
    return {"data_stats": ([0.0] * channels, [1.0] * channels)}


def _inspect_onnx(args) -> int:
    from .errors import InputError

    try:
        from .export import inspect_onnx
    except ImportError:
        raise InputError("ONNX inspection needs bnrewrite.export (not available in this build)") from None
    ignored = [flag for flag, given in (("--format dot", args.format == "dot"), ("--recipe", args.recipe != "bn"),
                                        ("--seed", args.seed is not None), ("--lower", args.lower != "reference"),
                                        ("--include", args.include), ("--exclude", args.exclude)) if given]
    if ignored:
        raise InputError(f"{args.model}: {', '.join(ignored)} applies to a torch model; an .onnx file is inspected "
                         "as it is, with --format table or json")
    report = inspect_onnx(args.model)
    _emit(json.dumps(report, indent=2, default=str) if args.format == "json" else str(report), args.out)
    return 0


def _emit(text: str, out: str | None) -> None:
    """Print ``text``, or write it to ``out`` (creating its folder, as fold and export do)."""
    if out:
        import os

        from .errors import InputError

        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as fh:
                fh.write(text)
        except OSError as exc:
            raise InputError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
        print(f"wrote {out}")
    else:
        print(text)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnrewrite",
        description="Rewrite a model's BatchNorm into paper variants (torch.fx), fold it away for "
                    "inference, export to ONNX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="show the BatchNorm sites of a model and what a recipe does to them",
                       description="Show every BatchNorm site (name, kind, input shape, producer, "
                                   "consumer, what the recipe rewrites it to) and a summary line. "
                                   "With a .onnx file: its op counts and any normalisation left.")
    p.add_argument("model", help=MODEL_HELP + ", or a .onnx file")
    p.add_argument("--recipe", default="bn", help="recipe, e.g. 'fs+vdn' or 'ghost:size=16' (default: bn)")
    p.add_argument("--input-shape", default="1,3,224,224",
                   help="example input shape for shapes, comma separated (default 1,3,224,224; 'none' skips)")
    p.add_argument("--format", choices=["table", "json", "dot"], default="table",
                   help="table (default), json, or dot (Graphviz of the rewritten graph, rewritten nodes filled)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling schedules (recipes that sample)")
    p.add_argument("--lower", choices=["reference", "auto", "fused"], default="reference",
                   help="lower sites to the fused Triton ops: reference (default, no), auto (CUDA models), "
                        "fused (always); shows which sites were lowered and fused with an activation")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="rewrite only the sites whose name matches (repeatable), as transform(include=)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="leave the sites whose name matches stock (repeatable), as transform(exclude=)")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_inspect)
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands defined next to the features they drive (fold/export, demo)."""
    for module_name in ("bnrewrite.cli_fold_export", "bnrewrite.cli_demo"):
        try:
            module = __import__(module_name, fromlist=["add_commands"])
        except ImportError:
            continue
        module.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import BnRewriteError

    try:
        return int(args.func(args) or 0)
    except BnRewriteError as exc:
        print(f"bnrewrite: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
