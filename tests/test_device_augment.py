"""On-device batched augmentation: kernels equal to torchvision's, parameter and output statistics
of the presets, per-image independence, determinism, loader layout, one end-to-end run."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from common import augment, data, device_augment as dev
from common.cli import UsageError
from common.run import build_data
from conftest import TINY, read_metrics

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # views stay in [0, 1], easy to inspect
# As in test_augment: 4.5 standard deviations, so a correct sampler fails one check in ~150000 runs.
SIGMAS = 4.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine a second thread only waits (see data.single_threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def binomial_tolerance(p, n):
    return SIGMAS * (p * (1 - p) / n) ** 0.5


def mean_tolerance(a, b):
    """Tolerance on the difference of the means of two independent samples."""
    return SIGMAS * (a.var() / len(a) + b.var() / len(b)).sqrt().item()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def params(spec, n, height=32, width=32, seed=0):
    return dev.sample_params(spec, torch.full((n,), height), torch.full((n,), width), gen(seed))


# ---- kernels: equal to torchvision's functional ops on float images ------------------------------

def test_resized_crops_equal_torchvision_antialiased_bicubic():
    images = torch.rand(4, 3, 32, 32, generator=gen())
    box = torch.tensor([[0.0, 0, 32, 32], [3, 4, 10, 12], [1, 2, 30, 25], [5, 0, 27, 32]])
    flip = torch.tensor([False, True, False, True])
    for size in (32, 18):  # upsampling, and shrinking where the kernel widens (antialiasing)
        out = dev.resized_crops(images, box, flip, size)
        for i in range(4):
            top, left, h, w = box[i].int().tolist()
            ref = TF.resized_crop(images[i], top, left, h, w, [size, size], TF.InterpolationMode.BICUBIC,
                                  antialias=True).clamp(0, 1)
            assert torch.allclose(out[i], ref.flip(-1) if flip[i] else ref, atol=1e-5)


def test_colour_ops_equal_torchvision():
    x = torch.rand(6, 3, 8, 8, generator=gen(1))
    torchvision_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = torch.tensor([[1.3, 0.7, 1.2, 0.05], [0.6, 1.4, 0.3, -0.1], [1.0, 1.0, 1.0, 0.0]] * 2)
    order = torch.stack([torch.randperm(4, generator=gen(i)) for i in range(6)])
    jitter_on = torch.tensor([True] * 5 + [False])
    out = dev.colour_jitter(x.clone(), dict(jitter_on=jitter_on, jitter=factors, order=order))
    for i in range(6):
        ref = x[i]
        for op in order[i].tolist() if jitter_on[i] else []:
            ref = torchvision_ops[op](ref, float(factors[i, op]))
        assert torch.allclose(out[i], ref, atol=1e-5)
    assert torch.allclose(dev.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, 3), atol=1e-6)
    sigma = torch.tensor([0.1, 0.7, 2.0, 1.3, 0.5, 1.0])
    blurred = dev.gaussian_blur(x, sigma, 7)
    for i in range(6):
        assert torch.allclose(blurred[i], TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2), atol=1e-5)


# ---- parameter statistics -----------------------------------------------------------------------

def test_crop_boxes_match_random_resized_crop():
    n, scale = 3000, (0.08, 1.0)
    top, left, h, w = dev.crop_boxes(torch.full((n,), 32), torch.full((n,), 32), scale, gen())
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    ref = torch.tensor([RandomResizedCrop.get_params(image, scale, dev.RATIO) for _ in range(n)], dtype=torch.float)
    for ours, theirs in ((h * w / 1024, ref[:, 2] * ref[:, 3] / 1024), (w / h, ref[:, 3] / ref[:, 2]),
                         (top + h / 2, ref[:, 0] + ref[:, 2] / 2), (left + w / 2, ref[:, 1] + ref[:, 3] / 2)):
        assert abs(ours.mean() - theirs.mean()) < mean_tolerance(ours, theirs)
        assert abs(ours.std() - theirs.std()) < 0.1 * theirs.std()
    area = h * w / 1024
    assert area.min() >= 0.07 and area.max() <= 1  # rounding to whole pixels moves the bounds a little
    assert (w / h).min() >= 0.6 and (w / h).max() <= 1.7
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    # where no draw fits, the same central fallback as torchvision: a 10 x 100 strip is far wider than 4:3
    strip = dev.crop_boxes(torch.full((5,), 10), torch.full((5,), 100), (0.9, 1.0), gen())
    expected = RandomResizedCrop.get_params(torch.zeros(3, 10, 100), (0.9, 1.0), dev.RATIO)
    assert all(torch.stack(strip, 1)[i].tolist() == list(expected) for i in range(5))


@pytest.mark.parametrize("preset", augment.PRESETS)
def test_probabilities_follow_the_preset_table(preset):
    n = 2000
    large, small = augment.preset_pipelines(preset, 32)
    for spec in large + [small]:
        p = params(spec, n)
        for key, prob in (("jitter_on", spec.jitter_p), ("gray", spec.gray_p), ("blur", spec.blur_p),
                          ("solarize", spec.solarize_p), ("flip", 0.5)):
            assert abs(p[key].float().mean() - prob) <= binomial_tolerance(prob, n) + 1e-9, (key, spec)
        jittered = p["jitter"][p["jitter_on"]]
        for column, spread in enumerate(spec.jitter):
            centre = 0.0 if column == dev.HUE else 1.0
            values = jittered[:, column]
            if not len(values):  # the weak ReSSL view never jitters
                continue
            assert values.min() >= centre - spread and values.max() <= centre + spread
            if spread:  # uniform: its mean is the centre, its std spread / sqrt(3)
                assert abs(values.mean() - centre) < SIGMAS * spread / math.sqrt(3 * len(values))
        assert (p["jitter"][~p["jitter_on"]] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
        assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
        # every op takes every position of the random order about a quarter of the time
        counts = torch.stack([torch.bincount(p["order"][:, k], minlength=4) for k in range(4)]).float() / n
        assert ((counts - 0.25).abs() <= binomial_tolerance(0.25, n)).all()


def test_images_of_a_batch_draw_independently():
    spec = augment.preset_pipelines("symmetric", 32)[0][0]
    p = params(spec, 4000)
    box = p["box"]
    assert len(set(map(tuple, box.tolist()))) > 3000  # not one shared box
    area = box[:, 2] * box[:, 3]
    for a, b in ((area[0::2], area[1::2]), (p["sigma"][0::2], p["sigma"][1::2]),
                 (p["gray"][0::2].float(), p["gray"][1::2].float())):
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(r) < SIGMAS / math.sqrt(len(a))
    # two copies of one image in a batch get different views
    images = data.synthetic_images(1, seed=0)[0].expand(2, -1, -1, -1)
    views = dev.apply_view(images.float() / 255, params(spec, 2), 32, *(torch.tensor(v).view(1, 3, 1, 1) for v in IDENTITY))
    assert not torch.equal(views[0], views[1])


# ---- output statistics: the same as the torchvision presets -------------------------------------

def noise_batch(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen(seed))


def loader_views(images, preset, batch_size, num_large=2, seed=0, epoch=0):
    ds = data.ImageTensorDataset(images, torch.zeros(len(images)), 1, 32)
    loader = dev.device_loader(ds, dev.view_specs(preset, 32, num_large), *IDENTITY, batch_size, seed)
    loader.sampler.set_epoch(epoch)
    return [torch.cat(v) for v in zip(*[views for views, _, _ in loader])]


def gray_fraction(views):
    return ((views[:, 0] == views[:, 1]) & (views[:, 1] == views[:, 2])).flatten(1).all(1).float().mean()


def test_grayscale_and_solarize_fractions():
    n = 1000
    views = loader_views(noise_batch(n), "asymmetric", 250)
    for v in views:  # colour noise stays coloured under jitter: equal channels only from Grayscale
        assert abs(gray_fraction(v) - 0.2) < binomial_tolerance(0.2, n)
    weak = loader_views(noise_batch(200), "ressl", 200)[1]
    assert gray_fraction(weak) == 0
    # a white image stays >= 153 under any jitter, so only Solarize makes it dark
    white = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    first, second = [(v.flatten(1).mean(1) < 0.5).float().mean() for v in loader_views(white, "asymmetric", 500)]
    assert first == 0 and abs(second - 0.2) < binomial_tolerance(0.2, n)
    dark = (loader_views(white[:500], "vicreg", 500)[0].flatten(1).mean(1) < 0.5).float().mean()
    assert abs(dark - 0.1) < binomial_tolerance(0.1, 500)
    # --invert-prob: ressl never solarizes, so a dark view of a white image is an inverted one.
    ds = data.ImageTensorDataset(white[:500], torch.zeros(500), 1, 32)
    views = dev.view_specs("ressl", 32, invert_prob=0.3)
    loader = dev.device_loader(ds, views, *IDENTITY, 500, 0)
    loader.sampler.set_epoch(0)
    for view in next(iter(loader))[0]:
        dark = (view.flatten(1).amax(1) < 0.5).float().mean()
        assert abs(dark - 0.3) < binomial_tolerance(0.3, 500)


def test_output_statistics_match_torchvision():
    images, _ = data.synthetic_images(256, seed=3)
    ours = torch.cat(loader_views(images, "symmetric", 128))
    torch.manual_seed(0)
    transform = augment.pretrain_transform("symmetric", 32, *IDENTITY)
    with data.single_threaded():
        theirs = torch.stack([v for image in images for v in transform(image)])
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)), lambda v: v[:, 0].mean((1, 2)) - v[:, 2].mean((1, 2))):
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < mean_tolerance(a, b)


# ---- no host syncs, static shapes ---------------------------------------------------------------

aten = torch.ops.aten
# Ops that read a device value back to the host (bool(t) and t.item() arrive as _local_scalar_dense).
READS_BACK = (aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.nonzero, aten.masked_select)


class OpCounter(TorchDispatchMode):
    """Records every aten op dispatched (name and argument shapes), and those that wait on the device:
    READS_BACK, indexing with a boolean mask, and lift_fresh (torch.tensor(data) built from Python
    values: a host -> device copy on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.from_python = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            bool_index = any(t is not None and t.dtype == torch.bool for t in args[1])
        else:
            bool_index = False
        if func.overloadpacket in READS_BACK or bool_index:
            self.syncs.append(str(func))
        self.from_python += func.overloadpacket is aten.lift_fresh
        return func(*args, **(kwargs or {}))


def test_the_op_counter_sees_syncs():
    t = torch.rand(8, generator=gen())
    with OpCounter() as counter:
        t.sum().item()
        bool(t.sum() > 0)
        t.nonzero()
        t[t > 0.5]
        t[t > 0.5] = 0
        t.masked_select(t > 0.2)
    assert [name.split(".")[1] for name in counter.syncs] == [
        "_local_scalar_dense", "_local_scalar_dense", "nonzero", "index", "index_put_", "masked_select"]
    with OpCounter() as counter:
        torch.tensor([1.0, 2.0])
    assert counter.syncs == [] and counter.from_python == 1


@pytest.mark.parametrize("invert_prob", [0.0, 0.3])
@pytest.mark.parametrize("preset", augment.PRESETS)
def test_a_batch_never_waits_on_the_device(preset, invert_prob):
    """No op of a batch reads the device back, none builds a tensor from Python values once the
    constants exist (the first batch may build them), and the ops and their shapes are the same
    every batch: no data-dependent shapes (cudnn.benchmark tunes the blur once)."""
    ds = data.ImageTensorDataset(noise_batch(48), torch.zeros(48), 1, 32)
    views = dev.view_specs(preset, 32, num_large=2, num_small=2 if preset == "multicrop" else 0,
                           invert_prob=invert_prob)
    loader = dev.device_loader(ds, views, *IDENTITY, 16, seed=0)
    loader.sampler.set_epoch(0)
    counters = [OpCounter() for _ in range(3)]
    batches = iter(loader)
    for counter in counters:
        with counter:
            next(batches)
    assert [c.syncs for c in counters] == [[], [], []]
    assert counters[1].from_python == counters[2].from_python == 0
    assert counters[1].ops == counters[2].ops


def test_steps_that_do_not_fire_are_identities():
    x = torch.rand(6, 3, 16, 16, generator=gen(2))
    sigma, blur = torch.linspace(0.1, 2.0, 6), torch.tensor([True, False] * 3)
    blurred = dev.gaussian_blur(x, sigma, 7, blur)
    assert torch.equal(blurred[~blur], x[~blur])  # the delta kernel: exactly
    assert torch.allclose(blurred[blur], dev.gaussian_blur(x[blur], sigma[blur], 7), atol=1e-6)
    assert torch.allclose(dev.adjust_hue(x, torch.zeros(6)), x, atol=1e-6)
    identity = dict(jitter=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(6, 4),
                    order=torch.stack([torch.randperm(4, generator=gen(i)) for i in range(6)]))
    assert torch.allclose(dev.colour_jitter(x, identity), x, atol=1e-6)
    # Skipping the steps a view never fires (asymmetric at 32px: no blur; first view: no solarize)
    # changes nothing but float rounding.
    spec = augment.preset_pipelines("asymmetric", 32)[0][0]
    p = params(spec, 6, 16, 16)
    skipped, full = (dev.apply_view(x, p, 16, *(torch.tensor(v).view(1, 3, 1, 1) for v in IDENTITY), spec=s)
                     for s in (spec, None))
    assert torch.allclose(skipped, full, atol=1e-6)


# ---- the loader ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_set():
    images, labels = data.synthetic_images(96, seed=5)
    return data.ImageTensorDataset(images, labels, 10, 32)


def batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip)
    return list(loader)


def test_layout_matches_the_torchvision_loader(small_set):
    views = dev.view_specs("multicrop", 32, num_large=2, num_small=2)
    ours = batches(dev.device_loader(small_set, views, *IDENTITY, 20, seed=4), epoch=2)
    transform = augment.pretrain_transform("multicrop", 32, *IDENTITY, num_small=2)
    theirs = batches(data.pretrain_loader(small_set, transform, 20, workers=0, seed=4), epoch=2)
    assert len(ours) == len(theirs) == 96 // 20
    for (v_a, l_a, i_a), (v_b, l_b, i_b) in zip(ours, theirs):
        assert torch.equal(i_a, i_b) and torch.equal(l_a, l_b)
        assert [(v.shape, v.dtype) for v in v_a] == [(v.shape, v.dtype) for v in v_b]
    assert [tuple(v.shape) for v in ours[0][0]] == [(20, 3, 32, 32)] * 2 + [(20, 3, 18, 18)] * 2


def test_loader_is_deterministic_and_resumable(small_set):
    views = dev.view_specs("asymmetric", 32)
    loader = dev.device_loader(small_set, views, *IDENTITY, 16, seed=1)
    rng = torch.get_rng_state()
    first = batches(loader, epoch=3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither used nor moved
    torch.manual_seed(123)
    again = batches(dev.device_loader(small_set, views, *IDENTITY, 16, seed=1), epoch=3)
    resumed = batches(loader, epoch=3, skip=32)  # two batches already trained on
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[2], b[2])
    for a, b in zip(first[2:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[2], b[2])
    other_seed = batches(dev.device_loader(small_set, views, *IDENTITY, 16, seed=2), epoch=3)
    other_epoch = batches(loader, epoch=4)
    assert not torch.equal(first[0][2], other_epoch[0][2]) and not torch.equal(first[0][2], other_seed[0][2])


def test_subset_and_errors(small_set):
    subset = torch.utils.data.Subset(small_set, range(40))
    loader = dev.device_loader(subset, dev.view_specs("symmetric", 32), *IDENTITY, 16, seed=0)
    assert len(loader) == 2 and max(i.max() for _, _, i in batches(loader, 0)) < 40
    with pytest.raises(UsageError, match="48 images per process, fewer than --batch-size 64"):
        dev.device_loader(small_set, dev.view_specs("symmetric", 32), *IDENTITY, 64, 0, rank=1, world_size=2)
    args = SimpleNamespace(data_backend="device", dataset="folder")
    with pytest.raises(UsageError, match="use --data-backend dali or torchvision"):
        build_data(args, run=None)


def test_simclr_trains_with_the_device_backend(run, tmp_path):
    # one thread: a second only waits on a busy 2-core machine (18 s instead of 50 s here)
    run("simclr.py", *TINY, "--data-backend", "device", "--max-steps", "2", "--out-dir", tmp_path,
        env={"OMP_NUM_THREADS": "1"})
    steps = [m for m in read_metrics(tmp_path) if m["type"] == "step"]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    assert (tmp_path / "backbone.pt").exists()
