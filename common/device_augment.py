"""On-device batched augmentation (`--data-backend device`) for in-memory datasets.

The uint8 dataset lives as one tensor on the training device. Each step takes the next batch of
the same EpochSampler order as the torchvision loader and augments the whole batch at once, every
image with its own random parameters, in plain torch ops: no worker processes, no per-image Python.

The presets are those of common/augment.py (`preset_pipelines`, one `Pipeline` per view), applied
in the same order: crop -> colour jitter with prob p -> grayscale -> blur -> solarize -> flip ->
normalize. Crops are resized by two batched matrix products with per-image weights that are
exactly torchvision's antialiased bicubic kernel (a = -0.5, widened when shrinking), so a view
differs from the per-image path only in that pixels stay float in [0, 1] between steps instead of
being rounded to uint8 after each one. Flips are folded into the resize weights (mirrored rows),
which commutes with every later step (all per-pixel, or the symmetric blur).

Nothing in a batch waits on the device, and every shape is the same each step. Each op runs over
the whole batch with per-image parameters; an image for which a step does not fire gets the step's
identity (factor 1, hue shift 0, a one-tap blur kernel, a False torch.where mask) rather than being
left out by a boolean index, which would read the mask back to the host and give the blur a new
shape (so a new cudnn tuning) nearly every step. Steps a view never fires (probability 0) are
skipped in Python. Small constants (luma weights, hue offsets, pixel grids, blur taps) are built
once per device; the epoch's order crosses to the device once per epoch, not per batch.

Randomness: a generator on the device seeded from (seed, epoch, rank, position in the epoch), so a
run resumed mid-epoch draws exactly what the uninterrupted run drew (for the same world size).
`sample_params` runs on any device and is shared with the DALI path (common/dali.py).
"""
import functools
import math

import torch
import torch.nn.functional as F

from common import augment
from common.cli import UsageError
from common.data import EpochSampler, mix_seed

DATASETS = ("cifar10", "cifar100", "stl10", "synthetic")
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # columns of params["jitter"]


def view_specs(preset, size, num_large=2, num_small=0, small_size=None, min_scale=None, invert_prob=0.0):
    """[(Pipeline, crop side)] per view, large crops first: the layout of augment.pretrain_transform."""
    if num_large < 1 or num_small < 0:
        raise UsageError(f"need at least one large crop and no negative count (got {num_large}, {num_small})")
    large, small = augment.preset_pipelines(preset, size, min_scale, invert_prob)
    small_size = small_size or augment.default_small_size(size)
    return [(large[i % len(large)], size) for i in range(num_large)] + [(small, small_size)] * num_small


@functools.lru_cache(maxsize=None)
def _constant(values, device, dtype=torch.float32, shape=(-1,)):
    """A small constant tensor, built once per device: torch.tensor(list, device=...) in the step
    would copy host -> device every batch. Shared between calls: never modify it in place."""
    return torch.tensor(values, dtype=dtype, device=device).view(shape)


@functools.lru_cache(maxsize=None)
def _pixel_centres(size, device):
    """0.5, 1.5, ..., size - 0.5: the pixel centres along an image axis, built once per size and device."""
    return torch.arange(size, device=device, dtype=torch.float32) + 0.5


def _scaled(u, low, high):
    """Uniform [0, 1) draws mapped to uniform [low, high)."""
    return low + (high - low) * u


def crop_boxes(heights, widths, scale, gen, ratio=RATIO, attempts=10):
    """RandomResizedCrop.get_params for a batch: (top, left, height, width) float tensors.

    Each image tries `attempts` (area, log-aspect) draws at once and keeps the first that fits;
    images where none fits fall back to the central crop clipped to the ratio range.
    Heights and widths go through every op together, as (N, 2) (or (N, 2, attempts)) tensors."""
    n = len(heights)
    sizes = torch.stack([heights, widths], 1).float()  # (N, 2): height, width
    # One draw (one kernel): the areas (N, attempts), the log-aspects (N, attempts), the tops, the lefts.
    u = torch.rand(2 * n * attempts + 2 * n, generator=gen, device=gen.device)
    area_u, aspect_u = u[:2 * n * attempts].view(2, n, attempts)
    area = sizes.prod(1, keepdim=True) * _scaled(area_u, *scale)
    aspect = torch.exp(_scaled(aspect_u, math.log(ratio[0]), math.log(ratio[1])))  # w / h
    # (h, w) = (sqrt(area / aspect), sqrt(area * aspect)) in whole pixels, for every attempt: (N, 2, attempts)
    drawn = torch.stack([area / aspect, area * aspect], 1).sqrt().round()
    fits = ((drawn > 0) & (drawn <= sizes[:, :, None])).all(1)  # (N, attempts)
    first = fits.float().argmax(1)  # index of the first fitting draw (0 if none)
    found = fits.any(1, keepdim=True)
    drawn = drawn.gather(2, first.view(n, 1, 1).expand(n, 2, 1)).squeeze(2)
    # The fallback: the whole image, its width cut to height * ratio[1] or its height to width / ratio[0].
    fallback = torch.minimum(sizes, (sizes.flip(1) * _constant((1 / ratio[0], ratio[1]), gen.device)).round())
    hw = torch.where(found, drawn, fallback)
    # Offsets uniform over the integer positions that keep the crop inside the image; centred in the fallback.
    room = sizes - hw
    offsets = torch.where(found, (u[2 * n * attempts:].view(2, n).T * (room + 1)).floor(), (room / 2).floor())
    return (*offsets.unbind(1), *hw.unbind(1))


def sample_params(spec, heights, widths, gen):
    """Independent random parameters of one view for every image of a batch (sizes as tensors).

    Steps that do not fire get identity parameters (factor 1, hue 0, flags False), so one
    batched op serves the whole batch. `jitter` columns: BRIGHTNESS, CONTRAST, SATURATION, HUE.
    Keys: box (N, 4: top, left, h, w), jitter_on, jitter (N, 4), order (N, 4), gray, blur, sigma,
    solarize, flip, and invert only with --invert-prob.

    Two draws (two kernels) per view, this one and crop_boxes'. Each is laid out as consecutive
    draws of its quantities, in the order listed, would be: on the CPU generator (DALI's) the
    values are those of one torch.rand per quantity."""
    n, device = len(heights), gen.device
    box = torch.stack(crop_boxes(heights, widths, spec.scale, gen), 1)
    # Rows of N draws: the jitter coin, four jitter factors, the (N, 4) keys of the jitter order,
    # then gray, blur, sigma, solarize, flip; invert last and only when used, so that runs without
    # --invert-prob keep their random stream.
    u = torch.rand((14 + (spec.invert_p > 0), n), generator=gen, device=device)
    coin = lambda row, p: u[row] < p
    jitter_on = coin(0, spec.jitter_p)
    b, c, s, hue = spec.jitter
    low, high = (max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue), (1 + b, 1 + c, 1 + s, hue)
    span = tuple(top - bottom for top, bottom in zip(high, low))
    factors = torch.addcmul(_constant(low, device), u[1:5].T, _constant(span, device))  # uniform in [low, high)
    jitter = torch.where(jitter_on[:, None], factors, _constant((1.0, 1.0, 1.0, 0.0), device))
    return dict(box=box, jitter_on=jitter_on, jitter=jitter,
                order=u[5:9].reshape(n, 4).argsort(1),  # ColorJitter applies its four ops in a random order per image
                gray=coin(9, spec.gray_p), blur=coin(10, spec.blur_p), sigma=_scaled(u[11], *augment.BLUR_SIGMA),
                solarize=coin(12, spec.solarize_p), flip=coin(13, 0.5),
                **({"invert": coin(14, spec.invert_p)} if spec.invert_p > 0 else {}))


def _cubic(x, a=-0.5):
    """Keys' cubic convolution kernel; a = -0.5 is PIL's and torchvision's antialiased bicubic."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, size, in_size, flip):
    """(..., size, in_size) matrices, one per element of `start`, `length`, `flip` (same shapes),
    resampling the pixels [start, start + length) of an image axis to `size` pixels as torchvision's
    antialiased bicubic resize of the cropped image: kernel widened by the shrink factor, taps
    limited to the crop, weights normalized per output. `flip` (bool) mirrors the output."""
    scale = (length / size)[..., None, None]
    output = _pixel_centres(size, start.device)[:, None]
    output = torch.where(flip[..., None, None], size - output, output)  # output j samples where size-1-j would
    centre = start[..., None, None] + output * scale  # (..., size, 1), in input pixels
    pixel = _pixel_centres(in_size, start.device)
    weights = _cubic((pixel - centre) / scale.clamp_min(1))
    inside = (pixel > start[..., None, None]) & (pixel < (start + length)[..., None, None])
    weights = torch.where(inside, weights, 0.0)
    return weights / weights.sum(-1, keepdim=True)


def resized_crops(images, box, flip, size):
    """Crop boxes (top, left, h, w in pixels) of float NCHW images resized to size x size: two batched
    matrix products (columns, then rows) with per-image bicubic weights; flipped images mirrored."""
    n, c, height, width = images.shape
    # Row and column weights in one pass over (N, 2) axes: rows never mirror, columns do where flipped.
    # Both span the longer side; taps past an axis's end are 0 (outside every crop) and are cut off.
    mirror = flip[:, None] & _constant((False, True), images.device, torch.bool)
    weights = resize_weights(box[:, :2], box[:, 2:], size, max(height, width), mirror)  # (N, 2, size, side)
    rows, cols = weights[:, 0, :, :height], weights[:, 1, :, :width]
    # Columns first, all channels in one (c * H, W) @ (W, size) product per image (no per-channel copy of weights).
    out = rows.unsqueeze(1) @ (images.reshape(n, c * height, width) @ cols.transpose(1, 2)).view(n, c, height, size)
    return out.clamp_(0, 1)  # bicubic overshoots at edges


def grayscale(x):
    """(N, 1, H, W) luma of float RGB images."""
    return (x * _constant(GRAY_WEIGHTS, x.device, x.dtype, (1, 3, 1, 1))).sum(1, keepdim=True)


def adjust_hue(x, shift):
    """Rotate the hue of float RGB images by `shift` (fractions of a turn, one per image) in HSV;
    a shift of 0 gives the images back (to float rounding).

    V = max, V * S = max - min, and each channel of the HSV -> RGB conversion is
    V - V * S * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 * hue) mod 6, n = 5, 3, 1 for R, G, B."""
    maxc, argmax = x.max(1, keepdim=True)  # ties go to the first channel, as in torchvision
    delta = maxc - x.amin(1, keepdim=True)
    # Hue in sixths of a turn, by which channel is largest: red (g - b), green 2 + (b - r), blue 4 + (r - g);
    # the channels rolled by one and by two give the three differences (g - b, b - r, r - g) at once.
    differences = x.roll(-1, 1) - x.roll(-2, 1)
    sixths = differences.gather(1, argmax) / delta.clamp_min(1e-12) + 2 * argmax
    offsets = _constant((5.0, 3.0, 1.0), x.device, x.dtype, (1, 3, 1, 1))
    k = (offsets + sixths + 6 * shift.view(-1, 1, 1, 1)) % 6
    return maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1)


def _blend(x, keep, to_luma, to_mean):
    """keep * x + to_luma * luma + to_mean * mean luma, clamped to [0, 1], with per-image weights:
    brightness, contrast and saturation are all (f x + (1 - f) target).clamp(0, 1), target black,
    the mean luma or the luma image; keep = 1 and no target is the identity."""
    per_image = lambda t: t.view(-1, 1, 1, 1)
    luma = grayscale(x)
    target = torch.addcmul(luma.mean((2, 3), keepdim=True) * per_image(to_mean), luma, per_image(to_luma))
    return torch.addcmul(target, x, per_image(keep)).clamp_(0, 1)


def colour_jitter(x, params):
    """ColorJitter with each image's random order of its four ops, in batched ops of fixed shapes.

    Brightness, contrast and saturation are blends (_blend), identities at factor 1; hue is the one
    nonlinear op. So each image's order is cut at its hue: the blends before it (positions 0-2 at
    most), one hue rotation of the whole batch, the blends after it (positions 1-3 at most); at each
    position an image with nothing to do on that side gets factor 1. Images without jitter have
    identity factors (sample_params), so the whole batch always goes through the same ops."""
    factors, order = params["jitter"], params["order"]
    hue_position = (order == HUE).int().argmax(1, keepdim=True)  # (N, 1)
    position = _constant((0, 1, 2, 3), x.device, torch.long)
    in_order = factors.gather(1, order)  # (N, 4): the factor of the op at each position
    saturation, contrast = (order == SATURATION).to(x.dtype), (order == CONTRAST).to(x.dtype)

    def blend_weights(applies):  # (keep, to_luma, to_mean), each (N, 4): the blends at each position on one side
        keep = torch.where(applies, in_order, 1.0)
        return keep, (1 - keep) * saturation, (1 - keep) * contrast

    before, after = blend_weights(position < hue_position), blend_weights(position > hue_position)
    for k in range(3):
        x = _blend(x, *(weights[:, k] for weights in before))
    x = adjust_hue(x, factors[:, HUE])
    for k in range(1, 4):
        x = _blend(x, *(weights[:, k] for weights in after))
    return x


@functools.lru_cache(maxsize=None)
def _blur_taps(kernel, device, dtype):
    """(-t^2 / 2 for the taps t = -(k - 1) / 2 ... (k - 1) / 2, the one-tap delta kernel) of a k-tap blur."""
    taps = torch.arange(kernel, device=device, dtype=dtype) - (kernel - 1) / 2
    return -0.5 * taps ** 2, (taps == 0).to(dtype)


def gaussian_blur(x, sigma, kernel, blur=None):
    """Blur each image with its own sigma: separable per-image kernels as one grouped convolution
    over the whole batch, so its shape never changes. Images where `blur` (bool per image) is False
    get the delta kernel and come back unchanged (exactly: 1 * x plus zeros)."""
    n, c, h, w = x.shape
    half_square, delta = _blur_taps(kernel, x.device, x.dtype)
    weights = torch.exp(half_square / sigma[:, None].square())
    weights = weights / weights.sum(1, keepdim=True)
    if blur is not None:
        weights = torch.where(blur[:, None], weights, delta)
    weights = weights[:, None].expand(n, c, kernel).reshape(n * c, kernel)  # one kernel per image channel
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


def apply_view(images, params, size, mean, std, spec=None):
    """One view of a float [0, 1] NCHW batch with per-image `params` -> normalized float batch.
    Given the view's `spec` (Pipeline), the steps it never fires (probability 0) are skipped."""
    fires = lambda probability: spec is None or getattr(spec, probability) > 0  # a Python decision, no sync
    per_image = lambda flags: flags.view(-1, 1, 1, 1)
    x = resized_crops(images, params["box"], params["flip"], size)
    if fires("jitter_p"):
        x = colour_jitter(x, params)
    if fires("gray_p"):
        x = torch.where(per_image(params["gray"]), grayscale(x).expand_as(x), x)
    if fires("blur_p"):
        x = gaussian_blur(x, params["sigma"], augment.blur_kernel_size(size), params["blur"])
    if fires("solarize_p"):
        x = torch.where(per_image(params["solarize"]) & (x >= augment.SOLARIZE_THRESHOLD / 255), 1 - x, x)
    if "invert" in params:  # drawn only with --invert-prob: no extra pass over the batch without it
        x = torch.where(per_image(params["invert"]), 1 - x, x)
    return (x - mean) / std


class DeviceViewsLoader:
    """Loader-like: iterating yields (list of view batches, labels, indexes), all on `device`;
    `len()` is the number of full batches; `sampler` is the EpochSampler (set_epoch(epoch, skip))."""

    def __init__(self, images, targets, views, mean, std, batch_size, seed=0, rank=0, world_size=1,
                 device="cpu"):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        self.views, self.batch_size, self.seed, self.rank = views, batch_size, seed, rank
        self.sampler = EpochSampler(len(images), rank, world_size, seed)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.generator = torch.Generator(device=self.device)
        # All images of an in-memory dataset have one size: the crop sampler's inputs, built once.
        height, width = self.images.shape[2:]
        self.heights = torch.full((batch_size,), float(height), device=self.device)
        self.widths = torch.full((batch_size,), float(width), device=self.device)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    @torch.no_grad()
    def __iter__(self):
        # The epoch's order crosses to the device once (pinned, so the copy does not block);
        # a batch's indexes are a slice of it, its images and labels an index_select on the device.
        order = torch.tensor([index for index, _ in self.sampler], dtype=torch.long)
        if self.device.type == "cuda":
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)
        for step in range(len(self)):
            indexes = order[step * self.batch_size:(step + 1) * self.batch_size]
            position = self.sampler.skip + step * self.batch_size  # in the epoch, so resumes draw alike
            self.generator.manual_seed(mix_seed("device-views", self.seed, self.sampler.epoch, self.rank, position))
            batch = self.images.index_select(0, indexes).float().div_(255)
            views = [apply_view(batch, sample_params(spec, self.heights, self.widths, self.generator), size,
                                self.mean, self.std, spec) for spec, size in self.views]
            yield views, self.targets.index_select(0, indexes), indexes


def image_tensors(dataset):
    """(uint8 NCHW images, targets) of an in-memory dataset, or of a Subset of one."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(dataset.indices)
    if not hasattr(dataset, "images"):
        raise UsageError(f"--data-backend device serves in-memory datasets ({', '.join(DATASETS)}): "
                         "use --data-backend dali or torchvision for image folders")
    images, targets = dataset.images, torch.as_tensor(dataset.targets)
    return (images, targets) if indices is None else (images[indices], targets[indices])


def device_loader(dataset, views, mean, std, batch_size, seed, rank=0, world_size=1, device="cpu"):
    """The pretraining loader of `--data-backend device` for an in-memory dataset."""
    images, targets = image_tensors(dataset)
    per_rank = len(images) // world_size
    if per_rank < batch_size:
        raise UsageError(f"dataset has {per_rank} images per process, fewer than --batch-size {batch_size}")
    return DeviceViewsLoader(images, targets, views, mean, std, batch_size, seed, rank, world_size, device)
