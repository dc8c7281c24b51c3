"""MoCo v3: loss values by hand and its limits, the rank offset of the positives, gradient paths, the two head
designs, the ViT recipe (fixed sin-cos positions, frozen patch projection), two processes, and the script end to
end with an exact resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_mocov3 import batch, step
from mocov3 import MoCoV3, mocov3_loss, parse_args

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32"]
E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def tiny(out_dir, *extra):
    return ["mocov3.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_value_and_view_pairing():
    # ctr(q, k) = 2T * mean_i -log softmax_j(n(q_i).n(k_j) / T)_i.
    # ctr(q1 = [e1, e2], k2 = [e1, e2]): each row has logits {1/T own, 0 other} -> 2T log(1 + e^(-1/T)).
    # ctr(q2 = [e2, e1], k1 = [e1, e1]): every logit equal (0 or 1/T) -> 2T log 2.
    # Pairing q1 with k1 would give 2T log 2 + 2T (log(1 + e^(1/T)) + log(1 + e^(-1/T))) / 2 instead.
    t = 0.5
    q1, q2, k1, k2 = torch.cat([E1, E2]), torch.cat([E2, E1]), torch.cat([E1, E1]), torch.cat([E1, E2])
    want = 2 * t * (math.log(1 + math.exp(-1 / t)) + math.log(2))
    assert abs(mocov3_loss(3 * q1, q2, k1, 0.5 * k2, temperature=t).item() - want) < 1e-6  # q and k are normalized


def test_matches_the_formula_row_by_row_with_the_rank_offset():
    # this rank (1 of 2) holds 3 queries; the gathered keys hold 6 rows, its positives are rows 3, 4, 5
    g = torch.Generator().manual_seed(0)
    q1, q2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    k1, k2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    t = 0.2

    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        return 2 * t * sum(-math.log(math.exp(q[i] @ k[3 + i] / t) / sum(math.exp(q[i] @ k[j] / t) for j in range(6)))
                           for i in range(3)) / 3

    got = mocov3_loss(q1, q2, k1, k2, temperature=t, rank=1)
    assert abs(got.item() - (ctr(q1, k2) + ctr(q2, k1))) < 1e-4
    # the negatives' order does not matter: rank 1 with [other, own] keys = rank 0 with [own, other] keys
    swap = lambda k: torch.cat([k[3:], k[:3]])
    assert torch.allclose(got, mocov3_loss(q1, q2, swap(k1), swap(k2), temperature=t, rank=0))
    assert not torch.allclose(got, mocov3_loss(q1, q2, k1, k2, temperature=t, rank=0))


def test_limits_uniform_keys_and_the_2t_scale():
    # All keys alike: every logit equal, each half is 2T log(number of keys), whatever the queries.
    q = torch.randn(4, 3)
    k = torch.ones(8, 3)
    for t in (0.1, 1.0):
        assert abs(mocov3_loss(q, q, k, k, temperature=t).item() - 2 * 2 * t * math.log(8)) < 1e-5
    # Orthonormal queries equal to their keys: 2 * 2T log(1 + (B - 1) e^(-1/T)), which vanishes as T -> 0.
    eye = torch.eye(4)
    for t in (0.05, 0.5):
        want = 2 * 2 * t * math.log(1 + 3 * math.exp(-1 / t))
        assert abs(mocov3_loss(eye, eye, eye, eye, temperature=t).item() - want) < 1e-6


def test_only_queries_receive_gradient():
    q1, q2, k1, k2 = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    mocov3_loss(q1, q2, k1, k2).backward()
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0
    assert k1.grad is None and k2.grad is None


def test_heads_of_the_two_designs_and_the_momentum_encoder():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    linears = lambda m: [x for x in m if isinstance(x, torch.nn.Linear)]
    resnet, vit = MoCoV3(backbone, 6, 16, 4, 8, num_classes=3), MoCoV3(backbone, 6, 16, 4, 8, 3, transformer=True)
    assert len(linears(resnet.projector)) == 2 and len(linears(vit.projector)) == 3
    assert isinstance(resnet.predictor[-1], torch.nn.Linear)  # ResNet predictor: no final BN
    for head in (resnet.projector, vit.projector, vit.predictor):
        assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine
    assert all(x.bias is None for m in (resnet, vit) for x in linears(m.projector) + linears(m.predictor))
    momentum = resnet.momentum_encoder()
    views = [torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)]
    (q1, q2), logits = resnet(views)
    assert q1.shape == (5, 4) and logits.shape == (10, 3)  # the probe sees both crops
    assert torch.equal(momentum(views[0]), resnet.projector(resnet.backbone(views[0])))
    keys = [momentum(v) for v in views]
    mocov3_loss(q1, q2, *keys).backward()
    assert all(p.grad is None for p in momentum.parameters())
    assert all(p.grad is not None for p in resnet.predictor.parameters())


def test_vit_recipe_and_bad_flags(tmp_path):
    out = ["--out-dir", str(tmp_path / "x")]
    vit = parse_args(["--dataset", "cifar10", "--backbone", "vit_small", *out])
    assert (vit.optimizer, vit.lr, vit.weight_decay, vit.probe_lr) == ("adamw", 3e-4, 0.1, 3e-4)
    assert not vit.freeze_patch_embed  # solo-learn trains the patch projection
    assert parse_args(["--dataset", "cifar10", "--backbone", "vit_small", "--lr", "1e-3", *out]).lr == 1e-3
    resnet = parse_args(["--dataset", "cifar10", *out])
    assert (resnet.optimizer, resnet.lr, resnet.weight_decay, resnet.probe_lr) == ("lars", 0.3, 1e-6, 0.3)
    with pytest.raises(UsageError, match="ViT or Swin"):
        parse_args(["--freeze-patch-embed", *out])
    with pytest.raises(UsageError, match="two views"):
        parse_args(["--num-small-crops", "2", *out])


def test_two_processes_give_the_single_process_step(tmp_path):
    torchrun("tests/dist_mocov3.py", tmp_path)
    want = step(batch(1), batch(2))
    assert want["k1"].shape == (8, 4) and all(g is None for g in want["momentum_grads"])
    for rank in range(2):
        got = torch.load(tmp_path / f"mocov3-rank{rank}.pt")
        assert torch.allclose(got["k1"], want["k1"], atol=1e-6) and torch.allclose(got["k2"], want["k2"], atol=1e-6)
        assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["grads"], want["grads"]))
        assert all(g is None for g in got["momentum_grads"])


def test_run_resume_is_exact(tmp_path):
    """Stopped at step 2 and resumed to step 6 = one run to step 6, momentum encoder included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    la, lb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert all(torch.allclose(la["momentum"][k].float(), lb["momentum"][k].float(), atol=1e-6) for k in la["momentum"])
    steps = [m for m in read_metrics(straight) if m["type"] == "step"]
    assert steps[0]["tau"] == pytest.approx(0.99) and steps[0]["tau"] < steps[-1]["tau"] < 1.0
    assert (straight / "backbone.pt").exists()
    assert json.loads((straight / "args.json").read_text())["optimizer"] == "adamw"  # the synthetic recipe


def test_vit_run_keeps_positions_fixed_and_the_frozen_patch_projection(tmp_path):
    """One tiny ViT step: the position embedding is MoCo v3's sin-cos table and stays so (AdamW never sees it);
    with --freeze-patch-embed the patch projection stays equal in the online and momentum networks (the EMA
    of a frozen tensor is itself), while a trained weight does not."""
    out = tmp_path / "vit"
    run_script(*tiny(out, "--backbone", "vit_tiny", "--max-steps", "1", "--freeze-patch-embed"))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    online, momentum = ckpt["model"], ckpt["momentum"]
    pos = online["backbone.pos_embed"][0]  # (1 + 16 patches at 16px / patch 4, 192)
    d = pos.shape[1]
    assert pos.shape == (17, 192) and torch.equal(pos[0], torch.zeros(d))  # the class token's row is zero
    # patch 1 (row 2): first grid coordinate 0 -> sin 0, cos 1; second coordinate 1 -> sin(1 * omega_0) = sin 1
    assert pos[2, 0] == 0 and pos[2, d // 4] == 1 and abs(pos[2, d // 2] - math.sin(1)) < 1e-6
    assert torch.equal(momentum["0.pos_embed"][0], pos)
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert torch.equal(online[f"backbone.{name}"], momentum[f"0.{name}"])
    assert not torch.equal(online["backbone.blocks.0.attn.qkv.weight"], momentum["0.blocks.0.attn.qkv.weight"])
    assert json.loads((out / "args.json").read_text())["optimizer"] == "adamw"
