"""--accumulate-steps (Lightning's accumulate_grad_batches, common.run.Accumulation) and --lars-eta.

Why accumulation equals a larger batch: with a loss that is a mean over the batch and a model without
BatchNorm (each sample's output depends on that sample alone), the gradient of the mean over two batches of B
is (grad mean(batch 1) + grad mean(batch 2)) / 2: exactly what two backwards of loss / 2 add up. Any optimizer
then takes the same step from the same gradient, so N = 2 on batches of B equals one step on the 2B batch.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import byol
from common import cli, optim
from common.run import Accumulation, optimizer_step
from conftest import ROOT, TINY, torchrun

METHODS = sorted(p.stem for p in ROOT.glob("*.py") if "def parse_args(" in p.read_text())


def fake_run(accumulation):
    """What optimizer_step uses of a Run."""
    return SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False), watch_finite=lambda *args: None,
                           accumulation=accumulation, args=SimpleNamespace(freeze_backbone_epochs=0))


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_two_accumulated_batches_step_like_one_batch_of_both(name):
    # float64: the two gradients differ only by the order of summation, ~1e-16 relative; 1e-12 leaves room.
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).double()
    small, large = make(), make()
    large.load_state_dict(small.state_dict())
    initial = small[0].weight.detach().clone()
    x, y = torch.randn(4, 8, 5, dtype=torch.float64), torch.randn(4, 8, 3, dtype=torch.float64)
    loss = lambda model, i: ((model(x[i]) - y[i]) ** 2).mean()  # a mean over the batch's rows
    opts = [optim.build_optimizer(name, optim.param_groups(m, 1e-3, exclude_1d=name == "lars"), 0.1, 1e-3,
                                  eta=0.001, lars_clip=False) for m in (small, large)]
    accumulated, single = fake_run(Accumulation(2, 4)), fake_run(Accumulation(1, 2))
    stepped = [optimizer_step(accumulated, loss(small, i), opts[0], 0, i // 2) for i in range(4)]
    assert stepped == [False, True, False, True]  # two optimizer steps: momentum and a fresh gradient per group
    for step in range(2):
        union = ((large(x[2 * step:2 * step + 2].flatten(0, 1)) - y[2 * step:2 * step + 2].flatten(0, 1)) ** 2).mean()
        assert optimizer_step(single, union, opts[1], 0, step)
    for a, b in zip(small.parameters(), large.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert not torch.allclose(small[0].weight, initial)  # the steps moved the weights


def test_groups_count_from_the_epoch_start_and_its_last_batch_steps():
    # 7 batches, N = 3: the optimizer steps after batches 3, 6 and 7 (a group of 1), ceil(7 / 3) = 3 steps an epoch.
    acc = Accumulation(3, 7)
    assert acc.steps_per_epoch == 3
    ddp = SimpleNamespace()
    acc.watch(ddp)
    step, pattern, sizes, synced, numbers = 0, [], [], [], []
    for epoch in range(2):
        for _ in range(7):
            synced.append(ddp.require_backward_grad_sync)  # what DDP reads in this batch's forward
            numbers.append(acc.batch_number(step))  # per-batch seeds
            stepping = acc.add_batch(epoch, step)
            acc.sync_next_batch()
            pattern.append(stepping)
            if stepping:
                sizes.append(acc.last_step_batches)
                step += 1
    one_epoch = [False, False, True, False, False, True, True]
    assert pattern == one_epoch * 2 and step == 6 and sizes == [3, 3, 1] * 2
    assert synced == pattern  # only the batches that step all-reduce their gradients
    assert numbers == [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15]  # unique: step x 3 + the group's batches before
    assert Accumulation(1, 7).batch_number(5) == 5  # no accumulation: the step, as the seeds were before
    # Resumed after the first step of epoch 1 (last.pt is written after a step, never mid-group): the loader skips
    # the group's 3 batches and the rest of the epoch groups as before.
    resumed = Accumulation(3, 7)
    assert [resumed.add_batch(1, 4 + (k >= 3)) for k in range(4)] == one_epoch[3:]
    assert Accumulation(1, 5).add_batch(0, 0) and Accumulation(4, 1).add_batch(0, 0)


def test_ddp_ranks_all_reduce_only_the_stepping_batches_and_match_one_process(tmp_path):
    """tests/dist_accumulation.py: 2 gloo ranks, N = 3 over 7 batches an epoch, against one process on the union."""
    torchrun("tests/dist_accumulation.py", tmp_path)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # float64, a few dozen operations per parameter: rounding ~1e-16 relative; without the final all-reduce
        # (or with the all-reduce skipped everywhere) the ranks differ from the union by ~0.1.
        assert result["diff"] < 1e-12 and result["steps"] == 6 and result["synced"] == 6, result


def test_byol_counts_optimizer_steps_and_resumes_mid_epoch(tmp_path):
    """48 images in batches of 16, N = 2: steps after batches 2 and 3 (a group of 1 ends the epoch)."""
    heads = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32"]
    argv = lambda out, *extra: [*TINY, "--train-subset", "48", "--epochs", "2", "--accumulate-steps", "2", *heads,
                                "--warmup-epochs", "0.5", "--out-dir", str(out), *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    byol.main(argv(straight))
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["type"] == "step"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and [m["epoch"] for m in steps] == [0, 0, 1, 1]
    # synthetic recipe's lr 2e-3 for 256 images, scaled by 16 images x 1 process x 2 batches / 256; a warmup of
    # int(0.5 x 2) = 1 step from 3e-5, then the cosine over the other 3; tau 0.99 -> 1 over the 4 steps.
    base = 2e-3 * 16 * 2 / 256
    expected_lr = [3e-5] + [base * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(3)]
    assert [m["lr"] for m in steps] == pytest.approx(expected_lr, rel=1e-9)
    expected_tau = [1 - 0.01 * (math.cos(math.pi * s / 4) + 1) / 2 for s in range(4)]
    assert [m["tau"] for m in steps] == pytest.approx(expected_tau, rel=1e-12)
    assert json.loads((straight / "args.json").read_text())["global_batch_size"] == 32
    # Stopped after step 1 (batch 2 of epoch 0), resumed: the same weights as the uninterrupted run.
    byol.main(argv(resumed, "--max-steps", "1"))
    byol.main(argv(resumed))
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_lars_eta_and_clip_reach_every_scripts_optimizer(monkeypatch, tmp_path):
    """Each script passes --lars-eta and --lars-clip to build_optimizer (caught there: no training)."""
    import importlib
    seen = {}

    class Built(Exception):
        pass

    def capture(name, groups, lr, weight_decay, momentum=0.9, eta=0.02, lars_clip=True):
        seen[method] = (eta, lars_clip)
        raise Built

    monkeypatch.setattr(optim, "build_optimizer", capture)
    for method in METHODS:
        module = importlib.import_module(method)
        extra = {"deepclusterv2": ["--num-prototypes", "8"],  # what 16 images allow
                 "wmse": ["--whitening-size", "16", "--proj-output-dim", "8"]}.get(method, [])
        args = module.parse_args([*TINY, "--train-subset", "16", "--lars-eta", "0.005", "--no-lars-clip", *extra,
                                  "--out-dir", str(tmp_path / method)])
        with pytest.raises(Built):
            module.train(args)
    assert seen == {m: (0.005, False) for m in METHODS}
    assert (cli.GENERIC_DEFAULTS["lars_eta"], cli.GENERIC_DEFAULTS["lars_clip"]) == (0.02, True)
