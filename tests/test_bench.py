"""bench/synthetic_features.py: the spectrum statistics on features whose answer is known by construction."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features_script():
    spec = importlib.util.spec_from_file_location("synthetic_features_script", ROOT / "bench" / "synthetic_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collapsed_features_read_as_one_direction_of_the_nuisance(features_script):
    gen = torch.Generator().manual_seed(0)
    nuisance = torch.rand(400, generator=gen)
    labels = torch.arange(400) % 4
    # 8 dims: all but a 1e-3 sliver of the variance lies along one direction that is 3 * nuisance.
    direction = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1]) / 8**0.5
    feats = 3 * nuisance[:, None] * direction + 1e-3 * torch.randn(400, 8, generator=gen)
    rank, share, corr, r2 = features_script.spectrum_stats(feats, nuisance, labels, 4)
    assert rank == pytest.approx(1.0, abs=0.01) and share == pytest.approx(1.0, abs=1e-4)
    assert corr == pytest.approx(1.0, abs=1e-4)
    assert r2 < 0.05  # the nuisance is independent of the labels: the class explains ~3/400 of it


def test_isotropic_class_features(features_script):
    labels = torch.arange(400) % 4
    # Features are the centred one-hot of the class: 3 equal principal components (4 classes, one
    # degree of freedom lost to centring), all explained by the class.
    feats = torch.nn.functional.one_hot(labels, 4).float()
    rank, share, corr, r2 = features_script.spectrum_stats(feats, torch.rand(400), labels, 4, top=3)
    assert rank == pytest.approx(3.0, abs=1e-6) and share == pytest.approx(1 / 3, abs=1e-6)
    assert r2 == pytest.approx(1.0, abs=1e-9)
