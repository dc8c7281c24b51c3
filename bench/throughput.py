"""Training-step throughput of every method against its compute floor, printed as a markdown table.

For each method the real script runs (its heads, loss, optimizer, momentum update, probe) in a
subprocess, three ways:
  step    the training loop fed one pre-augmented batch from memory again and again (no loader)
  floor   the bare backbone's forward+backward on the same views, plus a no-grad forward of a
          momentum copy on the large views for methods with a momentum encoder
  loader  the training loop with the real data loader (synthetic, --workers W)
A step's time is the gap between two consecutive batch requests, the median after warm-up.
step/floor is the overhead of the method itself; loader/step that of the data pipeline.

    python bench/throughput.py                                   # all methods, CPU-sized settings
    python bench/throughput.py --methods simclr byol --backbone resnet18 --batch-size 256   # on a GPU
"""
import argparse
import copy
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["barlow_twins", "byol", "deepclusterv2", "dino", "mocov2plus", "nnclr", "ressl", "simclr", "supcon",
           "simsiam", "swav", "vicreg", "wmse", "all4one", "mocov3", "vibcreg", "nnbyol", "nnsiam", "mae"]
# methods whose floor includes a momentum forward
MOMENTUM = {"byol", "dino", "mocov2plus", "ressl", "all4one", "mocov3", "nnbyol"}


class TimedBatches:
    """Yields batches and records when each was asked for: consecutive gaps are training steps."""

    def __init__(self, batches, length):
        self.batches, self.length, self.times = batches, length, []
        self.sampler = SimpleNamespace(set_epoch=lambda epoch, skip=0: None)

    def __len__(self):
        return self.length

    def __iter__(self):
        for batch in self.batches:
            self.times.append(time.perf_counter())
            yield batch

    def step_seconds(self, warmup):
        gaps = [b - a for a, b in zip(self.times, self.times[1:])][warmup:]
        return statistics.median(gaps)


def peak_memory_mb(device):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(method, mode, opts):
    """Run in a subprocess: one method, one mode; prints a JSON line."""
    import torch
    from common import run as common_run
    module = importlib.import_module(method)
    steps = opts.warmup + opts.steps
    argv = ["--dataset", "synthetic", "--backbone", opts.backbone, "--batch-size", str(opts.batch_size),
            "--workers", str(opts.workers), "--max-steps", str(steps), "--knn-every", "-1", "--umap-every", "-1",
            "--log-every", "1000000", "--out-dir", tempfile.mkdtemp(), "--device", opts.device, *opts.extra]
    args = module.parse_args(argv)
    timed = {}

    def build_data(args, run):
        real = common_run.build_data(args, run)
        if mode == "loader":
            timed["loader"] = TimedBatches(real.loader, real.steps_per_epoch)
        else:  # the same augmented batch, steps times, straight from memory
            batch = next(iter(real.loader))
            timed["loader"] = TimedBatches([batch] * (steps + 1), real.steps_per_epoch)
        return SimpleNamespace(**{**vars(real), "loader": timed["loader"], "val": None, "knn_train": None})

    if mode in ("step", "loader"):
        module.build_data = build_data
        module.train(args)
        seconds = timed["loader"].step_seconds(opts.warmup)
    else:
        seconds = floor_seconds(method, args, opts)
    device = "cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu"
    print(json.dumps({"method": method, "mode": mode, "images_per_s": opts.batch_size / seconds,
                      "peak_mb": peak_memory_mb(device)}))


def floor_seconds(method, args, opts):
    """Median seconds of the bare backbone's forward+backward on the method's views."""
    import torch
    from common import run as common_run
    from common.backbones import build_backbone
    from common.run import Run
    torch.manual_seed(0)
    run = Run(args)
    data = common_run.build_data(args, run)
    views, _, _ = next(iter(data.loader))
    views = [run.to_device(v) for v in views]
    net, _ = build_backbone(args.backbone, args.crop_size)
    net = net.to(run.device).train()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    target = copy.deepcopy(net) if method in MOMENTUM else None
    times = []
    for _ in range(opts.warmup + opts.steps):
        start = time.perf_counter()
        with run.autocast():
            loss = sum(net(v).float().sum() for v in views)
            if target is not None:
                with torch.no_grad():
                    [target(v) for v in views[:args.num_large_crops]]
        loss.backward()
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[opts.warmup:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, help="methods to measure [default: all]")
    p.add_argument("--backbone", default="resnet_narrow", help="[default: %(default)s]")
    p.add_argument("--batch-size", type=int, default=64, help="[default: %(default)s]")
    p.add_argument("--workers", type=int, default=2, help="loader workers in the loader mode [default: %(default)s]")
    p.add_argument("--steps", type=int, default=10, help="timed steps [default: %(default)s]")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps [default: %(default)s]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[default: %(default)s]")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="more flags for every script, after --")
    opts = p.parse_args()
    if opts.one:
        return measure(*opts.one, opts)
    print(f"backbone {opts.backbone}, batch {opts.batch_size}, synthetic recipe crops and data backend, "
          f"{opts.steps} timed steps, "
          f"loader workers {opts.workers}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")
    print("| method | step img/s | floor img/s | step / floor | loader img/s | loader / step | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for method in opts.methods:
        if not (ROOT / f"{method}.py").exists():
            print(f"| {method} | (script not written yet) | | | | | |")
            continue
        results = {}
        for mode in ("floor", "step", "loader"):
            cmd = [sys.executable, __file__, "--one", method, mode, "--backbone", opts.backbone, "--batch-size",
                   str(opts.batch_size), "--workers", str(opts.workers), "--steps", str(opts.steps), "--warmup",
                   str(opts.warmup), "--device", opts.device, "--", *opts.extra]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"{method} {mode} failed:\n{proc.stderr[-2000:]}")
            results[mode] = json.loads(lines[-1])
        step, floor, loader = (results[m]["images_per_s"] for m in ("step", "floor", "loader"))
        peak = max(r["peak_mb"] for r in results.values())
        print(f"| {method} | {step:.0f} | {floor:.0f} | {step / floor:.2f} | {loader:.0f} | {loader / step:.2f} | {peak:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
