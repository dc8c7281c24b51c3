"""Weighted kNN accuracy of a frozen backbone.pt (InstDisc / solo-learn protocol).

Training-split features are the memory, validation-split features the queries. Features are
L2-normalized; each query's k most similar memory features vote for their class with weight
exp(cosine / temperature). No training, no augmentation: a quick, hyperparameter-light check.

    python eval/knn.py --ckpt runs/byol-cifar10/backbone.pt
    python eval/knn.py --ckpt runs/byol-cifar10/backbone.pt --k 20 --temperature 0.07

The dataset and its folder default to the run's (recorded in backbone.pt). The result goes to knn.json beside
the checkpoint, or knn-<dataset>.json when the data is not the run's (another --dataset, or another folder),
so evaluating on other data never replaces the run's own result; --out names any other file.
"""
import argparse
import json
import os
import sys
from pathlib import Path

# `python eval/knn.py` puts eval/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import augment, checkpoint, cli, data, dist, evaluation  # noqa: E402
from common.backbones import load_backbone  # noqa: E402
from common.run import frozen_forward  # noqa: E402
from common.cli import Parser, RunError, UsageError, run_main  # noqa: E402


def build_parser():
    p = Parser(prog="eval/knn.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="backbone.pt written by a method script [required]")
    checkpoint.add_eval_data_flags(p, "evaluate on")
    p.add_argument("--k", type=cli.positive_int, default=200, help="neighbours per query [default: %(default)s]")
    # exp(1 / T) must fit a float32 (T >= 0.0114): 0.02 leaves a margin for every cosine in [-1, 1].
    p.add_argument("--temperature", type=cli.number_at_least(0.02), default=0.1,
                   help="vote weight is exp(cosine / temperature), at least 0.02 [default: %(default)s]")
    p.add_argument("--batch-size", type=cli.positive_int, default=256,
                   help="images per forward pass [default: %(default)s]")
    p.add_argument("--workers", type=cli.nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes [default: %(default)s, min(8, CPUs)]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU [default: %(default)s]")
    p.add_argument("--out", default=None, help="JSON result file [default: knn.json next to --ckpt; "
                   "knn-<dataset>.json for data other than the run's]")
    p.add_argument("--seed", type=cli.nonneg_int, default=0,
                   help="seed of the --max-train subset (and of the synthetic images) [default: %(default)s]")
    p.add_argument("--max-train", type=cli.positive_int, default=None,
                   help="use a random subset of N training images as memory [default: all]")
    return p


def run(argv=None):
    args = build_parser().parse_args(argv)  # numbers are range-checked by their types
    device = dist.resolve_device(args.device)
    backbone, meta = load_backbone(args.ckpt)
    if args.out:  # before anything else: a result nobody can write is lost
        checkpoint.check_output_file(args.out, inputs=[args.ckpt])
    args.dataset, args.data_dir, tag = checkpoint.eval_data(args.ckpt, meta, args.dataset, args.data_dir)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"knn{tag}.json")
    checkpoint.check_output_file(out, inputs=[args.ckpt])  # before the features

    train_set = data.load_dataset(args.dataset, args.data_dir, "train", args.seed)
    num_classes = train_set.num_classes
    if not num_classes:
        raise UsageError(f"{args.dataset} in {args.data_dir} has no labels: put the images in one sub-folder per class")
    val_set = data.load_dataset(args.dataset, args.data_dir, "val", args.seed)
    if val_set is None:
        raise UsageError(f"{args.data_dir} has no val/ folder: add labelled validation images there")
    if args.max_train is not None and args.max_train < len(train_set):
        chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))[:args.max_train]
        train_set = Subset(train_set, chosen.sort().values.tolist())

    cuda = device.type == "cuda"
    backbone, ctx = frozen_forward(backbone, device)
    mean, std = augment.NORMALIZATION.get(args.dataset, augment.NORMALIZATION["imagenet"])
    plain = augment.val_transform(meta["image_size"], mean, std)
    loaders = {split: data.eval_loader(dataset, plain, args.batch_size, args.workers, pin_memory=cuda)
               for split, dataset in (("train", train_set), ("val", val_set))}
    features = {split: evaluation.extract_features(backbone, tqdm(loader, desc=f"{split} features"), **ctx)
                for split, loader in loaders.items()}
    # The similarity search runs where the backbone ran: on a GPU it is a few matrix products.
    (train_features, train_labels), (val_features, val_labels) = [
        (f.to(device), y.to(device)) for f, y in (features["train"], features["val"])]
    acc1, acc5 = evaluation.knn_accuracy(train_features, train_labels, val_features, val_labels, num_classes,
                                         k=args.k, temperature=args.temperature)

    result = {"acc1": acc1, "acc5": acc5, "k": args.k, "temperature": args.temperature, "dataset": args.dataset,
              "data_dir": os.path.abspath(args.data_dir), "ckpt": str(args.ckpt), "train_images": len(train_set),
              "val_images": len(val_set), "backbone": meta["name"], "method": meta.get("method")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:  # atomic: a reader never sees half a file, a failed write leaves none
        checkpoint.write_atomic(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    except OSError as error:
        raise RunError(f"could not write {out} ({error.strerror or error}): acc@1 {acc1:.2f}, acc@5 {acc5:.2f}")
    print(f"kNN (k={args.k}, T={args.temperature}) of {args.ckpt} on {args.dataset}: "
          f"acc@1 {acc1:.2f}  acc@5 {acc5:.2f}  -> {out}")
    return result


def main(argv=None):
    run_main(run, argv)


if __name__ == "__main__":
    main()
