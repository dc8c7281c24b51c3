"""What a backbone's features encode on the synthetic validation split: how many directions carry their
variance, and whether the first is the image's background brightness (a nuisance) or the class.

    python bench/synthetic_features.py runs/byol-synthetic/backbone.pt runs/simclr-synthetic/backbone.pt
    python bench/synthetic_features.py --random-init        # the resnet_narrow floor, seed 0

Per checkpoint: effective rank (exp of the entropy of the normalized PCA spectrum), the variance share of
the first principal component, its |correlation| with the mean brightness of the image's 3-pixel border
(the background) and the R^2 with which the class one-hot explains the top 5 components. A collapsed run
reads effective rank ~1-3 with PC1 ~ background brightness.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for common/

import torch  # noqa: E402

from common import augment, cli, data, evaluation  # noqa: E402
from common.backbones import build_backbone, load_backbone  # noqa: E402


def spectrum_stats(features, nuisance, labels, num_classes, top=5):
    """(effective rank, PC1 variance share, |corr(PC1, nuisance)|, R^2 of the top PCs by the class one-hot)."""
    features = features.double()
    centred = features - features.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    share = s**2 / (s**2).sum()
    effective_rank = torch.exp(-(share * share.clamp_min(1e-300).log()).sum())
    pc1 = u[:, 0] * s[0]
    corr = torch.corrcoef(torch.stack([pc1, nuisance.double()]))[0, 1].abs()
    pcs = u[:, :top] * s[:top]
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()  # its columns sum to the intercept
    residual = pcs - onehot @ torch.linalg.lstsq(onehot, pcs).solution
    r2 = 1 - residual.pow(2).sum() / (pcs - pcs.mean(0)).pow(2).sum()
    return effective_rank.item(), share[0].item(), corr.item(), r2.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="backbone.pt files of runs on --dataset synthetic")
    p.add_argument("--random-init", action="store_true", help="also report a random-init resnet_narrow (seed 0)")
    p.add_argument("--size", type=int, default=16, help="image side, the recipes' crop size [default: %(default)s]")
    args = p.parse_args(argv)
    if not args.checkpoints and not args.random_init:
        p.error("give backbone.pt files, --random-init, or both")
    val = data.load_dataset("synthetic", ".", "val")
    mean, std = augment.NORMALIZATION["synthetic"]
    loader = data.eval_loader(val, augment.val_transform(args.size, mean, std), 500, 0)
    pixels = val.images.float() / 255
    border = torch.cat([pixels[:, :, :3].flatten(1), pixels[:, :, -3:].flatten(1),
                        pixels[:, :, :, :3].flatten(1), pixels[:, :, :, -3:].flatten(1)], 1).mean(1)
    nets = []
    if args.random_init:
        torch.manual_seed(0)
        nets.append(("random-init resnet_narrow", build_backbone("resnet_narrow", args.size)[0]))
    nets += [(path, load_backbone(path)[0]) for path in args.checkpoints]
    print("| features | effective rank | PC1 variance share | PC1 ~ background brightness | class R^2 of top 5 PCs |")
    print("|---|---|---|---|---|")
    for name, net in nets:
        feats, labels = evaluation.extract_features(net, loader, "cpu")
        rank, share, corr, r2 = spectrum_stats(feats, border, labels, val.num_classes)
        print(f"| {name} | {rank:.1f} | {share:.2f} | {corr:.2f} | {r2:.2f} |")


if __name__ == "__main__":
    cli.run_main(main)
