"""SupCon: both forms by hand and against the formulas, the default L_in against solo-learn's own loss function,
SimCLR as the unique-label case, gathered labels under two processes, the unlabelled-data error and the script
end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import supcon
from common import cli
from conftest import TINY, run_script, step_losses, torchrun
from dist_contrastive import inputs, step_supcon
from simclr import simclr_loss
from supcon import SupCon, parse_args, supcon_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16"]


def tiny(out_dir, *extra):
    return ["supcon.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def solo_learn_simclr_loss_func(z, indexes, temperature):
    """solo-learn's solo/losses/simclr.py (HEAD 9187ea3) in one process (gather = identity, rank 0), which its
    SupCon calls with the labels as indexes."""
    z = F.normalize(z, dim=-1)
    sim = torch.exp(torch.einsum("if, jf -> ij", z, z) / temperature)
    indexes = indexes.unsqueeze(0)
    pos_mask = indexes.t() == indexes
    pos_mask[:, 0:].fill_diagonal_(0)
    neg_mask = indexes.t() != indexes
    pos = torch.sum(sim * pos_mask, 1)
    neg = torch.sum(sim * neg_mask, 1)
    return -(torch.mean(torch.log(pos / (pos + neg))))


def test_hand_values_of_both_forms():
    # Two images of one class, two views each: rows e1, e2, e1, e2, all positives of each other.
    # Row 0 sees e2 (s=0), e1 (s=1), e2 (s=0): p = [1, e^(1/T), 1] / (e^(1/T) + 2).
    # L_out = -(1/3)(1/T - 3 log(e^(1/T) + 2)) = log(e^(1/T) + 2) - 1/(3T);
    # L_in = -log(sum p) = -log 1 = 0 (the paper's 1/|P(i)| inside the log would give log 3). Rows alike by symmetry.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.zeros(4, dtype=torch.long)
    for t in (0.5, 1.0):
        assert abs(supcon_loss(z, labels, t, form="out").item() - (math.log(math.exp(1 / t) + 2) - 1 / (3 * t))) < 1e-5
        assert abs(supcon_loss(z, labels, t, form="in").item()) < 1e-5


def test_default_is_solo_learns_l_in_by_hand():
    # Images a, b of class 0 and c of class 1, two views each, every view of an image the same unit vector:
    # rows e1, e2, e3, e1, e2, e3 with labels 0, 0, 1, 0, 0, 1; s = 1 with the other view, 0 otherwise; E = e^(1/T).
    # A class-0 row: denominator E + 4 (its other view and four others); positives its other view (E) and
    # b's two views (1, 1): sum p = (E + 2) / (E + 4); mean log p = 1/(3T) - log(E + 4).
    # A class-1 row: one positive, its other view: p = E / (E + 4); log p = 1/T - log(E + 4).
    # L_in  = -(4 log((E + 2)/(E + 4)) + 2 log(E/(E + 4))) / 6 = log(E + 4) - (2/3) log(E + 2) - 1/(3T)
    # L_out = -(4 (1/(3T) - log(E + 4)) + 2 (1/T - log(E + 4))) / 6 = log(E + 4) - 5/(9T)
    # (the paper's L_in, with 1/|P(i)| inside the log, is (4 log 3 + 2 log 1) / 6 = (2/3) log 3 above L_in).
    z = torch.eye(3).repeat(2, 1)
    labels = torch.tensor([0, 0, 1, 0, 0, 1])
    for t in (0.5, 1.0):
        e = math.exp(1 / t)
        l_in = math.log(e + 4) - 2 / 3 * math.log(e + 2) - 1 / (3 * t)
        l_out = math.log(e + 4) - 5 / (9 * t)
        assert supcon_loss(z, labels, t).item() == pytest.approx(l_in, abs=1e-5)  # the default form
        assert supcon_loss(z, labels, t, form="in").item() == pytest.approx(l_in, abs=1e-5)
        assert supcon_loss(z, labels, t, form="out").item() == pytest.approx(l_out, abs=1e-5)
        assert solo_learn_simclr_loss_func(z, labels, t).item() == pytest.approx(l_in, abs=1e-5)
        assert l_out - l_in > 0.5


@pytest.mark.parametrize("views", [2, 3])
def test_in_form_equals_solo_learns_loss_function(views):
    """Several images per class, two and three views: positives are every other view with the label, the view
    itself is in neither sum."""
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0]).repeat(views)
    z = torch.randn(len(labels), 6, generator=g)
    for t in (0.2, 0.5):
        assert torch.allclose(supcon_loss(z, labels, t), solo_learn_simclr_loss_func(z, labels, t), atol=1e-5)


@pytest.mark.parametrize("form", ["out", "in"])
def test_unique_labels_give_simclr(form):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    ids = torch.arange(8).repeat(2)
    assert torch.allclose(supcon_loss(z, ids, 0.2, form=form), simclr_loss(z, ids, temperature=0.2), atol=1e-5)


def test_both_forms_match_the_formulas_row_by_row():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(12, 5, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 1]).repeat(2)
    t, zn = 0.3, F.normalize(z, dim=1)
    out = inside = 0.0
    for i in range(12):
        denom = sum(math.exp(zn[i] @ zn[a] / t) for a in range(12) if a != i)
        probs = [math.exp(zn[i] @ zn[p] / t) / denom for p in range(12) if p != i and labels[p] == labels[i]]
        out += -sum(math.log(p) for p in probs) / len(probs) / 12
        inside += -math.log(sum(probs)) / 12
    assert abs(supcon_loss(z, labels, t, form="out").item() - out) < 1e-4
    assert abs(supcon_loss(z, labels, t, form="in").item() - inside) < 1e-4
    assert inside < out  # Jensen: log of the sum >= log of the mean >= mean of the logs


def test_class_clusters_reach_the_bounds():
    # 3 classes x 4 views, each class one unit vector: every row has 3 positives at s = 1 and 8 negatives
    # at s = 0, so every p_ip = e^(1/T) / (3 e^(1/T) + 8): L_out = log(3 + 8 e^(-1/T)) -> log 3 (the positive
    # count), L_in = -log(3 p) = L_out - log 3 -> 0.
    labels = torch.arange(3).repeat(4)
    z = F.one_hot(labels, 8).float()
    assert abs(supcon_loss(z, labels, 0.2, form="out").item() - math.log(3 + 8 * math.exp(-5))) < 1e-5
    assert abs(supcon_loss(z, labels, 0.2, form="in").item() - math.log(1 + 8 * math.exp(-5) / 3)) < 1e-5


def test_gradient_reaches_every_view_and_bad_form_is_refused():
    z = torch.randn(12, 8, requires_grad=True)
    supcon_loss(z, torch.tensor([0, 1, 1, 2, 0, 2]).repeat(2)).backward()
    assert (z.grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError):
        supcon_loss(z, torch.zeros(12, dtype=torch.long), form="sideways")


def test_recipes_default_to_the_in_form_and_the_flag_picks_either(monkeypatch):
    for dataset in ("cifar10", "cifar100", "imagenet100"):
        assert parse_args(["--dataset", dataset]).supcon_form == "in"
    assert parse_args(["--dataset", "cifar10", "--supcon-form", "out"]).supcon_form == "out"
    # a recipe that does not set the form gets solo-learn's
    monkeypatch.setattr(supcon, "RECIPES", {family: {k: v for k, v in recipe.items() if k != "supcon_form"}
                                            for family, recipe in supcon.RECIPES.items()})
    assert parse_args([]).supcon_form == "in"
    for bad in (["--supcon-form", "sideways"], ["--temperature", "0"], ["--proj-hidden-dim", "-2"]):
        with pytest.raises(cli.UsageError):
            parse_args(bad)


def test_probe_sees_every_large_crop_and_no_small_one():
    model = SupCon(torch.nn.Flatten(), 12, 8, 4, num_classes=3, num_large_crops=2)
    z, logits = model([torch.randn(5, 3, 2, 2) for _ in range(3)])  # two large crops and one small
    assert z.shape == (15, 4) and logits.shape == (10, 3)


def test_two_processes_gather_views_and_labels_like_one(tmp_path):
    torchrun("tests/dist_contrastive.py", "supcon", tmp_path)
    want = step_supcon(*inputs("supcon"))
    for rank in range(2):
        got = torch.load(tmp_path / f"supcon-rank{rank}.pt")
        assert torch.allclose(got["out"], want["out"], atol=1e-6) and torch.allclose(got["in"], want["in"], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["grads"], want["grads"]))


def test_unlabelled_folder_is_refused(tmp_path):
    from PIL import Image
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(flat / f"{i}.png")
    proc = run_script("supcon.py", "--dataset", "folder", "--data-dir", flat, "--batch-size", "2", "--workers", "0",
                      "--crop-size", "8", "--out-dir", tmp_path / "run", check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "supcon needs labels" in lines[0], proc.stderr


def test_run_and_resume_continue_exactly_with_the_in_form(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6", "--supcon-form", "in"))
    run_script(*tiny(resumed, "--max-steps", "2", "--supcon-form", "in"))
    run_script(*tiny(resumed, "--max-steps", "6", "--supcon-form", "in"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    assert json.loads((straight / "args.json").read_text())["supcon_form"] == "in"
    assert (straight / "backbone.pt").exists()


def test_torchrun_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "supcon", *tiny(out, "--max-steps", "2")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert json.loads((out / "args.json").read_text())["global_batch_size"] == 32
