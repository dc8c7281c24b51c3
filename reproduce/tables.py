"""Reproduce a published table: pretrain every method with its recipe, evaluate it, and print our
numbers beside the published ones.

    python reproduce/tables.py --table cifar10 --dry-run                      # print the commands only
    python reproduce/tables.py --table cifar10 --data-dir ./data              # 16 methods, one GPU
    python reproduce/tables.py --table cifar100 --methods byol simclr         # a subset
    python reproduce/tables.py --table imagenet100 --data-dir /data/imagenet100 --nproc-per-node 2
    python reproduce/tables.py --table imagenet --data-dir /data/imagenet --nproc-per-node 2 --dry-run

For each method: `<method>.py --dataset <table>` with the script's recipe for that dataset (CIFAR:
ResNet-18 with the CIFAR stem, 1000 epochs; ImageNet-100: the ImageNet-size recipe; ImageNet-1k: solo-learn's
scripts/pretrain/imagenet/ recipe, ResNet-50, with BYOL's 16 accumulated batches per step), under torchrun
when --nproc-per-node > 1, then `eval/linear.py` (solo-learn's offline protocol: 100 epochs, SGD,
augmented images). The table compares both of our numbers, the online probe at the end of pretraining
(the protocol of the published CIFAR numbers and of the unbracketed ImageNet-100 ones) and the offline
linear evaluation (the bracketed ImageNet-100 numbers; on ImageNet-1k with scripts/linear/imagenet/'s lr and
weight decay), with the published ones.

Runs go to --out-dir/<table>/<method>/, the table to --out-dir/<table>.md and .json. Rerunning the
same command resumes: a method whose linear.json exists is not rerun, one whose backbone.pt exists is
only evaluated, and an unfinished pretraining continues from its last.pt. A method whose script does
not exist is skipped with a note. Ctrl-C or SIGTERM lets the running script save its checkpoint, then
stops (rerun to continue).
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# `python reproduce/tables.py` puts reproduce/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import Parser, UsageError, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # where <method>.py and eval/linear.py live

METHODS = ("barlow_twins", "byol", "deepclusterv2", "dino", "mocov2plus", "nnclr", "ressl", "simclr", "supcon",
           "simsiam", "swav", "vicreg", "wmse", "all4one", "mocov3", "vibcreg", "nnbyol", "nnsiam", "mae")
# Methods solo-learn added after the paper: their numbers come from its README; NNBYOL, NNSiam and MAE have none
# in these tables (run them with --methods; MAE's published number is ImageNet-1k fine-tuning, not a table here).
LATER = ("all4one", "mocov3", "vibcreg")
NAMES = {"barlow_twins": "Barlow Twins", "byol": "BYOL", "deepclusterv2": "DeepCluster V2", "dino": "DINO",
         "mocov2plus": "MoCo V2+", "nnclr": "NNCLR", "ressl": "ReSSL", "simclr": "SimCLR", "supcon": "SupCon",
         "simsiam": "SimSiam", "swav": "SwAV", "vicreg": "VICReg", "wmse": "W-MSE", "all4one": "All4One",
         "mocov3": "MoCo V3", "vibcreg": "VIbCReg", "nnbyol": "NNBYOL", "nnsiam": "NNSiam", "mae": "MAE"}

# Published top-1 / top-5 accuracy, ResNet-18. "online": the online linear probe at the end of pretraining;
# "linear": offline linear evaluation. Source: solo-learn (Turrisi da Costa et al., JMLR 2022), Table 1,
# except SupCon, which Table 1 lacks: its CIFAR top-1 comes from solo-learn's README (top-5 not given).
PUBLISHED = {
    "cifar10": {
        "barlow_twins": {"online": (92.10, 99.73)}, "byol": {"online": (92.58, 99.79)},
        "deepclusterv2": {"online": (88.85, 99.58)}, "dino": {"online": (89.52, 99.71)},
        "mocov2plus": {"online": (92.94, 99.79)}, "nnclr": {"online": (91.88, 99.78)},
        "ressl": {"online": (90.63, 99.62)}, "simclr": {"online": (90.74, 99.75)},
        "supcon": {"online": (93.82, None)}, "simsiam": {"online": (90.51, 99.72)},
        "swav": {"online": (89.17, 99.68)}, "vicreg": {"online": (92.07, 99.74)},
        "wmse": {"online": (88.67, 99.68)}, "all4one": {"online": (93.24, 99.88)},
        "mocov3": {"online": (93.10, 99.80)}, "vibcreg": {"online": (91.18, 99.74)},
    },
    "cifar100": {
        "barlow_twins": {"online": (70.90, 91.91)}, "byol": {"online": (70.46, 91.96)},
        "deepclusterv2": {"online": (63.61, 88.09)}, "dino": {"online": (66.76, 90.34)},
        "mocov2plus": {"online": (69.89, 91.65)}, "nnclr": {"online": (69.62, 91.52)},
        "ressl": {"online": (65.92, 89.73)}, "simclr": {"online": (65.78, 89.04)},
        "supcon": {"online": (70.38, None)}, "simsiam": {"online": (66.04, 89.62)},
        "swav": {"online": (64.88, 88.78)}, "vicreg": {"online": (68.54, 90.83)},
        "wmse": {"online": (61.33, 87.26)}, "all4one": {"online": (72.17, 93.35)},
        "mocov3": {"online": (68.83, 90.57)}, "vibcreg": {"online": (67.37, 90.07)},
    },
    "imagenet100": {
        "barlow_twins": {"online": (80.38, 95.28), "linear": (80.16, 95.14)},
        "byol": {"online": (80.16, 94.80), "linear": (80.32, 94.94)},
        "deepclusterv2": {"online": (75.36, 93.22), "linear": (75.40, 93.10)},
        "dino": {"online": (74.84, 92.92), "linear": (74.92, 92.78)},
        "mocov2plus": {"online": (78.20, 95.50), "linear": (79.28, 95.18)},
        "nnclr": {"online": (79.80, 95.28), "linear": (80.16, 95.28)},
        "ressl": {"online": (76.92, 94.20), "linear": (78.48, 94.24)},
        "simclr": {"online": (77.04, 94.02), "linear": (77.48, 93.42)},
        "simsiam": {"online": (74.54, 93.16), "linear": (78.72, 94.78)},
        "swav": {"online": (74.04, 92.70), "linear": (74.28, 92.84)},
        "vicreg": {"online": (79.22, 95.06), "linear": (79.40, 95.02)},
        "wmse": {"online": (67.60, 90.94), "linear": (69.06, 91.22)},
        "all4one": {"online": (81.93, 96.23)},
        "mocov3": {"online": (80.36, 95.18), "linear": (80.36, 94.96)},
        "vibcreg": {"online": (79.86, 94.98), "linear": (79.38, 94.60)},
    },
    # ImageNet-1k, ResNet-50, 100 epochs: solo-learn's README (its "ImageNet" table), online and offline.
    "imagenet": {
        "barlow_twins": {"online": (67.18, 87.69), "linear": (67.23, 87.98)},
        "byol": {"online": (68.63, 88.80), "linear": (68.37, 88.66)},
        "mocov2plus": {"online": (62.61, 85.40), "linear": (66.84, 87.60)},
    },
}
TITLES = {"cifar10": "CIFAR-10, ResNet-18 (CIFAR stem), 1000 epochs",
          "cifar100": "CIFAR-100, ResNet-18 (CIFAR stem), 1000 epochs",
          "imagenet100": "ImageNet-100, ResNet-18, the ImageNet-size recipe (400 epochs in solo-learn)",
          "imagenet": "ImageNet-1k, ResNet-50, solo-learn's scripts/pretrain/imagenet/ recipes, 100 epochs"}
PUBLISHED_EPOCHS = {"cifar10": 1000, "cifar100": 1000, "imagenet100": 400, "imagenet": 100}
# The published row of MoCo V2+ on ImageNet-1k is 100 epochs; its HEAD yaml (our recipe) says 400.
EPOCHS = {("imagenet", "mocov2plus"): 100}
# solo-learn's published CIFAR and ImageNet-100 runs use a global batch of 256 (CIFAR: 256 on one GPU;
# ImageNet-100: 2 x 128); its ImageNet-1k yamls 64 per GPU on 2 GPUs (BYOL, MoCo V2+) or 4 (Barlow Twins).
GLOBAL_BATCH = 256
GLOBAL_BATCH_IMAGENET1K = {"barlow_twins": 64 * 4, "byol": 64 * 2, "mocov2plus": 64 * 2}


def build_parser():
    p = Parser(prog="reproduce/tables.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=tuple(PUBLISHED), help="which published table [required]")
    p.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                   help=f"methods to run, space- or comma-separated, of: {' '.join(METHODS)} "
                        f"[default: every method the table publishes]")
    p.add_argument("--data-dir", default="./data", help="dataset location, passed to every script [default: %(default)s]")
    p.add_argument("--out-dir", default="runs/reproduce",
                   help="runs go to OUT_DIR/<table>/<method>, the table to OUT_DIR/<table>.md [default: %(default)s]")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="GPUs (processes) per pretraining run; above 1 it runs under torchrun [default: %(default)s]")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="batch over all processes; each gets GLOBAL / nproc [default: solo-learn's: 256; on imagenet "
                        "64 x its GPUs: " + ", ".join(f"{m} {b}" for m, b in GLOBAL_BATCH_IMAGENET1K.items()) + "]")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the recipes' pretraining epochs, for a quick check [default: the recipe's]")
    p.add_argument("--pretrain-args", default="",
                   help='extra flags for every method script, given with "=": --pretrain-args="--workers 16" '
                        '[default: none]')
    p.add_argument("--linear-args", default="",
                   help='extra flags for eval/linear.py, given with "=": --linear-args="--workers 16" [default: none]')
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.methods is None:
        args.methods = [m for m in METHODS if m in PUBLISHED[args.table]]
    else:
        chosen = [m for item in args.methods for m in item.split(",") if m]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown:
            raise UsageError(f"unknown method(s) {', '.join(unknown)}: choose from {' '.join(METHODS)}")
        args.methods = list(dict.fromkeys(chosen))  # keep the order given, drop repeats
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be 1 or more, got {args.nproc_per_node}")
    for method in args.methods:
        batch = global_batch(args, method)
        if batch < 1 or batch % args.nproc_per_node:
            raise UsageError(f"global batch {batch} ({method}) must be a positive multiple of --nproc-per-node "
                             f"{args.nproc_per_node}: pass --global-batch-size")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be positive, got {args.epochs}")
    try:
        args.pretrain_args, args.linear_args = shlex.split(args.pretrain_args), shlex.split(args.linear_args)
    except ValueError as e:
        raise UsageError(f"cannot split --pretrain-args/--linear-args: {e}")
    return args


# ---- commands ----
def shown(path):
    """A path as the user would type it: relative to the current folder when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run_dir(args, method):
    return Path(args.out_dir) / args.table / method


def same_environment(program):
    """`program` when PATH finds it beside this Python (same environment), else None."""
    found = shutil.which(program)
    return program if found and Path(found).absolute().parent == Path(sys.executable).absolute().parent else None


def python():
    return same_environment("python") or sys.executable


def global_batch(args, method):
    if args.global_batch_size is not None:
        return args.global_batch_size
    return GLOBAL_BATCH_IMAGENET1K.get(method, GLOBAL_BATCH) if args.table == "imagenet" else GLOBAL_BATCH


def pretrain_command(args, method):
    if args.nproc_per_node == 1:
        launcher = [python()]
    else:  # torchrun of this Python's environment; --standalone picks a free port, so tables can run side by side
        torchrun = same_environment("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        launcher += ["--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    command = [*launcher, shown(str(ROOT / f"{method}.py")), "--dataset", args.table, "--data-dir", args.data_dir,
               "--out-dir", str(run_dir(args, method)),
               "--batch-size", str(global_batch(args, method) // args.nproc_per_node)]
    if epochs := args.epochs or EPOCHS.get((args.table, method)):
        command += ["--epochs", str(epochs)]
    return command + args.pretrain_args


def linear_command(args, method):
    folder = run_dir(args, method)
    return [python(), shown(str(ROOT / "eval" / "linear.py")), "--ckpt", str(folder / "backbone.pt"),
            "--dataset", args.table, "--data-dir", args.data_dir, "--out", str(folder / "linear.json"),
            *args.linear_args]


def state(args, method):
    """missing | done | pretrained | resume | new"""
    folder = run_dir(args, method)
    if not (ROOT / f"{method}.py").is_file():
        return "missing"
    if (folder / "linear.json").is_file():
        return "done"
    if (folder / "backbone.pt").is_file():
        return "pretrained"
    return "resume" if (folder / "last.pt").is_file() else "new"


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while a script ran; the script was left to save, then we stop."""


def execute(command):
    """Run a command to its end; returns its exit status. A SIGTERM sent to us is passed on to it (a
    terminal's Ctrl-C reaches it directly), and we wait for it to checkpoint instead of killing it."""
    signals, process = [], None

    def forward(signum, frame):
        signals.append(signum)
        if signum != signal.SIGINT and process is not None and process.poll() is None:
            process.send_signal(signum)

    # Handlers first: a signal arriving while the script starts must not kill us and orphan it.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        process = subprocess.Popen(command)
        if signal.SIGTERM in signals:
            process.send_signal(signal.SIGTERM)
        code = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signals:
        raise Interrupted(signal.Signals(signals[0]).name)
    return code


# ---- results ----
def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def ours(args, method):
    """Our numbers so far: {"online": (acc1, acc5), "linear": (acc1, acc5), "linear_mode", "epochs"}."""
    folder, result = run_dir(args, method), {}
    if (folder / "backbone.pt").is_file() and (folder / "metrics.jsonl").is_file():
        epochs = []
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if record.get("type") == "epoch" and "probe_acc1" in record:
                epochs.append(record)
        if epochs:
            result["online"] = (epochs[-1]["probe_acc1"], epochs[-1].get("probe_acc5"))
            result["epochs"] = epochs[-1]["epoch"] + 1
    linear = read_json(folder / "linear.json")
    if linear:
        result["linear"] = (linear["acc1"], linear.get("acc5"))
        result["linear_mode"] = linear.get("mode", "full")
    return result


def cell(pair, published=None):
    """'acc1 / acc5', with the acc@1 difference to the published number when both exist."""
    if not pair:
        return "–"
    acc1, acc5 = pair
    text = f"{acc1:.2f} / {acc5:.2f}" if acc5 is not None else f"{acc1:.2f} / –"
    if published:
        text += f" ({acc1 - published[0]:+.2f})"
    return text


def table(args, notes):
    """The markdown table and its JSON twin for the selected methods."""
    rows, data = [], {}
    published_all = PUBLISHED[args.table]
    for method in args.methods:
        published, mine = published_all.get(method, {}), ours(args, method)
        note = notes.get(method) or {"done": "", "pretrained": "linear evaluation pending",
                                     "resume": "pretraining unfinished", "new": "not run yet",
                                     "missing": f"{method}.py missing: skipped"}[state(args, method)]
        if mine.get("epochs", PUBLISHED_EPOCHS[args.table]) != PUBLISHED_EPOCHS[args.table]:
            n = mine["epochs"]
            note = "; ".join(filter(None, [note, f"pretrained {n} epoch{'s' * (n != 1)}, not "
                                                 f"{PUBLISHED_EPOCHS[args.table]}"]))
        if mine.get("linear_mode") == "fast":
            note = "; ".join(filter(None, [note, "linear eval in --fast mode"]))
        rows.append(f"| {NAMES[method]} | {cell(published.get('online'))} | {cell(mine.get('online'), published.get('online'))} "
                    f"| {cell(published.get('linear'))} | {cell(mine.get('linear'), published.get('linear'))} | {note} |")
        data[method] = {"published": published, "ours": mine, "note": note}
    text = "\n".join([
        f"## {TITLES[args.table]}", "",
        "Top-1 / top-5 accuracy (%); in brackets, our top-1 minus the published one. Online: the linear probe "
        "trained during pretraining, at its end; linear: offline linear evaluation (eval/linear.py).", "",
        "| Method | online, published | online, ours | linear, published | linear, ours | notes |",
        "|---|---|---|---|---|---|", *rows, "",
        ("Published: solo-learn's README, its ImageNet table." if args.table == "imagenet" else
         "Published: solo-learn (Turrisi da Costa et al., JMLR 2022), Table 1"
         + ("; SupCon's top-1 from solo-learn's README (not in Table 1)" if args.table != "imagenet100" else "")
         + "; All4One, MoCo V3 and VIbCReg (added after the paper) from solo-learn's README."),
        ""])
    return text, {"table": args.table, "title": TITLES[args.table], "methods": data}


def write_table(args, notes):
    text, data = table(args, notes)
    os.makedirs(args.out_dir, exist_ok=True)
    for suffix, content in ((".md", text), (".json", json.dumps(data, indent=2))):
        path = Path(args.out_dir) / f"{args.table}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
    return text


# ---- main ----
def dry_run(args):
    n = len(args.methods)
    print(f"# {TITLES[args.table]}: {n} method{'s' * (n != 1)}, runs in {Path(args.out_dir) / args.table}/<method>")
    for method in args.methods:
        status = state(args, method)
        if status == "missing":
            print(f"# {method}: {method}.py missing: skipped")
            continue
        if status == "done":
            print(f"# {method}: done ({run_dir(args, method) / 'linear.json'} exists): skipped")
            continue
        if status == "pretrained":
            print(f"# {method}: backbone.pt exists: linear evaluation only")
        else:
            if status == "resume":
                print(f"# {method}: resumes from {run_dir(args, method) / 'last.pt'}")
            print(shlex.join(pretrain_command(args, method)))
        print(shlex.join(linear_command(args, method)))
    return 0


def reproduce(args):
    """Run what is left to run; returns the exit status (0 all done, 1 a method failed)."""
    notes, failed = {}, False
    for i, method in enumerate(args.methods, 1):
        status = state(args, method)
        if status in ("missing", "done"):
            print(f"[{i}/{len(args.methods)}] {method}: {'skipped, script missing' if status == 'missing' else 'done'}",
                  flush=True)
            continue
        steps = ([("pretraining", pretrain_command(args, method))] if status != "pretrained" else []) \
            + [("linear evaluation", linear_command(args, method))]
        for what, command in steps:
            print(f"[{i}/{len(args.methods)}] {method}: {what}\n$ {shlex.join(command)}", flush=True)
            try:
                code = execute(command)
            except Interrupted as e:
                write_table(args, notes)
                print(f"{e} received: stopped during {method}'s {what}; rerun the same command to continue "
                      f"(pretraining resumes from its last.pt)", file=sys.stderr)
                return 130
            if code == 2:  # the script rejected its input: every other method would too
                write_table(args, notes)
                raise UsageError(f"{method}: {what} rejected its input (exit status 2, message above); fix it and "
                                 f"rerun: finished methods are kept")
            if code != 0:
                notes[method] = f"{what} failed (exit status {code})"
                failed = True
                print(f"{method}: {notes[method]}; going on with the next method", file=sys.stderr)
                break
            if what == "pretraining" and not (run_dir(args, method) / "backbone.pt").is_file():
                write_table(args, notes)
                print(f"{method} stopped before the end of pretraining (preempted?): rerun the same command to "
                      f"continue from its last.pt", file=sys.stderr)
                return 130
        write_table(args, notes)  # progress visible after every method
    print(write_table(args, notes))
    print(f"table written to {Path(args.out_dir) / args.table}.md (and .json)")
    return 1 if failed else 0


def run(argv=None):
    args = parse_args(argv)
    return dry_run(args) if args.dry_run else reproduce(args)


def main(argv=None):
    status = []
    run_main(lambda a: status.append(run(a)), argv)
    if status and status[0]:
        sys.exit(status[0])


if __name__ == "__main__":
    main()
