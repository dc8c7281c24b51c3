"""Run by tests/test_distributed_eval.py once as one process and once under `torchrun --nproc_per_node=2`:
`python tests/dist_eval.py OUT_DIR`.

Builds BYOL's synthetic set-up through common.run (Run, build_data's sharded eval loaders) on small synthetic
sets whose sizes are odd, so that a 2-rank split pads, then a seeded backbone and probe, and saves to
OUT_DIR/eval-rank{r}.pt what evaluate() (health pass included: 301 images, an odd count) and the functions under it
return. Both runs see the same backbone
and data: the test compares them.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import byol  # noqa: E402
from common import data, evaluation  # noqa: E402
from common.backbones import build_backbone  # noqa: E402
from common.run import Run, build_data, evaluate  # noqa: E402

# Odd sizes: rank 1's shard ends with a padding item. 601 train images are 3 eval batches of 256 in one
# process and 2 per rank in two, so the order of batches inside a shard matters too.
TRAIN_IMAGES, VAL_IMAGES = 601, 77


def small_synthetic(name, data_dir, split, seed=0):
    """common.data.load_dataset for `synthetic`, with fewer images (the full set takes seconds to draw)."""
    count, offset = {"train": (TRAIN_IMAGES, 0), "val": (VAL_IMAGES, 1)}[split]
    images, labels = data.synthetic_images(count, seed + offset)
    return data.ImageTensorDataset(images, labels, len(data.SYNTHETIC_CLASSES), 32)


def main(out_dir):
    data.load_dataset = small_synthetic  # build_data looks it up in common.data at call time
    args = byol.parse_args(["--dataset", "synthetic", "--device", "cpu", "--precision", "fp32", "--workers", "0",
                            "--batch-size", "32", "--data-backend", "torchvision", "--knn-every", "1",
                            "--umap-every", "-1", "--health-samples", "301", "--out-dir", out_dir])
    run = Run(args)
    datasets = build_data(args, run)
    torch.manual_seed(0)  # the same backbone and probe in every process
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    probe = nn.Linear(feature_dim, datasets.num_classes)
    projector = nn.Sequential(nn.Linear(feature_dim, 32), nn.BatchNorm1d(32))  # the health pass's embedding
    backbone.train()  # evaluate must switch to eval mode (running statistics) and back
    metrics = evaluate(run, datasets, backbone, probe, epoch=0, final=True, embed=projector)
    ctx = dict(device=run.device)
    val_feats, val_labels = (evaluation.unshard(t, datasets.val_size)
                             for t in evaluation.extract_features(backbone, datasets.val, on_device=True, **ctx))
    train_feats, train_labels = evaluation.extract_features(backbone, datasets.knn_train, on_device=True, **ctx)
    scores = evaluation.knn_predict(train_feats, train_labels, val_feats, datasets.num_classes, sharded=True)
    result = {"metrics": metrics, "val_features": val_feats, "val_labels": val_labels, "knn_scores": scores,
              "shard_sizes": (len(datasets.val.dataset), len(datasets.knn_train.dataset)),
              "still_training": backbone.training, "health_sizes": datasets.health_sizes}
    torch.save(result, os.path.join(out_dir, f"eval-rank{run.rank}.pt"))
    run.close()


if __name__ == "__main__":
    main(sys.argv[1])
