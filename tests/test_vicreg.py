"""VICReg: loss values derived by hand (the two views' variance terms summed as solo-learn does, averaged as the
official code does behind --variance-form mean), the recipe and flags, two processes = one process on the global
batch, resume and DDP end to end."""
import json
import math

import pytest
import torch

from common import cli
from common.backbones import load_backbone
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from vicreg import VICReg, parse_args, vicreg_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16"]
# Z: 4 rows, features of mean 0, unbiased variance 4/3, uncorrelated (sum_n z_n0 z_n1 = 0).
# W: both features equal, mean 0, unbiased variance 4/3, covariance 4/3.
Z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
W = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])


def tiny(out_dir, *extra):
    return ["vicreg.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_values():
    # identical, uncorrelated views with std sqrt(4/3 + 1e-4) > 1: every term is 0
    assert vicreg_loss(Z, Z).item() == pytest.approx(0.0, abs=1e-7)
    # shifting one view by 1 leaves variance and covariance (centred) unchanged: 25 * MSE = 25 * 1
    assert vicreg_loss(Z, Z + 1).item() == pytest.approx(25.0)
    # W's covariance matrix is [[4/3, 4/3], [4/3, 4/3]]: off-diagonal squares 2 * 16/9, / D = 2 -> 16/9
    # for each view, and the two views' terms are SUMMED (official code): 32/9
    assert vicreg_loss(W, W).item() == pytest.approx(32 / 9, rel=1e-6)
    # W against Z: W - Z = rows (0, 0), (-2, 0), (2, 0), (0, 0): MSE = 8 / 8 = 1 -> 25; covariance only
    # from W: 16/9; no variance term
    assert vicreg_loss(W, Z).item() == pytest.approx(25 + 16 / 9, rel=1e-6)


def test_variance_terms_are_summed_over_the_views_by_default_as_solo_learn():
    # 2 images x 2 features, both views [[0.1, 0], [-0.1, 0]]: feature 0 has unbiased variance 0.02 / 1, term
    # 1 - sqrt(0.0201); feature 1 is constant, std sqrt(1e-4) = 0.01, term 0.99; so v = (1.99 - sqrt(0.0201)) / 2
    # for each view. No invariance (equal views), no covariance (feature 1 is constant). solo-learn sums the
    # views: 25 * 2v; the official code averages them: 25 * v (what this script computed before).
    z = torch.tensor([[0.1, 0.0], [-0.1, 0.0]])
    v = (1.99 - math.sqrt(0.0201)) / 2
    assert vicreg_loss(z, z).item() == pytest.approx(50 * v, rel=1e-5)
    assert vicreg_loss(z, z, variance_form="sum").item() == pytest.approx(50 * v, rel=1e-5)
    assert vicreg_loss(z, z, variance_form="mean").item() == pytest.approx(25 * v, rel=1e-5)
    # constant views: std 0.01 in every feature, each view's term 0.99: sum 25 * 2 * 0.99, mean 25 * 0.99
    c = torch.full((4, 3), 2.0)
    assert vicreg_loss(c, c).item() == pytest.approx(49.5, rel=1e-6)
    assert vicreg_loss(c, c, variance_form="mean").item() == pytest.approx(24.75, rel=1e-6)
    # only view 1 shrunk: 0.3 * Z has unbiased variance 0.09 * 4/3 = 0.12, term 1 - sqrt(0.1201); view 2
    # (3 * Z) has std > 1 and term 0: the sum is the first term, the mean half of it; no covariance
    loss = vicreg_loss(0.3 * Z, 3 * Z, sim_coeff=0.0, std_coeff=1.0)
    assert loss.item() == pytest.approx(1 - math.sqrt(0.1201), rel=1e-6)
    loss = vicreg_loss(0.3 * Z, 3 * Z, sim_coeff=0.0, std_coeff=1.0, variance_form="mean")
    assert loss.item() == pytest.approx((1 - math.sqrt(0.1201)) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        vicreg_loss(z, z, variance_form="max")


def test_coefficients_weight_their_terms():
    loss = vicreg_loss(W, Z, sim_coeff=2.0, std_coeff=7.0, cov_coeff=3.0)
    assert loss.item() == pytest.approx(2 * 1 + 3 * 16 / 9, rel=1e-6)
    # the constant views' variance terms (0.99 each) under std_coeff 7: summed 7 * 1.98, averaged 7 * 0.99
    c = torch.full((4, 3), 2.0)
    assert vicreg_loss(c, c, std_coeff=7.0).item() == pytest.approx(7 * 1.98, rel=1e-6)
    assert vicreg_loss(c, c, std_coeff=7.0, variance_form="mean").item() == pytest.approx(7 * 0.99, rel=1e-6)


def test_gradient_reaches_both_views():
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    vicreg_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_recipe_and_heads():
    args = parse_args(["--dataset", "cifar10"])
    assert (args.optimizer, args.lr, args.weight_decay, args.preset) == ("lars", 0.3, 1e-4, "vicreg")
    assert (args.sim_coeff, args.std_coeff, args.cov_coeff) == (25.0, 25.0, 1.0)
    model = VICReg(torch.nn.Flatten(), 12, args.proj_hidden_dim, args.proj_output_dim, num_classes=10)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 2048]
    with pytest.raises(cli.UsageError):
        parse_args(["--num-small-crops", "2"])


def test_variance_form_flag_and_ranges():
    assert parse_args(["--dataset", "cifar10"]).variance_form == parse_args(["--dataset", "imagenet100"]).variance_form == "sum"
    assert parse_args([]).variance_form == "mean"  # the synthetic recipe: the form its kNN was measured with
    assert parse_args(["--variance-form", "mean"]).variance_form == "mean"
    for bad in (["--variance-form", "max"], ["--std-coeff", "-1"], ["--proj-output-dim", "0"]):
        with pytest.raises(cli.UsageError):
            parse_args(bad)


def test_probe_sees_every_large_crop():
    model = VICReg(torch.nn.Flatten(), 12, 8, 4, num_classes=3)
    (z1, z2), logits = model([torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)])
    assert z1.shape == z2.shape == (5, 4) and logits.shape == (10, 3)


def test_variance_form_reaches_the_loss_of_the_script(tmp_path):
    """Step 1 computes the loss before any update, on the same weights and views: averaging the variance
    terms can only lower it (the variance terms are >= 0, and > 0 for a fresh projector's small outputs)."""
    losses = {}
    for form in ("sum", "mean"):
        out = tmp_path / form
        run_script(*tiny(out, "--max-steps", "1", "--variance-form", form))
        losses[form] = step_losses(out)[1]
        assert json.loads((out / "args.json").read_text())["variance_form"] == form
    assert losses["mean"] < losses["sum"] - 1e-3, losses


def test_two_processes_match_one_process(tmp_path):
    """Variance and covariance on the all-gathered batch, invariance on each rank's own rows: the
    ranks' losses average to the one-process loss, and DDP's averaged gradients equal its gradients."""
    torchrun("tests/dist_noncontrastive.py", "vicreg", tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)  # seed 0: the workers' initial weights
    x = lambda s: torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
    loss = vicreg_loss(model(x(1)), model(x(2)), sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    loss.backward()
    ranks = [torch.load(tmp_path / f"vicreg-rank{r}.pt") for r in range(2)]
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), atol=1e-5)
    for got in ranks:
        for a, b in zip(got["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(a, b, atol=1e-5)


def test_resume_continues_exactly_and_writes_every_file(tmp_path):
    """Stopped at step 2 (mid-epoch 0) and resumed to step 6 (into epoch 1) = one run to step 6."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) and abs(a[s] - b[s]) < 1e-6 for s, v in a.items()), (a, b)
    end_a = [m for m in read_metrics(straight) if m["type"] == "epoch"][-1]
    end_b = [m for m in read_metrics(resumed) if m["type"] == "epoch"][-1]
    assert end_a["probe_acc1"] == end_b["probe_acc1"]
    last_a, last_b = torch.load(straight / "last.pt"), torch.load(resumed / "last.pt")
    assert last_a["method"] == "vicreg" and last_a["step"] == 6
    assert all(torch.allclose(last_a["model"][k].float(), last_b["model"][k].float(), atol=1e-6)
               for k in last_a["model"])
    net, meta = load_backbone(straight / "backbone.pt")
    assert meta["method"] == "vicreg" and net(torch.randn(2, 3, 32, 32)).shape == (2, meta["feature_dim"])


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "vicreg", *tiny(out, "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
