"""Every method's real train() on a fake CUDA device (tests/fake_cuda.py): no CPU/CUDA device mismatch anywhere,
no host sync in a training step that does not log.

Two configurations per method, 3 steps each with --log-every 3, and the end-of-run evaluation:
  bf16  the synthetic recipe's optimizer (AdamW; Adam for W-MSE), a ViT backbone (vit_tiny) for DINO, MoCo v3
        and MAE, the full evaluation (probe, features, kNN);
  fp16  the GradScaler with the optimizer of the method's CIFAR recipe (LARS for 12 methods, SGD for MoCo v2+,
        NNSiam, ReSSL, SimSiam and SupCon, Adam for W-MSE, AdamW for MAE) and --grad-clip 1; multi-crop (two
        small crops) for the methods that take it; the probe's evaluation alone.
Step 1 may hold one-time syncs (constants the device augmentation builds on first use and caches per device);
step 2 must hold none; step 3, the log step, at most two (as tests/test_step_ops.py); the evaluation may sync.
"""
import importlib
import signal
import sys
from pathlib import Path

import pytest
import torch

import fake_cuda
from fake_cuda import DEVICE, step_ops

ROOT = Path(__file__).resolve().parents[1]
METHODS = [m for m in step_ops.METHODS if (ROOT / f"{m}.py").exists()]
MULTI_CROP = ("byol", "deepclusterv2", "dino", "simclr", "supcon", "swav")  # the others refuse --num-small-crops
VIT = ("dino", "mocov3")  # and MAE, a ViT in any configuration (step_ops.METHOD_FLAGS)
# Smaller than the recipes where the code path stays the same: k-means of 8 clusters over the 24 images of 3 steps
# and one iteration, one decoder block; ViTs get 2 blocks (below) instead of 12.
SMALL = {"deepclusterv2": ["--num-prototypes", "8", "8", "8", "--kmeans-iters", "1"], "mae": ["--decoder-depth", "1"]}
VIT_BLOCKS = 2


def configuration(method, precision):
    flags = ["--precision", precision, *SMALL.get(method, [])]
    if precision == "bf16":
        return flags + (["--backbone", "vit_tiny"] if method in VIT else [])
    recipe_optimizer = importlib.import_module(method).RECIPES["cifar"]["optimizer"]
    return flags + ["--optimizer", recipe_optimizer, "--grad-clip", "1", "--knn-every", "-1"] + \
        (["--num-small-crops", "2"] if method in MULTI_CROP else [])


def check_steps(trace, method):
    """Three steps and the evaluation ran under the trace; no sync in step 2, at most two in the log step."""
    assert all(trace.ops[where] > 0 for where in (1, 2, 3, "end")), f"{method}: not traced throughout: {trace.ops}"
    syncs = {step: [f"{what} at {site}" for where, what, site in trace.syncs if where == step] for step in (1, 2, 3)}
    assert not syncs[2], f"{method}: host syncs in a step that does not log: {syncs[2]} (step 1: {syncs[1]})"
    assert len(syncs[3]) <= 2, f"{method}: more than 2 syncs on a log step: {syncs[3]}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_method_on_fake_cuda(method, precision, monkeypatch):
    from common import backbones
    timm_kwargs = backbones.timm_kwargs
    monkeypatch.setattr(backbones, "timm_kwargs", lambda name, size: {**timm_kwargs(name, size), "depth": VIT_BLOCKS})
    check_steps(fake_cuda.trace_train(method, configuration(method, precision)), method)


def test_trace_records_each_sync_and_leaves_nothing_behind():
    """Each kind of sync is recorded with the line that made it, sync-free ops are not, a mismatch raises; on exit
    every patch and flag is back as it was."""
    state = lambda: (torch.cuda.is_available, torch.Generator, torch.tensor, torch.nn.Module._apply,
                     torch.Tensor.backward, torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
                     signal.getsignal(signal.SIGINT))
    before = state()
    with fake_cuda.fake_cuda() as trace:
        x = torch.arange(6.0).to(DEVICE, non_blocking=True)  # a non-blocking copy from the host: no sync
        torch.where(x > 2, x, 0.0).sum() + torch.ones(())  # a 0-dim CPU tensor may meet a CUDA one, as on a GPU
        first = sys._getframe().f_lineno
        x.sum().item()
        bool(x[0])
        float(x[0])
        int(x[0])
        x.tolist()
        x.nonzero()
        x[x > 2]
        x.cpu()
        torch.ones(2).to(DEVICE)
        torch.tensor([1.0], device=DEVICE)
        x[torch.zeros(2, dtype=torch.long)]
        with pytest.raises(fake_cuda.DeviceMismatch, match=r"tests/test_fake_cuda\.py:\d+: aten\.add"):
            x + torch.ones(6)
        with pytest.raises(fake_cuda.DeviceMismatch, match=r"tests/test_fake_cuda\.py:\d+: aten\._foreach_mul_"):
            torch._foreach_mul_([x], [torch.ones(6)])  # the fake mode itself does not check foreach ops
    expected = ["item/bool/float/int"] * 4 + ["Tensor.tolist", "aten.nonzero", "aten.index", "device-to-host copy",
                                             "blocking host-to-device copy", "torch.tensor(host data, device=cuda)",
                                             "CPU index tensor copied to the device"]
    assert trace.syncs == [("setup", what, f"tests/test_fake_cuda.py:{first + i}") for i, what in
                           enumerate(expected, 1)]
    assert state() == before and torch._C._len_torch_dispatch_stack() == 0 and torch.ones(1).device.type == "cpu"


def test_planted_arange_without_device_fails(monkeypatch):
    """torch.arange(n) without device= in the device augmentation: a CPU tensor in a CUDA batch's resize. The run
    fails in its first step, and what it had set (signal handlers, cached fake constants) is undone."""
    from common import device_augment
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(device_augment, "_pixel_centres", lambda size, device: torch.arange(size) + 0.5)
    with pytest.raises(fake_cuda.DeviceMismatch, match=r"common/device_augment\.py:\d+ via simclr\.py:\d+"):
        fake_cuda.trace_train("simclr", ["--precision", "bf16"])
    assert signal.getsignal(signal.SIGINT) is handler and device_augment._constant.cache_info().currsize == 0


def test_gradscaler_sync_of_a_plain_optimizer_is_caught(monkeypatch):
    """fp16 with torch's own SGD (no `_step_supports_amp_scaling`): GradScaler.step reads the inf flag back with
    .item() every step (issue 20, item 1); the trace names the line of run.optimizer_step that calls it."""
    from common import optim, run
    build = optim.build_optimizer

    def torch_sgd(name, groups, lr, weight_decay, **kwargs):
        build("sgd", groups, lr, weight_decay)  # fills each group's lr and base_lr
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, foreach=True)
    monkeypatch.setattr(optim, "build_optimizer", torch_sgd)
    trace = fake_cuda.trace_train("simclr", configuration("simclr", "fp16") + ["--num-small-crops", "0"])
    with pytest.raises(AssertionError, match="host syncs in a step that does not log"):
        check_steps(trace, "simclr")
    step_line = next(i for i, text in enumerate(Path(run.__file__).read_text().splitlines(), 1)
                     if "run.scaler.step(optimizer)" in text)
    assert ((2, "item/bool/float/int", f"common/run.py:{step_line} via simclr.py:") in
            [(where, what, site[:site.index("via simclr.py:") + 14]) for where, what, site in trace.syncs])
