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

Randomness: a generator on the device seeded from (seed, epoch, rank, position in the epoch), so a
run resumed mid-epoch draws exactly what the uninterrupted run drew (for the same world size).
`sample_params` runs on any device and is shared with the DALI path (common/dali.py).
"""
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


def _uniform(low, high, shape, gen):
    return low + (high - low) * torch.rand(shape, generator=gen, device=gen.device)


def crop_boxes(heights, widths, scale, gen, ratio=RATIO, attempts=10):
    """RandomResizedCrop.get_params for a batch: (top, left, height, width) float tensors.

    Each image tries `attempts` (area, log-aspect) draws at once and keeps the first that fits;
    images where none fits fall back to the central crop clipped to the ratio range."""
    n = len(heights)
    heights, widths = heights.float(), widths.float()
    area = (heights * widths)[:, None] * _uniform(scale[0], scale[1], (n, attempts), gen)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts), gen))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting draw (0 if none)
    found = fits.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = widths / heights
    fallback_w = torch.where(in_ratio > ratio[1], (heights * ratio[1]).round(), widths)
    fallback_h = torch.where(in_ratio < ratio[0], (widths / ratio[0]).round(), heights)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    # Offsets uniform over the integer positions that keep the crop inside the image.
    u = torch.rand((2, n), generator=gen, device=gen.device)
    top = torch.where(found, (u[0] * (heights - h + 1)).floor(), ((heights - h) / 2).floor())
    left = torch.where(found, (u[1] * (widths - w + 1)).floor(), ((widths - w) / 2).floor())
    return top, left, h, w


def sample_params(spec, heights, widths, gen):
    """Independent random parameters of one view for every image of a batch (sizes as tensors).

    Steps that do not fire get identity parameters (factor 1, hue 0, flags False), so one
    batched op serves the whole batch. `jitter` columns: BRIGHTNESS, CONTRAST, SATURATION, HUE."""
    n = len(heights)
    coin = lambda p: torch.rand(n, generator=gen, device=gen.device) < p
    top, left, h, w = crop_boxes(heights, widths, spec.scale, gen)
    jitter_on = coin(spec.jitter_p)
    b, c, s, hue = spec.jitter
    jitter = torch.stack([_uniform(max(0.0, 1 - b), 1 + b, n, gen), _uniform(max(0.0, 1 - c), 1 + c, n, gen),
                          _uniform(max(0.0, 1 - s), 1 + s, n, gen), _uniform(-hue, hue, n, gen)], 1)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=gen.device)
    jitter = torch.where(jitter_on[:, None], jitter, identity)
    # ColorJitter applies its four ops in a random order drawn per image.
    order = torch.rand((n, 4), generator=gen, device=gen.device).argsort(1)
    return dict(box=torch.stack([top, left, h, w], 1), jitter_on=jitter_on, jitter=jitter, order=order,
                gray=coin(spec.gray_p), blur=coin(spec.blur_p), sigma=_uniform(*augment.BLUR_SIGMA, n, gen),
                solarize=coin(spec.solarize_p), flip=coin(0.5),
                # drawn last and only when used: runs without --invert-prob keep their random stream
                **({"invert": coin(spec.invert_p)} if spec.invert_p > 0 else {}))


def _cubic(x, a=-0.5):
    """Keys' cubic convolution kernel; a = -0.5 is PIL's and torchvision's antialiased bicubic."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, size, in_size, flip=None):
    """(N, size, in_size) matrices resampling the pixels [start, start + length) of each image row
    (or column) to `size` pixels, as torchvision's antialiased bicubic resize of the cropped image:
    kernel widened by the shrink factor, taps limited to the crop, weights normalized per output.
    `flip` (bool per image) mirrors the output."""
    scale = (length / size)[:, None, None]
    centre = start[:, None, None] + (torch.arange(size, device=start.device) + 0.5)[None, :, None] * scale
    if flip is not None:
        centre = torch.where(flip[:, None, None], centre.flip(1), centre)
    pixel = torch.arange(in_size, device=start.device)[None, None, :] + 0.5
    weights = _cubic((pixel - centre) / scale.clamp_min(1))
    inside = (pixel > start[:, None, None]) & (pixel < (start + length)[:, None, None])
    weights = weights * inside
    return weights / weights.sum(2, keepdim=True)


def resized_crops(images, box, flip, size):
    """Crop boxes (top, left, h, w in pixels) of float NCHW images resized to size x size: two batched
    matrix products (rows, then columns) with per-image bicubic weights; flipped images mirrored."""
    _, _, height, width = images.shape
    top, left, h, w = box.unbind(1)
    rows = resize_weights(top, h, size, height)  # (N, size, H)
    cols = resize_weights(left, w, size, width, flip)  # (N, size, W)
    out = rows.unsqueeze(1) @ images @ cols.transpose(1, 2).unsqueeze(1)
    return out.clamp_(0, 1)  # bicubic overshoots at edges


def grayscale(x):
    """(N, 1, H, W) luma of float RGB images."""
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return torch.einsum("nchw,c->nhw", x, weights).unsqueeze(1)


def adjust_hue(x, shift):
    """Rotate the hue of float RGB images by `shift` (fractions of a turn, one per image) in HSV.

    V = max, V * S = max - min, and each channel of the HSV -> RGB conversion is
    V - V * S * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 * hue) mod 6, n = 5, 3, 1 for R, G, B."""
    maxc, argmax = x.max(1, keepdim=True)
    delta = maxc - x.min(1, keepdim=True).values
    r, g, b = x.unbind(1)
    safe = delta.squeeze(1).clamp_min(1e-12)
    # Hue in sixths of a turn, by which channel is largest: red (g - b), green 2 + (b - r), blue 4 + (r - g).
    sixths = torch.stack([(g - b) / safe, 2 + (b - r) / safe, 4 + (r - g) / safe], 1).gather(1, argmax)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (offsets + sixths + 6 * shift.view(-1, 1, 1, 1)) % 6
    return maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1)


def colour_jitter(x, params):
    """Brightness, contrast and saturation are blends f * x + (1 - f) * target with target black,
    the mean luma or the luma image, so each position of the images' random orders is one batched
    blend (factor 1 where it is another op's turn), plus hue on the images whose turn it is."""
    jitter_on, factors, order = params["jitter_on"], params["jitter"], params["order"]
    if not bool(jitter_on.any()):
        return x
    for position in range(4):
        op = order[:, position]
        f = torch.where(op == HUE, torch.ones_like(factors[:, 0]), factors.gather(1, op[:, None]).squeeze(1))
        luma = grayscale(x)
        per_image = lambda t: t.view(-1, 1, 1, 1)
        x = x * per_image(f) + luma * per_image((1 - f) * (op == SATURATION))
        x = x.add_(luma.mean((2, 3), keepdim=True) * per_image((1 - f) * (op == CONTRAST))).clamp_(0, 1)
        turn = (jitter_on & (op == HUE) & (factors[:, HUE] != 0)).nonzero().squeeze(1)
        if len(turn):
            x[turn] = adjust_hue(x[turn], factors[turn, HUE])
    return x


def gaussian_blur(x, sigma, kernel):
    """Blur each image with its own sigma: separable per-image kernels as one grouped convolution."""
    n, c, h, w = x.shape
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, kernel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weights.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, weights.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


def apply_view(images, params, size, mean, std):
    """One view of a float [0, 1] NCHW batch with per-image `params` -> normalized float batch."""
    x = resized_crops(images, params["box"], params["flip"], size)
    x = colour_jitter(x, params)
    x = torch.where(params["gray"].view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    blurred = params["blur"].nonzero().squeeze(1)
    if len(blurred):
        x[blurred] = gaussian_blur(x[blurred], params["sigma"][blurred], augment.blur_kernel_size(size))
    threshold = augment.SOLARIZE_THRESHOLD / 255
    x = torch.where(params["solarize"].view(-1, 1, 1, 1) & (x >= threshold), 1 - x, x)
    if "invert" in params:  # --invert-prob: no extra pass over the batch when it is off
        x = torch.where(params["invert"].view(-1, 1, 1, 1), 1 - x, x)
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

    def __len__(self):
        return len(self.sampler) // self.batch_size

    @torch.no_grad()
    def __iter__(self):
        order = torch.tensor([index for index, _ in self.sampler], dtype=torch.long)
        height, width = self.images.shape[2:]
        for step in range(len(self)):
            indexes = order[step * self.batch_size:(step + 1) * self.batch_size].to(self.device)
            position = self.sampler.skip + step * self.batch_size  # in the epoch, so resumes draw alike
            self.generator.manual_seed(mix_seed("device-views", self.seed, self.sampler.epoch, self.rank, position))
            batch = self.images[indexes].float().div_(255)
            sizes = torch.full((len(indexes),), height, device=self.device), torch.full((len(indexes),), width, device=self.device)
            views = [apply_view(batch, sample_params(spec, *sizes, self.generator), size, self.mean, self.std)
                     for spec, size in self.views]
            yield views, self.targets[indexes], indexes


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
