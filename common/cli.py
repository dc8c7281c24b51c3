"""Command line: the flags every method script shares, per-dataset recipes, and one-line errors.

Every flag defaults to None; `resolve` fills what the command line left unset from the method's
recipe for the dataset's family (cifar, imagenet, synthetic), then from GENERIC_DEFAULTS.
"""
import argparse
import gc
import multiprocessing
import os
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class NonFiniteLoss(Exception):
    """The loss became NaN or inf: printed as one line, exit status 1; the last good last.pt stays."""


DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "folder", "synthetic")
RECIPE_FAMILY = {"cifar10": "cifar", "cifar100": "cifar", "stl10": "imagenet", "imagenet": "imagenet",
                 "imagenet100": "imagenet", "folder": "imagenet", "synthetic": "synthetic"}
# What no recipe sets. STL-10 uses the ImageNet-size recipe on its native 96px images.
GENERIC_DEFAULTS = dict(data_dir="./data", workers=min(8, os.cpu_count() or 1), seed=0, device="auto",
                        precision="auto", data_backend="torchvision", resume=None, max_steps=0, knn_every=0,
                        umap_every=0, log_every=50, log="none", channels_last=None, compile=False,
                        warmup_start_lr=3e-5, min_lr=0.0, num_large_crops=2, num_small_crops=0,
                        small_crop_size=None, min_scale=None, invert_prob=0.0, grad_clip=0.0, train_subset=0)
DATASET_OVERRIDES = {"stl10": dict(crop_size=96)}


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes become a UsageError: under run_main, one line and exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parser(method, doc, recipes):
    """A parser with the common flags; the help of each flag lists the recipes' values for it."""
    p = Parser(prog=f"{method}.py", description=doc.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="Recipe values are used for flags left unset; any flag given overrides its recipe.")

    def add(flag, help, **kw):
        dest = flag.lstrip("-").replace("-", "_")
        values = [f"{fam} {r[dest]}" for fam, r in recipes.items() if dest in r]
        default = GENERIC_DEFAULTS.get(dest)
        extra = f" [recipe: {', '.join(values)}]" if values else f" [default: {default}]" if default is not None else ""
        p.add_argument(flag, default=None, help=help + extra, **kw)

    add("--dataset", "dataset to pretrain on [default: synthetic]", choices=DATASETS)
    add("--data-dir", "where datasets live (torchvision sets are downloaded here)")
    add("--backbone", "resnet18, resnet50, resnet_narrow, vit_tiny/small/base, swin_tiny/small/base")
    add("--epochs", "training epochs", type=int)
    add("--batch-size", "batch size per process", type=int)
    add("--lr", "base learning rate for a global batch of 256 (scaled by global batch / 256)", type=float)
    add("--weight-decay", "weight decay", type=float)
    add("--optimizer", "optimizer", choices=("lars", "sgd", "adam", "adamw"))
    add("--warmup-epochs", "linear warmup epochs", type=float)
    add("--warmup-start-lr", "lr at the first warmup step", type=float)
    add("--min-lr", "lr at the end of the cosine", type=float)
    add("--probe-lr", "online linear probe lr (scaled like --lr)", type=float)
    add("--preset", "augmentation preset of RECIPES.md")
    add("--crop-size", "large crop size in pixels", type=int)
    add("--num-large-crops", "large crops per image", type=int)
    add("--num-small-crops", "small crops per image (multi-crop)", type=int)
    add("--small-crop-size", "small crop size [default: 18 for 32px crops, 96 for 224px]", type=int)
    add("--min-scale", "smallest area fraction of a large crop [default: the preset's, 0.08 or 0.2]", type=float)
    add("--invert-prob", "probability that a view is colour-inverted (1 - x), after the preset's steps", type=float)
    add("--grad-clip", "clip the gradient norm to this value (0: off)", type=float)
    add("--train-subset", "train on the first N images and validate on at most max(N, 256) (quick runs, tests; 0: all)", type=int)
    add("--workers", "data loader worker processes per process", type=int)
    add("--seed", "seed of model init, data order and augmentations", type=int)
    add("--device", "auto picks CUDA when present, else CPU", choices=("auto", "cpu", "cuda"))
    add("--precision", "auto: bf16 on GPUs that support it, else fp16 + GradScaler; fp32 on CPU",
        choices=("auto", "fp32", "fp16", "bf16"))
    add("--data-backend", "torchvision loader, DALI (folder datasets) or batched on-device augmentation",
        choices=("torchvision", "dali", "device"))
    add("--out-dir", "run folder [default: runs/<method>-<dataset>]")
    add("--resume", "checkpoint to resume from [default: <out-dir>/last.pt when it exists]")
    add("--max-steps", "stop after this many optimizer steps in all, as if training had ended (0: off)", type=int)
    add("--knn-every", "kNN monitor every N epochs (0: at the end only, -1: never)", type=int)
    add("--umap-every", "UMAP plot every N epochs (0: at the end only, -1: never)", type=int)
    add("--log-every", "write a metrics line every N steps", type=int)
    add("--log", "extra logger besides metrics.jsonl", choices=("none", "tensorboard", "wandb"))
    add("--channels-last", "channels_last memory format [default: on for ResNets]",
        action=argparse.BooleanOptionalAction)
    add("--compile", "torch.compile the backbone [default: off]", action=argparse.BooleanOptionalAction)
    return p


def resolve(p, argv, method, recipes):
    """Parse argv and fill unset flags from the recipe of the dataset's family, then the generic defaults."""
    args = p.parse_args(argv)
    args.dataset = args.dataset or "synthetic"
    filled = {**GENERIC_DEFAULTS, **recipes[RECIPE_FAMILY[args.dataset]], **DATASET_OVERRIDES.get(args.dataset, {})}
    for key, value in filled.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.method = method
    args.out_dir = args.out_dir or os.path.join("runs", f"{method}-{args.dataset}")
    if args.channels_last is None:
        args.channels_last = args.backbone.startswith("resnet")
    for key in ("epochs", "batch_size"):
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    return args


def stop_worker_processes():
    """Stop the DataLoader workers still alive (persistent ones) before the interpreter exits.

    The workers ignore SIGTERM (common.data.leave_signals_to_main), which is all that multiprocessing's
    exit handler sends them before joining: a loader not yet garbage-collected would hang the exit.
    Collecting first lets the loaders shut their workers down; anything left is killed."""
    gc.collect()
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


def run_main(main, argv=None):
    """Run main(argv); a UsageError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UsageError as e:
        # A DataLoader worker's error arrives wrapped in its traceback: its last line is the message.
        message = str(e).strip().splitlines()[-1].removeprefix(f"{UsageError.__module__}.UsageError: ")
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun every rank fails alike: say it once
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        stop_worker_processes()
