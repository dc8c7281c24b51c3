"""A method's real train() on a fake CUDA device, on the CPU: every device mismatch and host sync, by file:line.

Under torch's FakeTensorMode tensors have a device, a shape and a dtype but no data, and every op checks its
inputs' devices as the CUDA kernels would (a CPU tensor meeting a CUDA one fails, a 0-dim CPU tensor may, as on a
GPU). `fake_cuda()` makes this process look like one with a GPU to the code it runs, for as long as the context
lasts; everything it patches is put back on exit, so nothing leaks into the next test:

- torch.cuda.is_available / is_bf16_supported / set_device / _lazy_init report a GPU and initialise nothing:
  Run picks cuda:0, autocast and the fp16 GradScaler switch on. The fake mode itself is told there is no GPU
  (avoid_device_init), so it installs a no-op CUDA device guard and never runs a real op on CUDA;
- datasets, the EpochSampler and the evaluation loaders run with the modes off (real values on the CPU, as in
  a real run; the eval loaders unpinned, since pinning needs a driver);
- autograd records graphs on fake CUDA tensors but its engine cannot run them, so Tensor.backward gives every
  leaf of the loss's graph that requires a gradient a zero one: forward, loss, GradScaler, clipping, optimizer
  and momentum paths are traced with the real parameter sets, shapes, dtypes and devices;
- nn.Module._apply (model.to) builds new Parameters, since torch swaps a fake parameter in place and the fake
  mode's weak references forbid it; copy.deepcopy copies fake tensors without their __dict__;
  torch.Generator(device="cuda") is a CPU generator that reports cuda:0; checkpoint files are not written
  (no data to write) and Run.read_flags, after its real ops, reports finite losses and no signal;
- the project's functools caches (device_augment's constants per device) are emptied on entry and exit; the cuDNN
  and TF32 flags and the signal handlers a Run sets are put back. What stays is torch's own: the fake mode's
  dispatch cache and the no-op CUDA device guard it installs on any machine without a GPU.

`Trace`, a TorchDispatchMode above the fake mode, records each host sync on a CUDA tensor as (where, what,
file:line): .item(), bool(), float(), int(), .tolist(), the data-dependent ops of bench/step_ops.py (nonzero,
boolean masks, ...), a device-to-host copy, a blocking host-to-device copy, torch.tensor(data, device=cuda), a
CPU index tensor into a CUDA one.
`where` is "setup", a step's number (from the loader's next() for that step to the next one) or "end" (after
the loop: evaluation, summary, save). A read returns a stand-in value (0., 1 or False), a data-dependent op the
shapes of a full selection, so a run goes on past the syncs it is allowed (log steps, epoch ends). A device
mismatch (the fake mode's check, and the Trace's own for the foreach ops the fake mode lets through) raises
DeviceMismatch, naming the project's line that made the op.
"""
import contextlib
import importlib
import math
import os
import signal
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench.step_ops as step_ops  # noqa: E402  (the sync ops and the method flags of tests/test_step_ops.py)
from common import augment, checkpoint, data, run as run_module  # noqa: E402

DEVICE = torch.device("cuda:0")
_PROJECT, _THIS_FILE = str(ROOT) + os.sep, str(Path(__file__).resolve())
_Generator = torch.Generator


class DeviceMismatch(AssertionError):
    """An op whose tensors sit on different devices: a crash on a real GPU."""


def caller():
    """'file:line' of the innermost frame of the project's code (not torch, not this file), and of the method
    script's frame when that one is further out: "common/optim.py:40 via byol.py:120"."""
    frames, frame = [], sys._getframe(1)
    while frame:
        name = frame.f_code.co_filename
        if name.startswith(_PROJECT) and name != _THIS_FILE:
            frames.append(f"{os.path.relpath(name, ROOT)}:{frame.f_lineno}")
        frame = frame.f_back
    script = next((f for f in frames if os.sep not in f), None)  # the method scripts sit at the root
    inner = frames[0] if frames else "?"
    return inner if script in (None, inner) else f"{inner} via {script}"


def _on_cuda(x):
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def _stand_in(dtype):
    """What reading a fake value gives: False, 1 for integers (so that a kNN's k is not 0), or 0.0."""
    return False if dtype == torch.bool else 0.0 if dtype.is_floating_point or dtype.is_complex else 1


def _nested(shape, value):
    return value if not shape else [_nested(shape[1:], value) for _ in range(shape[0])]


def _as_if_all_selected(func, args, kwargs):
    """A data-dependent op's result (its size depends on values a fake tensor lacks, and on CUDA the host waits to
    read them) with the shape of a full selection: nonzero as if every element were nonzero, boolean masks as if
    all True (index 0 everywhere), bincount as if every value were below its minlength."""
    name = str(func.overloadpacket)
    if name == "aten.nonzero":
        return torch.zeros(args[0].numel(), args[0].dim(), dtype=torch.long, device=args[0].device)
    if name == "aten.bincount":  # as if every value were below minlength
        weights = args[1] if len(args) > 1 else kwargs.get("weights")
        minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
        dtype = torch.long if weights is None else weights.dtype
        return torch.zeros(max(minlength, 1), dtype=dtype, device=args[0].device)
    if name == "aten.masked_select":
        return args[0].new_empty(math.prod(torch.broadcast_shapes(args[0].shape, args[1].shape)))
    if step_ops._is_bool_index(func, args):  # each k-dim mask becomes k index tensors of its numel
        indices = []
        for index in args[1]:
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                indices += [torch.zeros(index.numel(), dtype=torch.long, device=index.device)] * index.dim()
            else:
                indices.append(index)
        return func(args[0], indices, *args[2:], **kwargs)
    raise NotImplementedError(f"the trace cannot go on past {name}")


_COPIES = {"aten._to_copy", "aten.copy_", "aten._copy_from", "aten._copy_from_and_resize", "aten.lift_fresh"}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


def _tensors(args, kwargs):
    """The tensors among an op's arguments, and in its lists of tensors (foreach ops, index)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (x for x in arg if isinstance(x, torch.Tensor))


class Trace(TorchDispatchMode):
    """Records host syncs on CUDA tensors as (where, what, file:line) and the ops run at each `where`; turns a
    device mismatch into DeviceMismatch."""

    def __init__(self):
        super().__init__()
        self.where, self.syncs, self.ops = "setup", [], Counter()

    def sync(self, what):
        self.syncs.append((self.where, what, caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[self.where] += 1
        if name == "aten._pin_memory":  # not implemented for fake tensors; pinned or not, the next copy is alike
            return args[0].clone()
        if name == "aten._local_scalar_dense" and _on_cuda(args[0]):  # .item(), bool(), float(), int()
            self.sync("item/bool/float/int")
            return _stand_in(args[0].dtype)
        # CUDA kernels take CPU tensors only as 0-dim scalars; the fake mode checks most ops, not foreach ones.
        devices = {t.device.type for t in _tensors(args, kwargs) if t.dim() or t.device.type != "cpu"}
        if {"cuda", "cpu"} <= devices and name not in _COPIES:
            if name not in _INDEXING:
                raise DeviceMismatch(f"{caller()}: {name}: CPU and CUDA tensors in one op")
            self.sync("CPU index tensor copied to the device")  # indexing a CUDA tensor by a CPU one copies it
        data_dependent = name in step_ops.SYNC_OPS or step_ops._is_bool_index(func, args)
        if data_dependent and _on_cuda(args[0]):
            self.sync(name)
        elif name == "aten._to_copy" and "device" in kwargs:
            self._copy(args[0].device, torch.device(kwargs["device"]), kwargs.get("non_blocking", False))
        elif name == "aten.copy_":
            self._copy(args[1].device, args[0].device, args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        try:
            return func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            if name == "aten._local_scalar_dense":  # a CPU value the fake mode does not know (not a constant)
                return _stand_in(args[0].dtype)
            if not data_dependent and _on_cuda(args[0]):
                self.sync(name)  # an op the CPU count does not know (bincount): its output size is read back
            return _as_if_all_selected(func, args, kwargs)
        except RuntimeError as e:
            message = str(e).splitlines()[0]
            if "device" in message and ("same device" in message or "two devices" in message):
                raise DeviceMismatch(f"{caller()}: {name}: {message}") from None
            raise

    def _copy(self, source, target, non_blocking):
        if source.type == "cuda" and target.type == "cpu":
            self.sync("device-to-host copy")
        elif source.type == "cpu" and target.type == "cuda" and not non_blocking:
            self.sync("blocking host-to-device copy")


class _FakeMode(FakeTensorMode):
    """The fake mode as on a machine without a GPU, whatever the patched torch.cuda.is_available says: a no-op
    CUDA device guard (autograd can record graphs on fake CUDA tensors), no real constant moved to a GPU."""
    avoid_device_init = True


@contextlib.contextmanager
def outside_fake():
    """Real tensors, untraced, for a while (data loading, the sampler), as the CPU side of a real run has."""
    with _disable_current_modes():
        yield


class _RealLoader:
    """An evaluation loader whose batches are loaded outside the fake mode."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        with outside_fake():
            batches = iter(self.loader)
        while True:
            with outside_fake():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def _zero_gradients(loss, *args, **kwargs):
    """Tensor.backward's stand-in (the autograd engine needs a real device): every leaf of the loss's graph that
    requires a gradient gets a zero one, so the optimizer sees the parameters a real backward would give it."""
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node holds its parameter
        if leaf is not None and leaf.requires_grad and leaf.grad is None:
            leaf.grad = torch.zeros_like(leaf)
        nodes.extend(next_node for next_node, _ in node.next_functions)


def _module_apply(module, fn, recurse=True):
    """nn.Module._apply (model.to) with new Parameters, shared ones staying shared."""
    new = {}
    for m in module.modules() if recurse else [module]:
        for key, p in m._parameters.items():
            if p is not None:
                if id(p) not in new:
                    with torch.no_grad():
                        new[id(p)] = nn.Parameter(fn(p), p.requires_grad)
                m._parameters[key] = new[id(p)]
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = fn(b)
    return module


def _fake_deepcopy(tensor, memo):
    """copy.deepcopy of a fake tensor (target networks): torch's copies its __dict__ too, whose real constant (a
    buffer made by torch.tensor, as BatchNorm's num_batches_tracked) cannot be set into a fake tensor."""
    if id(tensor) not in memo:
        new = tensor.detach().clone()
        memo[id(tensor)] = nn.Parameter(new, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new
    return memo[id(tensor)]


class _CudaGenerator(_Generator):
    """torch.Generator(device="cuda") needs a driver: a CPU generator that reports cuda:0 (fake ops ignore it)."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls) if torch.device(device).type == "cuda" else _Generator(device)

    def __init__(self, device="cpu"):
        self._device = DEVICE

    @property
    def device(self):
        return self._device


def _clear_project_caches():
    """Empty the project's functools caches (device_augment's constants, built once per device): fake tensors must
    not outlive the trace, and every trace builds them afresh, so it sees their first-use copies alike."""
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and module.__file__.startswith(_PROJECT):
            for value in list(vars(module).values()):
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


@contextlib.contextmanager
def fake_cuda(trace=None):
    """The fake GPU (see the module's docstring), recording into `trace` (a new Trace by default); yields it."""
    trace = trace or Trace()
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor
    real_sampler_iter, real_load, real_eval_loader = data.EpochSampler.__iter__, data.load_dataset, data.eval_loader
    real_pretrain_transform = augment.pretrain_transform
    real_read_flags = run_module.Run.read_flags

    def tensor(*args, device=None, **kwargs):  # torch.tensor(data, device="cuda") copies from the host, blocking
        if device is not None and torch.device(device).type == "cuda":
            trace.sync("torch.tensor(host data, device=cuda)")
            return real_tensor(*args, **kwargs).to(device, non_blocking=True)  # recorded once, here
        return real_tensor(*args, device=device, **kwargs)

    def as_tensor(x, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda" and not _on_cuda(x):
            trace.sync("torch.as_tensor(host data, device=cuda)")
            return real_as_tensor(x, *args, **kwargs).to(device, non_blocking=True)  # recorded once, here
        return real_as_tensor(x, *args, device=device, **kwargs)

    def tolist(self):  # FakeTensor's own would read each element: one sync, counted here
        if self.device.type == "cuda":
            trace.sync("Tensor.tolist")
        return _nested(self.shape, _stand_in(self.dtype))

    def sampler_iter(self):
        with outside_fake():
            return real_sampler_iter(self)

    def load_dataset(*args, **kwargs):
        with outside_fake():
            return real_load(*args, **kwargs)

    def pretrain_transform(*args, **kwargs):  # the health pass's views (run.health_loaders): host tensors
        with outside_fake():
            return real_pretrain_transform(*args, **kwargs)

    def eval_loader(*args, pin_memory=False, **kwargs):
        return _RealLoader(real_eval_loader(*args, **kwargs))

    def read_flags(self, values=()):
        means, _, _ = real_read_flags(self, values)
        return means, None, False

    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())  # Run sets them for CUDA
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}  # and these
    with contextlib.ExitStack() as stack:
        for patch in [
            mock.patch("torch.cuda.is_available", lambda: True),
            mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
            mock.patch("torch.cuda.set_device", lambda device: None),
            mock.patch("torch.cuda._lazy_init", lambda: None),
            mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.zeros(0, dtype=torch.uint8)),
            mock.patch("torch.Generator", _CudaGenerator),
            mock.patch("torch.tensor", tensor), mock.patch("torch.as_tensor", as_tensor),
            mock.patch.object(FakeTensor, "tolist", tolist),
            mock.patch.object(FakeTensor, "__deepcopy__", _fake_deepcopy, create=True),
            mock.patch.object(torch.Tensor, "backward", _zero_gradients),
            mock.patch.object(nn.Module, "_apply", _module_apply),
            mock.patch.object(data.EpochSampler, "__iter__", sampler_iter),
            mock.patch.object(data, "load_dataset", load_dataset),
            mock.patch.object(data, "eval_loader", eval_loader),
            mock.patch.object(augment, "pretrain_transform", pretrain_transform),
            mock.patch.object(run_module.Run, "read_flags", read_flags),
            mock.patch.object(checkpoint, "save_atomic", lambda obj, path: None),
        ]:
            stack.enter_context(patch)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # FakeTensor.data_ptr, GradScaler and autocast notes
        stack.callback(_clear_project_caches)
        _clear_project_caches()
        stack.enter_context(_FakeMode(allow_non_fake_inputs=True))
        stack.enter_context(trace)
        try:
            yield trace
        finally:
            stack.close()
            (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             precision) = flags
            torch.set_float32_matmul_precision(precision)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def trace_train(method, extra=(), steps=3):
    """`method`'s train() for `steps` steps (--log-every `steps`: the last one logs) and the end-of-run evaluation
    (probe, features, kNN unless --knn-every -1 in `extra`) on the fake GPU, at tiny sizes with the device
    backend; returns the Trace. The command line is that of bench/step_ops.py's count_steps, made smaller."""
    module = importlib.import_module(method)
    trace = Trace()
    real_progress, real_meter = run_module.Run.progress, run_module.Run.meter

    class NumberedBar:
        """The progress bar; once a meter counts its steps (the training loop, not a pass like DeepCluster V2's
        bank filling), trace.where is the number of the step whose batch is loaded or trained on."""

        def __init__(self, bar):
            self.bar, self.counted = bar, False

        def __getattr__(self, name):  # set_postfix, close
            return getattr(self.bar, name)

        def __iter__(self):
            if not self.counted:
                yield from self.bar
                return
            try:
                trace.where = 1
                for number, batch in enumerate(self.bar, 1):
                    yield batch
                    trace.where = number + 1  # the next step begins with the loader's next()
            finally:  # the loader is done or the loop left it (max_steps): CPython closes this at once
                trace.where = "end"

    def progress(self, iterable, epoch):
        return NumberedBar(real_progress(self, iterable, epoch))

    def meter(self, epoch, bar):
        bar.counted = True
        return real_meter(self, epoch, bar)

    with tempfile.TemporaryDirectory() as out:
        argv = ["--dataset", "synthetic", "--crop-size", "16", "--batch-size", "8", "--train-subset", str(8 * steps),
                "--epochs", "1", "--max-steps", str(steps), "--log-every", str(steps), "--knn-every", "0",
                "--umap-every", "-1", "--workers", "0", "--data-backend", "device", "--device", "cuda",
                "--out-dir", out, *step_ops.METHOD_FLAGS.get(method, []), *extra]
        args = module.parse_args(argv)
        with mock.patch.object(run_module.Run, "progress", progress), \
                mock.patch.object(run_module.Run, "meter", meter), fake_cuda(trace):
            module.train(args)
    return trace
