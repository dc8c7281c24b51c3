"""Offline linear evaluation of a frozen backbone.pt (solo-learn's protocol).

A Linear(feature_dim, classes) layer is trained on frozen features with SGD (momentum 0.9),
batch 256, 100 epochs, weight decay 0, the lr divided by 10 at 60% and 80% of the epochs
(epochs 60 and 80 of 100, solo-learn's lr_decay_steps). The lr is the one solo-learn's
scripts/linear/imagenet-100/<method>.yaml gives the method recorded in backbone.pt (LINEAR_LR;
0.1 for a method without a config there; on --dataset imagenet, scripts/linear/imagenet/<method>.yaml's lr and
weight decay where it has one: LINEAR_IMAGENET1K), for a batch of 256 and scaled by --batch-size / 256
as solo-learn scales it; --lr and --weight-decay override them. Training images get RandomResizedCrop(scale 0.08-1)
+ flip, validation images the plain resize/crop. --fast extracts un-augmented features once and
trains the layer on them: many epochs cost seconds, but without augmentation the numbers are not
the protocol's, so report which mode was used (the JSON records it).

    python eval/linear.py --ckpt runs/byol-cifar10/backbone.pt
    python eval/linear.py --ckpt runs/byol-synthetic/backbone.pt --fast --epochs 30
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

# `python eval/linear.py` puts eval/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import augment, checkpoint, data, dist, evaluation  # noqa: E402
from common.backbones import load_backbone  # noqa: E402
from common.run import frozen_forward  # noqa: E402
from common.cli import (Parser, UsageError, fraction, nonneg_float, nonneg_int, positive_float,  # noqa: E402
                        positive_int, run_main)

# Base lr (batch 256) per pretraining method: optimizer.lr of solo-learn's scripts/linear/imagenet-100/*.yaml.
LINEAR_LR = {"barlow_twins": 0.1, "byol": 0.3, "deepclusterv2": 0.15, "dino": 0.3, "mocov2plus": 3.0,
             "mocov3": 0.3, "nnclr": 0.3, "ressl": 3.0, "simclr": 1.0, "simsiam": 30.0, "swav": 0.15,
             "vibcreg": 0.3, "vicreg": 0.3}
DEFAULT_LINEAR_LR = 0.1  # methods solo-learn has no linear config for (supcon, wmse, ...): its usual SGD lr
# (base lr, weight decay) of solo-learn's scripts/linear/imagenet/*.yaml, for --dataset imagenet (ImageNet-1k).
LINEAR_IMAGENET1K = {"barlow_twins": (0.3, 1e-5), "byol": (0.1, 0.0), "mocov2plus": (3.0, 0.0)}


def existing_file(path):
    """--ckpt: a file that exists, checked when the flag is parsed (one line, exit status 2)."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"checkpoint not found: {path} (pass the backbone.pt a run wrote)")
    return path


def linear_recipe(method, dataset):
    """solo-learn's (base lr, weight decay) for the checkpoint's method: its ImageNet-1k config on imagenet where it
    has one, else its ImageNet-100 lr and weight decay 0."""
    if dataset == "imagenet" and method in LINEAR_IMAGENET1K:
        return LINEAR_IMAGENET1K[method]
    return LINEAR_LR.get(method, DEFAULT_LINEAR_LR), 0.0


def linear_lr(method, batch_size, lr=None, dataset=None):
    """(base lr for a batch of 256, lr used): --lr if given, else linear_recipe's for the checkpoint's method."""
    base = lr if lr is not None else linear_recipe(method, dataset)[0]
    return base, base * batch_size / 256


def build_parser():
    p = Parser(prog="eval/linear.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=existing_file,
                   help="backbone.pt written by a method script [required]")
    checkpoint.add_eval_data_flags(p, "evaluate on")
    p.add_argument("--epochs", type=positive_int, default=100,
                   help="epochs of linear-layer training [default: %(default)s]")
    p.add_argument("--batch-size", type=positive_int, default=256, help="mini-batch size [default: %(default)s]")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="SGD learning rate for a batch of 256 (scaled by --batch-size / 256), divided by 10 at 60%% "
                        "and 80%% of the epochs [default: solo-learn's for the checkpoint's method: "
                        + ", ".join(f"{m} {v:g}" for m, v in LINEAR_LR.items()) + f"; others {DEFAULT_LINEAR_LR}; "
                        "on imagenet " + ", ".join(f"{m} {v[0]:g}" for m, v in LINEAR_IMAGENET1K.items()) + "]")
    p.add_argument("--weight-decay", type=nonneg_float, default=None,
                   help="SGD weight decay [default: 0; barlow_twins on imagenet 1e-5, solo-learn's]")
    p.add_argument("--workers", type=nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes [default: %(default)s, min(8, CPUs)]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU [default: %(default)s]")
    p.add_argument("--fast", action="store_true",
                   help="train on features extracted once, without augmentation [default: off]")
    p.add_argument("--out", default=None, help="JSON result file [default: linear.json next to --ckpt; "
                   "linear-<dataset>.json for data other than the run's]")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the layer init, shuffling, augmentation, --max-train subset [default: %(default)s]")
    p.add_argument("--max-train", type=positive_int, default=None,
                   help="train on a random subset of N images, for quick runs [default: all]")
    p.add_argument("--fraction", type=fraction, default=1.0,
                   help="train on a class-balanced fraction of the labelled images, drawn with --seed (0.01 and 0.1: "
                        "the SSL papers' 1%% / 10%% protocols); the JSON lists the chosen indexes [default: all]")
    return p


def load_splits(dataset, data_dir, seed, max_train, fraction=1.0):
    """(train set or its --fraction and --max-train subset, val set, num_classes); no labels or no val split:
    UsageError. A subset is a Subset whose `indices` (sorted) name the images chosen."""
    train_set = data.load_dataset(dataset, data_dir, "train", seed)
    if not train_set.num_classes:
        raise UsageError(f"{dataset} in {data_dir} has no labels: put the images in one sub-folder per class")
    num_classes = train_set.num_classes
    val_set = data.load_dataset(dataset, data_dir, "val", seed)
    if val_set is None:
        raise UsageError(f"{data_dir} has no val/ folder: add labelled validation images there")
    chosen = data.class_balanced_subset(train_set.targets, fraction, seed) if fraction < 1 else \
        torch.arange(len(train_set))
    if max_train is not None and max_train < len(chosen):
        chosen = chosen[torch.randperm(len(chosen), generator=torch.Generator().manual_seed(seed))[:max_train]]
    if len(chosen) < len(train_set):
        train_set = Subset(train_set, chosen.sort().values.tolist())
    return train_set, val_set, num_classes


def train_transform(size, mean, std):
    """solo-learn's linear-eval augmentation: RandomResizedCrop(scale 0.08-1) + flip, at every size."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.Lambda(augment.plain_tensor),
    ])


def step_lr(base_lr, epoch, epochs):
    """Step decay x0.1 at 60% and 80% of training: epochs 60 and 80 of solo-learn's 100."""
    milestones = (round(0.6 * epochs), round(0.8 * epochs))
    return base_lr / 10 ** sum(epoch >= m for m in milestones)


def write_json(result, path):
    """Write `result` to a temporary file, then rename it to `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as file:
        json.dump(result, file, indent=2)
    os.replace(temporary, path)  # atomic: a reader never sees half a file


def train_fast(args, backbone, probe, optimizer, train_loader, val_loader, device, ctx):
    """Train on cached features; returns the per-epoch history."""
    features, labels = evaluation.extract_features(backbone, tqdm(train_loader, desc="train features"), **ctx)
    val_features, val_labels = evaluation.extract_features(backbone, tqdm(val_loader, desc="val features"), **ctx)
    features, labels = features.to(device), labels.to(device)
    val_features, val_labels = val_features.to(device), val_labels.to(device)
    shuffle = torch.Generator().manual_seed(args.seed)
    history = []
    bar = tqdm(range(args.epochs), desc="linear (fast)")
    for epoch in bar:
        lr = step_lr(args.lr, epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(len(features), generator=shuffle).to(device)
        loss_sum, steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            loss = F.cross_entropy(probe(features[batch]), labels[batch], ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + loss.detach(), steps + 1
        with torch.no_grad():
            acc1, acc5 = evaluation.accuracy(probe(val_features), val_labels)
        history.append({"epoch": epoch, "lr": lr, "loss": loss_sum.item() / max(steps, 1), "acc1": acc1, "acc5": acc5})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc1=f"{acc1:.2f}", acc5=f"{acc5:.2f}")
    return history


def train_full(args, backbone, probe, optimizer, train_loader, val_loader, device, ctx):
    """Train on augmented images through the frozen backbone; returns the per-epoch history."""
    history = []
    bar = tqdm(range(args.epochs), desc="linear")
    memory_format = torch.channels_last if ctx["channels_last"] else torch.contiguous_format
    autocast = ctx["autocast"] or nullcontext
    for epoch in bar:
        lr = step_lr(args.lr, epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for images, labels in tqdm(train_loader, desc=f"epoch {epoch}", leave=False):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with torch.no_grad(), autocast():
                features = backbone(images)
            loss = F.cross_entropy(probe(features.float()), labels.to(device), ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + loss.detach(), steps + 1
        scores = evaluation.probe_validate(backbone, probe, val_loader, **ctx)
        history.append({"epoch": epoch, "lr": lr, "loss": loss_sum.item() / max(steps, 1), **scores})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc1=f"{scores['acc1']:.2f}", acc5=f"{scores['acc5']:.2f}")
    return history


def run(argv=None):
    args = build_parser().parse_args(argv)
    device = dist.resolve_device(args.device)
    backbone, meta = load_backbone(args.ckpt)
    args.dataset, args.data_dir, tag = checkpoint.eval_data(args.ckpt, meta, args.dataset, args.data_dir)
    args.base_lr, args.lr = linear_lr(meta.get("method"), args.batch_size, args.lr, args.dataset)
    if args.weight_decay is None:
        args.weight_decay = linear_recipe(meta.get("method"), args.dataset)[1]
    torch.manual_seed(args.seed)
    train_set, val_set, num_classes = load_splits(args.dataset, args.data_dir, args.seed, args.max_train, args.fraction)

    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    backbone, ctx = frozen_forward(backbone, device)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)

    size = meta["image_size"]
    mean, std = augment.NORMALIZATION.get(args.dataset, augment.NORMALIZATION["imagenet"])
    plain = augment.val_transform(size, mean, std)
    val_loader = data.eval_loader(val_set, plain, args.batch_size, args.workers, pin_memory=cuda)
    probe = nn.Linear(meta["feature_dim"], num_classes).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    if args.fast:
        train_loader = data.eval_loader(train_set, plain, args.batch_size, args.workers, pin_memory=cuda)
        history = train_fast(args, backbone, probe, optimizer, train_loader, val_loader, device, ctx)
    else:
        train_loader = DataLoader(data.TransformedDataset(train_set, train_transform(size, mean, std)),
                                  batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                  pin_memory=cuda, persistent_workers=args.workers > 0,
                                  generator=torch.Generator().manual_seed(args.seed))
        history = train_full(args, backbone, probe, optimizer, train_loader, val_loader, device, ctx)

    final = history[-1]
    result = {"acc1": final["acc1"], "acc5": final["acc5"], "epochs": args.epochs, "dataset": args.dataset,
              "ckpt": str(args.ckpt), "mode": "fast" if args.fast else "full", "base_lr": args.base_lr, "lr": args.lr,
              "weight_decay": args.weight_decay, "batch_size": args.batch_size, "train_images": len(train_set),
              "val_images": len(val_set), "backbone": meta["name"], "method": meta.get("method"),
              "fraction": args.fraction, "train_indexes": getattr(train_set, "indices", None), "history": history}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"linear{tag}.json")
    write_json(result, out)
    print(f"linear eval ({result['mode']}) of {args.ckpt} on {args.dataset}: "
          f"acc@1 {final['acc1']:.2f}  acc@5 {final['acc5']:.2f}  (lr {args.lr:g})  -> {out}")
    return result


def main(argv=None):
    run_main(run, argv)


if __name__ == "__main__":
    main()
