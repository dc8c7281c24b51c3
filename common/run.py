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
        self.amp_dtype = AMP_DTYPES.get(precision)
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
        self.metrics_file = self.extra_logger = self.folder_lock = None  # set by open_outputs, once the data is read

    def open_outputs(self):
        """Lock the run folder, write args.json, open metrics.jsonl and the extra logger (rank 0). build_data
        calls it once the data is read, so that a data error (a missing folder, an offline download) leaves no
        run folder behind."""
        args = self.args
        if self.is_main and self.metrics_file is None:
            # One run per folder (rank 0 holds it): a second run into a busy --out-dir stops here, before it writes.
            self.folder_lock = lock_run_folder(args.out_dir)
            os.makedirs(args.out_dir, exist_ok=True)
            config = {**vars(args), "torch": torch.__version__, "world_size": self.world_size,
                      "global_batch_size": args.batch_size * self.world_size * args.accumulate_steps,
                      "resolved_precision": self.precision}
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
        """Learning rates are given for a global batch of 256, the batches an optimizer step accumulates counted:
        solo-learn scales by batch x devices x nodes / 256 (solo/args/pretrain.py), then by accumulate_grad_batches
        (solo/methods/base.py)."""
        return lr * self.args.batch_size * self.world_size * self.args.accumulate_steps / 256

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


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # autocast's dtype of each --precision (fp32: none)


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


def frozen_forward(backbone, device):
    """(backbone on `device`, the keyword context of evaluation's forward passes) for the eval/ tools' frozen
    backbones: channels_last on CUDA, autocast in the dtype --precision auto picks there (bf16 on Ampere and newer
    and on CPUs with native bf16, fp16 on a V100 or T4; forward passes only, features cast back to float32, so half
    precision needs no loss scaling)."""
    cuda = device.type == "cuda"
    dtype = AMP_DTYPES.get(resolve_precision("auto", device.type))
    ctx = dict(device=device, channels_last=cuda,
               autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if dtype else None)
    return backbone.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format), ctx


@contextlib.contextmanager
def full_float32():
    """Matmuls in full float32 inside (Run turns TF32 on for the rest): for the float32 math of a loss that needs it
    (a cross-correlation, a covariance, Newton iterations), which TF32's 10-bit mantissa cuts to ~3 digits on Ampere
    and newer. Also a decorator. The legacy flag, as Run sets it: torch refuses a mix of its two TF32 APIs."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class StepMeter:
    """One epoch's bookkeeping: losses summed on the device, the progress bar and metrics line at --log-every
    steps (the only steps that read anything back from the device), and the reason to stop, if any.
    update() returns why to stop ("max_steps" or a signal's name) or None; a non-finite loss raises NonFiniteLoss."""

    def __init__(self, run, epoch, bar):
        self.run, self.epoch, self.bar = run, epoch, bar
        self.loss_sum = torch.zeros((), device=run.device)
        self.steps, self.images, self.start = 0, 0, time.time()
        self.seconds = 0.0  # training time: the host clock at the last step, so evaluation time is not counted
        self.last_loss = float("nan")

    def update(self, step, loss, batch_size, lr, **extra):
        """After optimizer step number `step` (counted from 1). `loss` and tensor values in `extra` stay on the
        device; they are read (and averaged over ranks) only every --log-every steps."""
        run, args = self.run, self.run.args
        self.loss_sum += loss.detach().float()
        self.steps += 1
        self.images += batch_size * run.world_size * run.accumulation.last_step_batches
        self.seconds = time.time() - self.start  # no sync: the host runs at most a few steps ahead of the device
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
    class_names = getattr(train_set, "classes", None)  # for the UMAP legend
    if train_set.num_classes and val_set is None and run.is_main:  # a labelled folder without val/: say what is lost
        parent = os.path.dirname(os.path.abspath(args.data_dir))
        fix = (f"pass --data-dir {parent}, which holds train/ and val/" if os.path.isdir(os.path.join(parent, "val"))
               and os.path.basename(os.path.abspath(args.data_dir)) == "train" else
               f"put labelled images in {os.path.join(args.data_dir, 'val')}, one sub-folder per class as in training")
        print(f"{args.data_dir} has labels but no val/ folder: no probe validation, kNN or UMAP in this run; {fix}",
              flush=True)
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
    run.accumulation = Accumulation(args.accumulate_steps, len(loader))
    run.open_outputs()  # the data is read and its loaders built: now the run folder may be written
    run.datasets = SimpleNamespace(  # steps_per_epoch counts optimizer steps
        loader=loader, num_classes=train_set.num_classes, steps_per_epoch=run.accumulation.steps_per_epoch,
        batches_per_epoch=len(loader), train_size=len(train_set),
        val=eval_loader(val_set) if labelled else None, knn_train=eval_loader(train_set) if labelled else None,
        val_size=len(val_set) if labelled else 0, class_names=class_names,
        **health_loaders(args, run, train_set, mean, std, eval_batch))
    return run.datasets  # kept on run too: prepare_model measures the --init baseline on it


HEALTH_PAIRS = 1024  # images of the health sample whose two augmented views give alignment and uniformity


def health_loaders(args, run, train_set, mean, std, batch_size):
    """The health pass's loaders (this rank's Shard of each): clean views of a fixed seeded sample of
    --health-samples training images, and two augmented views (the run's preset, torchvision transforms whatever the
    backend, seeded per image) of its first HEALTH_PAIRS. Nothing when --health-every -1."""
    if args.health_every < 0:
        return dict(health=None)
    sample = torch.utils.data.Subset(train_set, evaluation.health_sample(len(train_set), args.health_samples,
                                                                         args.seed))
    pairs = torch.utils.data.Subset(sample, range(min(HEALTH_PAIRS, len(sample))))
    views = augment.pretrain_transform(args.preset, args.crop_size, mean, std, num_large=2,
                                       min_scale=args.min_scale, invert_prob=args.invert_prob)
    shard = lambda dataset: evaluation.Shard(dataset, run.rank, run.world_size)  # noqa: E731
    pin = run.device.type == "cuda"
    return dict(health=data.eval_loader(shard(sample), augment.val_transform(args.crop_size, mean, std), batch_size,
                                        args.workers, pin_memory=pin),
                health_pairs=data.eval_loader(shard(evaluation.FixedViews(pairs, views, args.seed)),
                                              augment.plain_tensor,
                                              batch_size, args.workers, pin_memory=pin),
                health_sizes=(len(sample), len(pairs)))


def prepare_model(model, run, trained=True):
    """Move to the device; SyncBatchNorm when world size > 1 on GPUs; with --compile, torch.compile of the
    backbone; DistributedDataParallel when world size > 1. Returns the module to call in training; `model`
    itself stays the one to save (its state_dict keys never change: every step here works in place).
    trained=False is for momentum (target) networks: no DDP, no gradients, its backbone compiled too.
    The backbone is `model.backbone`, or `model[0]` of a target built as nn.Sequential(backbone, head).
    --init: a fresh run (nothing to resume) loads its backbone from the source here (targets too), then measures
    the baseline of those weights (epoch -1); --freeze-backbone-epochs: the trained backbone's parameters are
    kept in run.frozen, whose gradients optimizer_step drops during the first N epochs."""
    args = run.args
    backbone = model.backbone if hasattr(model, "backbone") else model[0] if isinstance(model, nn.Sequential) else model
    fresh_init = getattr(args, "init", None) and checkpoint.resume_path(args) is None
    if fresh_init:
        if getattr(run, "init_state", None) is None:  # read once: the online network and its target share it
            run.init_state = checkpoint.init_state_dict(args.init, backbone, args.backbone, args.crop_size)
        backbone.load_state_dict(run.init_state)
    if trained:
        run.frozen = list(backbone.parameters())
    model.to(run.device)
    if run.args.channels_last:
        model.to(memory_format=torch.channels_last)
    if not trained:
        model.requires_grad_(False)
    if run.world_size > 1 and run.device.type == "cuda":  # DDP supports SyncBatchNorm on GPUs only; CPU ranks
        # keep local BN. Converted before compiling, so that the compiled graph holds the synchronised layers.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps BN children in place: same root module
    if run.args.compile:
        compile_backbone(backbone)
    if fresh_init and trained:
        init_baseline(run, backbone)
    if run.world_size == 1 or not trained:
        return model
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda"
                                              else None)
    run.accumulation.watch(ddp)  # build_data made it: the batches that do not step skip the all-reduce
    return ddp


def compile_backbone(backbone):
    """torch.compile in place (Module.compile: state_dict keys stay unchanged) and whole (fullgraph: a graph break
    is an error, not a silent slowdown; the ResNets, ViTs and Swins here trace whole). A backbone with SyncBatchNorm
    (torchrun on GPUs) is refused: Dynamo breaks the graph at every such layer and the pair has open PyTorch bugs."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules()):
        raise UsageError("--compile with several GPUs: the backbone's BatchNorm layers are SyncBatchNorm there, "
                         "which torch.compile cannot compile whole; drop --compile, or use a ViT or Swin backbone")
    backbone.compile(fullgraph=True)


def probe_loss(logits, labels):
    """Cross-entropy of the online probe, averaged over every large crop (solo-learn): `logits` holds the
    crops' rows one batch after another, so labels repeat once per crop. Rows labelled -1 (unlabelled) are
    ignored; with none labelled the loss is 0 and the probe stays in the graph (DDP sees every parameter used).
    Dividing by the labelled count (at least 1) instead of branching on it keeps the step free of host syncs."""
    labels = labels.repeat(len(logits) // len(labels))
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp(min=1)


class Accumulation:
    """--accumulate-steps N with the semantics of Lightning's accumulate_grad_batches, which solo-learn's ImageNet
    BYOL config uses: every batch runs its backward on loss / N, adding to the gradients; the optimizer steps after
    the N-th batch of a group and after the epoch's last batch (a shorter group, still divided by N), groups counted
    from the epoch's start. An epoch of B batches makes ceil(B / N) optimizer steps; the step counter and what it
    drives (lr warmup and cosine, momentum tau and the momentum update, --max-steps, --log-every, resuming) count
    optimizer steps, and the online probe's loss accumulates with the rest. Per-batch state (queues, DINO's center,
    memory banks) is updated after every batch, as solo-learn's training_step does. The loss logged for a step is
    its last batch's. Under DDP the batches that do not step skip the gradient all-reduce (what DDP's no_sync does):
    the ranks' accumulated gradients are averaged once, in the backward of the stepping batch."""

    def __init__(self, steps, batches_per_epoch):
        self.steps, self.batches_per_epoch = steps, batches_per_epoch
        self.steps_per_epoch = -(-batches_per_epoch // steps)
        self.pending = 0  # batches whose gradients wait for the next optimizer step
        self.batch = 0  # the last batch's number in its epoch, from 1
        self.last_step_batches = 1  # batches that went into the last optimizer step (images/s)
        self.ddp_models = []

    def _steps_after(self, batch, pending):
        """Whether the optimizer steps after the epoch's batch number `batch` (from 1), the pending-th of its group."""
        return pending == self.steps or batch == self.batches_per_epoch

    def watch(self, ddp):
        """A DDP module whose gradient all-reduce waits for the batches that step (set before each forward)."""
        ddp.require_backward_grad_sync = self._steps_after(1, 1)  # a run starts or resumes with a group's first batch
        self.ddp_models.append(ddp)

    def batch_number(self, step):
        """A number unique to each batch of the run, before its optimizer_step: `step` itself when nothing accumulates
        (per-batch seeds: MAE's masks, W-MSE's chunks, All4One's dropout)."""
        return step * self.steps + self.pending

    def add_batch(self, epoch, step):
        """Count one batch of optimizer step `step` (from 0) of `epoch`; True when the optimizer steps after it.
        Python arithmetic only: nothing is read from the device."""
        self.pending += 1
        self.batch = (step - epoch * self.steps_per_epoch) * self.steps + self.pending
        stepping = self._steps_after(self.batch, self.pending)
        if stepping:
            self.last_step_batches, self.pending = self.pending, 0
        return stepping

    def sync_next_batch(self):
        """After a batch's backward: whether the next batch's backward all-reduces (DDP reads it in its forward)."""
        syncs = self._steps_after(self.batch % self.batches_per_epoch + 1, self.pending + 1)
        for ddp in self.ddp_models:
            ddp.require_backward_grad_sync = syncs


def optimizer_step(run, loss, optimizer, epoch, step, grad_clip=0.0, before_step=None):
    """Backward (scaled under fp16), optional clipping and a hook (e.g. to cancel frozen gradients),
    then the step. A non-finite loss is recorded on the device (Run.watch_finite) and stops the run at the next
    log step or checkpoint, before last.pt could hold it. With --accumulate-steps N (Accumulation) only every N-th
    batch steps: returns whether this one did; the script advances `step` and its momentum networks only then."""
    run.watch_finite(loss, epoch, step)
    accumulation = run.accumulation
    if accumulation.pending == 0:
        optimizer.zero_grad(set_to_none=True)
    stepping = accumulation.add_batch(epoch, step)
    run.scaler.scale(loss / accumulation.steps if accumulation.steps > 1 else loss).backward()
    accumulation.sync_next_batch()
    if not stepping:
        return False
    if epoch < getattr(run.args, "freeze_backbone_epochs", 0):  # no gradient: no update, no optimizer state
        for p in run.frozen:
            p.grad = None
    if grad_clip or before_step:
        run.scaler.unscale_(optimizer)
        if before_step:
            before_step()
        if grad_clip:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    run.scaler.step(optimizer)
    run.scaler.update()
    return True


def evaluate(run, datasets, backbone, probe, epoch, final=False, embed=None):
    """Probe accuracy every epoch; kNN every --knn-every epochs and at the end; UMAP likewise; the label-free
    health (evaluation.health_metrics: of the backbone and of `embed`, the head whose output the loss sees, e.g.
    the projector) every --health-every epochs and at the end, also without labels, with one warning line when
    the representation collapses. Epoch -1 (the --init baseline): kNN and health, no UMAP; probe None: no probe.

    Every rank evaluates its shard of the validation and kNN-train sets (build_data's loaders): probe
    counts are summed over ranks, validation features gathered back into dataset order, and the kNN runs on
    the device, each rank searching its shard of the train features and the ranks' top-k merged, so every
    rank returns the metrics one process computes. UMAP is drawn on rank 0 alone (the others wait for it in
    their next collective: dist.setup's timeout covers it). The RNG is forked so that evaluating never
    changes the training's random stream (resumed runs stay identical)."""
    args, metrics = run.args, {}
    run.check_finite()  # a NaN model is not worth evaluating
    now = lambda every: every >= 0 and (final or epoch < 0 or (every and (epoch + 1) % every == 0))  # noqa: E731
    ctx = dict(device=run.device, channels_last=args.channels_last, autocast=run.autocast)
    if getattr(datasets, "health", None) is not None and now(args.health_every):
        with torch.random.fork_rng(devices=[]):
            metrics = evaluation.health_metrics(backbone, embed, datasets.health, datasets.health_pairs,
                                                datasets.health_sizes, sharded=True, **ctx)
        if epoch >= 0 and embed is not None:  # joint-embedding methods only (MAE's loss sees pixels: no collapse)
            # the best embedding rank since this process started: a collapse is a fall from it
            run.best_rank = max(getattr(run, "best_rank", 0.0), metrics["health_rank_embed"])
            if warning := evaluation.collapse_warning(metrics, args.method, run.best_rank):
                metrics["health_warning"] = 1  # every epoch it holds; said once, not once an epoch
                if not getattr(run, "collapse_said", False):
                    run.print(f"warning: epoch {epoch}: {warning} (said once; later epochs that still show it "
                              "carry health_warning=1 in metrics.jsonl)")
                    run.collapse_said = True
    if datasets.val is None:
        return metrics
    knn_now, umap_now = now(args.knn_every), now(args.umap_every) and epoch >= 0
    with torch.random.fork_rng(devices=[]):
        if probe is not None:
            scores = evaluation.probe_validate(backbone, probe, datasets.val, sharded=True, **ctx)
            metrics.update({f"probe_{k}": v for k, v in scores.items()})
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
                     f"{args.method} on {args.dataset}, epoch {epoch}", class_names=datasets.class_names)
    return metrics


def init_baseline(run, backbone):
    """Epoch -1 of metrics.jsonl: the kNN (with labels) and the backbone's health of the --init weights, before
    any training, so the curves show what continued pretraining adds."""
    metrics = evaluate(run, run.datasets, backbone, None, -1)
    metrics = {k: v for k, v in metrics.items() if k.startswith(("knn_", "health_rank_backbone"))}
    run.log({"type": "epoch", "epoch": -1, "step": 0, "time": time.time(), **metrics})
    run.print(f"--init {run.args.init}: " + (" ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "loaded"))


def epoch_summary(run, meter, step, lr, metrics, extra=None):
    """One metrics line per epoch and one printed summary line."""
    line = {"type": "epoch", "epoch": meter.epoch, "step": step, "loss": meter.mean_loss(), "lr": lr,
            "images_per_s": meter.images / max(meter.seconds, 1e-9), "time": time.time(), **metrics, **(extra or {})}
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
        checkpoint.export_backbone(os.path.join(args.out_dir, "backbone.pt"), backbone,
                                   {**meta, "dataset": args.dataset, "data_dir": os.path.abspath(args.data_dir),
                                    "init": getattr(args, "init", None)})
        if args.umap_every >= 0:
            draw_curves(args)
