"""Fine-tune a backbone.pt end to end with a new linear head, on all labels or a class-balanced --fraction of them.

solo-learn's second evaluation mode (main_linear.py with `finetune: True`): the backbone trains with the head, in
train mode. The defaults depend on the checkpoint's backbone (any flag given overrides them):

- ViT / Swin: solo-learn's scripts/finetune/imagenet-100/mae.yaml: AdamW (betas 0.9, 0.999) at lr 5e-4 for a batch
  of 256, weight decay 0.05 (none on biases, norms and position embeddings), layer-wise lr decay 0.75, drop path
  0.1, mixup 0.8 and cutmix 1.0 (timm's Mixup: one of the two per batch, with probability 1/2 each), label
  smoothing 0.1, 100 epochs, per-step warmup-cosine with 10 warmup epochs from lr 0, 64 images per process.
  Unlike solo-learn, whose scheduler ignores the per-layer lr scales, the layer decay is applied (docs/fidelity.md).
- ResNets: solo-learn has no config; the semi-supervised protocol of SimCLR (Chen et al. 2020, appendix B.5):
  SGD with Nesterov momentum 0.9, lr 0.05 x batch / 256 without warmup, no regularization (weight decay 0, no
  mixup, no label smoothing), 60 epochs on 1% of the labels and 30 on 10% (30, too, for any other fraction: the
  paper gives no count), random resized crop and flip only. The paper's batch is 4096 (lr 0.8); ours is 256 per
  process at the same lr per image. The paper names no schedule: ours is a cosine to 0, its code's.

Training images get RandomResizedCrop(scale 0.08-1) + flip (solo-learn's and SimCLR's), validation images the plain
resize/crop. Learning rates are for a global batch of 256, scaled by global batch / 256. --fraction 0.01 / 0.1 is
the 1% / 10% protocol of SimCLR, BYOL, SwAV and DINO: round(fraction x n) images of each class, drawn with --seed
(the JSON lists them). DDP (torchrun), mixed precision, resume from <out-dir>/last.pt and SIGTERM work as in the
method scripts; the result, with the per-epoch history, is <out-dir>/finetune.json.

    python eval/finetune.py --ckpt runs/mae-imagenet100/backbone.pt
    python eval/finetune.py --ckpt runs/simclr-imagenet/backbone.pt --fraction 0.01
    torchrun --nproc_per_node=8 eval/finetune.py --ckpt runs/byol-imagenet/backbone.pt --fraction 0.1
"""
import argparse
import os
import sys
from pathlib import Path

# `python eval/finetune.py` puts eval/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from common import augment, checkpoint, cli, data, dist, evaluation, optim  # noqa: E402
from common.backbones import TIMM_MODELS, load_backbone, timm_kwargs  # noqa: E402
from common.cli import UsageError  # noqa: E402
from common.run import Accumulation, Run, optimizer_step, prepare_model  # noqa: E402
from eval.linear import existing_file, load_splits, train_transform, write_json  # noqa: E402

# Defaults per backbone family (see the docstring for their sources). ResNet epochs depend on --fraction.
RECIPES = {
    "transformer": dict(epochs=100, batch_size=64, optimizer="adamw", lr=5e-4, weight_decay=0.05, layer_decay=0.75,
                        drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1, warmup_epochs=10.0),
    "resnet": dict(epochs=None, batch_size=256, optimizer="sgd", lr=0.05, weight_decay=0.0, layer_decay=1.0,
                   drop_path=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, warmup_epochs=0.0),
}


def resnet_epochs(fraction):
    """SimCLR's fine-tuning length: 60 epochs on 1% of the labels (or fewer), 30 on 10% and above."""
    return 60 if fraction <= 0.01 else 30


def build_parser():
    p = cli.Parser(prog="eval/finetune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def recipe_flag(flag, kind, what, **kw):
        key = flag.lstrip("-").replace("-", "_")
        values = {family: r[key] for family, r in RECIPES.items()}
        if key == "epochs":
            values["resnet"] = f"{resnet_epochs(0.01)} at --fraction <= 0.01, else {resnet_epochs(1)}"
        shown = ", ".join(f"{family} {value}" for family, value in values.items())
        p.add_argument(flag, type=kind, default=None, help=f"{what} [default: {shown}]".replace("%", "%%"), **kw)

    p.add_argument("--ckpt", required=True, type=existing_file,
                   help="backbone.pt written by a method script [required]")
    checkpoint.add_eval_data_flags(p, "fine-tune on")
    p.add_argument("--fraction", type=cli.fraction, default=1.0,
                   help="train on a class-balanced fraction of the labelled images, drawn with --seed (0.01 and 0.1: "
                        "the SSL papers' 1%% / 10%% protocols) [default: all]")
    recipe_flag("--epochs", cli.positive_int, "training epochs")
    recipe_flag("--batch-size", cli.positive_int, "batch size per process")
    recipe_flag("--optimizer", str, "adamw, or sgd with Nesterov momentum 0.9", choices=("adamw", "sgd"))
    recipe_flag("--lr", cli.positive_float,
                "peak learning rate for a global batch of 256 (scaled by global batch / 256)")
    recipe_flag("--weight-decay", cli.nonneg_float, "weight decay (never on 1-D parameters of a ViT or Swin)")
    recipe_flag("--layer-decay", cli.fraction, "layer-wise lr decay of ViT / Swin: block i of L (from 0) trains at "
                "lr x decay^(L - 1 - i), the patch embedding at lr x decay^L, the last block, norm and head at lr; "
                "1: off")
    recipe_flag("--drop-path", cli.probability, "stochastic depth rate of ViT / Swin (timm's drop_path_rate)")
    recipe_flag("--mixup", cli.nonneg_float, "mixup alpha (0: off)")
    recipe_flag("--cutmix", cli.nonneg_float, "cutmix alpha (0: off)")
    recipe_flag("--label-smoothing", cli.probability, "label smoothing of the cross-entropy")
    recipe_flag("--warmup-epochs", cli.nonneg_float, "linear warmup epochs from --warmup-start-lr, then cosine")
    p.add_argument("--warmup-start-lr", type=cli.nonneg_float, default=0.0, help="lr of the first step [default: 0]")
    p.add_argument("--min-lr", type=cli.nonneg_float, default=0.0, help="lr at the end of the cosine [default: 0]")
    p.add_argument("--workers", type=cli.nonneg_int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes per process [default: %(default)s, min(8, CPUs)]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU [default: %(default)s]")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: native bf16 (GPU; CPU with AMX/AVX512-BF16), else fp16+GradScaler (GPU), fp32 (CPU) "
                        "[default: auto]")
    p.add_argument("--seed", type=cli.nonneg_int, default=0,
                   help="seed of the head, the --fraction and --max-train subsets, data order, augmentation, mixup "
                        "and drop path [default: %(default)s]")
    p.add_argument("--out-dir", default=None,
                   help="run folder: last.pt, metrics.jsonl, finetune.json [default: finetune or "
                        "finetune-<fraction> next to --ckpt; finetune-<dataset>... for data other than the run's]")
    p.add_argument("--resume", default=None, help="last.pt to resume from [default: <out-dir>/last.pt when it exists]")
    p.add_argument("--max-steps", type=cli.nonneg_int, default=0,
                   help="stop after this many optimizer steps in all, as if training had ended (0: off) [default: 0]")
    p.add_argument("--max-train", type=cli.positive_int, default=None,
                   help="train on a random subset of N images (of the --fraction subset), for quick runs "
                        "[default: all]")
    p.add_argument("--max-val", type=cli.positive_int, default=None,
                   help="validate on the first N validation images, for quick runs [default: all]")
    p.add_argument("--log-every", type=cli.positive_int, default=50,
                   help="read the loss and write a metrics line every N steps [default: %(default)s]")
    return p


def resolve(args, meta):
    """Fill the flags left unset from the recipe of the checkpoint's backbone family; refuse what it cannot do."""
    transformer = meta["name"] in TIMM_MODELS
    for key, value in RECIPES["transformer" if transformer else "resnet"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.epochs = args.epochs or resnet_epochs(args.fraction)
    if not transformer and (args.layer_decay < 1 or args.drop_path > 0):
        raise UsageError(f"--layer-decay and --drop-path need a ViT or Swin; {args.ckpt} holds a {meta['name']}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f"mixup and cutmix pair each image with another: --batch-size {args.batch_size} must be even")
    args.dataset, args.data_dir, tag = checkpoint.eval_data(args.ckpt, meta, args.dataset, args.data_dir)
    if args.out_dir is None:
        name = f"finetune{tag}" if args.fraction == 1 else f"finetune{tag}-{args.fraction:g}"
        args.out_dir = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), name)
    cli.check_out_dir(args.out_dir)
    # What common.run.Run and prepare_model read.
    args.method, args.log, args.compile = "finetune", "none", False
    args.accumulate_steps, args.freeze_backbone_epochs, args.init = 1, 0, None
    args.channels_last = not transformer
    return args


class Classifier(nn.Module):
    """The pretrained backbone and a new Linear head (PyTorch's default init, as solo-learn), trained together."""

    def __init__(self, backbone, feature_dim, num_classes):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(feature_dim, num_classes)

    def forward(self, images):
        return self.head(self.backbone(images))


def with_drop_path(backbone, meta, rate):
    """The ViT / Swin of `backbone` rebuilt by timm with drop_path_rate `rate`, holding the same weights."""
    if rate == 0:
        return backbone
    import timm
    net = timm.create_model(TIMM_MODELS[meta["name"]], **timm_kwargs(meta["name"], meta["image_size"]),
                            drop_path_rate=rate)
    net.load_state_dict(backbone.state_dict())
    return net


def param_groups(model, lr, weight_decay, layer_decay):
    """Optimizer groups, each with its own "lr". ViT / Swin: timm's param_groups_layer_decay, which solo-learn's
    copy of it matches (the patch and position embeddings are layer 0, block i of L layer i + 1, the final norm
    joins the last block's layer L; layer j trains at lr x layer_decay^(L - j); 1-D tensors and position
    embeddings without weight decay. MAE's own code puts the norm one layer above the last block, so each of its
    layers trains one factor of layer_decay lower), then the head at lr with weight decay (solo-learn's classifier
    group). ResNets: one group, weight decay on everything (solo-learn's finetune without exclude_bias_n_norm_wd)."""
    if not hasattr(model.backbone, "group_matcher"):  # torchvision ResNet
        return [{"params": list(model.parameters()), "weight_decay": weight_decay, "lr": lr}]
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(model.backbone, weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=model.backbone.no_weight_decay())
    groups.append({"params": list(model.head.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0})
    return [{**g, "lr": lr * g.pop("lr_scale")} for g in groups]


def seed_step(seed, step, rank):
    """Seed the randomness of step `step` (mixup's lambda and box come from numpy, drop path from torch) from
    (seed, step, rank) alone: a resumed run draws what the uninterrupted one drew."""
    value = data.mix_seed("finetune", seed, step, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2 ** 32)


def finetune_loss(logits, targets, label_smoothing=0.0):
    """Cross-entropy of `logits` (N, C) against class indexes (N,), smoothed: target (1 - s) on the class plus
    s / C on every class; or against soft targets (N, C) that mixup / cutmix made (already smoothed)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing if targets.ndim == 1 else 0.0)


def train(args):
    backbone, meta = load_backbone(args.ckpt)
    args = resolve(args, meta)
    torch.manual_seed(args.seed)  # the same head on every rank
    run = Run(args)
    cuda = run.device.type == "cuda"
    if not run.is_main:
        dist.barrier()  # rank 0 downloads (torchvision sets) before the others read
    train_set, val_set, num_classes = load_splits(args.dataset, args.data_dir, args.seed, args.max_train, args.fraction)
    if run.is_main:
        dist.barrier()
    if args.max_val is not None and args.max_val < len(val_set):
        val_set = Subset(val_set, range(args.max_val))
    train_indexes = getattr(train_set, "indices", None)
    if len(train_set) // run.world_size < args.batch_size:  # 1% of a small set: say which flag to change
        raise UsageError(f"{len(train_set)} training images ({len(train_set) // run.world_size} per process) are "
                         f"fewer than --batch-size {args.batch_size}: pass a smaller --batch-size")
    run.open_outputs()  # the data is read: now the run folder may be written
    size = meta["image_size"]
    mean, std = augment.NORMALIZATION.get(args.dataset, augment.NORMALIZATION["imagenet"])
    # The deterministic loader of the method scripts: batches a function of (seed, epoch, position), resumable
    # mid-epoch; each of its items is (crop, label, index).
    loader = data.pretrain_loader(train_set, train_transform(size, mean, std), args.batch_size, args.workers,
                                  args.seed, run.rank, run.world_size, pin_memory=cuda)
    run.accumulation = Accumulation(1, len(loader))  # one optimizer step per batch
    val_loader = data.eval_loader(evaluation.Shard(val_set, run.rank, run.world_size),
                                  augment.val_transform(size, mean, std), max(args.batch_size, 256), args.workers,
                                  pin_memory=cuda)

    model = Classifier(with_drop_path(backbone, meta, args.drop_path), meta["feature_dim"], num_classes)
    train_model = prepare_model(model, run)
    lr = run.scale_lr(args.lr)
    optimizer = optim.build_optimizer(args.optimizer, param_groups(model, lr, args.weight_decay, args.layer_decay),
                                      lr, args.weight_decay)
    if args.optimizer == "sgd":
        for group in optimizer.param_groups:
            group["nesterov"] = True  # SimCLR fine-tunes with Nesterov momentum
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup  # solo-learn's settings: a whole batch mixed alike, cutmix or mixup at 1/2 each
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                      label_smoothing=args.label_smoothing, num_classes=num_classes)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    subset = [args.dataset, args.fraction, args.seed, args.max_train, len(train_set)]  # what a resume must match
    epoch, step, history = 0, 0, []
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "finetune", state)
        if extra["subset"] != subset:
            raise UsageError(f"{path} trained on another subset (dataset, --fraction, --seed, --max-train, images: "
                             f"{extra['subset']}): rerun with its flags, or pass another --out-dir")
        history = extra["history"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "finetune", epoch, step, state, {"history": history, "subset": subset})
    ctx = dict(device=run.device, channels_last=args.channels_last, autocast=run.autocast)

    scores, lr_now = None, lr
    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        loader.sampler.set_epoch(epoch, skip=skip * args.batch_size)
        model.train()
        bar = run.progress(loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for images, labels, _ in bar:
            seed_step(args.seed, step, run.rank)
            optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            lr_now = optimizer.param_groups[-1]["lr"]  # the head's: the top layer's lr, undecayed
            images, labels = run.to_device(images), run.labels_to_device(labels)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with run.autocast():
                logits = train_model(images)
            loss = finetune_loss(logits, targets, args.label_smoothing)
            optimizer_step(run, loss, optimizer, epoch, step)
            step += 1
            if stop := meter.update(step, loss, len(labels), lr_now):
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), validation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        scores = evaluation.probe_validate(model.backbone, model.head, val_loader, sharded=True, **ctx)
        line = {"epoch": epoch, "step": step, "lr": lr_now, "loss": meter.mean_loss(), **scores}
        run.log({"type": "epoch", **line})
        run.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items()))
        if finished_epoch:
            history.append(line)
        epoch += finished_epoch
        save(epoch, step)
    if scores is None:  # resumed from a finished run: validate what it left
        scores = evaluation.probe_validate(model.backbone, model.head, val_loader, sharded=True, **ctx)
    if run.is_main:
        result = {**scores, "mode": "finetune", "fraction": args.fraction, "epochs": args.epochs, "steps": step,
                  "dataset": args.dataset, "ckpt": str(args.ckpt), "backbone": meta["name"],
                  "method": meta.get("method"),
                  **{k: getattr(args, k) for k in ("optimizer", "weight_decay", "layer_decay", "drop_path", "mixup",
                                                   "cutmix", "label_smoothing", "warmup_epochs", "batch_size")},
                  "base_lr": args.lr, "lr": lr, "world_size": run.world_size, "precision": run.precision,
                  "train_images": len(train_set), "val_images": len(val_set), "train_indexes": train_indexes,
                  "history": history}
        out = os.path.join(args.out_dir, "finetune.json")
        write_json(result, out)
        labels = f"{args.fraction:g} of the labels" if args.fraction < 1 else "all labels"
        run.print(f"fine-tuned {args.ckpt} on {args.dataset} ({labels}): "
                  f"acc@1 {scores['acc1']:.2f}  acc@5 {scores['acc5']:.2f}  -> {out}")
    run.close()
    return scores


def main(argv=None):
    cli.run_main(lambda a: train(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    main()
