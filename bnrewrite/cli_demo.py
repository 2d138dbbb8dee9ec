"""The ``demo`` command (its code lives in bnrewrite.demo)."""
from __future__ import annotations


def _parse_runs(text: str | None):
    if not text:
        return None
    from .demo import DEFAULT_RUNS

    known = {label: (label, recipe, batch) for label, recipe, batch in DEFAULT_RUNS}
    runs = []
    for item in text.split(","):
        item = item.strip()
        if item in known:
            runs.append(known[item])
            continue
        recipe, _, batch = item.partition("@")
        runs.append((item, recipe, int(batch) if batch else 32))
    return runs


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(epochs=args.epochs, small_batch_epochs=args.small_batch_epochs, runs=_parse_runs(args.runs),
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
