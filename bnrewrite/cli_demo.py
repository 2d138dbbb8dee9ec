"""The ``demo`` command (its code lives in bnrewrite.demo)."""
from __future__ import annotations


def _run_items(text: str) -> list[str]:
    """The comma-separated runs; a recipe's own options are comma-separated too ('cbn:k=4,burnin=5@4'):
    a piece with '=' and no ':' (an option, never a component, which names itself first) continues the
    run before it."""
    items: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if items and "=" in piece and ":" not in piece:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def _parse_runs(text: str | None):
    if not text:
        return None
    from .demo import DEFAULT_RUNS
    from .errors import InputError
    from .recipe import parse_recipe

    known = {label: (label, recipe, batch) for label, recipe, batch in DEFAULT_RUNS}
    runs = []
    for item in _run_items(text):
        if item in known:
            runs.append(known[item])
            continue
        recipe, _, batch = item.partition("@")
        if not recipe or (batch and not (batch.isdigit() and int(batch) >= 1)):
            raise InputError(f"demo --runs: {item!r} is not RECIPE@BATCH with a batch size of 1 or more, nor a "
                             f"default run ({', '.join(known)})")
        parse_recipe(recipe)  # a bad recipe now, not after the runs before it have trained
        runs.append((item, recipe, int(batch) if batch else 32))
    return runs


def _check_arguments(args) -> None:
    """The demo's options, refused before any training (they failed deep inside it, with tracebacks)."""
    import os

    import torch

    from .errors import InputError

    for name in ("epochs", "small_batch_epochs"):
        if getattr(args, name) < 1:
            raise InputError(f"demo --{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"demo --device: {args.device!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"demo --device {args.device}: this machine has no CUDA GPU torch can use; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"demo --device: {args.device!r}; use cpu or cuda")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        raise InputError(f"demo --out: cannot create the folder {args.out!r} ({err.strerror or err})") from None


def cmd_demo(args) -> int:
    from .demo import run_demo

    runs = _parse_runs(args.runs)
    _check_arguments(args)  # after the runs: it creates the --out folder
    run_demo(epochs=args.epochs, small_batch_epochs=args.small_batch_epochs, runs=runs,
             out_dir=args.out, device=args.device, seed=args.seed, progress=not args.no_progress)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="train a small ResNet on scikit-learn digits with each recipe, fold, export",
                       description="Train a small ResNet on scikit-learn's handwritten digits (upsampled to "
                                   "32x32) with stock BN and the paper recipes; print accuracy / step-time "
                                   "table, save training curves, fold the best model and export it to ONNX "
                                   "verified with onnxruntime.")
    p.add_argument("--epochs", type=int, default=8, help="epochs for runs at batch >= 8 (default 8)")
    p.add_argument("--small-batch-epochs", type=int, default=3,
                   help="epochs for runs at batch < 8, which take many more steps (default 3)")
    p.add_argument("--runs", default=None,
                   help="comma-separated runs: labels of the default set (bn, fs+vdn, fs/8+vdn, bs, ghost, cbn@4, cbn/rn@4, "
                        "bn@4, bgn@2, bn@2, two-tower) or RECIPE@BATCH, e.g. 'bn,fs:ratio=1/16@32'")
    p.add_argument("--out", default="demo-out", help="output folder for the plot, ONNX file and results.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
