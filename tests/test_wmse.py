"""W-MSE: whitening gives identity covariance (computed in float64, float32 out, under autocast too), a
covariance that is not positive definite (NaN, then a one-line stop naming the fix), loss values derived by
hand, solo-learn's stop-gradient on the second view of each pair and the symmetric form, chunking and its
errors, the recipe, per-rank whitening under DDP, resume and DDP end to end."""
import math
import sys

import pytest
import torch

from common import cli
from common.backbones import load_backbone
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from wmse import WMSE, parse_args, whiten, wmse_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "4", "--whitening-size", "8"]


def tiny(out_dir, *extra):
    return ["wmse.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 5 * torch.randn(d, generator=g)


def covariance(w):
    c = w - w.mean(-2, keepdim=True)
    return c.mT @ c / (w.shape[-2] - 1)


def test_whitened_output_has_zero_mean_and_identity_covariance():
    w = whiten(correlated(64, 5, seed=0))
    assert torch.allclose(w.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(covariance(w), torch.eye(5), atol=1e-4)
    chunks = whiten(correlated(96, 4, seed=1).view(3, 32, 4))  # each leading index whitened on its own
    assert torch.allclose(covariance(chunks), torch.eye(4).expand(3, 4, 4), atol=1e-4)


def test_whitening_is_the_inverse_cholesky_factor_applied_to_centred_rows():
    z = correlated(40, 3, seed=2)
    centred = (z - z.mean(0)).double()
    factor = torch.linalg.cholesky(centred.T @ centred / 39)  # reference in float64
    assert torch.allclose(whiten(z).double(), centred @ torch.linalg.inv(factor).T, atol=1e-4)
    # eps = 1 shrinks the covariance to I, whose Cholesky factor is I: only the centring is left
    assert torch.allclose(whiten(z, eps=1.0).double(), centred, atol=1e-5)


def test_whitening_returns_float32_under_autocast_and_leaves_tf32_alone():
    z = correlated(64, 5, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = whiten(z.bfloat16())
    assert w.dtype == torch.float32
    assert torch.allclose(covariance(w), torch.eye(5), atol=1e-4)
    flag = torch.backends.cuda.matmul.allow_tf32
    try:  # float64 needs no TF32 switch: the caller's setting is never touched
        torch.backends.cuda.matmul.allow_tf32 = True
        whiten(z)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def test_whitening_is_computed_in_float64_forward_and_backward():
    """An ill-conditioned chunk (singular values 1 .. 1e-3, offset 3): float32 arithmetic is off by about
    1e-2 here, float64 rounded to float32 by about 1e-7. Float64 is also why TF32 cannot touch the whitening
    on a GPU, in the backward as in the forward (TF32 applies to float32 matmuls only)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    z = torch.randn(64, 8, generator=g) @ torch.diag(torch.logspace(0, -3, 8)) @ basis + 3
    z64 = z.double().requires_grad_()
    centred = z64 - z64.mean(0)
    factor = torch.linalg.cholesky(centred.T @ centred / 63)
    want = torch.linalg.solve_triangular(factor, centred.T, upper=False).T
    z32 = z.clone().requires_grad_()
    got = whiten(z32)
    assert torch.allclose(got.double(), want.detach(), atol=1e-5)
    probe = torch.randn(64, 8, generator=g)  # d(sum(probe * w))/dz, float64 reference
    (got * probe).sum().backward()
    (want * probe.double()).sum().backward()
    assert z32.grad.dtype == torch.float32
    assert torch.allclose(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-4 * z64.grad.abs().max().item())


def test_covariance_not_positive_definite_gives_nan_rows_without_raising():
    # chunk 0 is well spread; chunk 1 repeats one row, so its covariance is 0: Cholesky fails on that chunk
    # alone, which comes out as NaN (cholesky_ex: no error raised, no host sync) while chunk 0 is whitened
    good = correlated(16, 3, seed=7)
    chunks = torch.stack([good, good[:1].expand(16, 3)])
    w = whiten(chunks)
    assert torch.isnan(w[1]).all() and torch.equal(w[0], whiten(good))
    assert math.isnan(wmse_loss([good, good[:1].expand(16, 3)], whitening_size=16).item())  # one view enough


# The last projector layer zeroed: every embedding is its bias, every chunk covariance 0.
CONSTANT_EMBEDDINGS = """import sys, torch, wmse
build = wmse.projector
def constant(*dims):
    head = build(*dims)
    torch.nn.init.zeros_(head[-1].weight)
    return head
wmse.projector = constant
wmse.main(sys.argv[1:])
"""


def test_run_with_a_covariance_not_positive_definite_stops_naming_the_fix(tmp_path):
    proc = run_script(sys.executable, "-c", CONSTANT_EMBEDDINGS, *tiny(tmp_path / "run", "--max-steps", "4")[1:],
                      check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "whitening failed at epoch 0, step 0" in lines[0] and "--whitening-size" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "last.pt").exists()


def test_hand_values():
    # one feature (D = 1), one chunk of 4: whitening is (z - mean) / std, so only the signs of the
    # centred values matter, and cos in one dimension is the product of the signs
    z1 = torch.tensor([[0.0], [1.0], [2.0], [3.0]])       # centred signs - - + +
    z2 = torch.tensor([[2.0], [1.0], [0.0], [3.0]])       # centred signs + - - +
    # cos per row: -1, +1, -1, +1 -> mean 0 -> 2 - 2 * 0 = 2
    assert wmse_loss([z1, z2], whitening_size=4).item() == pytest.approx(2.0, abs=1e-6)
    assert wmse_loss([z1, 10 * z1 - 3], whitening_size=4).item() == pytest.approx(0.0, abs=1e-6)
    assert wmse_loss([z1, -z1], whitening_size=4).item() == pytest.approx(4.0, abs=1e-6)
    # three views a, a, -a: pairs (a, a) = 0, (a, -a) = 4, (a, -a) = 4 -> mean 8/3
    z = correlated(16, 3, seed=4)
    assert wmse_loss([z, z, -z], whitening_size=8).item() == pytest.approx(8 / 3, abs=1e-5)


def test_invariant_to_positive_per_feature_scaling():
    # Cholesky whitening: Cov(S z) = S L L^T S with S L lower triangular, so S z whitens to the same rows
    z = correlated(32, 4, seed=5)
    scaled = z * torch.tensor([0.5, 2.0, 3.0, 0.1]) + 4
    torch.manual_seed(0)
    assert wmse_loss([z, scaled], whitening_size=16).item() == pytest.approx(0.0, abs=1e-5)


def test_chunks_come_from_the_global_rng():
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(32, 3, generator=g), torch.randn(32, 3, generator=g)
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        losses.append(wmse_loss([z1, z2], whitening_size=8, whitening_iters=2).item())
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_batch_not_divisible_by_chunk_is_a_usage_error():
    with pytest.raises(cli.UsageError, match="whitening-size"):
        wmse_loss([torch.randn(10, 2), torch.randn(10, 2)], whitening_size=4)
    for flags in (["--batch-size", "16", "--whitening-size", "6"], ["--proj-output-dim", "8", "--whitening-size", "8"]):
        with pytest.raises(cli.UsageError):
            parse_args(flags)
    proc = run_script("wmse.py", "--batch-size", "16", "--whitening-size", "6", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not divisible by --whitening-size 6" in proc.stderr


def grads(views, **kw):
    """(loss, gradient of each view; None where no gradient reached it) with one chunk of all rows, where the
    random partition cannot change anything (whitening commutes with permuting the rows)."""
    views = [v.clone().requires_grad_() for v in views]
    loss = wmse_loss(views, whitening_size=len(views[0]), **kw)
    loss.backward()
    return loss.detach(), [v.grad for v in views]


def test_second_view_of_each_pair_gets_no_gradient_by_default():
    """solo-learn's wmse_loss_func(simplified=True): 2 - 2 mean cos(w_a, sg(w_b)) for a < b."""
    g = torch.Generator().manual_seed(8)
    a, b, c = (torch.randn(16, 3, generator=g) for _ in range(3))
    loss, (ga, gb) = grads([a, b])
    assert gb is None and ga.abs().sum() > 0  # view 2 is only a target
    # three views: pairs (a, b), (a, c), (b, c), averaged. c gets nothing; b only from the pair (b, c),
    # so its gradient is a third of the two-view loss [b, c]'s
    _, (_, gb3, gc3) = grads([a, b, c])
    _, (gb_pair, _) = grads([b, c])
    assert gc3 is None and torch.allclose(gb3, gb_pair / 3, atol=1e-6)


def test_symmetric_form_has_the_same_value_and_gradients_into_both_views():
    """The official code: both views of a pair learn. Same value; view 1's gradient is the default's, and by
    cos(a, b) = cos(b, a) view 2's is the default's gradient of view 1 with the views swapped."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    loss, (ga, gb) = grads([a, b], symmetric=True)
    solo_loss, (solo_ga, _) = grads([a, b])
    _, (swapped_gb, _) = grads([b, a])
    assert torch.allclose(loss, solo_loss) and gb.abs().sum() > 0
    assert torch.allclose(ga, solo_ga, atol=1e-6) and torch.allclose(gb, swapped_gb, atol=1e-6)


def test_recipe_and_heads():
    args = parse_args(["--dataset", "cifar10"])
    assert (args.optimizer, args.lr, args.weight_decay, args.probe_lr) == ("adam", 2e-3, 1e-6, 3e-3)
    assert (args.warmup_start_lr, args.preset, args.whitening_size, args.whitening_iters) == (0.0, "wmse", 128, 1)
    assert args.symmetric_loss is False and parse_args(["--symmetric-loss"]).symmetric_loss is True
    model = WMSE(torch.nn.Flatten(), 12, args.proj_hidden_dim, args.proj_output_dim, num_classes=10)
    assert [type(m).__name__ for m in model.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [1024, 64]
    views = [torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)]
    z, logits = model(views)  # the probe sees every view (solo-learn: every large crop), one batch after another
    assert len(z) == 3 and logits.shape == (12, 10)
    assert torch.allclose(logits[4:8], model.probe(views[1].flatten(1)))
    for flags in (["--whitening-eps", "1.5"], ["--whitening-iters", "0"], ["--whitening-size", "1"]):
        with pytest.raises(cli.UsageError):
            parse_args(flags)


def test_two_processes_whiten_their_own_rows(tmp_path):
    """As in the official code, each rank whitens its own batch (one chunk of 4 rows here): the ranks'
    losses average to one process's mean over the two halves, and DDP's gradients equal its gradients."""
    torchrun("tests/dist_noncontrastive.py", "wmse", tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)  # seed 0: the workers' initial weights
    x = lambda s: torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
    z1, z2 = model(x(1)), model(x(2))
    loss = (wmse_loss([z1[:4], z2[:4]], 4) + wmse_loss([z1[4:], z2[4:]], 4)) / 2
    loss.backward()
    ranks = [torch.load(tmp_path / f"wmse-rank{r}.pt") for r in range(2)]
    mean = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert torch.allclose(mean, loss.detach(), atol=1e-5)
    assert not torch.allclose(mean, wmse_loss([z1, z2], 8).detach(), atol=1e-3)  # not the gathered batch
    for got in ranks:
        for a, b in zip(got["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(a, b, atol=1e-5)


def test_resume_continues_exactly_and_writes_every_file(tmp_path):
    """Stopped at step 2 (mid-epoch 0) and resumed to step 6 (into epoch 1) = one run to step 6:
    with 2 chunks per batch the loss depends on the random chunks, so they must be redrawn alike."""
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
    assert last_a["method"] == "wmse" and last_a["step"] == 6
    assert all(torch.allclose(last_a["model"][k].float(), last_b["model"][k].float(), atol=1e-6)
               for k in last_a["model"])
    assert [m["lr"] for m in read_metrics(straight) if m["type"] == "step"][0] == 0.0  # warmup from 0
    net, meta = load_backbone(straight / "backbone.pt")
    assert meta["method"] == "wmse" and net(torch.randn(2, 3, 32, 32)).shape == (2, meta["feature_dim"])


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "wmse", *tiny(out, "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
