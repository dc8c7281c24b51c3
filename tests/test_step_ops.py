"""No host sync in a training step: every method's step runs under bench/step_ops.py's counting mode.

A sync (`.item()`, `bool(t)`, `nonzero`, a boolean mask, `.tolist()`, a tensor built from Python data) makes the
host wait for the GPU; on a step that does not log there must be none, on a --log-every step at most two."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("step_ops", ROOT / "bench" / "step_ops.py")
step_ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_ops)
METHODS = [m for m in step_ops.METHODS if (ROOT / f"{m}.py").exists()]


def test_the_counter_sees_each_kind_of_sync():
    """The counter must catch what it claims to, or the tests below could not fail."""
    x = torch.arange(6.0)
    counter = step_ops.StepCounter()
    counter.recording = True
    with step_ops.patched(counter, set(), "device"), counter:
        x.sum().item()
        bool(x[0] > 1)
        x.nonzero()
        x[x > 2]
        x.tolist()
        torch.tensor([1.0, 2.0])
        torch.where(x > 2, x, 0.0).sum()  # the sync-free way: not counted
    assert sum(counter.syncs.values()) == 6, counter.sync_names


@pytest.mark.parametrize("method", METHODS)
def test_training_step_has_no_host_sync(method):
    steps = step_ops.count_steps(method, "device", "resnet_narrow", 16, 16)
    ops, syncs, names = steps[3]
    assert sum(ops.values()) > 100  # the step really ran under the counter
    assert not names, f"{method}: host syncs in a step that does not log: {names}"
    _, log_syncs, log_names = steps[4]
    assert sum(log_syncs.values()) <= 2, f"{method}: more than 2 syncs on a log step: {log_names}"


def test_torchvision_backend_step_has_no_host_sync():
    ops, syncs, names = step_ops.count_steps("byol", "torchvision", "resnet_narrow", 16, 16)[3]
    assert not names, names
