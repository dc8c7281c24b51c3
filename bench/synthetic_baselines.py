"""The floor every method must beat on the synthetic dataset: weighted kNN (k=200, T=0.1) of the
validation split against the training split, on raw pixels and on a randomly initialised backbone.

    python bench/synthetic_baselines.py [--backbone resnet_narrow] [--seeds 0 1 2] [--size 16]

--size is the side the images are resized to, as the probe and kNN of a run see them: 16 is the
synthetic recipes' crop size.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for common/

import torch  # noqa: E402

from common import augment, data, evaluation  # noqa: E402
from common.backbones import build_backbone  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet_narrow", help="backbone to initialise at random [default: %(default)s]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="init seeds [default: 0 1 2]")
    p.add_argument("--size", type=int, default=16, help="image side, the recipes' crop size [default: %(default)s]")
    args = p.parse_args()
    train, val = (data.load_dataset("synthetic", ".", split) for split in ("train", "val"))
    mean, std = augment.NORMALIZATION["synthetic"]
    plain = augment.val_transform(args.size, mean, std)
    loaders = [data.eval_loader(s, plain, 500, 0) for s in (train, val)]
    raw = [torch.cat([x.flatten(1) for x, _ in loader]) for loader in loaders]
    labels = [torch.as_tensor(s.targets) for s in (train, val)]
    rows = [(f"raw pixels (normalized, {args.size}px)", evaluation.knn_accuracy(raw[0], labels[0], raw[1], labels[1], 10)[0])]
    for seed in args.seeds:
        torch.manual_seed(seed)
        net, _ = build_backbone(args.backbone, args.size)
        feats = [evaluation.extract_features(net, loader, "cpu")[0] for loader in loaders]
        rows.append((f"random-init {args.backbone}, {args.size}px, seed {seed}",
                     evaluation.knn_accuracy(feats[0], labels[0], feats[1], labels[1], 10)[0]))
    print("| features | kNN acc@1 (%) |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.1f} |")


if __name__ == "__main__":
    main()
