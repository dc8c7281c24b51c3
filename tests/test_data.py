"""Datasets and deterministic loaders: synthetic generation, folders, errors, sampler, view seeding."""
import multiprocessing
import os
import pickle
import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common import data
from common.augment import pretrain_transform, val_transform
from common.cli import UsageError

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def synthetic_train():
    return data.load_dataset("synthetic", None, "train", seed=0)


@pytest.fixture(scope="module")
def small_set():
    images, labels = data.synthetic_images(96, seed=5)
    return data.ImageTensorDataset(images, labels, 10, 32)


def test_synthetic_dataset(synthetic_train):
    val = data.load_dataset("synthetic", None, "val", seed=0)
    assert len(synthetic_train) == 8000 and len(val) == 2000
    assert synthetic_train.images.dtype == torch.uint8 and synthetic_train.images.shape[1:] == (3, 32, 32)
    assert synthetic_train.num_classes == 10 and synthetic_train.image_size == 32
    assert torch.bincount(synthetic_train.targets).tolist() == [800] * 10
    assert torch.bincount(val.targets).tolist() == [200] * 10
    assert not torch.equal(synthetic_train.images[:2000], val.images)
    image, label = synthetic_train[3]
    assert torch.equal(image, synthetic_train.images[3]) and label == int(synthetic_train.targets[3])
    assert type(label) is int


def test_synthetic_is_a_function_of_the_seed():
    a, la = data.synthetic_images(50, seed=7)
    b, lb = data.synthetic_images(50, seed=7)
    c, _ = data.synthetic_images(50, seed=8)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.float().std() > 30  # not a blank canvas


def test_unknown_dataset():
    with pytest.raises(UsageError, match="synthetic"):
        data.load_dataset("mnist", "x", "train")


# ---- EpochSampler -------------------------------------------------------------------------------

def shard(size, rank, world, epoch, skip=0, seed=0):
    sampler = data.EpochSampler(size, rank, world, seed)
    sampler.set_epoch(epoch, skip)
    items = list(sampler)
    assert len(items) == len(sampler)
    assert all(e == epoch for _, e in items)
    return [i for i, _ in items]


def test_sampler_shards_are_disjoint_and_cover():
    size, world = 103, 4
    shards = [shard(size, r, world, epoch=2) for r in range(world)]
    assert all(len(s) == size // world for s in shards)
    union = set().union(*map(set, shards))
    assert len(union) == (size // world) * world and union <= set(range(size))
    # rank r holds positions r::world of one shared permutation
    interleaved = [shards[p % world][p // world] for p in range(len(union))]
    assert interleaved == shard(size, 0, 1, epoch=2)[: len(union)]


def test_sampler_order_depends_on_epoch_and_seed_only():
    assert shard(50, 0, 1, epoch=0) == shard(50, 0, 1, epoch=0)
    assert shard(50, 0, 1, epoch=0) != shard(50, 0, 1, epoch=1)
    assert shard(50, 0, 1, epoch=0) != shard(50, 0, 1, epoch=0, seed=1)
    assert sorted(shard(50, 0, 1, epoch=3)) == list(range(50))
    unshuffled = data.EpochSampler(10, shuffle=False)
    assert [i for i, _ in unshuffled] == list(range(10))


def test_sampler_skip_gives_the_tail():
    full = shard(103, 1, 3, epoch=5)
    assert shard(103, 1, 3, epoch=5, skip=7) == full[7:]
    assert shard(103, 1, 3, epoch=5, skip=len(full)) == []


# ---- ViewsDataset and loaders -------------------------------------------------------------------

def test_views_are_a_function_of_seed_epoch_index(small_set):
    views = data.ViewsDataset(small_set, pretrain_transform("symmetric", 32, *IDENTITY), seed=3)
    rng_before = torch.get_rng_state()
    first, label, index = views[(4, 1)]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert index == 4 and label == int(small_set.targets[4])
    torch.manual_seed(123)  # global RNG state must not matter
    again, _, _ = views[(4, 1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch, _, _ = views[(4, 2)]
    assert not torch.equal(first[0], other_epoch[0])
    same_image = data.ViewsDataset(data.ImageTensorDataset(small_set.images[[4, 4]], [0, 0], 10, 32), views.transform, 3)
    assert not torch.equal(same_image[(0, 1)][0][0], same_image[(1, 1)][0][0])  # index enters the seed
    other_seed, _, _ = data.ViewsDataset(small_set, views.transform, seed=4)[(4, 1)]
    assert not torch.equal(first[0], other_seed[0])


def batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip)
    return list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (views_a, labels_a, idx_a), (views_b, labels_b, idx_b) in zip(a, b):
        assert torch.equal(idx_a, idx_b) and torch.equal(labels_a, labels_b)
        assert all(torch.equal(x, y) for x, y in zip(views_a, views_b))


def test_pretrain_loader_batches(small_set):
    transform = pretrain_transform("asymmetric", 32, *IDENTITY, num_small=2)
    loader = data.pretrain_loader(small_set, transform, batch_size=20, workers=0, seed=0)
    out = batches(loader, epoch=0)
    assert len(out) == len(loader) == 96 // 20  # drop_last
    views, labels, indexes = out[0]
    assert [tuple(v.shape) for v in views] == [(20, 3, 32, 32)] * 2 + [(20, 3, 18, 18)] * 2
    assert labels.shape == indexes.shape == (20,)
    assert torch.equal(labels, small_set.targets[indexes])
    # resuming after one batch reproduces the rest of the epoch exactly
    assert_same_batches(batches(loader, epoch=0, skip=20), out[1:])


def test_pretrain_loader_same_with_workers(small_set):
    transform = pretrain_transform("symmetric", 32, *IDENTITY)
    single = data.pretrain_loader(small_set, transform, batch_size=16, workers=0, seed=1)
    multi = data.pretrain_loader(small_set, transform, batch_size=16, workers=2, seed=1)
    assert_same_batches(batches(single, epoch=3), batches(multi, epoch=3))


def test_pretrain_loader_rejects_tiny_shards(small_set):
    transform = pretrain_transform("symmetric", 32, *IDENTITY)
    with pytest.raises(UsageError, match="48 images per process, fewer than --batch-size 64"):
        data.pretrain_loader(small_set, transform, batch_size=64, workers=0, seed=0, rank=1, world_size=2)


def test_eval_loader_is_ordered_and_complete(small_set):
    loader = data.eval_loader(small_set, val_transform(32, *IDENTITY), batch_size=40, workers=0)
    images, labels = zip(*loader)
    assert [len(x) for x in labels] == [40, 40, 16]
    assert torch.equal(torch.cat(labels), small_set.targets)
    assert torch.allclose(torch.cat(images), small_set.images.float() / 255)


# ---- folders ------------------------------------------------------------------------------------

def write_png(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_labelled_folder(tmp_path):
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            write_png(tmp_path / name / f"{i}.png", 10 * c + i)
    write_png(tmp_path / "val" / "dog" / "a.png", 99)
    train = data.load_dataset("folder", str(tmp_path), "train")
    assert len(train) == 6 and train.num_classes == 2 and train.image_size == 224
    assert sorted(train.targets) == [0, 0, 0, 1, 1, 1]  # "val" is not a class
    image, label = train[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    val = data.load_dataset("folder", str(tmp_path), "val")
    assert len(val) == 1 and val.targets == [1]  # class indexes follow the training folders


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        write_png(tmp_path / f"{i}.png", i)
    train = data.load_dataset("folder", str(tmp_path), "train")
    assert len(train) == 4 and train.num_classes == 0 and train.targets == [-1] * 4
    assert data.load_dataset("folder", str(tmp_path), "val") is None


def test_imagenet_layout(tmp_path):
    for split in ("train", "val"):
        for name in ("n01", "n02"):
            write_png(tmp_path / split / name / "x.png", 0)
    assert len(data.load_dataset("imagenet100", str(tmp_path), "val")) == 2
    with pytest.raises(UsageError, match="class folders under"):
        data.load_dataset("imagenet", str(tmp_path / "train"), "train")  # one level too deep


def test_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        data.load_dataset("folder", str(tmp_path / "missing"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images.*empty"):
        data.load_dataset("folder", str(tmp_path / "empty"), "train")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png at all")
    broken = data.load_dataset("folder", str(tmp_path / "broken"), "train")
    with pytest.raises(UsageError, match="bad.png"):
        broken[0]
    (tmp_path / "file").write_text("not a folder")
    for name in ("folder", "imagenet", "cifar10"):
        with pytest.raises(UsageError, match="is a file, not a folder"):
            data.load_dataset(name, str(tmp_path / "file"), "train")


def awkward_folder(root):
    """Valid but awkward class folders: every image mode, odd sizes, upper-case extensions, nesting, links,
    and files to skip: not images, hidden, a broken link, one beside the class folders."""
    cat, dog = root / "cat", root / "dog"
    (dog / "puppies" / "small").mkdir(parents=True)
    cat.mkdir()
    Image.new("RGB", (20, 10), (200, 100, 50)).save(cat / "a.JPG")
    Image.new("L", (7, 13), 77).save(cat / "b.png")
    Image.new("RGBA", (9, 9), (10, 20, 30, 0)).save(cat / "c.PNG")  # fully transparent: RGB values kept
    palette = Image.new("P", (5, 6), 0)
    palette.putpalette([40, 50, 60] + [0, 0, 0] * 255)
    palette.save(cat / "d.png", transparency=0)
    sixteen = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(sixteen).save(cat / "e.png")
    Image.new("RGB", (33, 17), (1, 2, 3)).save(dog / "puppies" / "small" / "f.jpeg")  # belongs to dog
    (dog / "g.png").symlink_to(cat / "b.png")
    (dog / "loop").symlink_to(dog)  # a link cycle: walked once
    (dog / "broken.png").symlink_to(root / "nowhere.png")
    (cat / "notes.txt").write_text("not an image")
    (cat / ".DS_Store").write_bytes(b"\0\0")
    (cat / "._a.jpg").write_bytes(b"macOS resource fork")  # image extension, but hidden
    (root / "README.md").write_text("beside the class folders")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class
    Image.new("RGB", (4, 4)).save(root / ".ipynb_checkpoints" / "x.png")


def test_awkward_but_valid_folder(tmp_path, capsys):
    awkward_folder(tmp_path)
    train = data.load_dataset("folder", str(tmp_path), "train")
    again = data.load_dataset("folder", str(tmp_path), "train")
    assert train.num_classes == 2 and train.paths == again.paths
    names = [os.path.relpath(p, tmp_path) for p in train.paths]
    assert names == ["cat/a.JPG", "cat/b.png", "cat/c.PNG", "cat/d.png", "cat/e.png",
                     "dog/g.png", "dog/puppies/small/f.jpeg"]
    assert train.targets == [0, 0, 0, 0, 0, 1, 1]
    lines = [l for l in capsys.readouterr().out.splitlines() if "skipped" in l]
    # README.md, notes.txt, .DS_Store, ._a.jpg, broken.png; printed once however often the folder is loaded
    assert len(lines) == 1 and "skipped 5 files" in lines[0], lines
    images = [train[i][0] for i in range(len(train))]
    assert all(im.mode == "RGB" for im in images)
    assert [im.size for im in images] == [(20, 10), (7, 13), (9, 9), (5, 6), (3, 1), (7, 13), (33, 17)]
    assert images[1].getpixel((0, 0)) == (77, 77, 77) and images[2].getpixel((0, 0)) == (10, 20, 30)
    assert images[3].getpixel((0, 0)) == (40, 50, 60)
    assert [images[4].getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]  # 16 bits scaled, not clipped
    # Mixed sizes batch through both transforms.
    views = pretrain_transform("symmetric", 16, *IDENTITY)
    assert all(v.shape == (3, 16, 16) for image in images for v in views(image))
    batch, labels = next(iter(data.eval_loader(train, val_transform(16, *IDENTITY), 8, 0)))
    assert batch.shape == (7, 3, 16, 16) and labels.tolist() == train.targets


def test_flat_folder_skips_hidden_and_stray_files(tmp_path, capsys):
    for i in range(3):
        write_png(tmp_path / f"{i}.PNG", i)
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("a,b")
    (tmp_path / ".cache").mkdir()  # a hidden folder does not make the folder labelled
    train = data.load_dataset("folder", str(tmp_path), "train")
    assert len(train) == 3 and train.num_classes == 0 and train.targets == [-1] * 3
    assert "skipped 2 files" in capsys.readouterr().out


# ---- torchvision datasets, offline ----------------------------------------------------------------

def test_cifar_offline_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(UsageError, match="cifar-10-batches-py"):
        data.load_dataset("cifar10", str(tmp_path), "train")


def test_cifar_files_load_as_chw(tmp_path, monkeypatch):
    # Fake batches in CIFAR's layout (rows of 3072 bytes, CHW order); integrity checks skipped.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = np.repeat(np.arange(4 * 3, dtype=np.uint8).reshape(4, 3, 1), 1024, axis=2).reshape(4, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [0, 1, 2, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    val = data.load_dataset("cifar10", str(tmp_path), "val")
    assert len(val) == 4 and val.num_classes == 10 and val.image_size == 32
    assert val.classes == [str(i) for i in range(10)]  # batches.meta's label names: the UMAP legend's
    assert val.images.shape == (4, 3, 32, 32) and val.images.is_contiguous()
    assert val.images[2, 1].unique().tolist() == [7]  # image 2, channel 1 of the CHW rows
    assert val[3][1] == 3


def _ignore_sigterm_and_wait():
    data.leave_signals_to_main(0)
    time.sleep(60)


def test_exit_stops_workers_that_ignore_sigterm():
    """Workers ignore SIGTERM, the only signal multiprocessing's exit handler sends before joining them:
    run_main's clean-up must still stop them, or a run would hang after writing its outputs."""
    from common.cli import stop_worker_processes
    worker = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_wait, daemon=True)
    worker.start()
    time.sleep(0.5)
    worker.terminate()  # what the exit handler does: ignored
    worker.join(1)
    assert worker.is_alive()
    start = time.time()
    stop_worker_processes()
    assert not worker.is_alive() and time.time() - start < 10
