"""DALI loader in CPU-only mode on generated image folders: layout per preset, labels and indexes,
sharding, epoch order, drop-last, resume, crops equal to torchvision's, errors, one end-to-end run.
Skipped where DALI is not installed (pip install -r requirements-dali.txt), except the errors."""
import importlib.util
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from common import augment, data
from common.cli import UsageError
from common.device_augment import sample_params, view_specs
from common.run import build_data
from conftest import read_metrics

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
                                reason="NVIDIA DALI not installed: pip install -r requirements-dali.txt")
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
CLASSES, PER_CLASS = 3, 16


def write_images(root, count, ext, seed=0):
    """`count` images of random sizes spread over CLASSES class folders (smooth gradients + noise)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = rng.integers(36, 80, 2)
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, rng.integers(0, 256))], -1)
        pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
        folder = os.path.join(root, f"class{i % CLASSES}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.{ext}"))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_images(root, CLASSES * PER_CLASS, "jpg")
    return root


@pytest.fixture(scope="module")
def folder(jpegs):
    return data.load_dataset("folder", str(jpegs), "train")


def loader(dataset, preset="asymmetric", batch_size=8, num_small=0, **kw):
    from common import dali
    return dali.dali_loader(dataset, view_specs(preset, 32, num_small=num_small), *IDENTITY, batch_size,
                            kw.pop("seed", 0), threads=1, **kw)


def batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip)
    return list(loader)


def test_errors_name_the_fix(monkeypatch):
    from common import dali
    with pytest.raises(UsageError, match="for cifar10 use --data-backend device"):
        dali.check_available("cifar10")
    with pytest.raises(UsageError, match="for synthetic use --data-backend device"):
        build_data(SimpleNamespace(data_backend="dali", dataset="synthetic"), run=None)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    with pytest.raises(UsageError, match="pip install -r requirements-dali.txt"):
        dali.check_available("folder")
    with pytest.raises(UsageError, match="--invert-prob is not implemented in the DALI graph"):
        dali.dali_loader(None, view_specs("asymmetric", 32, invert_prob=0.5), (0.5,) * 3, (0.5,) * 3, 8, 0)


@needs_dali
@pytest.mark.parametrize("preset,num_small", [("asymmetric", 0), ("ressl", 0), ("multicrop", 2), ("symmetric", 0)])
def test_layout_per_preset(folder, preset, num_small):
    out = batches(loader(folder, preset, num_small=num_small), epoch=0)
    assert len(out) == CLASSES * PER_CLASS // 8
    views, labels, indexes = out[0]
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 18, 18)] * num_small
    assert all(v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 for v in views)
    assert labels.dtype == indexes.dtype == torch.long
    targets = torch.tensor(folder.targets)
    for _, labels, indexes in out:  # index -> the file's class folder
        assert torch.equal(labels, targets[indexes])
        assert all(os.path.basename(os.path.dirname(folder.paths[i])) == f"class{l}" for i, l in zip(indexes, labels))


@needs_dali
def test_order_shards_drop_last_and_resume(folder):
    one = loader(folder, batch_size=10)
    first = batches(one, epoch=0)
    assert len(one) == len(first) == 4  # 48 images, last partial batch dropped
    sampler = data.EpochSampler(len(folder), seed=0)
    sampler.set_epoch(0)
    assert torch.cat([i for _, _, i in first]).tolist() == [i for i, _ in sampler][:40]  # the torchvision order
    again = batches(one, epoch=0)
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x[0] + [x[2]], y[0] + [y[2]]))
    assert not torch.equal(batches(one, epoch=1)[0][2], first[0][2])
    resumed = batches(one, epoch=0, skip=20)  # two batches already trained on: the rest, identical
    assert all(torch.equal(a, b) for x, y in zip(first[2:], resumed) for a, b in zip(x[0] + [x[2]], y[0] + [y[2]]))
    shards = [torch.cat([i for _, _, i in batches(loader(folder, rank=r, world_size=2), epoch=3)]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 24 and not set(shards[0].tolist()) & set(shards[1].tolist())


@needs_dali
def test_colour_steps_fire_at_the_preset_rates(tmp_path):
    """Gray views (equal channels) and solarized white views at the asymmetric preset's rates, over
    200 images; the tolerances are 4.5 binomial standard deviations, as in test_augment."""
    n, tolerance = 200, 4.5 * (0.2 * 0.8 / 200) ** 0.5
    write_images(tmp_path / "colour", n, "jpg", seed=2)  # colourful: jitter alone never makes them gray
    views = [torch.cat(v) for v in zip(*[v for v, _, _ in batches(loader(data.load_dataset(
        "folder", str(tmp_path / "colour"), "train"), batch_size=50), epoch=0)])]
    for v in views:
        gray = ((v[:, 0] == v[:, 1]) & (v[:, 1] == v[:, 2])).flatten(1).all(1).float().mean()
        assert abs(gray - 0.2) < tolerance
    for i in range(n):  # white stays >= 153 under any jitter: only Solarize makes it dark
        os.makedirs(tmp_path / "white" / "a", exist_ok=True)
        Image.new("RGB", (40, 40), (255, 255, 255)).save(tmp_path / "white" / "a" / f"{i}.jpg")
    first, second = [torch.cat(v) for v in zip(*[v for v, _, _ in batches(loader(data.load_dataset(
        "folder", str(tmp_path / "white"), "train"), batch_size=50), epoch=0)])]
    dark = lambda v: (v.flatten(1).mean(1) < 0.5).float().mean()
    assert dark(first) == 0 and abs(dark(second) - 0.2) < tolerance


@needs_dali
def test_crops_equal_torchvision(tmp_path):
    """The weak ReSSL view (crop + flip) of lossless images: the same pixels as torchvision's
    antialiased bicubic resized_crop of the box the loader drew."""
    write_images(tmp_path, 8, "png", seed=1)
    pngs = data.load_dataset("folder", str(tmp_path), "train")
    views, _, indexes = batches(loader(pngs, "ressl", seed=5), epoch=2)[0]
    images = [TF.pil_to_tensor(data.load_rgb(pngs.paths[i])) for i in indexes]
    heights, widths = torch.tensor([tuple(image.shape[1:]) for image in images]).unbind(1)
    gen = torch.Generator().manual_seed(data.mix_seed("dali-views", 5, 2, 0, 0))
    strong, weak = augment.preset_pipelines("ressl", 32)[0]
    sample_params(strong, heights, widths, gen)
    p = sample_params(weak, heights, widths, gen)
    for i, image in enumerate(images):
        top, left, h, w = p["box"][i].int().tolist()
        ref = TF.resized_crop(image.float(), top, left, h, w, [32, 32], TF.InterpolationMode.BICUBIC, antialias=True)
        ref = (ref.flip(-1) if p["flip"][i] else ref).clamp(0, 255) / 255
        error = (views[1][i] - ref).abs() * 255
        # Measured: mean 0.06-0.09, max 1.8-3.5 grey levels (DALI's own filter tables); a wrong box,
        # flip or kernel (plain bicubic without antialiasing) gives means of 2.4-6.3.
        assert error.mean() < 0.25 and error.max() < 5


@needs_dali
def test_simclr_trains_with_dali(run, jpegs, tmp_path):
    run("simclr.py", "--dataset", "folder", "--data-dir", jpegs, "--data-backend", "dali", "--backbone",
        "resnet_narrow", "--crop-size", "32", "--batch-size", "8", "--workers", "1", "--epochs", "1",
        "--max-steps", "2", "--log-every", "1", "--knn-every", "-1", "--umap-every", "-1", "--out-dir", tmp_path,
        env={"OMP_NUM_THREADS": "1"})
    steps = [m for m in read_metrics(tmp_path) if m["type"] == "step"]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    assert (tmp_path / "backbone.pt").exists()
