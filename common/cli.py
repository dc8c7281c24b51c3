"""Command line: the flags every method script shares, per-dataset recipes, and one-line errors.

Every flag defaults to None; `resolve` fills what the command line left unset from the method's
recipe for the dataset's family (cifar, imagenet, imagenet1k, synthetic) or the one --recipe names, then from
GENERIC_DEFAULTS.
"""
import argparse
import gc
import math
import multiprocessing
import os
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


PREEMPTED_EXIT = 3  # exit status after a signal (SIGTERM, SIGINT, SIGUSR1) once last.pt is written: rerun to resume


class Preempted(Exception):
    """Raised after a signal once last.pt is written: exit status PREEMPTED_EXIT (docs/slurm.md requeues on it)."""


class RunError(Exception):
    """A run that cannot go on (a failed checkpoint write, ...): printed as one line, exit status 1."""


class NonFiniteLoss(RunError):
    """The loss became NaN or inf: printed as one line, exit status 1; the last good last.pt stays."""


# ---- flag types: each checks its range where the flag is declared, so a bad value is one line, exit 2 ----
def _number(kind, test, rule):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or not test(value) or abs(value) > 1e12:
            raise argparse.ArgumentTypeError(f"{text} is not {rule}")
        return value
    parse.__name__ = rule  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive finite number")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
probability = _number(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
finite_float = _number(float, lambda v: True, "a finite number")
momentum = _number(float, lambda v: 0 <= v <= 1, "a momentum in [0, 1]")


def int_at_least(low):
    return _number(int, lambda v: v >= low, f"an integer >= {low}")


def number_at_least(low):
    return _number(float, lambda v: v >= low, f"a number >= {low}")


def existing_file(text):
    """A path that must be an existing file (--ckpt of the eval tools)."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not os.path.exists(text) else f"{text} is not a file")
    return text


def every_n(text):
    """--knn-every / --umap-every: N > 0 every N epochs, 0 at the end only, -1 never."""
    return int_at_least(-1)(text)


DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "folder", "synthetic")
RECIPE_FAMILIES = ("cifar", "imagenet", "imagenet1k", "synthetic")  # what --recipe offers: the keys of RECIPES
RECIPE_FAMILY = {"cifar10": "cifar", "cifar100": "cifar", "stl10": "imagenet", "imagenet": "imagenet1k",
                 "imagenet100": "imagenet", "folder": "imagenet", "synthetic": "synthetic"}
# "imagenet" is the ImageNet-100 recipe (solo-learn's scripts/pretrain/imagenet-100/). "imagenet1k" is
# scripts/pretrain/imagenet/, which only some methods have: the others use their "imagenet" recipe on ImageNet-1k.
FALLBACK_FAMILY = {"imagenet1k": "imagenet"}
# What no recipe sets. STL-10 uses the ImageNet-size recipe on its native 96px images.
GENERIC_DEFAULTS = dict(data_dir="./data", workers=min(8, os.cpu_count() or 1), seed=0, device="auto",
                        precision="auto", data_backend="torchvision", resume=None, max_steps=0, knn_every=0,
                        umap_every=0, log_every=50, log="none", channels_last=None, compile=False,
                        warmup_start_lr=3e-5, min_lr=0.0, num_large_crops=2, num_small_crops=0,
                        small_crop_size=None, min_scale=None, invert_prob=0.0, grad_clip=0.0, train_subset=0,
                        lars_eta=0.02, lars_clip=True, accumulate_steps=1,
                        health_every=1, health_samples=4096, freeze_backbone_epochs=0)
DATASET_OVERRIDES = {"stl10": dict(crop_size=96)}  # under the dataset's own recipe family only
SMALL_IMAGE_SIDE = 64  # a folder whose first images are at most this many pixels on a side gets the cifar recipe
BACKBONE_NAMES = ("resnet18", "resnet50", "resnet_narrow", "vit_tiny", "vit_small", "vit_base", "swin_tiny",
                  "swin_small", "swin_base", "vit_large", "swin_large", "convnext_tiny", "convnext_small",
                  "convnext_base", "convnext_large", "poolformer_s12", "poolformer_s24", "poolformer_s36",
                  "poolformer_m36", "poolformer_m48", "wide_resnet28w2",
                  "wide_resnet28w8")  # common.backbones.BACKBONES; tests/test_backbones.py checks they agree


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes become a UsageError: under run_main, one line and exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def parser(method, doc, recipes):
    """The parser with the common flags, in groups (data, model, optimisation, run), and a function that adds
    the method's own flags to a group of their own: `add(flag, type, help)`. The help of every flag lists
    the recipes' values for it; the description is the docstring's first two paragraphs (title and idea),
    the epilog its commands."""
    from common import augment  # imported here: augment imports this module's UsageError
    paragraphs = doc.strip().split("\n\n")
    commands = [x for x in paragraphs if x.lstrip().startswith(("python", "torchrun"))]
    p = Parser(prog=f"{method}.py", usage="%(prog)s [options]", description="\n\n".join(paragraphs[:2]),
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="examples:\n" + "\n".join(commands) + "\n\nRecipe values are used for flags left unset; "
                      "any flag given overrides its recipe. Every numeric flag is checked for its range.")
    groups = {name: p.add_argument_group(name) for name in ("data", "model", "optimisation", "run")}
    groups["method"] = p.add_argument_group(f"method ({method})")

    def adder(group):
        def add(flag, type=None, help="", **kw):
            dest = flag.lstrip("-").replace("-", "_")
            values = [f"{fam} {r[dest]}" for fam, r in recipes.items() if dest in r]
            default = GENERIC_DEFAULTS.get(dest)
            extra = (f" [recipe: {', '.join(values)}]" if values
                     else f" [default: {default}]" if default is not None and "[default" not in help else "")
            if type is not None:
                kw["type"] = type
            groups[group].add_argument(flag, default=None, help=help.replace("%", "%%") + extra, **kw)
        return add

    data, model, opt, run = (adder(g) for g in ("data", "model", "optimisation", "run"))
    presets = "; ".join(f"{name}: {what}" for name, what in augment.PRESET_HELP.items())
    data("--dataset", help="dataset to pretrain on [default: synthetic]", choices=DATASETS)
    data("--recipe", help="recipe family, for any dataset: cifar (32px crops, CIFAR stem, 1000 epochs), imagenet "
         "(ImageNet-100: 224px crops, 400 epochs), imagenet1k (ImageNet-1k, where the method has one, else imagenet), "
         "synthetic (CPU-sized: resnet_narrow, 16px crops, 20-40 epochs) [default: the dataset's: cifar for "
         "cifar10/100, synthetic for synthetic, imagenet1k for imagenet, imagenet for the others, but cifar for a "
         f"folder whose images are at most {SMALL_IMAGE_SIDE}px]", choices=RECIPE_FAMILIES)
    data("--data-dir", help="where datasets live (torchvision sets are downloaded here)")
    data("--train-subset", nonneg_int, "train on the first N images and validate on at most max(N, 256) "
         "(quick runs, tests; 0: all)")
    data("--data-backend", help="torchvision loader, DALI (folder datasets) or batched on-device augmentation",
         choices=("torchvision", "dali", "device"))
    data("--workers", nonneg_int, "data loader worker processes per process")
    data("--preset", help=f"augmentation preset ({presets})", choices=augment.PRESETS)
    data("--crop-size", int_at_least(8), "large crop size in pixels")
    data("--num-large-crops", positive_int, "large crops per image")
    data("--num-small-crops", nonneg_int, "small crops per image (multi-crop)")
    data("--small-crop-size", int_at_least(8), "small crop size [default: 18 for 32px crops, 96 for 224px]")
    data("--min-scale", fraction, "smallest area fraction of a large crop [default: the preset's, 0.08 or 0.2]")
    data("--invert-prob", probability, "probability that a view is colour-inverted (1 - x), after the preset's steps")
    model("--backbone", help="resnet18, resnet50, resnet_narrow, vit_tiny/small/base/large, "
                             "swin_tiny/small/base/large, convnext_tiny/small/base/large, "
                             "poolformer_s12/s24/s36/m36/m48, wide_resnet28w2/w8", choices=BACKBONE_NAMES)
    model("--channels-last", help="channels_last memory format [default: on for ResNets]",
          action=argparse.BooleanOptionalAction)
    model("--compile", help="torch.compile the backbone (and the momentum network) [default: off]",
          action=argparse.BooleanOptionalAction)
    opt("--epochs", positive_int, "training epochs")
    opt("--batch-size", positive_int, "batch size per process")
    opt("--optimizer", help="optimizer", choices=("lars", "sgd", "adam", "adamw"))
    opt("--lr", positive_float, "base learning rate for a global batch of 256 (scaled by global batch / 256)")
    opt("--weight-decay", nonneg_float, "weight decay")
    opt("--warmup-epochs", nonneg_float, "linear warmup epochs")
    opt("--warmup-start-lr", nonneg_float, "lr at the first warmup step")
    opt("--min-lr", nonneg_float, "lr at the end of the cosine")
    opt("--probe-lr", nonneg_float, "online linear probe lr (scaled like --lr)")
    opt("--grad-clip", nonneg_float, "clip the gradient norm to this value (0: off)")
    opt("--lars-eta", positive_float, "LARS trust coefficient eta (solo-learn's optimizer.kwargs.eta; 0.02 where "
        "no recipe sets it)")
    opt("--lars-clip", help="LARS trust ratio clipped to min(ratio / lr, 1) (solo-learn's clip_lr; on where no "
        "recipe sets it)", action=argparse.BooleanOptionalAction)
    opt("--accumulate-steps", positive_int, "sum the gradients of N batches per optimizer step, as Lightning's "
        "accumulate_grad_batches (solo-learn's ImageNet BYOL; 1 where no recipe sets it): lrs scale by batch x "
        "processes x N / 256; steps, lr, momentum and --max-steps count optimizer steps")
    opt("--init", help="start the backbone from these weights: a backbone.pt, a torchvision or timm checkpoint "
        "file, torchvision:<name> or timm:<name> (their pretrained weights); heads start fresh [default: none]",
        metavar="SOURCE")
    opt("--freeze-backbone-epochs", nonneg_int, "train only the heads on the frozen backbone for the first N "
        "epochs, then everything (with --init: fresh heads first)")
    run("--seed", nonneg_int, "seed of model init, data order and augmentations")
    run("--device", help="auto picks CUDA when present, else CPU", choices=("auto", "cpu", "cuda"))
    run("--precision", help="auto: native bf16 (GPU; CPU with AMX/AVX512-BF16), else fp16+GradScaler (GPU), fp32 (CPU)",
        choices=("auto", "fp32", "fp16", "bf16"))
    run("--out-dir", help="run folder [default: runs/<method>-<dataset>]")
    run("--resume", help="checkpoint to resume from [default: <out-dir>/last.pt when it exists]")
    run("--max-steps", nonneg_int, "stop after this many optimizer steps in all, as if training had ended (0: off)")
    run("--knn-every", every_n, "kNN monitor every N epochs (0: at the end only, -1: never)")
    run("--umap-every", every_n, "UMAP plot and training curves every N epochs (0: at the end only, -1: never)")
    run("--health-every", every_n, "label-free health (effective rank, alignment/uniformity, std of the "
        "normalised embedding; docs/health.md) every N epochs (0: at the end only, -1: never)")
    run("--health-samples", positive_int, "training images of the health pass (a fixed seeded sample)")
    run("--log-every", positive_int, "read the loss and write a metrics line every N steps (the only steps "
        "that wait on the device)")
    run("--log", help="extra logger besides metrics.jsonl", choices=("none", "tensorboard", "wandb"))
    return p, adder("method")


def check_out_dir(path):
    """--out-dir must be a folder, or a path whose nearest existing parent is a writable folder."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"--out-dir {path} is a file, not a folder: pass a folder path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"--out-dir {path} is not writable: pass a folder you can write to")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {path} cannot be created ({parent} is not a writable folder)")


def recipe_family(dataset, recipes):
    """The recipe a dataset gets: its family's, or the fallback family's when the script has none of that family."""
    family = RECIPE_FAMILY[dataset]
    return family if family in recipes else FALLBACK_FAMILY[family]


def folder_recipe(data_dir, cifar):
    """The recipe family of a `folder` dataset left without --recipe: cifar when its first images are at most
    SMALL_IMAGE_SIDE pixels on their longer side (said in one printed line), else imagenet."""
    from common import data  # here: it imports this module
    sides = data.first_image_sides(data_dir)
    if not sides or max(sides) > SMALL_IMAGE_SIDE:
        return "imagenet"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{data_dir} holds small images (at most {max(sides)}px): using the cifar recipe ({cifar['crop_size']}px "
              f"crops, CIFAR stem, {cifar['epochs']} epochs); --recipe imagenet or synthetic picks another", flush=True)
    return "cifar"


def resolve(p, argv, method, recipes):
    """Parse argv and fill unset flags from the recipe of the dataset's family, then the generic defaults."""
    args = p.parse_args(argv)
    args.dataset = args.dataset or "synthetic"
    given = {key for key, value in vars(args).items() if value is not None}
    own = recipe_family(args.dataset, recipes)
    args.recipe = args.recipe or (folder_recipe(args.data_dir or GENERIC_DEFAULTS["data_dir"], recipes["cifar"])
                                  if args.dataset == "folder" else own)
    if args.recipe not in recipes:  # --recipe imagenet1k for a method without one: its ImageNet-100 recipe
        args.recipe = FALLBACK_FAMILY[args.recipe]
    filled = {**GENERIC_DEFAULTS, **recipes[args.recipe], **(DATASET_OVERRIDES.get(args.dataset, {})
                                                              if args.recipe == own else {})}
    for key, value in filled.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    from common import device_augment  # here: it imports this module
    if "data_backend" not in given and args.data_backend == "device" and args.dataset not in device_augment.DATASETS:
        args.data_backend = "torchvision"  # the synthetic recipe's on-device augmentation serves in-memory sets only
    if getattr(args, "warmup_epochs", 0) >= args.epochs and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --warmup-epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the lr warms up for the "
              f"whole run and never decays; pass a smaller --warmup-epochs (e.g. {args.epochs / 10:g})",
              file=sys.stderr, flush=True)
    args.method = method
    args.out_dir = args.out_dir or os.path.join("runs", f"{method}-{args.dataset}")
    check_out_dir(args.out_dir)
    if args.resume is not None and not os.path.isfile(args.resume):
        what = "is a folder, not a file" if os.path.isdir(args.resume) else "no such file"
        raise UsageError(f"--resume {args.resume}: {what} (pass a last.pt; omit --resume to continue from "
                         "<out-dir>/last.pt)")
    if args.init and not args.init.startswith(("torchvision:", "timm:")) and not os.path.isfile(args.init):
        raise UsageError(f"--init {args.init}: no such file (pass a backbone.pt, a torchvision or timm checkpoint "
                         "file, torchvision:<name> or timm:<name>)")
    if args.channels_last is None:
        args.channels_last = args.backbone.startswith("resnet")
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
    except Preempted as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(e, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except RunError as e:  # NonFiniteLoss, a failed checkpoint write: one line, status 1
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        stop_worker_processes()
