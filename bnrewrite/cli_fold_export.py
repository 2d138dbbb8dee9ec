"""``bnrewrite fold`` and ``bnrewrite export`` (picked up by ``cli._add_optional_commands``).

Imports of torch happen inside the commands so ``bnrewrite --help`` stays fast.
"""
from __future__ import annotations

import json

from .cli import MODEL_HELP, _emit, example_input, load_model, parse_shape, unit_data_stats


def _prepare(args):
    """Load the model, apply ``--recipe`` (so a recipe's runtime modules are what gets folded)."""
    model = load_model(args.model)
    shape = parse_shape(args.input_shape)
    example = (example_input(shape),) if shape else None
    if args.recipe != "bn":
        from .api import transform

        model = transform(model, args.recipe, example_inputs=example, **unit_data_stats(args.recipe, shape))
    return model.eval(), example


def _check_out(out: str, suffix: str) -> None:
    import os

    from .errors import InputError

    if not out.strip() or os.path.isdir(out):
        raise InputError(f"--out '{out}' is {'a folder' if out.strip() else 'empty'}; give the path of the "
                         f"{suffix} file to write")


def cmd_fold(args) -> int:
    import torch

    from .passes.fold import fold_for_inference

    _check_out(args.out, ".pt")
    model, example = _prepare(args)
    folded = fold_for_inference(model, example_weight=args.example_weight, example_inputs=example)
    report = folded.bnrewrite_fold_report
    check = None
    if example is not None:
        with torch.no_grad():
            want, got = model(*example), folded(*example)
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
            check = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    _save(folded, args.out)
    if args.format == "json":
        key = "max_rel_change_by_example_weighing" if args.example_weight else "max_rel_error_vs_unfolded"
        text = json.dumps({"model": args.model, "out": args.out, key: check,
                           **report.as_dict()}, indent=2, default=str)
    else:
        text = str(report) + f"\n\nsaved {args.out}"
        if check is not None:
            if args.example_weight:
                # the plain eval output is not what example weighing computes: this is its effect, not an error
                text += (f"\nmax relative change from the unfolded eval output made by example weighing "
                         f"(alpha={args.example_weight:g}, intended): {check:.3g}")
            else:
                text += f"\nmax relative difference to the unfolded eval output: {check:.3g}"
    _emit(text, None)
    return 0


def _make_folder_of(out: str, what: str) -> None:
    """Create the folder ``--out`` names, as ``inspect --out`` does (the library's ``export_onnx``
    refuses a missing folder instead: a typo in a path given in code should not make folders)."""
    import os

    from .errors import InputError

    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write the {what} there ({exc})") from None


def _save(module, out: str) -> None:
    """``torch.save``, creating the folder of ``out`` first."""
    import torch

    from .errors import InputError

    _make_folder_of(out, "folded model")
    try:
        torch.save(module, out)
    except (OSError, RuntimeError) as exc:
        raise InputError(f"--out {out}: cannot write the folded model there ({exc})") from None


def cmd_export(args) -> int:
    from .errors import InputError
    from .export import export_onnx

    if parse_shape(args.input_shape) is None:
        raise InputError("export needs --input-shape (e.g. 1,3,224,224)")
    _check_out(args.out, ".onnx")
    model, example = _prepare(args)
    _make_folder_of(args.out, "ONNX model")
    report = export_onnx(model, example, args.out, dynamic_batch=not args.static_batch, opset=args.opset,
                         verify=not args.no_verify, example_weight=args.example_weight, exporter=args.exporter)
    if args.format == "json":
        text = json.dumps(report.as_dict(), indent=2, default=str)
    else:
        text = str(report)
        if report.fold_report is not None:
            counts = report.fold_report.counts()
            text += "\nfolded first: " + ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
    _emit(text, None)
    return 0


def _common(p, shape_default):
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--recipe", default="bn", help="rewrite with this recipe first (default: bn, the model as is)")
    p.add_argument("--input-shape", default=shape_default,
                   help=f"example input shape, comma separated (default {shape_default})")
    p.add_argument("--example-weight", type=float, default=0.0, metavar="ALPHA",
                   help="inference example weighing α in [0, 1] (four-things-bn §3.1); 0 folds plainly")
    p.add_argument("--format", choices=["table", "json"], default="table")


def add_commands(sub) -> None:
    p = sub.add_parser("fold", help="fold every normalisation away and save the inference model",
                       description="Fold BatchNorm (and every bnrewrite variant) into the neighbouring "
                                   "conv/linear layers or a per-channel affine; save the whole module "
                                   "with torch.save and print what happened at each site.")
    _common(p, "1,3,224,224")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("export", help="fold, export to ONNX and verify with onnxruntime",
                       description="Fold the model, export it with torch.onnx.export, run it "
                                   "in onnxruntime and compare with torch on two batch sizes.")
    _common(p, "1,3,224,224")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--static-batch", action="store_true", help="export a fixed batch size")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                   help="torch.onnx exporter (default auto: TorchScript, dynamo if that fails)")
    p.set_defaults(func=cmd_export)
