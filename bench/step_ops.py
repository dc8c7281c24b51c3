"""Host syncs and dispatched ops of one training step of every method, counted on the CPU.

On a fast GPU a CIFAR ResNet-18 step computes in a few ms, so two things decide its speed that a CPU
can count: **host syncs** (the host waits until the device has finished everything queued: `.item()`,
`bool(t)`, `float(t)`, `nonzero`, boolean-mask indexing, `.tolist()`, a tensor built from Python data)
and **dispatched ops** (each one kernel launch or more, the proxy for launch overhead). The real script
runs in this process (its heads, loss, optimizer, momentum update, probe, meter) under a
`TorchDispatchMode` that counts every aten op, split by phase:

  data       the loader's next batch (device backend: the augmentation; torchvision: only the copy to
             the device, since the augmentation runs in worker processes there)
  fwd+bwd    forward, loss and backward (everything between the batch and the optimizer)
  optimizer  optimizer.step (LARS' trust ratios included)
  momentum   the momentum (target) network update
  rest       lr schedule, the meter (loss accumulated on the device), the probe's bookkeeping

Two steps are counted: a step that does not log (target: 0 syncs) and a --log-every step (target: at
most 2, reading the loss, the NaN flag and the stop flag at once). A sync on CUDA is a CPU count here:
`aten._local_scalar_dense` (item, bool, float, int), `aten.nonzero`, `aten.masked_select`, indexing or
index_put with a boolean mask, `Tensor.tolist`, and `torch.tensor` / `torch.as_tensor` calls (Python data
copied to the device).

    python bench/step_ops.py                                      # all methods, both backends, ResNet-18 32px
    python bench/step_ops.py --methods byol,swav --backends device --backbone resnet_narrow --crop-size 16
"""
import argparse
import contextlib
import importlib
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

METHODS = ["barlow_twins", "byol", "deepclusterv2", "dino", "mocov2plus", "nnclr", "ressl", "simclr", "supcon",
           "simsiam", "swav", "vicreg", "wmse", "mocov3", "nnbyol", "nnsiam", "vibcreg", "all4one", "mae"]
# What a method needs at the bench's small batches (op counts do not depend on the batch size).
METHOD_FLAGS = {"wmse": ["--whitening-size", "8", "--proj-output-dim", "4"], "mae": ["--backbone", "vit_tiny"]}
PHASES = ("data", "fwd+bwd", "optimizer", "momentum", "rest")
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_static", "aten.masked_select",
            "aten.masked_scatter", "aten.unique", "aten._unique2", "aten.unique_consecutive"}


def _is_bool_index(func, args):
    """aten.index / index_put with a boolean mask: the output size depends on the data."""
    name = str(func.overloadpacket)
    if name not in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class StepCounter(TorchDispatchMode):
    """Counts ops and syncs per phase while `recording`; `phase` is set by the patches in `patched`."""

    def __init__(self):
        super().__init__()
        self.phase, self.recording = "rest", False
        self.ops, self.syncs = Counter(), Counter()
        self.sync_names = []

    def count_sync(self, name):
        if self.recording:
            self.syncs[self.phase] += 1
            self.sync_names.append(f"{self.phase}: {name}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording:
            name = str(func.overloadpacket)
            self.ops[self.phase] += 1
            if name in SYNC_OPS or _is_bool_index(func, args):
                self.count_sync(name)
        return func(*args, **(kwargs or {}))

    def reset(self):
        self.ops, self.syncs, self.sync_names = Counter(), Counter(), []


@contextlib.contextmanager
def _phase(counter, name):
    before, counter.phase = counter.phase, name
    try:
        yield
    finally:
        counter.phase = before


@contextlib.contextmanager
def patched(counter, record_steps, backend):
    """Set the phase around the loader, backward, optimizer and momentum update; start recording after the
    meter's update of step s - 1 and stop after that of step s, for s in record_steps; yield results."""
    from common import optim, run as run_module
    results = {}
    originals = (run_module.Run.progress, run_module.StepMeter.update, optim.momentum_update, torch.Tensor.backward,
                 torch.Tensor.tolist, torch.tensor, torch.as_tensor)
    progress, update, momentum_update, backward, tolist, tensor, as_tensor = originals

    class PhasedBar:
        """The progress bar, iterated with the phase set to "data" around each next()."""

        def __init__(self, bar):
            self.bar = bar

        def __getattr__(self, name):  # set_postfix, close, ...
            return getattr(self.bar, name)

        def __iter__(self):
            iterator = iter(self.bar)
            while True:
                # torchvision backend: the views arrive augmented by worker processes, so next() is left out;
                # their copy to the device (run.to_device, after next()) counts in fwd+bwd.
                was = counter.recording
                counter.recording = was and backend == "device"
                try:
                    with _phase(counter, "data"):
                        batch = next(iterator)
                except StopIteration:
                    return
                finally:
                    counter.recording = was
                counter.phase = "fwd+bwd"
                yield batch

    def timed_progress(self, iterable, epoch):
        return PhasedBar(progress(self, iterable, epoch))

    def counted_update(self, step, *a, **kw):
        with _phase(counter, "rest"):
            stop = update(self, step, *a, **kw)
        if counter.recording:
            results[step] = (dict(counter.ops), dict(counter.syncs), list(counter.sync_names))
            counter.recording = False
        if step + 1 in record_steps:
            counter.reset()
            counter.recording = True
        return stop

    def counted_momentum(*a, **kw):
        with _phase(counter, "momentum"):
            return momentum_update(*a, **kw)

    def counted_backward(self, *a, **kw):
        with _phase(counter, "fwd+bwd"):
            return backward(self, *a, **kw)

    def counted_tolist(self):
        counter.count_sync("Tensor.tolist")
        return tolist(self)

    def counted_tensor(*a, **kw):
        counter.count_sync("torch.tensor")
        return tensor(*a, **kw)

    def counted_as_tensor(*a, **kw):
        counter.count_sync("torch.as_tensor")
        return as_tensor(*a, **kw)

    def pre_step(optimizer, args, kwargs):
        counter.phase = "optimizer"

    def post_step(optimizer, args, kwargs):
        counter.phase = "rest"

    hooks = [register_optimizer_step_pre_hook(pre_step),
             register_optimizer_step_post_hook(post_step)]
    run_module.Run.progress, run_module.StepMeter.update = timed_progress, counted_update
    optim.momentum_update = counted_momentum
    torch.Tensor.backward, torch.Tensor.tolist = counted_backward, counted_tolist
    torch.tensor, torch.as_tensor = counted_tensor, counted_as_tensor
    try:
        yield results
    finally:
        (run_module.Run.progress, run_module.StepMeter.update, optim.momentum_update, torch.Tensor.backward,
         torch.Tensor.tolist, torch.tensor, torch.as_tensor) = originals
        for h in hooks:
            h.remove()


def count_steps(method, backend="device", backbone="resnet18", crop_size=32, batch_size=32, extra=()):
    """Run `method` for 4 steps with --log-every 2; returns {step: (ops per phase, syncs per phase, sync names)}
    for step 3 (does not log) and step 4 (logs)."""
    module = importlib.import_module(method)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--dataset", "synthetic", "--backbone", backbone, "--crop-size", str(crop_size),
                "--batch-size", str(batch_size), "--train-subset", str(max(8 * batch_size, 512)), "--epochs", "1",
                "--max-steps", "4", "--log-every", "2", "--knn-every", "-1", "--umap-every", "-1", "--workers", "0",
                "--data-backend", backend, "--device", "cpu", "--precision", "fp32", "--out-dir", out,
                *METHOD_FLAGS.get(method, []), *extra]
        counter = StepCounter()
        evaluate, module.evaluate = module.evaluate, lambda *a, **k: {}  # the end-of-run evaluation is not counted
        try:
            with patched(counter, {3, 4}, backend) as results, counter:
                module.train(module.parse_args(argv))
        finally:
            module.evaluate = evaluate
    return results


def table(rows, title):
    lines = [f"### {title}", "",
             "| method | syncs, step without log | syncs, log step | ops/step | " + " | ".join(PHASES) + " |",
             "|---|---|---|---|" + "---|" * len(PHASES)]
    for method, res in rows:
        ops, syncs, names = res[3]
        _, log_syncs, _ = res[4]
        lines.append(f"| {method} | {sum(syncs.values())} | {sum(log_syncs.values())} | {sum(ops.values())} | "
                     + " | ".join(str(ops.get(p, 0)) for p in PHASES) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method scripts [default: all]")
    p.add_argument("--backends", default="torchvision,device", help="data backends [default: %(default)s]")
    p.add_argument("--backbone", default="resnet18", help="[default: %(default)s]")
    p.add_argument("--crop-size", type=int, default=32, help="[default: %(default)s]")
    p.add_argument("--batch-size", type=int, default=32, help="[default: %(default)s] (op counts do not depend on it)")
    p.add_argument("--show-syncs", action="store_true", help="print where each counted sync happened")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    methods = [m for m in args.methods.split(",") if (ROOT / f"{m}.py").exists()]
    for backend in args.backends.split(","):
        rows = []
        for method in methods:
            try:
                res = count_steps(method, backend, args.backbone, args.crop_size, args.batch_size)
            except Exception as e:  # one method that cannot run at these sizes must not hide the others
                print(f"| {method} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |", file=sys.stderr)
                continue
            rows.append((method, res))
            if args.show_syncs:
                for step in (3, 4):
                    for name in res[step][2]:
                        print(f"  {method} step {step} sync: {name}", file=sys.stderr)
        print(table(rows, f"{backend} backend, {args.backbone} at {args.crop_size}px, one step (ops dispatched)"))
        print()


if __name__ == "__main__":
    main()
