"""Training curves of one or more runs in one picture: loss, online probe acc@1 and kNN acc@1 against epoch, and
the label-free health (effective rank, std of the normalised embedding, alignment and uniformity; docs/health.md),
which runs without labels log too: a healthy and a collapsing run side by side tell themselves apart.

Reads each run folder's metrics.jsonl and args.json (the method and dataset name the run in the legend), one
colour per run, so comparing methods is one look. Every run also draws its own curves.png at its end.

    python eval/plot.py runs/byol-cifar10 runs/simclr-cifar10 --out byol-vs-simclr.png
    python eval/plot.py runs/*-synthetic --out synthetic.png
"""
import argparse
import json
import os
import sys
from pathlib import Path

# `python eval/plot.py` puts eval/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import Parser, UsageError, run_main  # noqa: E402


def build_parser():
    p = Parser(prog="eval/plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with metrics.jsonl) [required]")
    p.add_argument("--out", default="curves.png", help="PNG file [default: %(default)s]")
    p.add_argument("--title", default=None, help="figure title [default: none]")
    return p


def load_run(run_dir):
    """(legend label, per-epoch metrics) of a run folder; a folder that is not a run is a UsageError."""
    from common.plots import read_epochs
    metrics, config = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "args.json")
    if not os.path.isfile(metrics):
        raise UsageError(f"{run_dir} has no metrics.jsonl: pass the --out-dir of a training run")
    try:
        with open(config) as f:
            args = json.load(f)
        label = f"{args['method']} on {args['dataset']}"
    except (OSError, ValueError, KeyError):
        label = os.path.basename(os.path.normpath(run_dir))
    try:
        epochs = read_epochs(metrics)
    except ValueError as e:
        raise UsageError(f"{metrics} is not a metrics file ({e})")
    if not epochs:
        raise UsageError(f"{metrics} has no finished epoch yet: nothing to plot")
    return label, epochs


def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    labels = [label for label, _ in runs]
    # Two runs of one method on one dataset: tell them apart by their folder.
    runs = [(f"{label} ({os.path.basename(os.path.normpath(d))})" if labels.count(label) > 1 else label, epochs)
            for (label, epochs), d in zip(runs, args.runs)]
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {args.out}: {parent} is not a writable folder")
    from common.plots import curves_png
    drawn = curves_png(runs, args.out, args.title)
    print(f"wrote {args.out}: {len(runs)} run(s); lines per panel: {drawn}")


if __name__ == "__main__":
    run_main(main)
