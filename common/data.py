"""Datasets, the synthetic offline dataset, and deterministic pretraining/evaluation loaders.

In-memory datasets (CIFAR, STL-10, synthetic) hold one uint8 NCHW tensor and return
`(uint8 CHW tensor, int label)`; folder datasets return `(PIL RGB image, int label)`.
Label -1 marks an unlabelled image. Every dataset carries `num_classes` (0 when unlabelled),
`image_size` (the default crop side), `targets` and `classes` (the class names, None when unlabelled).

Pretraining data is a pure function of (seed, epoch, position): `EpochSampler` draws each
epoch's order from (seed, epoch) and `ViewsDataset` seeds each image's augmentations from
(seed, epoch, index), so worker count, rank layout and resuming mid-epoch never change a batch.
"""
import contextlib
import hashlib
import math
import os
import signal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from common.cli import UsageError

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "folder", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SYNTHETIC_CLASSES = ("disk", "square", "triangle", "star", "plus", "ring", "bars", "ell", "crescent", "frame")


class ImageTensorDataset(Dataset):
    """Images held as one uint8 NCHW tensor (fast to index, shared by forked workers)."""

    def __init__(self, images, targets, num_classes, image_size, classes=None):
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)
        self.num_classes, self.image_size, self.classes = num_classes, image_size, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index])


class FolderDataset(Dataset):
    """Image files listed as (path, label); decoded to RGB PIL images on access."""

    def __init__(self, samples, num_classes, image_size=224, classes=None):
        self.paths = [path for path, _ in samples]
        self.targets = [label for _, label in samples]
        self.num_classes, self.image_size, self.classes = num_classes, image_size, classes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_rgb(self.paths[index]), self.targets[index]


def load_rgb(path):
    """Open an image file as 8-bit RGB, whatever its mode (grayscale, RGBA, palette, CMYK, 16-bit, float);
    a broken file is a user problem, named with its path."""
    try:
        with Image.open(path) as image:
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # what PIL asks for; the RGB values are the palette's either way
            elif image.mode.startswith(("I", "F")):
                image = _to_8bit(image)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path} ({error}): remove or replace the file") from None


def _to_8bit(image):
    """16-bit or 32-bit integer and float grayscale (PNG, TIFF) as 8-bit "L": PIL's convert("RGB") would clip
    every value above 255 to white. I;16 spans 0-65535; I is read as 16-bit when any value exceeds 255; F as
    0-1 when no value exceeds 1."""
    values = np.asarray(image, dtype=np.float64)
    top = values.max(initial=0)
    full = 65535 if image.mode.startswith("I;16") or (image.mode == "I" and top > 255) else \
        1 if image.mode == "F" and top <= 1 else 255
    return Image.fromarray((values * (255 / full)).clip(0, 255).round().astype(np.uint8), "L")


def _hidden(name):
    """Dot files and folders (.DS_Store, ._x.jpg resource forks, .ipynb_checkpoints) and macOS zip debris."""
    return name.startswith(".") or name == "__MACOSX"


def _is_image(directory, name):
    return (not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(os.path.join(directory, name)))  # isfile: false for a broken link


def _image_files(directory, skipped):
    """Image files below `directory`, recursively (following links, each folder once), in a stable sorted order,
    yielded as the walk finds them. Names of files that are not images (other extensions, hidden, broken links) are
    appended to `skipped`."""
    seen = set()
    for parent, subdirs, files in os.walk(directory, followlinks=True):
        seen.add(os.path.realpath(parent))
        # Prune hidden folders and links back to a folder already walked (a link cycle would never end).
        subdirs[:] = sorted(d for d in subdirs
                            if not _hidden(d) and os.path.realpath(os.path.join(parent, d)) not in seen)
        for name in sorted(files):
            if _is_image(parent, name):
                yield os.path.join(parent, name)
            else:
                skipped.append(os.path.join(parent, name))


def _subfolders(root, ignore=()):
    """Class folders of `root`: its visible sub-folders (or links to folders) not in `ignore`."""
    return sorted(d for d in os.listdir(root)
                  if os.path.isdir(os.path.join(root, d)) and d not in ignore and not _hidden(d))


_REPORTED = set()  # roots whose skipped files were already reported: one line per folder and process


def _report_skipped(root, skipped):
    if skipped and root not in _REPORTED and int(os.environ.get("RANK", 0)) == 0:
        _REPORTED.add(root)
        names = ", ".join(os.path.relpath(path, root) for path in skipped[:3])
        print(f"{root}: skipped {len(skipped)} files that are not images, are hidden, or lie outside the class "
              f"folders ({names}{', ...' if len(skipped) > 3 else ''})", flush=True)


def scan_folder(root, classes, ignore=()):
    """Samples of `root`: the images of each class sub-folder (at any depth below it) with its index, or, with
    no classes, the images directly in `root` labelled -1. Sub-folders in `ignore` are skipped; other files
    (not images, hidden, broken links, or beside the class folders) are counted in one printed line."""
    skipped = []
    if not classes:
        samples = []
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if _is_image(root, name):
                samples.append((path, -1))
            elif not os.path.isdir(path):  # folders here are `ignore`d (val/) or hidden
                skipped.append(path)
    else:
        stray = set(_subfolders(root, ignore)) - set(classes)
        if stray:
            raise UsageError(f"{root} has class folders absent from the training set: {sorted(stray)[:5]}")
        skipped = [os.path.join(root, f) for f in sorted(os.listdir(root))  # files beside the class folders
                   if not os.path.isdir(os.path.join(root, f))]
        samples = [(path, label) for label, name in enumerate(classes)
                   for path in _image_files(os.path.join(root, name), skipped)]
    _report_skipped(root, skipped)
    return samples


def load_folder(name, data_dir, split):
    """imagenet/imagenet100 (DATA/train, DATA/val) and folder (DATA or DATA/train, DATA/val)."""
    if not data_dir or not os.path.exists(data_dir):
        raise UsageError(f"data directory {data_dir} does not exist: pass --data-dir with your images")
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir} is a file, not a folder: pass the folder that holds the images")
    train_root = os.path.join(data_dir, "train")
    if not os.path.isdir(train_root):
        if name != "folder":
            raise UsageError(f"{name} expects class folders under {train_root} and {data_dir}/val")
        train_root = data_dir
    # In the plain `folder` layout, DATA/val holds validation images, not a class.
    ignore = ("val",) if train_root == data_dir else ()
    classes = _subfolders(train_root, ignore)
    root = train_root if split == "train" else os.path.join(data_dir, "val")
    if not os.path.isdir(root):
        if name == "folder":
            return None  # no validation images: the caller skips probe validation
        raise UsageError(f"{name} expects class folders under {root}")
    samples = scan_folder(root, classes, ignore if root == train_root else ())
    if not samples:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}: "
                         "put images there, in one sub-folder per class for labels")
    return FolderDataset(samples, len(classes), classes=classes or None)


def first_image_sides(data_dir, count=8):
    """The longer side of the first `count` images of a folder dataset (under DATA/train, else DATA), in scan
    order, from their headers: a quick look at the image size before the full scan. [] when none is found."""
    train_root = os.path.join(data_dir, "train")
    sides = []
    for path in _image_files(train_root if os.path.isdir(train_root) else data_dir, skipped=[]):
        with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError), Image.open(path) as image:
            sides.append(max(image.size))
        if len(sides) == count:
            break
    return sides


def load_torchvision(name, data_dir, split):
    """CIFAR-10/100 and STL-10 via torchvision, downloaded into `data_dir` when absent."""
    import torchvision.datasets as tvd
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir} is a file, not a folder: pass the folder to hold {name}")
    if name == "stl10":
        kwargs = {"split": {"train": "train", "unlabeled": "train+unlabeled", "val": "test"}[split]}
        expected, build = "stl10_binary/", tvd.STL10
    else:
        kwargs = {"train": split == "train"}
        expected = "cifar-10-batches-py/" if name == "cifar10" else "cifar-100-python/"
        build = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    try:
        raw = build(data_dir, download=False, **kwargs)
    except RuntimeError:  # absent or corrupt: try the network once
        existing = os.path.abspath(data_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        try:
            raw = build(data_dir, download=True, **kwargs)
        except Exception as error:  # offline shows up as URLError, socket or HTTP errors
            remove_empty_folders(data_dir, existing)  # the download made them: a failed one leaves nothing behind
            raise UsageError(f"{name} not found in {data_dir} and could not be downloaded "
                             f"(offline? {type(error).__name__}): put {expected} there") from None
    if name == "stl10":
        images, targets, size = torch.from_numpy(raw.data), torch.from_numpy(raw.labels).long(), 96
    else:  # CIFAR stores NHWC
        images, targets, size = torch.from_numpy(raw.data).permute(0, 3, 1, 2), torch.tensor(raw.targets), 32
    return ImageTensorDataset(images.contiguous(), targets, len(raw.classes), size, classes=list(raw.classes))


def remove_empty_folders(path, stop):
    """Remove `path` and its parents while they are empty folders, up to (not including) `stop`."""
    path, stop = os.path.abspath(path), os.path.abspath(stop)
    while path != stop and path.startswith(stop + os.sep):
        try:
            os.rmdir(path)  # only an empty folder: anything the download left stays
        except OSError:
            return
        path = os.path.dirname(path)


def _box(u, v, half_u, half_v):
    """Signed distance (approximate outside corners) to an axis-aligned box at the origin."""
    return torch.maximum(u.abs() - half_u, v.abs() - half_v)


def _shape_distance(shape, u, v):
    """Signed distance of points (u, v) to one shape class, drawn within the unit disk."""
    rho = torch.sqrt(u * u + v * v)
    if shape == "disk":
        return rho - 0.8
    if shape == "square":
        return _box(u, v, 0.62, 0.62)
    if shape == "triangle":
        edges = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
        return torch.maximum(torch.maximum(edges[0], edges[1]), edges[2]) - 0.45
    if shape == "star":
        phase = (torch.atan2(v, u) * 5 / (2 * math.pi)) % 1.0
        return (rho - (0.35 + 0.6 * (2 * phase - 1).abs())) * 0.6
    if shape == "plus":
        return torch.minimum(_box(u, v, 0.85, 0.22), _box(u, v, 0.22, 0.85))
    if shape == "ring":
        return (rho - 0.62).abs() - 0.18
    if shape == "bars":
        return torch.minimum(_box(u, v - 0.42, 0.85, 0.18), _box(u, v + 0.42, 0.85, 0.18))
    if shape == "ell":
        return torch.minimum(_box(u + 0.35, v, 0.2, 0.85), _box(u - 0.1, v + 0.65, 0.65, 0.2))
    if shape == "crescent":
        return torch.maximum(rho - 0.8, 0.62 - torch.sqrt((u - 0.42) ** 2 + v * v))
    return (torch.maximum(u.abs(), v.abs()) - 0.58).abs() - 0.2  # frame: a hollow square


def synthetic_images(num_images, seed, size=32):
    """Procedural images of the 10 SYNTHETIC_CLASSES (balanced, shuffled) -> (uint8 NCHW, labels).

    One shape per image, at a random position (up to 0.3 of the half-width off centre), scale
    (0.5-0.9) and any rotation, over a background with a few small blobs and a line segment of
    random colours. Shape and background are each filled with a smooth random colour field (a 3x3
    grid of colours, bilinearly upsampled), one dark and one light, in random order. Pixel distance
    then follows colour, polarity and layout rather than the class; and since two crops of an image
    see different parts of its colour fields, colour is no shortcut to match them: what the crops
    of one image share is mostly its shape.
    """
    gen = torch.Generator().manual_seed(seed)
    n = num_images
    labels = (torch.arange(n) % len(SYNTHETIC_CLASSES))[torch.randperm(n, generator=gen)]
    axis = (torch.arange(size) + 0.5) * 2 / size - 1  # pixel centres in [-1, 1]
    y, x = axis.view(1, -1, 1), axis.view(1, 1, -1)

    def draw(low, high):  # one uniform value per image, shaped to broadcast over the pixel grid
        return (low + (high - low) * torch.rand(n, generator=gen)).view(n, 1, 1)

    def paint(canvas, distance, colour):  # analytic anti-aliasing: coverage of a 1-pixel edge
        alpha = (0.5 - distance * size / 2).clamp_(0, 1).unsqueeze(1).expand_as(canvas)
        return canvas.lerp_(colour.expand_as(canvas), alpha)

    def colour_field():
        grid = torch.rand(n, 3, 3, 3, generator=gen)
        return torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)

    dark, light = colour_field() * 0.35, 1 - (1 - colour_field()) * 0.4
    light_shape = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    shape_colour, canvas = torch.where(light_shape, light, dark), torch.where(light_shape, dark, light)
    for _ in range(3):  # blobs
        cx, cy, radius = draw(-1, 1), draw(-1, 1), draw(0.05, 0.1)
        distance = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) - radius
        canvas = paint(canvas, distance, torch.rand(n, 3, 1, 1, generator=gen))
    # A line segment from a to b: distance to the nearest point of the segment.
    ax, ay, bx, by = draw(-1, 1), draw(-1, 1), draw(-1, 1), draw(-1, 1)
    t = (((x - ax) * (bx - ax) + (y - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2 + 1e-6)).clamp(0, 1)
    distance = torch.sqrt((x - ax - t * (bx - ax)) ** 2 + (y - ay - t * (by - ay)) ** 2) - 0.03
    canvas = paint(canvas, distance, torch.rand(n, 3, 1, 1, generator=gen))
    scale, rotation, cx, cy = draw(0.5, 0.9), draw(0, 2 * math.pi), draw(-0.3, 0.3), draw(-0.3, 0.3)
    # Rotate and scale the pixel grid into each shape's own frame.
    u = ((x - cx) * rotation.cos() + (y - cy) * rotation.sin()) / scale
    v = ((y - cy) * rotation.cos() - (x - cx) * rotation.sin()) / scale
    distance = torch.empty(n, size, size)
    for label, shape in enumerate(SYNTHETIC_CLASSES):
        rows = labels == label
        distance[rows] = _shape_distance(shape, u[rows], v[rows]) * scale[rows]
    canvas = paint(canvas, distance, shape_colour)
    return (canvas * 255).round().clamp(0, 255).to(torch.uint8), labels


def cached_synthetic_images(count, seed):
    """synthetic_images, read back from $SSL_SYNTHETIC_CACHE when that folder is set and holds them (else generated
    there once). Only the test suite sets it (tests/conftest.py): its ~300 short runs would otherwise spend ~2 s of
    CPU each generating the same images. Users never get a file: without the variable nothing is written."""
    folder = os.environ.get("SSL_SYNTHETIC_CACHE")
    if not folder:
        return synthetic_images(count, seed)
    path = os.path.join(folder, f"synthetic-{count}-{seed}.pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            return saved["images"], saved["labels"]
        except Exception:  # a file cut short by a killed writer: make it again
            pass
    images, labels = synthetic_images(count, seed)
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"  # one writer at a time per file name; the rename is atomic
    torch.save({"images": images, "labels": labels}, temporary)
    os.replace(temporary, path)
    return images, labels


def load_dataset(name, data_dir, split, seed=0):
    """Dataset `name` (one of DATASETS) for split "train", "val" or (stl10) "unlabeled".

    Returns None only for the val split of a `folder` dataset without a val/ sub-folder.
    """
    if split not in ("train", "val") + (("unlabeled",) if name == "stl10" else ()):
        raise UsageError(f"{name} has no split {split!r}: use train or val")
    if name == "synthetic":
        count, offset = {"train": (8000, 0), "val": (2000, 1)}[split]
        images, labels = cached_synthetic_images(count, seed + offset)
        return ImageTensorDataset(images, labels, len(SYNTHETIC_CLASSES), 32, classes=list(SYNTHETIC_CLASSES))
    if name in ("cifar10", "cifar100", "stl10"):
        return load_torchvision(name, data_dir, split)
    if name in ("imagenet", "imagenet100", "folder"):
        return load_folder(name, data_dir, split)
    raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def class_balanced_subset(labels, fraction, seed):
    """Sorted indexes of a class-balanced `fraction` of a labelled set (the 1% / 10% protocols of the SSL papers):
    round(fraction * n_c) images of each class c with n_c images (halves to even, at least one), drawn at random
    from a generator seeded with `seed` alone, so the same seed gives the same subset in every process and on every
    rerun. Unlabelled images (label -1) are never chosen; fraction 1 keeps every labelled image."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[labels[order] >= 0]
    by_class = order[torch.sort(labels[order], stable=True).indices]  # classes in turn, shuffled within each
    counts = torch.bincount(labels[by_class])
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(by_class)) - starts[labels[by_class]]
    keep = (counts * fraction).round().clamp(min=1).long()
    return by_class[rank_in_class < keep[labels[by_class]]].sort().values


def mix_seed(*values):
    """A 63-bit seed that is a stable function of `values` (same in every process and run)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler):
    """Yields (index, epoch) for this rank: a (seed, epoch)-determined permutation truncated to
    floor(size / world_size) * world_size, rank r taking positions r::world_size, minus the first
    `skip` (items already trained on when resuming mid-epoch). Call set_epoch before each epoch."""

    def __init__(self, size, rank=0, world_size=1, seed=0, shuffle=True):
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.per_rank = size // world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed("order", self.seed, self.epoch))
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.arange(self.size)
        mine = order[: self.per_rank * self.world_size][self.rank :: self.world_size][self.skip :]
        return ((index, self.epoch) for index in mine.tolist())

    def __len__(self):
        return max(self.per_rank - self.skip, 0)


@contextlib.contextmanager
def single_threaded():
    """Run a block with one intra-op thread, as DataLoader workers do. A 32px augmentation is
    hundreds of tiny ops for which thread hand-offs cost more than the work (>10x slower with
    2 threads on a busy 2-core machine); this also makes workers=0 compute exactly like workers>0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ViewsDataset(Dataset):
    """Indexed by (index, epoch): returns (views, label, index), the views' randomness seeded
    from (seed, epoch, index) alone."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        image, label = self.dataset[index]
        # fork_rng restores the caller's CPU RNG; seeding only the CPU generator (not
        # torch.manual_seed) leaves CUDA RNG streams untouched when workers=0.
        with torch.random.fork_rng(devices=[]), single_threaded():
            torch.default_generator.manual_seed(mix_seed("views", self.seed, int(epoch), int(index)))
            views = self.transform(image)
        return views, label, index


class TransformedDataset(Dataset):
    """(transform(image), label) pairs of a dataset, for evaluation."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        with single_threaded():
            return self.transform(image), label


def leave_signals_to_main(worker_id):
    """DataLoader workers ignore SIGTERM/SIGINT (a cluster signals the whole process group): the main
    process finishes its step, writes last.pt and then shuts the workers down itself."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def pretrain_loader(dataset, transform, batch_size, workers, seed, rank=0, world_size=1, pin_memory=False):
    """Deterministic loader of (list of view batches, labels, indexes); `loader.sampler` is the
    EpochSampler on which to call set_epoch(epoch, skip) before iterating."""
    per_rank = len(dataset) // world_size
    if per_rank < batch_size:
        raise UsageError(f"dataset has {per_rank} images per process, fewer than --batch-size {batch_size}")
    sampler = EpochSampler(len(dataset), rank, world_size, seed)
    # A private generator keeps loader construction from consuming the global RNG.
    return DataLoader(ViewsDataset(dataset, transform, seed), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, drop_last=True,
                      persistent_workers=workers > 0, generator=torch.Generator(),
                      worker_init_fn=leave_signals_to_main)


def eval_loader(dataset, transform, batch_size, workers, pin_memory=False):
    """Ordered loader of (images, labels) over the whole dataset, for probes and kNN."""
    return DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=workers > 0, generator=torch.Generator(),
                      worker_init_fn=leave_signals_to_main)
