"""The parts of a training run that are the same for every method: set-up (devices, DDP, precision,
seeds, run folder, logs, signals), the data, one optimizer step, and the end-of-epoch evaluation.

The method scripts keep what differs: heads, loss, the training step and what goes in last.pt.
"""
import atexit
import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import augment, backbones, checkpoint, data, device_augment, dist, evaluation
from common.cli import PREEMPTED_EXIT, NonFiniteLoss, Preempted, RunError, UsageError


class Run:
    """Devices, precision, logging and signal handling of one training process."""

    def __init__(self, args):
        # A checkpoint this run cannot resume from stops it here, before args.json or anything else is written.
        checkpoint.check_resumable(args, args.method)
        self.args = args
        self.rank, self.world_size, self.device = dist.setup(args.device)
        self.is_main = self.rank == 0
        cuda = self.device.type == "cuda"
        self.precision = precision = resolve_precision(args.precision, self.device.type)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.stop_signal = None  # a Python value, set by the handler: reading it never waits on the device
        self.told_stopping = False
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # SIGUSR1: SLURM's --signal=B:USR1@120
            signal.signal(sig, self._on_signal)
        # (epoch << 32) + step of the first step whose loss was not finite (-1: none), kept on the device and read
        # only at log steps, at the epoch's end and before a checkpoint is written: the step never waits for it.
        self.nonfinite_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.metrics_file = self.extra_logger = None
        # One run per folder (rank 0 holds it): a second run into a busy --out-dir stops here, before it writes.
        self.folder_lock = lock_run_folder(args.out_dir) if self.is_main else None
        if self.is_main:
            os.makedirs(args.out_dir, exist_ok=True)
            config = {**vars(args), "torch": torch.__version__, "world_size": self.world_size,
                      "global_batch_size": args.batch_size * self.world_size, "resolved_precision": precision}
            with open(os.path.join(args.out_dir, "args.json"), "w") as f:
                json.dump(config, f, indent=2)
            self.metrics_file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a")
            self.extra_logger = _extra_logger(args, config)

    def _on_signal(self, signum, frame):
        # Finish the current step, then checkpoint and exit (cluster preemption, Ctrl-C). The handler stays to the
        # end: a second signal (SLURM signals every process of a step and torchrun forwards the same signal, so a
        # worker can get two; a second Ctrl-C) is ignored, so it cannot cut the save short. SIGKILL force-quits.
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name
        elif self.is_main and not self.told_stopping:
            self.told_stopping = True
            os.write(2, f"\n{signal.Signals(signum).name} ignored: already stopping after {self.stop_signal} "
                        f"(writing last.pt); kill -KILL {os.getpid()} force-quits without saving\n".encode())

    def watch_finite(self, loss, epoch, step):
        """Record (epoch, step) on the device if `loss` is the first non-finite one (no host sync)."""
        fine = torch.isfinite(loss.detach()).all() | (self.nonfinite_step >= 0)
        self.nonfinite_step = torch.where(fine, self.nonfinite_step, (epoch << 32) + step)

    def read_flags(self, values=()):
        """One host sync: (the tensors in `values` as floats, averaged over ranks; the first non-finite step, -1 when
        it happened on another rank, None when on none; whether any rank was signalled). Under DDP one all-reduce
        carries them all; the last entry, this rank's own non-finite step, stays out of it."""
        flags = torch.stack([*(v.detach().double().reshape(()) for v in values), (self.nonfinite_step >= 0).double(),
                             torch.full((), float(self.stop_signal is not None), dtype=torch.float64,
                                        device=self.device), self.nonfinite_step.double()])
        if self.world_size > 1:
            torch.distributed.all_reduce(flags[:-1])
        *means, bad, signalled, own_bad = flags.tolist()
        means = [m / self.world_size for m in means]
        own_bad = int(own_bad)  # float64 holds (epoch << 32) + step exactly up to epoch 2**20
        bad_step = (own_bad >> 32, own_bad & 0xFFFFFFFF) if own_bad >= 0 else (-1, -1) if bad else None
        return means, bad_step, signalled > 0

    @staticmethod
    def raise_if_nonfinite(bad_step):
        """bad_step: None (all finite), (epoch, step), or (-1, -1) when only another rank saw it."""
        if bad_step is not None:
            where = "on another rank" if bad_step[0] < 0 else f"at epoch {bad_step[0]}, step {bad_step[1]}"
            raise NonFiniteLoss(f"loss is not finite {where}: stopping; last.pt holds the last good state "
                                "(try a lower --lr, --grad-clip 1, or --precision fp32)")

    def check_finite(self):
        """NonFiniteLoss (on every rank) if any loss since the start was NaN or inf: one sync."""
        self.raise_if_nonfinite(self.read_flags()[1])

    def save(self, path, method, epoch, step, objects, extra=None):
        """Check that no loss went non-finite (all ranks), then write last.pt on rank 0, so last.pt never holds
        a non-finite state. A failed write (disk full) leaves the previous last.pt intact and stops with one line."""
        self.check_finite()
        if self.is_main:
            try:
                checkpoint.save(path, method, self.args, epoch, step, objects, extra)
            except OSError as e:
                raise RunError(f"could not write {path} ({e.strerror or e}): the previous last.pt is intact; "
                               "free disk space or pass another --out-dir, then rerun to resume")

    def meter(self, epoch, bar):
        return StepMeter(self, epoch, bar)

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

    def labels_to_device(self, *tensors):
        """Labels and indexes, copied without blocking the host (the loaders pin them on CUDA)."""
        moved = [t.to(self.device, non_blocking=True) for t in tensors]
        return moved[0] if len(moved) == 1 else moved

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

    def preempted(self, reason, path, epoch, step):
        """After a signal, once `path` is written: close and leave with exit status cli.PREEMPTED_EXIT."""
        message = f"{reason} received: saved {path} at epoch {epoch}, step {step}; rerun the command to resume"
        if self.world_size > 1 and self.is_main:
            print(message, file=sys.stderr)  # close() ends a torchrun process itself, before cli.run_main could
        self.close(PREEMPTED_EXIT)
        raise Preempted(message)

    def close(self, status=0):
        """The end of a run: the metrics file, the process group and the folder lock. Under torchrun the process
        ends here with `status` (dist.exit_process says why)."""
        if self.metrics_file:
            self.metrics_file.close()
        dist.cleanup()
        if self.folder_lock:
            self.folder_lock.close()  # releases the flock (process exit would too)
        if self.world_size > 1:
            dist.exit_process(status)


def lock_run_folder(out_dir):
    """Hold an exclusive flock on <out_dir>/run.lock for the life of this process; another live run holding it is a
    UsageError naming it. The kernel drops a flock when its process ends, however it ends: a crashed run leaves no
    stale lock. Returns the open file (keep it: closing it releases the lock)."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "run.lock"), "a+")  # "a+": never truncated before the lock is ours
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that is starting"
        lock.close()
        raise UsageError(f"--out-dir {out_dir} is in use by another run ({holder}): wait for it to end, or pass "
                         "another --out-dir") from None
    except OSError as e:  # a file system without flock (some network mounts): run unguarded, say so
        print(f"note: cannot lock {out_dir} ({e.strerror}): a second run into it would not be stopped", file=sys.stderr)
        return lock
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def cpu_has_fast_bf16():
    """Whether this CPU has native bf16 dot products, on which oneDNN runs bf16 convolutions and matmuls faster than
    fp32: AMX tiles (Intel Sapphire Rapids and newer: a ResNet-18 step 2.2-2.6x faster) or AVX512-BF16 (AMD EPYC
    Zen 4 and newer, Intel Cooper Lake: 1.9-2.1x here). Without them bf16 is emulated and slower than fp32 (~10x on AVX2
    only). docs/benchmarks.md, bench/cpu_precision.py."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_precision(precision, device_type):
    """--precision auto: bf16 on GPUs with native bf16 (Ampere and newer; emulated bf16 on a V100 or T4 is slow,
    fp16 with a GradScaler is the better choice there); on the CPU bf16 where it is faster (cpu_has_fast_bf16),
    else fp32. The losses run in float32 either way (each script casts them)."""
    if precision == "auto":
        if device_type != "cuda":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and device_type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA GPU: use fp32 (or bf16) on the CPU")
    return precision


class StepMeter:
    """One epoch's bookkeeping: losses summed on the device, the progress bar and metrics line at --log-every
    steps (the only steps that read anything back from the device), and the reason to stop, if any.
    update() returns why to stop ("max_steps" or a signal's name) or None; a non-finite loss raises NonFiniteLoss."""

    def __init__(self, run, epoch, bar):
        self.run, self.epoch, self.bar = run, epoch, bar
        self.loss_sum = torch.zeros((), device=run.device)
        self.steps, self.images, self.start = 0, 0, time.time()
        self.last_loss = float("nan")

    def update(self, step, loss, batch_size, lr, **extra):
        """After optimizer step number `step` (counted from 1). `loss` and tensor values in `extra` stay on the
        device; they are read (and averaged over ranks) only every --log-every steps."""
        run, args = self.run, self.run.args
        self.loss_sum += loss.detach().float()
        self.steps += 1
        self.images += batch_size * run.world_size
        stop = "max_steps" if args.max_steps and step >= args.max_steps else None
        if step % args.log_every == 0:
            names = [k for k, v in extra.items() if torch.is_tensor(v)]
            (self.last_loss, *values), bad_step, signalled = run.read_flags([loss, *(extra[k] for k in names)])
            run.raise_if_nonfinite(bad_step)
            logged = {**extra, **dict(zip(names, values))}
            speed = self.images / max(time.time() - self.start, 1e-9)
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.3g}", img_s=f"{speed:.0f}")
            run.log({"type": "step", "epoch": self.epoch, "step": step, "loss": self.last_loss, "lr": lr, **logged})
            if signalled:
                stop = run.stop_signal or "signal"
        elif run.world_size == 1 and run.stop_signal:  # a Python flag: free to read on any step
            stop = run.stop_signal
        return stop

    def mean_loss(self):
        """The epoch's mean loss over steps and ranks (one sync, at the epoch's end)."""
        (total,), bad_step, _ = self.run.read_flags([self.loss_sum])
        self.run.raise_if_nonfinite(bad_step)
        return total / max(1, self.steps)


def _extra_logger(args, config):
    """TensorBoard or W&B when asked for and installed; returns a function of a metrics dict."""
    if args.log == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--log tensorboard needs the tensorboard package: pip install tensorboard")
        writer = SummaryWriter(args.out_dir)
        atexit.register(writer.close)  # flushed at the end (dist.exit_process runs atexit functions too)
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

    def eval_loader(dataset):  # this rank's shard: evaluate() splits the probe, features and kNN over ranks
        return data.eval_loader(evaluation.Shard(dataset, run.rank, run.world_size), plain, eval_batch, args.workers,
                                pin_memory=run.device.type == "cuda")
    labelled = val_set is not None
    return SimpleNamespace(
        loader=loader, num_classes=train_set.num_classes, steps_per_epoch=len(loader), train_size=len(train_set),
        val=eval_loader(val_set) if labelled else None, knn_train=eval_loader(train_set) if labelled else None,
        val_size=len(val_set) if labelled else 0)


def prepare_model(model, run, trained=True):
    """Move to the device; SyncBatchNorm when world size > 1 on GPUs; with --compile, torch.compile of the
    backbone; DistributedDataParallel when world size > 1. Returns the module to call in training; `model`
    itself stays the one to save (its state_dict keys never change: every step here works in place).
    trained=False is for momentum (target) networks: no DDP, no gradients, its backbone compiled too.
    The backbone is `model.backbone`, or `model[0]` of a target built as nn.Sequential(backbone, head)."""
    model.to(run.device)
    if run.args.channels_last:
        model.to(memory_format=torch.channels_last)
    if not trained:
        model.requires_grad_(False)
    if run.world_size > 1 and run.device.type == "cuda":  # DDP supports SyncBatchNorm on GPUs only; CPU ranks
        # keep local BN. Converted before compiling, so that the compiled graph holds the synchronised layers.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps BN children in place: same root module
    if run.args.compile:
        backbone = model.backbone if hasattr(model, "backbone") else model[0] if isinstance(model, nn.Sequential) \
            else model
        backbone.compile()  # in place (Module.compile): state_dict keys stay unchanged
    if run.world_size == 1 or not trained:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def probe_loss(logits, labels):
    """Cross-entropy of the online probe, averaged over every large crop (solo-learn): `logits` holds the
    crops' rows one batch after another, so labels repeat once per crop. Rows labelled -1 (unlabelled) are
    ignored; with none labelled the loss is 0 and the probe stays in the graph (DDP sees every parameter used).
    Dividing by the labelled count (at least 1) instead of branching on it keeps the step free of host syncs."""
    labels = labels.repeat(len(logits) // len(labels))
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp(min=1)


def optimizer_step(run, loss, optimizer, epoch, step, grad_clip=0.0, before_step=None):
    """Backward (scaled under fp16), optional clipping and a hook (e.g. to cancel frozen gradients),
    then the step. A non-finite loss is recorded on the device (Run.watch_finite) and stops the run at the next
    log step or checkpoint, before last.pt could hold it."""
    run.watch_finite(loss, epoch, step)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if grad_clip or before_step:
        run.scaler.unscale_(optimizer)
        if before_step:
            before_step()
        if grad_clip:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    run.scaler.step(optimizer)
    run.scaler.update()


def evaluate(run, datasets, backbone, probe, epoch, final=False):
    """Probe accuracy every epoch; kNN every --knn-every epochs and at the end; UMAP likewise.

    Every rank evaluates its shard of the validation and kNN-train sets (build_data's loaders): probe
    counts are summed over ranks, validation features gathered back into dataset order, and the kNN runs on
    the device, each rank searching its shard of the train features and the ranks' top-k merged, so every
    rank returns the metrics one process computes. UMAP is drawn on rank 0 alone (the others wait for it in
    their next collective: dist.setup's timeout covers it). The RNG is forked so that evaluating never
    changes the training's random stream (resumed runs stay identical)."""
    args, metrics = run.args, {}
    run.check_finite()  # a NaN model is not worth evaluating
    if datasets.val is None:
        return metrics
    knn_now = args.knn_every >= 0 and (final or (args.knn_every and (epoch + 1) % args.knn_every == 0))
    umap_now = args.umap_every >= 0 and (final or (args.umap_every and (epoch + 1) % args.umap_every == 0))
    ctx = dict(device=run.device, channels_last=args.channels_last, autocast=run.autocast)
    with torch.random.fork_rng(devices=[]):
        scores = evaluation.probe_validate(backbone, probe, datasets.val, sharded=True, **ctx)
        metrics = {f"probe_{k}": v for k, v in scores.items()}
        if knn_now or umap_now:
            val_feats, val_labels = (evaluation.unshard(t, datasets.val_size) for t in
                                     evaluation.extract_features(backbone, datasets.val, on_device=True, **ctx))
        if knn_now:
            train_feats, train_labels = evaluation.extract_features(backbone, datasets.knn_train, on_device=True, **ctx)
            metrics["knn_acc1"], metrics["knn_acc5"] = evaluation.knn_accuracy(
                train_feats, train_labels, val_feats, val_labels, datasets.num_classes, sharded=True)
            del train_feats, train_labels  # the largest tensors of the run: free them before training resumes
        if umap_now and run.is_main:
            from common.plots import umap_png  # umap-learn imports slowly: only when drawing
            umap_png(val_feats.cpu(), val_labels.cpu(), os.path.join(args.out_dir, "umap.png"),
                     f"{args.method} on {args.dataset}, epoch {epoch}")
    return metrics


def epoch_summary(run, meter, step, lr, metrics, extra=None):
    """One metrics line per epoch and one printed summary line."""
    seconds = time.time() - meter.start
    line = {"type": "epoch", "epoch": meter.epoch, "step": step, "loss": meter.mean_loss(), "lr": lr,
            "images_per_s": meter.images / max(seconds, 1e-9), "time": time.time(), **metrics, **(extra or {})}
    run.log(line)
    run.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in line.items() if k not in ("type", "time")))
    every = run.args.umap_every
    if run.is_main and every > 0 and (meter.epoch + 1) % every == 0:
        draw_curves(run.args)


def draw_curves(args):
    """curves.png (loss, probe and kNN acc@1 against epoch) from the run's metrics.jsonl, beside umap.png."""
    from common.plots import run_curves_png  # matplotlib: imported only when drawing
    run_curves_png(args.out_dir)


def finish(run, backbone, feature_dim):
    """Write backbone.pt for eval/ and users, and curves.png unless --umap-every -1."""
    if run.is_main:
        args = run.args
        meta = backbones.backbone_metadata(args.backbone, args.crop_size, feature_dim, args.method)
        checkpoint.export_backbone(os.path.join(args.out_dir, "backbone.pt"), backbone, {**meta, "dataset": args.dataset})
        if args.umap_every >= 0:
            draw_curves(args)
