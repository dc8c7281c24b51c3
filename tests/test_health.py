"""Label-free health of a representation (common/evaluation.py, docs/health.md): effective rank, alignment,
uniformity and the std of the normalised embedding on inputs whose values are derived by hand; the collapse
warning; the health pass of evaluate() with and without labels. (DDP against one process: test_distributed_eval.)"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from common import data, evaluation, run as run_module
from common.backbones import build_backbone
from common.evaluation import alignment, collapse_warning, effective_rank, normalised_std, uniformity


def test_effective_rank_of_hand_computable_matrices():
    assert effective_rank(torch.eye(8)) == pytest.approx(8, rel=1e-12)  # 8 equal singular values: exp(log 8)
    assert effective_rank(5 * torch.eye(3, 7)) == pytest.approx(3, rel=1e-12)  # scale-free, max min(N, D)
    a, b = torch.arange(1.0, 7.0), torch.tensor([1.0, -2.0, 0.5])
    # rank one: one non-zero singular value (the others are float64 round-off, ~1e-16 of it: entropy ~1e-14)
    assert effective_rank(torch.outer(a, b)) == pytest.approx(1, abs=1e-9)
    # singular values 3 and 1: p = (3/4, 1/4), entropy -(3/4 log 3/4 + 1/4 log 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(entropy), rel=1e-12)
    # rows permuted or rotated: the same singular values
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    assert effective_rank(q @ x) == pytest.approx(effective_rank(x), rel=1e-9)


def test_effective_rank_of_isotropic_gaussian_rows_is_near_the_dimension():
    # N x D standard normal, N >> D: the singular values are sqrt(N) (1 +- about sqrt(D / N)) = sqrt(N) (1 +- 0.0625),
    # so p_i = (1 + e_i) / D with |e_i| < 0.15 and entropy >= log D - mean(e^2) / 2 - ...: the rank is over 0.98 D.
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    assert 0.98 * 16 < effective_rank(x) <= 16


def test_alignment_uniformity_and_std_at_their_limits():
    u = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    assert alignment(u, 3 * u) == pytest.approx(0, abs=1e-12)  # the same directions: aligned, whatever the norm
    assert alignment(u, -u) == pytest.approx(4, rel=1e-12)  # opposite unit vectors: |2u|^2 = 4
    collapsed = torch.ones(32, 8) + 1e-3 * torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    # one point (up to 1e-3 / sqrt(8) of jitter): every pair at distance ~0, exp(0) = 1, log 1 = 0; std ~0
    assert uniformity(torch.ones(5, 3)) == 0 and normalised_std(torch.ones(5, 3)) == 0
    assert -1e-4 < uniformity(collapsed) <= 0 and normalised_std(collapsed) < 1e-3
    # two opposite points: one pair at squared distance 4: log exp(-2 * 4) = -8, the lowest value there is
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8, rel=1e-12)
    # +-e_1 ... +-e_D: each coordinate is +1 once, -1 once and 0 for the other 2D - 2 rows, so its mean is 0 and
    # its population variance 2 / (2D) = 1 / D: the healthy std 1 / sqrt(D) exactly
    d = 6
    spread = torch.cat([torch.eye(d), -torch.eye(d)])
    assert normalised_std(spread) == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    # its pairs: squared distances 2 (orthogonal; 2D(2D - 2) ordered pairs) and 4 (opposite; 2D ordered pairs)
    pairs = 2 * d * (2 * d - 1)
    expected = math.log((2 * d * (2 * d - 2) * math.exp(-4) + 2 * d * math.exp(-8)) / pairs)
    assert uniformity(spread) == pytest.approx(expected, rel=1e-12)


def health(embeddings, max_rank=None):
    """The embedding part of health_metrics' dict for these rows."""
    n, d = embeddings.shape
    return {"health_rank_embed": effective_rank(embeddings), "health_rank_embed_max": max_rank or min(n, d),
            "health_std": normalised_std(embeddings), "health_std_healthy": 1 / math.sqrt(d)}


def test_the_collapse_warning_fires_on_collapse_and_names_causes():
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(512, 64, generator=g)  # rank ~64 of 64, std ~1/8: far from every threshold
    assert collapse_warning(health(healthy), "byol") is None
    one_point = torch.randn(64, generator=g) + 1e-4 * torch.randn(512, 64, generator=g)  # std ~1e-4 / 8 << 0.05 / 8
    warning = collapse_warning(health(one_point), "byol")
    assert warning.startswith("the representation is collapsed to one point") and "momentum" in warning
    assert "\n" not in warning
    # a line through the origin: the normalised rows are +-v, rank 1 < 0.02 * 64 while the std is healthy-sized
    # (|v_i| / |v| per coordinate, averaging sqrt(2 / pi) / 8 for a Gaussian v)
    line = torch.randn(512, 1, generator=g) * torch.randn(1, 64, generator=g)
    metrics = health(line)
    assert metrics["health_std"] > 0.5 / 8 and "effective rank 1.00 of at most 64" in collapse_warning(metrics, "simclr")
    warning = collapse_warning(metrics, "simclr")
    assert warning.startswith("the representation is collapsed onto about 1 direction (") and "temperature" in warning
    # three directions of 256 through the origin: rank ~3 < 0.02 * 256, named as such
    plane = torch.randn(512, 3, generator=g) @ torch.linalg.qr(torch.randn(256, 3, generator=g))[0].T
    warning = collapse_warning(health(plane), "simclr")
    assert warning.startswith("the representation is collapsed onto about 3 directions")
    # partial collapse: 4 directions of 64 (rank ~2.7: under 0.1 * 64, over 0.02 * 64) around a common mean that
    # puts the normalised rows in a cone (std under 0.25 / 8, over 0.05 / 8): flagged only as a fall from a rank
    # over 4 times higher earlier in the run, never on its own (a network near its random init looks like this)
    g = torch.Generator().manual_seed(1)  # mean |10 m| ~ 80 against spreads ~ 16: std ~ (16 / 80) / 8 << 0.25 / 8
    cone = 10 * torch.randn(64, generator=g) + torch.randn(512, 4, generator=g) @ torch.randn(4, 64, generator=g)
    metrics = health(cone)
    rank = metrics["health_rank_embed"]
    assert 0.02 * 64 < rank < 0.1 * 64 and 0.05 / 8 < metrics["health_std"] < 0.25 / 8
    assert collapse_warning(metrics, "vicreg") is None and collapse_warning(metrics, "vicreg", rank / 0.26) is None
    warning = collapse_warning(metrics, "vicreg", rank / 0.24)
    assert warning.startswith("the representation is collapsing") and "down from" in warning
    assert "decorrelation" in warning and "families" not in collapse_warning(metrics, "mae", 64)


# ---- the health pass of evaluate(), in process, on a few synthetic images ----
TRAIN_IMAGES = 90


def small_synthetic(labelled):
    def load(name, data_dir, split, seed=0):
        if split == "val" and not labelled:
            return None
        images, labels = data.synthetic_images(TRAIN_IMAGES if split == "train" else 40, seed + (split == "val"))
        return data.ImageTensorDataset(images, labels if labelled else torch.full_like(labels, -1),
                                       len(data.SYNTHETIC_CLASSES) if labelled else 0, 32)
    return load


@pytest.fixture(scope="module")
def health_run(tmp_path_factory):
    """A Run and its datasets on 90 synthetic images, with and without labels, and a seeded backbone."""
    import byol
    made = {}
    for labelled in (True, False):
        args = byol.parse_args(["--dataset", "synthetic", "--device", "cpu", "--workers", "0", "--batch-size", "32",
                                "--data-backend", "torchvision", "--knn-every", "-1", "--umap-every", "-1",
                                "--health-samples", "64", "--out-dir", str(tmp_path_factory.mktemp("health"))])
        original, data.load_dataset = data.load_dataset, small_synthetic(labelled)
        try:
            run = run_module.Run(args)
            made[labelled] = (run, run_module.build_data(args, run))
        finally:
            data.load_dataset = original
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet_narrow", 16)
    yield made, backbone, dim
    for run, _ in made.values():
        run.close()


def test_the_health_pass_runs_with_and_without_labels(health_run, capsys):
    made, backbone, dim = health_run
    (run, datasets), (_, unlabelled) = made[True], made[False]
    assert datasets.health_sizes == (64, 64) and unlabelled.val is None
    projector, probe = nn.Linear(dim, 16), nn.Linear(dim, 10)
    before = torch.get_rng_state()
    metrics = run_module.evaluate(run, datasets, backbone, probe, 0, embed=projector)
    assert torch.equal(torch.get_rng_state(), before)  # the training's random stream is untouched
    assert metrics["health_rank_backbone_max"] == min(64, dim) and metrics["health_rank_embed_max"] == 16
    assert 1 <= metrics["health_rank_embed"] <= 16 and metrics["health_std_healthy"] == 1 / 4
    assert 0 < metrics["health_alignment"] < 4 and -8 < metrics["health_uniformity"] < 0
    assert "probe_acc1" in metrics
    # the same sample and views without labels: the same health, and nothing else
    again = run_module.evaluate(run, unlabelled, backbone, None, 0, embed=projector)
    assert again == {k: v for k, v in metrics.items() if k.startswith("health_")}
    assert "warning" not in capsys.readouterr().out  # a random projector of a random backbone is no collapse


def test_a_collapsed_embedding_prints_one_warning_line(health_run, capsys):
    made, backbone, dim = health_run
    run, datasets = made[False]
    constant = nn.Linear(dim, 16)
    nn.init.zeros_(constant.weight)  # every image maps to the bias: one point
    run.collapse_said = False  # the fixture's run is shared: this test starts from a run that has said nothing
    metrics = run_module.evaluate(run, datasets, backbone, None, 3, embed=constant)
    assert metrics["health_std"] == 0 and metrics["health_alignment"] == 0 and metrics["health_uniformity"] == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: epoch 3: the representation is collapsed to one point")
    assert metrics["health_warning"] == 1
    # Said once per run: the next epoch that still shows it is marked in metrics.jsonl, not printed again.
    later = run_module.evaluate(run, datasets, backbone, None, 4, embed=constant)
    assert later["health_warning"] == 1 and "warning" not in capsys.readouterr().out
