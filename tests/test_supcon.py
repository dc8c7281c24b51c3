"""SupCon: both forms by hand and against the formulas, SimCLR as the unique-label case, gathered labels
under two processes, the unlabelled-data error and the script end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run_script, step_losses, torchrun
from dist_contrastive import inputs, step_supcon
from simclr import simclr_loss
from supcon import supcon_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16"]


def tiny(out_dir, *extra):
    return ["supcon.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_values_of_both_forms():
    # Two images of one class, two views each: rows e1, e2, e1, e2, all positives of each other.
    # Row 0 sees e2 (s=0), e1 (s=1), e2 (s=0): p = [1, e^(1/T), 1] / (e^(1/T) + 2).
    # L_out = -(1/3)(1/T - 3 log(e^(1/T) + 2)) = log(e^(1/T) + 2) - 1/(3T);
    # L_in = -log((1/3) * sum p) = -log(1/3) = log 3. Every row is alike by symmetry.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.zeros(4, dtype=torch.long)
    for t in (0.5, 1.0):
        assert abs(supcon_loss(z, labels, t, form="out").item() - (math.log(math.exp(1 / t) + 2) - 1 / (3 * t))) < 1e-5
        assert abs(supcon_loss(z, labels, t, form="in").item() - math.log(3)) < 1e-5


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
        inside += -math.log(sum(probs) / len(probs)) / 12
    assert abs(supcon_loss(z, labels, t, form="out").item() - out) < 1e-4
    assert abs(supcon_loss(z, labels, t, form="in").item() - inside) < 1e-4
    assert inside < out  # Jensen: the log of a mean is at least the mean of the logs


def test_class_clusters_reach_the_bound_log_of_the_positive_count():
    # 3 classes x 4 views, each class one unit vector: every row has 3 positives at s = 1 and 8 negatives
    # at s = 0, so every p_ip = e^(1/T) / (3 e^(1/T) + 8) and L_out = L_in = log(3 + 8 e^(-1/T)) -> log 3.
    labels = torch.arange(3).repeat(4)
    z = F.one_hot(labels, 8).float()
    for form in ("out", "in"):
        assert abs(supcon_loss(z, labels, 0.2, form=form).item() - math.log(3 + 8 * math.exp(-5))) < 1e-5


def test_gradient_reaches_every_view_and_bad_form_is_refused():
    z = torch.randn(12, 8, requires_grad=True)
    supcon_loss(z, torch.tensor([0, 1, 1, 2, 0, 2]).repeat(2)).backward()
    assert (z.grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError):
        supcon_loss(z, torch.zeros(12, dtype=torch.long), form="sideways")


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
