"""VIbCReg: loss values derived by hand (the normalised covariance term: correlations, whatever the scale),
IterNorm (group sizes, BatchNorm at one feature a group, Sigma^(-1/2) in the limit, running statistics, float32,
gradients), the recipe and flags, two processes = one process on the global batch, resume and the script end
to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from common import cli
from common.backbones import load_backbone
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_vibcreg import batch, step
from vibcreg import IterNorm, VIbCReg, iternorm_groups, parse_args, vibcreg_loss, whitening_matrix

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16"]
# Z: 4 rows, features of mean 0, unbiased variance 4/3, orthogonal columns (correlation 0).
# W: both features equal, mean 0, unbiased variance 4/3, correlation 1.
Z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
W = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])


def tiny(out_dir, *extra):
    return ["vibcreg.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_values():
    # identical, uncorrelated views with std sqrt(4/3 + 1e-4) > 1: every term is 0
    assert vibcreg_loss(Z, Z).item() == pytest.approx(0.0, abs=1e-7)
    # W's correlation matrix is [[1, 1], [1, 1]]: off-diagonal squares 2, / D^2 = 4 -> 1/2 per view; two views
    # summed, weight 200: 200
    assert vibcreg_loss(W, W).item() == pytest.approx(200.0, rel=1e-6)
    # W against Z: W - Z = rows (0, 0), (-2, 0), (2, 0), (0, 0): MSE = 8 / 8 = 1 -> 25; correlation only in W: 100
    assert vibcreg_loss(W, Z).item() == pytest.approx(125.0, rel=1e-6)
    # constant views: std sqrt(1e-4) = 0.01 in every feature, each view's term 0.99, summed: 25 * 1.98; the
    # centred columns are 0 and stay 0 under the normalisation (no NaN): no covariance term
    c = torch.full((4, 3), 2.0)
    assert vibcreg_loss(c, c).item() == pytest.approx(49.5, rel=1e-6)


def test_covariance_term_is_a_correlation_whatever_the_scale():
    """VICReg's covariance grows with the square of the features' scale; VIbCReg's is the correlation: scaling a
    view (by 10, or per feature) leaves the term as it was; only the invariance term sees the scale."""
    cov_only = dict(sim_coeff=0.0, std_coeff=0.0, cov_coeff=1.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 5, generator=g)
    z[:, 1] = z[:, 0] + 0.1 * z[:, 1]  # two strongly correlated features
    base = vibcreg_loss(z, z, **cov_only)
    scales = torch.tensor([10.0, 0.1, 3.0, 1.0, 7.0])
    assert vibcreg_loss(10 * z, 10 * z, **cov_only).item() == pytest.approx(base.item(), rel=1e-5)
    assert vibcreg_loss(z * scales, z * scales, **cov_only).item() == pytest.approx(base.item(), rel=1e-5)
    # the formula, entry by entry: Pearson correlations r_ij, sum over i != j of r_ij^2 / D^2, two views
    r = torch.corrcoef(z.T)
    assert base.item() == pytest.approx(2 * (r.pow(2).sum() - 5).item() / 25, rel=1e-5)
    # the variance term (25 weight) is zero above std 1: 10 * W has none, and its invariance to Z grows
    assert vibcreg_loss(10 * W, 10 * W).item() == pytest.approx(200.0, rel=1e-6)


def test_coefficients_weight_their_terms():
    assert vibcreg_loss(W, Z, sim_coeff=2.0, std_coeff=7.0, cov_coeff=3.0).item() == pytest.approx(2 + 3 / 2, rel=1e-6)
    c = torch.full((4, 3), 2.0)
    assert vibcreg_loss(c, c, std_coeff=7.0).item() == pytest.approx(7 * 1.98, rel=1e-6)


def test_gradient_reaches_both_views_and_stays_finite():
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    vibcreg_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    constant = torch.full((4, 3), 2.0, requires_grad=True)  # a collapsed view: the variance term pushes it apart
    vibcreg_loss(constant, constant.detach()).backward()
    assert torch.isfinite(constant.grad).all()


def test_iternorm_group_sizes():
    # ceil(D / groups) features a group, halved until it divides D
    assert iternorm_groups(2048, 64) == (64, 32)
    assert iternorm_groups(512, 64) == (64, 8)
    assert iternorm_groups(16, 64) == (16, 1)  # fewer features than groups: one feature a group
    assert iternorm_groups(48, 8) == (8, 6)
    assert iternorm_groups(12, 5) == (4, 3)  # ceil(12 / 5) = 3 divides 12: 4 groups
    assert iternorm_groups(20, 3) == (20, 1)  # ceil(20 / 3) = 7 divides nothing: 7 -> 3 -> 1


def test_iternorm_with_one_feature_a_group_is_batchnorm():
    """Sigma is the scalar var + eps, Sigma_N = 1, every Newton step keeps P = 1: x_hat = (x - mean) / sqrt(var + eps),
    BatchNorm's training output (biased variance, eps 1e-5) before its affine part."""
    x = torch.randn(10, 6) * 3 + 1
    norm = IterNorm(6, num_groups=6, iters=5)
    assert torch.allclose(norm(x), F.batch_norm(x, None, None, training=True, eps=1e-5), atol=1e-5)


def test_iternorm_whitens_each_group():
    """With enough Newton steps the matrix is Sigma^(-1/2) (eigendecomposition), and each group of the output
    has I - eps Sigma^(-1) as (biased) covariance; features of different groups are not decorrelated. The maths is
    checked in float64, where it converges; the float32 module is then checked against that float64 reference
    within a bound derived below, so the outcome does not depend on the CPU's rounding (AVX2, AVX-512, AMX)."""
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) @ mix
    xc = (x - x.mean(0)).T.reshape(2, 3, 200)
    sigma = xc @ xc.transpose(1, 2) / 200 + 1e-5 * torch.eye(3, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(sigma)
    inverse_sqrt = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(1, 2)
    assert torch.allclose(whitening_matrix(xc, iters=10), inverse_sqrt, atol=1e-9)
    assert whitening_matrix(xc, iters=5).sub(inverse_sqrt).abs().max() > 1e-5  # T = 5 only approximates it
    white = whitening_matrix(xc, iters=10) @ xc  # (G, C, N), float64
    cov = white @ white.transpose(1, 2) / 200  # = W (Sigma - eps I) W = I - eps Sigma^(-1) for W = Sigma^(-1/2)
    assert torch.allclose(cov, torch.eye(3, dtype=torch.float64) - 1e-5 * torch.linalg.inv(sigma), atol=1e-9)
    full = torch.cat(list(white)).T  # (N, 6) in feature order
    assert (full.T @ full / 200)[:3, 3:].abs().max() > 0.05  # groups are whitened apart from each other

    # float32. This Newton iteration is not stable for long. Linearised at an iterate P_k (a polynomial in Sigma_N,
    # eigenvalues p_i), the step P -> (3P - P^3 Sigma_N) / 2 multiplies an error E_ij in Sigma's eigenbasis by
    # (3 - (p_j^2 + p_i p_j + p_i^2) lambda_j) / 2: at the fixed point -(r - 1)(r + 2) / 2, r = sqrt(lambda_j /
    # lambda_i), which is 2.9 here (lambda_max / lambda_min = 5.4): rounding errors grow 2.9x a step once converged
    # (the float32 drift an AMX CPU showed at 10 steps: 1.35e-4 off). Each step rounds P by about 12u relative
    # (three length-3 products and the update; u = 2^-24), so |W32 - W64| <= 12 u |W| sum_k prod_{m>k} f_m, f_m
    # the largest factor at step m; the output W xc moves by that times max |xc_n|, plus |W| times the rounding of
    # x and its mean (4u max|x|). At IterNorm's default T = 5: 1.6e-4, 100x above what this CPU gives and what a
    # simulation of 200 random roundings of u per product gives (1.5e-6), and 7x below one step more or less.
    u, iters = 2.0 ** -24, 5
    lam, p, factors = values / values.sum(-1, keepdim=True), torch.ones_like(values), []
    for _ in range(iters):
        pi, pj, lj = p[:, :, None], p[:, None, :], lam[:, None, :]
        factors.append(((3 - (pj ** 2 + pi * pj + pi ** 2) * lj).abs() / 2).max().item())
        p = (3 * p - p ** 3 * lam) / 2
    assert abs(p.square() * lam - 1).max() < 1e-2  # the scalar recurrence reaches lambda^(-1/2): P is near converged
    growth = sum(math.prod(factors[k + 1:]) for k in range(iters))
    w_norm = values[:, 0].rsqrt().max().item()
    tol = 12 * u * w_norm * growth * xc.norm(dim=1).max().item() + w_norm * 4 * u * x.abs().max().item()
    want = torch.cat(list(whitening_matrix(xc, iters=iters) @ xc)).T
    got = IterNorm(6, num_groups=2, iters=iters)(x.float())  # 2 groups of 3 features
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() < tol
    for other in (iters - 1, iters + 1):  # the bound can tell T steps from one more or less
        assert (torch.cat(list(whitening_matrix(xc, iters=other) @ xc)).T - want).abs().max() > 4 * tol


def test_iternorm_gradient_and_precision():
    xc = torch.randn(2, 3, 7, dtype=torch.float64)
    xc = (xc - xc.mean(-1, keepdim=True)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: whitening_matrix(t, iters=3), (xc,))
    norm = IterNorm(4, num_groups=2)
    x = torch.randn(6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.float32  # solo-learn: custom_fwd(cast_inputs=float32)
    out.pow(3).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, norm.weight, norm.bias))


def test_iternorm_running_statistics_and_eval():
    """Training updates running = 0.9 running + 0.1 batch (mean and whitening matrix); eval whitens with them."""
    x = torch.randn(12, 4) + 2
    norm = IterNorm(4, num_groups=2, iters=5)
    with torch.no_grad():
        norm.weight.fill_(2.0), norm.bias.fill_(1.0)
    norm(x)
    groups = x.T.reshape(2, 2, 12)
    mean = groups.mean(-1, keepdim=True)
    wm = whitening_matrix(groups - mean, 5)
    assert torch.allclose(norm.running_mean, 0.1 * mean)
    assert torch.allclose(norm.running_wm, 0.9 * torch.eye(2) + 0.1 * wm)
    norm.eval()
    want = (norm.running_wm @ (groups - norm.running_mean)).reshape(4, 12).T * 2 + 1
    assert torch.allclose(norm(x), want, atol=1e-6)


def test_recipe_and_heads():
    args = parse_args(["--dataset", "cifar10"])
    assert (args.optimizer, args.lr, args.weight_decay, args.preset) == ("lars", 0.3, 1e-4, "vicreg")
    assert (args.sim_coeff, args.std_coeff, args.cov_coeff) == (25.0, 25.0, 200.0)
    head = dict(activation=args.activation, iternorm=args.iternorm, groups=args.iternorm_groups,
                iters=args.iternorm_iters)
    model = VIbCReg(torch.nn.Flatten(), 12, args.proj_hidden_dim, args.proj_output_dim, num_classes=10, **head)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear", "IterNorm"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 2048]
    assert (model.projector[-1].groups, model.projector[-1].per_group, model.projector[-1].iters) == (64, 32, 5)
    assert parse_args(["--dataset", "imagenet100"]).crop_size == 224
    args = parse_args(["--activation", "relu", "--no-iternorm"])
    model = VIbCReg(torch.nn.Flatten(), 12, 8, 4, num_classes=3, activation=args.activation, iternorm=args.iternorm)
    assert [type(model.projector[i]).__name__ for i in (2, 5, 7)] == ["ReLU", "ReLU", "Identity"]
    for bad in (["--num-small-crops", "2"], ["--cov-coeff", "-1"], ["--activation", "tanh"], ["--iternorm-iters", "0"]):
        with pytest.raises(cli.UsageError):
            parse_args(bad)


def test_probe_sees_every_large_crop():
    model = VIbCReg(torch.nn.Flatten(), 12, 8, 4, num_classes=3)
    (z1, z2), logits = model([torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)])
    assert z1.shape == z2.shape == (5, 4) and logits.shape == (10, 3)


def test_two_processes_match_one_process(tmp_path):
    """Variance and covariance on the all-gathered batch, invariance on each rank's own rows, IterNorm on each
    rank's own batch: the ranks' losses average to the one-process loss with IterNorm per half, and DDP's averaged
    gradients equal its gradients. Whitening the whole batch at once gives another loss."""
    torchrun("tests/dist_vibcreg.py", tmp_path)
    want = step(batch(1), batch(2), halves=2)
    assert abs(step(batch(1), batch(2))["loss"] - want["loss"]) > 1e-3
    for rank in range(2):
        got = torch.load(tmp_path / f"vibcreg-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-5) and torch.allclose(got["z1"], want["z1"], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["grads"], want["grads"]))


def test_resume_continues_exactly_and_writes_every_file(tmp_path):
    """Stopped at step 2 (mid-epoch 0) and resumed to step 6 (into epoch 1) = one run to step 6, IterNorm's
    running statistics included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) and abs(a[s] - b[s]) < 1e-5 for s, v in a.items()), (a, b)
    end_a = [m for m in read_metrics(straight) if m["type"] == "epoch"][-1]
    end_b = [m for m in read_metrics(resumed) if m["type"] == "epoch"][-1]
    assert end_a["probe_acc1"] == end_b["probe_acc1"]
    last_a, last_b = torch.load(straight / "last.pt"), torch.load(resumed / "last.pt")
    assert last_a["method"] == "vibcreg" and last_a["step"] == 6
    running = [k for k in last_a["model"] if k.endswith(("running_mean", "running_wm"))]
    assert "projector.7.running_wm" in running
    assert not torch.allclose(last_a["model"]["projector.7.running_wm"], torch.eye(1).expand(16, 1, 1))
    assert all(torch.allclose(last_a["model"][k].float(), last_b["model"][k].float(), atol=1e-5)
               for k in last_a["model"])
    net, meta = load_backbone(straight / "backbone.pt")
    assert meta["method"] == "vibcreg" and net(torch.randn(2, 3, 32, 32)).shape == (2, meta["feature_dim"])
