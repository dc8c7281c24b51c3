"""UMAP picture of a frozen backbone.pt's features on one split, coloured by label.

At most --max-points images (a seeded random subset) go through the backbone, then UMAP
(cosine metric, 15 neighbours, min_dist 0.1) maps their features to 2-D. The first UMAP fit
of a Python process spends ~15 s compiling umap-learn's numba code.

    python eval/umap.py --ckpt runs/byol-cifar10/backbone.pt
    python eval/umap.py --ckpt runs/byol-cifar10/backbone.pt --split train --out train.png
"""
import argparse
import os
import sys
from pathlib import Path

# `python eval/umap.py` puts eval/ on sys.path, not the repository root that holds common/.
# eval/ must also leave sys.path: there this file would shadow umap-learn's `umap` package.
_EVAL_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _EVAL_DIR]
sys.path.insert(0, str(_EVAL_DIR.parent))

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import augment, checkpoint, cli, data, dist, evaluation  # noqa: E402
from common.backbones import load_backbone  # noqa: E402
from common.run import frozen_forward  # noqa: E402
from common.cli import Parser, RunError, UsageError, run_main  # noqa: E402


def build_parser():
    p = Parser(prog="eval/umap.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="backbone.pt written by a method script [required]")
    checkpoint.add_eval_data_flags(p, "draw")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which split to draw [default: %(default)s]")
    p.add_argument("--max-points", type=cli.int_at_least(3), default=10000,
                   help="draw a random subset of at most N images (UMAP needs 3 or more) [default: %(default)s]")
    p.add_argument("--batch-size", type=cli.positive_int, default=256,
                   help="images per forward pass [default: %(default)s]")
    p.add_argument("--workers", type=cli.nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes [default: %(default)s, min(8, CPUs)]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU [default: %(default)s]")
    p.add_argument("--out", default=None, help="PNG file [default: umap-<split>.png next to --ckpt; "
                   "umap-<dataset>-<split>.png for data other than the run's]")
    p.add_argument("--seed", type=cli.nonneg_int, default=0,
                   help="seed of the subset, of UMAP (and of the synthetic images) [default: %(default)s]")
    return p


def run(argv=None):
    args = build_parser().parse_args(argv)  # numbers are range-checked by their types
    device = dist.resolve_device(args.device)
    backbone, meta = load_backbone(args.ckpt)
    if args.out:  # before anything else: a picture nobody can write is lost
        checkpoint.check_output_file(args.out, inputs=[args.ckpt])
    args.dataset, args.data_dir, tag = checkpoint.eval_data(args.ckpt, meta, args.dataset, args.data_dir)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"umap{tag}-{args.split}.png")
    checkpoint.check_output_file(out, inputs=[args.ckpt])  # before the features
    dataset = data.load_dataset(args.dataset, args.data_dir, args.split, args.seed)
    if dataset is None:
        raise UsageError(f"{args.data_dir} has no val/ folder: pass --split train")
    if len(dataset) < 3:
        raise UsageError(f"the {args.split} split of {args.dataset} has {len(dataset)} images: UMAP needs at least 3")
    class_names = getattr(dataset, "classes", None)  # the legend's names
    if len(dataset) > args.max_points:
        # Subsample before the backbone, not after: features of images not drawn are wasted work.
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:args.max_points]
        dataset = Subset(dataset, chosen.sort().values.tolist())

    cuda = device.type == "cuda"
    backbone, ctx = frozen_forward(backbone, device)
    mean, std = augment.NORMALIZATION.get(args.dataset, augment.NORMALIZATION["imagenet"])
    loader = data.eval_loader(dataset, augment.val_transform(meta["image_size"], mean, std), args.batch_size,
                              args.workers, pin_memory=cuda)
    features, labels = evaluation.extract_features(backbone, tqdm(loader, desc=f"{args.split} features"), **ctx)

    from common.plots import umap_png  # umap-learn imports slowly: only once the features exist
    print(f"fitting UMAP to {len(features)} features (the first fit compiles numba code: ~15 s)", flush=True)
    try:
        umap_png(features, labels, out, f"{meta.get('method', '?')} {meta['name']}: {args.dataset} {args.split}",
                 max_points=args.max_points, seed=args.seed, class_names=class_names)
    except OSError as error:  # disk full, folder removed meanwhile: umap_png leaves no half file
        raise RunError(f"could not write {out} ({error.strerror or error})")
    print(f"UMAP of {len(features)} {args.split} images of {args.dataset} -> {out}")
    return out


def main(argv=None):
    run_main(run, argv)


if __name__ == "__main__":
    main()
