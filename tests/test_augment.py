"""Augmentation presets: view layout, probabilities of the random steps, evaluation transform."""
import dataclasses

import pytest
import torch
from PIL import Image

from common.augment import NORMALIZATION, PRESETS, preset_pipelines, pretrain_transform, val_transform
from common.cli import UsageError

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # views stay in [0, 1], easy to inspect
# Fractions over n ~ 1000 views, allowed 4.5 binomial standard deviations: a correct preset fails
# one check in ~150000 runs, while a probability off by 0.1 (e.g. 0.3 for 0.2) exceeds the tolerance
# by 3 standard deviations and fails in > 99.8% of runs.
SIGMAS = 4.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Augmenting a small image is many tiny ops: intra-op threads only add contention (as in
    DataLoader workers and data.ViewsDataset, which also run transforms single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def binomial_tolerance(p, n):
    return SIGMAS * (p * (1 - p) / n) ** 0.5


def noise_image(seed=0, size=32):
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_views_32px(preset):
    torch.manual_seed(0)
    num_small = 6 if preset == "multicrop" else 2
    views = pretrain_transform(preset, 32, *NORMALIZATION["cifar10"], num_small=num_small)(noise_image())
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 18, 18)] * num_small
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])  # two random crops of noise never coincide


@pytest.mark.parametrize("preset", PRESETS)
def test_views_224px_from_pil(preset):
    torch.manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (260, 300, 3), dtype=torch.uint8).numpy())
    views = pretrain_transform(preset, 224, *NORMALIZATION["imagenet"], num_large=3, num_small=1)(image)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 3 + [(3, 96, 96)]
    assert all(v.dtype == torch.float32 for v in views)


def test_normalization_is_applied():
    torch.manual_seed(0)
    mean, std = NORMALIZATION["cifar10"]
    gray = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    view = pretrain_transform("ressl", 32, mean, std)(gray)[1]  # the weak view: crop and flip only
    expected = (128 / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(view.mean((1, 2)), expected, atol=0.05)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(UsageError, match="symmetric_weak"):
        pretrain_transform("simclr", 32, *IDENTITY)


def gray_fraction(views):
    return sum(bool((v[0] == v[1]).all() and (v[1] == v[2]).all()) for v in views) / len(views)


def test_grayscale_probability():
    # Colour noise stays coloured under jitter (saturation >= 0.8): equal channels only from Grayscale.
    torch.manual_seed(0)
    asym = pretrain_transform("asymmetric", 32, *IDENTITY)
    views = [v for i in range(500) for v in asym(noise_image(i))]
    assert abs(gray_fraction(views) - 0.2) < binomial_tolerance(0.2, len(views))
    ressl = pretrain_transform("ressl", 32, *IDENTITY)
    pairs = [ressl(noise_image(i)) for i in range(300)]
    assert abs(gray_fraction([p[0] for p in pairs]) - 0.2) < binomial_tolerance(0.2, len(pairs))
    assert gray_fraction([p[1] for p in pairs]) == 0  # the weak view is never gray


def solarized_fraction(views):
    # A white image stays >= 153 under any jitter, so only Solarize makes it dark.
    return sum(bool(v.mean() < 0.5) for v in views) / len(views)


def test_solarize_probability_and_pipeline_alternation():
    torch.manual_seed(0)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    asym = pretrain_transform("asymmetric", 32, *IDENTITY, num_large=4)
    views = [asym(white) for _ in range(500)]
    first = [v for vs in views for v in vs[0::2]]  # views 1 and 3 use pipeline 1: never solarized
    second = [v for vs in views for v in vs[1::2]]
    assert solarized_fraction(first) == 0
    assert abs(solarized_fraction(second) - 0.2) < binomial_tolerance(0.2, len(second))
    vicreg = pretrain_transform("vicreg", 32, *IDENTITY)
    views = [v for _ in range(500) for v in vicreg(white)]
    assert abs(solarized_fraction(views) - 0.1) < binomial_tolerance(0.1, len(views))
    assert solarized_fraction([v for _ in range(50) for v in pretrain_transform("symmetric_weak", 32, *IDENTITY)(white)]) == 0


def test_val_transform():
    image = noise_image()
    out = val_transform(32, *IDENTITY)(image)
    assert type(out) is torch.Tensor and torch.allclose(out, image.float() / 255)  # no resampling at 32px
    stl = val_transform(96, *NORMALIZATION["stl10"])(noise_image(size=96))
    assert stl.shape == (3, 96, 96)
    pil = Image.fromarray(torch.randint(0, 256, (260, 300, 3), dtype=torch.uint8).numpy())
    assert val_transform(224, *NORMALIZATION["imagenet"])(pil).shape == (3, 224, 224)
    assert val_transform(32, *IDENTITY)(noise_image(size=40)).shape == (3, 32, 32)


@pytest.mark.parametrize("preset", PRESETS)
def test_min_scale_replaces_the_large_crops_scale_only(preset):
    large, small = preset_pipelines(preset, 32)
    large_30, small_30 = preset_pipelines(preset, 32, min_scale=0.3)
    assert [p.scale for p in large_30] == [(0.3, 1.0)] * len(large)
    assert small_30 == small and small.scale != (0.3, 1.0)
    # everything but the scale is the preset's
    assert [dataclasses.replace(p, scale=(0.3, 1.0)) for p in large] == large_30


def test_min_scale_bounds_the_crop_area():
    """A crop of at least 90% of the area keeps a centred 1-pixel dot (from a 32px image of one dot,
    a 0.08-area crop would miss it most of the time)."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, 16, 16] = 255
    weak_views = lambda transform: [transform(image)[1] for _ in range(50)]  # ressl's 2nd view: crop, flip
    torch.manual_seed(0)
    assert all(view.amax() > 0 for view in weak_views(pretrain_transform("ressl", 32, *IDENTITY, min_scale=0.9)))
    assert not all(view.amax() > 0 for view in weak_views(pretrain_transform("ressl", 32, *IDENTITY)))


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_min_scale_out_of_range_is_a_usage_error(value):
    with pytest.raises(UsageError, match="min-scale"):
        preset_pipelines("asymmetric", 32, min_scale=value)


def test_invert_probability_on_every_view():
    torch.manual_seed(0)
    white = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    assert all(p.invert_p == 0 for p in preset_pipelines("ressl", 32)[0])  # no preset inverts
    # ressl never solarizes, and jitter keeps white >= 0.6: only the inversion takes a view below 0.5.
    transform = pretrain_transform("ressl", 32, *IDENTITY, num_small=1, invert_prob=0.3)
    views = [transform(white) for _ in range(400)]
    for i in range(3):  # strong, weak and small views alike
        dark = sum(bool(vs[i].amax() < 0.5) for vs in views) / len(views)
        assert abs(dark - 0.3) < binomial_tolerance(0.3, len(views))
        assert all(vs[i].amax() < 0.5 or vs[i].amin() >= 0.5 for vs in views)  # inverted whole, or not at all


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_invert_probability_out_of_range_is_a_usage_error(value):
    with pytest.raises(UsageError, match="invert-prob"):
        preset_pipelines("asymmetric", 32, invert_prob=value)
