"""Augmentation presets of solo-learn's recipes, built on torchvision.transforms.v2.

Every preset is one or two pipelines of the same shape (the table in `_preset`):
RandomResizedCrop (bicubic) -> ColorJitter with prob p -> Grayscale -> GaussianBlur ->
Solarize -> HorizontalFlip -> float in [0, 1] -> Normalize.
All steps but the last two run on uint8 CHW tensors, the cheapest format for v2 kernels.

`pretrain_transform` turns one image into the list of views a method trains on;
`val_transform` is the deterministic resize/crop/normalize used for probes and kNN.
"""
import dataclasses

import torch
from torchvision.transforms import v2

from common.cli import UsageError

NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Measured once over the 8000 training images of load_dataset("synthetic", seed=0):
    # per-channel mean and std of all pixels scaled to [0, 1], rounded to 3 decimals.
    "synthetic": ((0.484, 0.484, 0.484), (0.311, 0.311, 0.310)),
}
NORMALIZATION["imagenet100"] = NORMALIZATION["imagenet"]
NORMALIZATION["folder"] = NORMALIZATION["imagenet"]

# One line per preset for --help (crop scale, jitter strength and probability, gray, blur, solarize per view;
# the table below in _preset is the definition).
PRESET_HELP = {
    "asymmetric": "BYOL's two pipelines: crops 0.08-1, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2; "
                  "blur 0/0 (1.0/0.1 at >= 96px), solarize 0/0.2",
    "symmetric": "one pipeline: crops 0.08-1, strong jitter (0.8, 0.8, 0.8, 0.2) p 0.8, gray 0.2, blur 0.5",
    "symmetric_weak": "one pipeline: crops 0.08-1, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray 0.2, blur 0.5",
    "ressl": "a strong view (jitter p 0.8, gray 0.2, blur 0.5) and a weak one (crop and flip only)",
    "vicreg": "crops 0.2-1, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2, blur 0 (0.5 at >= 96px), solarize 0.1",
    "wmse": "crops 0.2-1, strong jitter (0.8, 0.8, 0.8, 0.2) p 0.8, gray 0.2, blur 0 (0.2 at >= 96px)",
    "multicrop": "SwAV: 2 large crops 0.2-1 + small crops 0.08-0.5 (0.05-0.14 at >= 96px) with --num-small-crops",
    "reconstruction": "MAE: one pipeline, crops 0.08-1 and flip only (no colour jitter, gray, blur or solarize)",
}
PRESETS = tuple(PRESET_HELP)

# At and above this crop size the ImageNet variants of the presets apply.
IMAGENET_SIZE = 96
BLUR_SIGMA = (0.1, 2.0)  # Gaussian blur sigma ~ U[0.1, 2]
SOLARIZE_THRESHOLD = 128  # uint8 pixels at or above it are inverted


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Parameters of one augmentation pipeline (one view's side of a preset)."""

    scale: tuple = (0.08, 1.0)
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    invert_p: float = 0.0  # 1 - x on the whole view; set by --invert-prob only (recipes), never by a preset


def preset_pipelines(preset, size, min_scale=None, invert_prob=0.0):
    """Return (large-crop pipelines, small-crop pipeline) of a preset at crop `size`.

    One large pipeline means every large view uses it; two mean views alternate between them.
    `min_scale` replaces the smallest area fraction of the large crops (small crops keep theirs);
    `invert_prob` is the probability that a view (any view) is inverted, its last colour step.
    """
    if min_scale is not None and not 0 < min_scale <= 1:
        raise UsageError(f"--min-scale must be in (0, 1], got {min_scale}")
    if not 0 <= invert_prob <= 1:
        raise UsageError(f"--invert-prob must be in [0, 1], got {invert_prob}")
    large, small = _preset(preset, size)
    large = [dataclasses.replace(p, invert_p=invert_prob) for p in large]
    if min_scale is not None:
        large = [dataclasses.replace(p, scale=(min_scale, 1.0)) for p in large]
    return large, dataclasses.replace(small, invert_p=invert_prob)


def _preset(preset, size):
    """The preset's (large pipelines, small pipeline): solo-learn's augmentation files (docs/fidelity.md).

    Large crops: scripts/pretrain/cifar/ below 96px, scripts/pretrain/imagenet-100/ at and above (only the blur
    differs). Small crops (--num-small-crops): SwAV's from scripts/pretrain/cifar-multicrop/ (official SwAV's
    scale at ImageNet size); for the other presets, the first large pipeline on a smaller area below 96px, and
    at ImageNet size that pipeline without blur or solarization (scripts/pretrain/imagenet-100-multicrop/).
    """
    imagenet = size >= IMAGENET_SIZE
    strong_jitter = (0.8, 0.8, 0.8, 0.2)
    if preset == "asymmetric":
        blur = (1.0, 0.1) if imagenet else (0.0, 0.0)
        large = [Pipeline(blur_p=blur[0]), Pipeline(blur_p=blur[1], solarize_p=0.2)]
    elif preset == "symmetric":
        large = [Pipeline(jitter=strong_jitter, blur_p=0.5)]
    elif preset == "symmetric_weak":
        large = [Pipeline(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)]
    elif preset == "ressl":
        weak = Pipeline(jitter=(0, 0, 0, 0), jitter_p=0.0, gray_p=0.0)
        large = [Pipeline(blur_p=0.5), weak]
    elif preset == "vicreg":
        large = [Pipeline(scale=(0.2, 1.0), blur_p=0.5 if imagenet else 0.0, solarize_p=0.1)]
    elif preset == "wmse":
        large = [Pipeline(scale=(0.2, 1.0), jitter=strong_jitter, blur_p=0.2 if imagenet else 0.0)]
    elif preset == "reconstruction":  # MAE: augmentations/reconstruction.yaml, crop and flip only
        large = [Pipeline(jitter=(0, 0, 0, 0), jitter_p=0.0, gray_p=0.0)]
    elif preset == "multicrop":
        swav = Pipeline(scale=(0.2, 1.0), jitter=(0.6, 0.6, 0.6, 0.2))
        large = [swav, dataclasses.replace(swav, solarize_p=0.2)]
        small_scale = (0.05, 0.14) if imagenet else (0.08, 0.5)
        return large, Pipeline(scale=small_scale, jitter=strong_jitter, blur_p=0.1, solarize_p=0.1)
    else:
        raise UsageError(f"unknown augmentation preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if imagenet:
        return large, dataclasses.replace(large[0], blur_p=0.0, solarize_p=0.0)
    return large, dataclasses.replace(large[0], scale=(0.08, 0.5))


def blur_kernel_size(size):
    """Kernel 23 as in BYOL, shrunk on tiny crops because reflect padding needs pad < side."""
    return min(23, (size // 2) * 2 - 1)


def build_pipeline(spec, size, mean, std):
    """v2.Compose of one pipeline for uint8 CHW image tensors, ending in a normalized float tensor."""
    steps = [v2.RandomResizedCrop(size, scale=spec.scale, interpolation=v2.InterpolationMode.BICUBIC)]
    if spec.jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p > 0:
        steps.append(v2.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=spec.solarize_p))
    if spec.invert_p > 0:
        steps.append(v2.RandomInvert(p=spec.invert_p))
    steps += [
        v2.RandomHorizontalFlip(0.5),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return v2.Compose(steps)


class PretrainTransform:
    """Image (PIL or uint8 CHW tensor) -> list of float views, large crops first, then small."""

    def __init__(self, large_pipelines, small_pipeline, num_large, num_small):
        self.large_pipelines = large_pipelines
        self.small_pipeline = small_pipeline
        self.num_large = num_large
        self.num_small = num_small
        self.to_image = v2.ToImage()

    def __call__(self, image):
        # Convert once: the tensor is shared by all views and never modified in place.
        image = self.to_image(image)
        views = [self.large_pipelines[i % len(self.large_pipelines)](image) for i in range(self.num_large)]
        views += [self.small_pipeline(image) for _ in range(self.num_small)]
        # Plain tensors: tv_tensors subclasses would survive collate and slow every later op.
        return [plain_tensor(view) for view in views]

    def __repr__(self):
        return (f"PretrainTransform(num_large={self.num_large}, num_small={self.num_small},\n"
                f"  large={self.large_pipelines},\n  small={self.small_pipeline})")


def default_small_size(size):
    """Small-crop side: 18 for 32px crops, 96 for 224px crops, scaled alike for other sizes."""
    return round(size * 18 / 32) if size < IMAGENET_SIZE else round(size * 96 / 224)


def pretrain_transform(preset, size, mean, std, num_large=2, num_small=0, small_size=None, min_scale=None,
                       invert_prob=0.0):
    """Build the multi-view transform of `preset` with `num_large` crops of `size` pixels and
    `num_small` crops of `small_size` pixels (multi-crop works with every preset)."""
    if num_large < 1 or num_small < 0:
        raise UsageError(f"need at least one large crop and no negative count (got {num_large}, {num_small})")
    large_specs, small_spec = preset_pipelines(preset, size, min_scale, invert_prob)
    small_size = small_size or default_small_size(size)
    large = [build_pipeline(spec, size, mean, std) for spec in large_specs]
    small = build_pipeline(small_spec, small_size, mean, std)
    return PretrainTransform(large, small, num_large, num_small)


def plain_tensor(image):
    """Drop the tv_tensors subclass (module-level so spawn-started workers can pickle it)."""
    return image.as_subclass(torch.Tensor)


def val_transform(size, mean, std):
    """Deterministic evaluation transform: image -> normalized float tensor of `size` x `size`.

    Small-image datasets (CIFAR 32px, STL-10 96px) are only resized when their side differs
    from `size`; ImageNet-size crops follow the usual Resize(size * 256/224) + CenterCrop(size).
    """
    resize = size if size <= IMAGENET_SIZE else round(size * 256 / 224)
    return v2.Compose([
        v2.ToImage(),
        # Resize returns the input untouched when the side already matches.
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.Lambda(plain_tensor),
    ])
