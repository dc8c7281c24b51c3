"""The parts of a training run that are the same for every method: set-up (devices, DDP, precision,
seeds, run folder, logs, signals), the data, one optimizer step, and the end-of-epoch evaluation.

The method scripts keep what differs: heads, loss, the training step and what goes in last.pt.
"""
import contextlib
import json
import os
import signal
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import augment, backbones, checkpoint, data, device_augment, dist, evaluation
from common.cli import NonFiniteLoss, UsageError


class Run:
    """Devices, precision, logging and signal handling of one training process."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size, self.device = dist.setup(args.device)
        self.is_main = self.rank == 0
        cuda = self.device.type == "cuda"
        precision = args.precision
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        if precision == "fp16" and not cuda:
            raise UsageError("--precision fp16 needs a CUDA GPU: use fp32 (or bf16) on the CPU")
        self.precision = precision
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.stop_signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.metrics_file = self.extra_logger = None
        if self.is_main:
            os.makedirs(args.out_dir, exist_ok=True)
            config = {**vars(args), "torch": torch.__version__, "world_size": self.world_size,
                      "global_batch_size": args.batch_size * self.world_size, "resolved_precision": precision}
            with open(os.path.join(args.out_dir, "args.json"), "w") as f:
                json.dump(config, f, indent=2)
            self.metrics_file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a")
            self.extra_logger = _extra_logger(args, config)

    def _on_signal(self, signum, frame):
        # Finish the current step, then checkpoint and exit (cluster preemption, Ctrl-C).
        self.stop_signal = signal.Signals(signum).name

    def should_stop(self):
        """True on every rank once any rank was signalled, so all ranks leave the loop together."""
        flag = torch.tensor([self.stop_signal is not None], dtype=torch.float32, device=self.device)
        return bool(dist.all_reduce_sum(flag).item() > 0) if self.world_size > 1 else bool(flag.item())

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def scale_lr(self, lr):
        """Learning rates are given for a global batch of 256."""
        return lr * self.args.batch_size * self.world_size / 256

    def to_device(self, images):
        fmt = torch.channels_last if self.args.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)

    def progress(self, iterable, epoch):
        return tqdm(iterable, desc=f"epoch {epoch}", disable=not self.is_main, dynamic_ncols=True, leave=False)

    def print(self, *a):
        if self.is_main:
            tqdm.write(" ".join(str(x) for x in a))

    def log(self, metrics):
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        if self.extra_logger:
            self.extra_logger(metrics)

    def close(self):
        if self.metrics_file:
            self.metrics_file.close()
        dist.cleanup()


def _extra_logger(args, config):
    """TensorBoard or W&B when asked for and installed; returns a function of a metrics dict."""
    if args.log == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--log tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(args.out_dir)
        return lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items() if isinstance(v, float)]
    if args.log == "wandb":
        try:
            import wandb
        except ImportError:
            raise UsageError("--log wandb needs the wandb package: pip install wandb")
        wandb.init(project="ssl-scripts", name=os.path.basename(args.out_dir), config=config, resume="allow")
        return lambda m: wandb.log(m, step=m["step"])
    return None


def build_data(args, run):
    """The pretraining loader (views, labels, indexes) and the labelled loaders for probe and kNN.

    --data-backend picks the pretraining loader: torchvision (DataLoader workers, any dataset),
    device (batched augmentation on the training device, in-memory datasets) or dali (folder
    datasets). All three share the presets, the EpochSampler order and the batch layout."""
    backend = args.data_backend
    if backend == "device" and args.dataset not in device_augment.DATASETS:
        raise UsageError(f"--data-backend device serves {', '.join(device_augment.DATASETS)}; "
                         f"for {args.dataset} use --data-backend dali or torchvision")
    if backend == "dali":
        from common import dali  # imports nvidia.dali itself only when a loader is built
        dali.check_available(args.dataset)
    elif backend not in ("torchvision", "device"):
        raise UsageError(f"unknown --data-backend {backend}: choose torchvision, dali or device")
    if not run.is_main:
        dist.barrier()  # rank 0 downloads (torchvision sets) before the others read
    train_set = data.load_dataset(args.dataset, args.data_dir, "train", args.seed)
    val_set = data.load_dataset(args.dataset, args.data_dir, "val", args.seed) if train_set.num_classes else None
    if run.is_main:
        dist.barrier()
    if args.train_subset:  # the first N images: quick experiments and tests
        full, train_set = train_set, torch.utils.data.Subset(train_set, range(min(args.train_subset, len(train_set))))
        train_set.num_classes, train_set.image_size = full.num_classes, full.image_size
        if val_set is not None:  # validation shrinks with it (at most N, at least 256 images)
            val_set = torch.utils.data.Subset(val_set, range(min(len(val_set), max(args.train_subset, 256))))
    mean, std = augment.NORMALIZATION.get(args.dataset, augment.NORMALIZATION["imagenet"])
    crops = dict(num_large=args.num_large_crops, num_small=args.num_small_crops, small_size=args.small_crop_size,
                 min_scale=args.min_scale, invert_prob=args.invert_prob)
    if backend == "device":
        views = device_augment.view_specs(args.preset, args.crop_size, **crops)
        loader = device_augment.device_loader(train_set, views, mean, std, args.batch_size, args.seed, run.rank,
                                              run.world_size, run.device)
    elif backend == "dali":
        views = device_augment.view_specs(args.preset, args.crop_size, **crops)
        loader = dali.dali_loader(train_set, views, mean, std, args.batch_size, args.seed, run.rank,
                                  run.world_size, run.device, threads=max(args.workers, 1))
    else:
        views = augment.pretrain_transform(args.preset, args.crop_size, mean, std, **crops)
        loader = data.pretrain_loader(train_set, views, args.batch_size, args.workers, args.seed, run.rank,
                                      run.world_size, pin_memory=run.device.type == "cuda")
    plain = augment.val_transform(args.crop_size, mean, std)
    eval_batch = max(args.batch_size, 256)
    return SimpleNamespace(
        loader=loader, num_classes=train_set.num_classes, steps_per_epoch=len(loader), train_size=len(train_set),
        val=data.eval_loader(val_set, plain, eval_batch, args.workers) if val_set is not None else None,
        knn_train=data.eval_loader(train_set, plain, eval_batch, args.workers) if val_set is not None else None)


def prepare_model(model, run, trained=True):
    """Move to the device; SyncBatchNorm and DistributedDataParallel when world size > 1.
    Returns the module to call in training; `model` itself stays the one to save.
    trained=False is for momentum (target) networks: no DDP, no gradients."""
    model.to(run.device)
    if run.args.channels_last:
        model.to(memory_format=torch.channels_last)
    if run.args.compile and hasattr(model, "backbone"):
        model.backbone.compile()  # in place: state_dict keys stay unchanged
    if not trained:
        model.requires_grad_(False)
    if run.world_size == 1:
        return model
    if run.device.type == "cuda":  # DDP supports SyncBatchNorm on GPUs only; CPU ranks keep local BN
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not trained:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def probe_loss(logits, labels):
    """Cross-entropy of the online probe; rows labelled -1 (unlabelled) are ignored."""
    if (labels >= 0).any():
        return F.cross_entropy(logits.float(), labels, ignore_index=-1)
    return logits.sum() * 0.0  # keeps the probe in the graph so DDP sees every parameter used


def optimizer_step(run, loss, optimizer, epoch, step, grad_clip=0.0, before_step=None):
    """Backward (scaled under fp16), optional clipping and a hook (e.g. to cancel frozen gradients),
    then the step. A non-finite loss stops the run before any weight is touched."""
    if not torch.isfinite(loss).item():
        raise NonFiniteLoss(f"loss is {loss.item()} at epoch {epoch}, step {step}: stopping; "
                            f"last.pt holds the last good state (try a lower --lr or --precision fp32)")
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if grad_clip or before_step:
        run.scaler.unscale_(optimizer)
        if before_step:
            before_step()
        if grad_clip:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()


def evaluate(run, datasets, backbone, probe, epoch, final=False):
    """Probe accuracy every epoch; kNN every --knn-every epochs and at the end; UMAP likewise.
    Runs on rank 0 (others wait), since it is a small fraction of an epoch. The RNG is forked so
    that evaluating never changes the training's random stream (resumed runs stay identical)."""
    args, metrics = run.args, {}
    if run.is_main and datasets.val is not None:
        with torch.random.fork_rng(devices=[]):
            ctx = dict(device=run.device, channels_last=args.channels_last, autocast=run.autocast)
            metrics = {f"probe_{k}": v for k, v in evaluation.probe_validate(backbone, probe, datasets.val, **ctx).items()}
            knn_now = args.knn_every >= 0 and (final or (args.knn_every and (epoch + 1) % args.knn_every == 0))
            umap_now = args.umap_every >= 0 and (final or (args.umap_every and (epoch + 1) % args.umap_every == 0))
            if knn_now or umap_now:
                val_feats, val_labels = evaluation.extract_features(backbone, datasets.val, **ctx)
            if knn_now:
                train_feats, train_labels = evaluation.extract_features(backbone, datasets.knn_train, **ctx)
                metrics["knn_acc1"], metrics["knn_acc5"] = evaluation.knn_accuracy(
                    train_feats, train_labels, val_feats, val_labels, datasets.num_classes)
            if umap_now:
                from common.plots import umap_png  # umap-learn imports slowly: only when drawing
                umap_png(val_feats, val_labels, os.path.join(args.out_dir, "umap.png"),
                         f"{args.method} on {args.dataset}, epoch {epoch}")
    dist.barrier()
    return metrics


def epoch_summary(run, epoch, step, losses, lr, images, seconds, metrics, extra=None):
    """One metrics line per epoch and one printed summary line."""
    line = {"type": "epoch", "epoch": epoch, "step": step, "loss": sum(losses) / max(1, len(losses)),
            "lr": lr, "images_per_s": images / max(seconds, 1e-9), "time": time.time(), **metrics, **(extra or {})}
    run.log(line)
    run.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in line.items() if k not in ("type", "time")))


def finish(run, backbone, feature_dim):
    """Write backbone.pt for eval/ and users."""
    if run.is_main:
        args = run.args
        meta = backbones.backbone_metadata(args.backbone, args.crop_size, feature_dim, args.method)
        checkpoint.export_backbone(os.path.join(args.out_dir, "backbone.pt"), backbone, {**meta, "dataset": args.dataset})
