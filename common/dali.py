"""NVIDIA DALI pretraining loader (`--data-backend dali`) for image folders (imagenet, imagenet100,
folder): decoding on the GPU ("mixed") when training on one, entirely on the CPU otherwise.

DALI only decodes and applies the augmentations. What to read and how to augment it is decided in
Python, per batch, by a function of (seed, epoch, rank, position in the epoch):
- the file order is the torchvision path's EpochSampler order (same shards, same drop-last, same
  `skip` on resume), fed through an external source together with each image's dataset index;
- the random parameters are common.device_augment.sample_params over the presets of
  common/augment.py (crop boxes drawn as RandomResizedCrop draws them, from the image size read
  from the file header), passed to DALI as per-sample arguments.
So batches keep the torchvision layout (views, labels, dataset indexes), and a run resumed mid-epoch
reads and augments exactly what the uninterrupted run would have.

Differences from the torchvision path: colour jitter applies brightness, contrast, saturation, hue
in that fixed order (torchvision draws a random order per image), hue is DALI's rotation about the
gray axis rather than an HSV shift. One graph serves the whole batch: a step that does not fire
for an image gets identity parameters (factor 1, a 1-tap blur).
"""
import io

import numpy as np
import torch
from PIL import Image

from common import augment
from common.cli import UsageError
from common.data import EpochSampler, mix_seed
from common.device_augment import GRAY_WEIGHTS, sample_params

DATASETS = ("imagenet", "imagenet100", "folder")


def check_available(dataset):
    """UsageError unless DALI is installed and serves `dataset`."""
    if dataset not in DATASETS:
        raise UsageError(f"--data-backend dali serves image folders ({', '.join(DATASETS)}); "
                         f"for {dataset} use --data-backend device")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UsageError("--data-backend dali needs NVIDIA DALI: pip install -r requirements-dali.txt") from None


def image_size(encoded, path):
    """(height, width) from an encoded image's header, without decoding it."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path} ({error}): remove or replace the file") from None
    return height, width


def param_names(spec):
    """The per-sample arguments the graph of a view with pipeline `spec` uses."""
    names = ["roi_start", "roi_end", "mirror"]
    names += ["brightness", "contrast", "saturation", "hue"] if spec.jitter_p > 0 else []
    names += ["gray"] if spec.gray_p > 0 else []
    names += ["sigma", "window"] if spec.blur_p > 0 else []
    return names + (["solarize"] if spec.solarize_p > 0 else [])


def view_params(spec, size, heights, widths, gen):
    """Per-sample DALI arguments of one view as contiguous arrays, in param_names(spec) order.

    Saturation and grayscale are per-pixel channel mixes, out = M x, with M = s I + (1 - s) 1 w^T
    (w the luma weights); images without blur get a 1-tap window (identity, and nearly free)."""
    p = sample_params(spec, heights, widths, gen)
    n = len(heights)
    top, left, h, w = p["box"].unbind(1)
    jitter = p["jitter"]
    eye, to_luma = torch.eye(3).expand(n, 3, 3), torch.tensor(GRAY_WEIGHTS).expand(n, 3, 3)
    mix = lambda f: f.view(-1, 1, 1) * eye + (1 - f.view(-1, 1, 1)) * to_luma
    arrays = dict(roi_start=torch.stack([top, left], 1), roi_end=torch.stack([top + h, left + w], 1),
                  mirror=p["flip"].int(), brightness=jitter[:, 0], contrast=jitter[:, 1], saturation=mix(jitter[:, 2]),
                  hue=jitter[:, 3] * 360, gray=mix(1 - p["gray"].float()), sigma=p["sigma"],
                  window=torch.where(p["blur"], augment.blur_kernel_size(size), 1).int(), solarize=p["solarize"].float())
    return [np.ascontiguousarray(arrays[name].numpy()) for name in param_names(spec)]


def _view(images, params, spec, size, mean, std, gpu):
    """The graph of one view: crop+resize, jitter, grayscale, blur, solarize, flip + normalize."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath
    p = dict(zip(param_names(spec), params))
    scalar = (lambda x: x.gpu()) if gpu else (lambda x: x)  # arithmetic operands live with the images
    x = fn.resize(images, size=[size, size], roi_start=p["roi_start"], roi_end=p["roi_end"],
                  interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.FLOAT)
    # Pixels stay float in [0, 255] until normalization; factors are identities where a step does not fire.
    if spec.jitter_p > 0:
        x = dmath.clamp(x * scalar(p["brightness"]), 0, 255)
        c = scalar(p["contrast"])
        mean_luma = fn.reductions.mean(fn.coord_transform(x, M=list(GRAY_WEIGHTS)))
        x = dmath.clamp(x * c + (1 - c) * mean_luma, 0, 255)
        x = dmath.clamp(fn.coord_transform(x, M=p["saturation"]), 0, 255)
        x = dmath.clamp(fn.hue(x, hue=p["hue"]), 0, 255)
    else:
        x = dmath.clamp(x, 0, 255)  # bicubic overshoots
    if spec.gray_p > 0:
        x = fn.coord_transform(x, M=p["gray"])  # the same dot product on every channel of a gray image
    if spec.blur_p > 0:
        x = fn.gaussian_blur(x, window_size=p["window"], sigma=p["sigma"])
    if spec.solarize_p > 0:
        flag = scalar(p["solarize"]) * (x >= augment.SOLARIZE_THRESHOLD)
        x = x + flag * (255 - 2 * x)
    return fn.crop_mirror_normalize(x, mirror=p["mirror"], mean=[255 * m for m in mean], std=[255 * s for s in std],
                                    output_layout="CHW", dtype=types.FLOAT)


class DaliViewsLoader:
    """Loader-like: iterating yields (list of view batches, labels, indexes) on `device`; `len()` is
    the number of full batches; `sampler` is the EpochSampler (set_epoch(epoch, skip)).
    A DALI pipeline is built per epoch, after set_epoch, so that it prefetches the right batches."""

    def __init__(self, paths, targets, views, mean, std, batch_size, seed=0, rank=0, world_size=1,
                 device="cpu", threads=2):
        self.paths, self.targets = list(paths), torch.as_tensor(targets, dtype=torch.long)
        self.views, self.mean, self.std = views, mean, std
        self.batch_size, self.seed, self.rank, self.threads = batch_size, seed, rank, threads
        self.device = torch.device(device)
        self.sampler = EpochSampler(len(self.paths), rank, world_size, seed)
        self.sizes = {}  # index -> (height, width): headers are read once per run

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def batch(self, step, order, epoch, skip):
        """External-source callback: encoded files, indexes, labels and view parameters of a batch."""
        if step >= len(self):
            raise StopIteration
        indexes = order[step * self.batch_size:(step + 1) * self.batch_size]
        encoded = [np.fromfile(self.paths[i], dtype=np.uint8) for i in indexes]
        for i, data in zip(indexes, encoded):
            if i not in self.sizes:
                self.sizes[i] = image_size(data.tobytes(), self.paths[i])
        heights, widths = torch.tensor([self.sizes[i] for i in indexes]).unbind(1)
        gen = torch.Generator().manual_seed(mix_seed("dali-views", self.seed, epoch, self.rank, skip + step * self.batch_size))
        params = [array for spec, size in self.views for array in view_params(spec, size, heights, widths, gen)]
        index_array = np.asarray(indexes, dtype=np.int64)
        return [encoded, index_array, self.targets[index_array].numpy(), *params]

    def pipeline(self, order, epoch, skip):
        from nvidia.dali import Pipeline, fn, types
        gpu = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads, seed=mix_seed("dali", self.seed) % 2**31,
                        device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=2)
        with pipe:
            counts = [len(param_names(spec)) for spec, _ in self.views]
            encoded, indexes, labels, *params = fn.external_source(
                source=lambda info: self.batch(info.iteration, order, epoch, skip), batch=True, batch_info=True,
                num_outputs=3 + sum(counts))
            # adjust_orientation=False: EXIF rotation is ignored, as by PIL and the torchvision path,
            # so that the header size the crop boxes were drawn for is the decoded size.
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False)
            views, start = [], 0
            for (spec, size), count in zip(self.views, counts):
                views.append(_view(images, params[start:start + count], spec, size, self.mean, self.std, gpu))
                start += count
            # labels and indexes copied to the GPU inside the pipeline: a copy from pageable host memory in to_torch
            # would block the host twice a step
            pipe.set_outputs(*views, *((labels.gpu(), indexes.gpu()) if gpu else (labels, indexes)))
        pipe.build()
        return pipe

    def to_torch(self, output):
        """A copy of a DALI output batch as a torch tensor on the training device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        from nvidia.dali.tensors import TensorListGPU
        tensor = output.as_tensor()
        on_gpu = isinstance(output, TensorListGPU)
        out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=self.device if on_gpu else "cpu")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        return out.to(self.device, non_blocking=True)  # a no-op: the outputs are on the training device already

    def __iter__(self):
        order = [index for index, _ in self.sampler]
        epoch, skip = self.sampler.epoch, self.sampler.skip
        pipe = self.pipeline(order, epoch, skip)
        try:
            for _ in range(len(self)):
                *views, labels, indexes = pipe.run()
                yield [self.to_torch(v) for v in views], self.to_torch(labels), self.to_torch(indexes)
        finally:
            del pipe


def folder_samples(dataset):
    """(paths, targets) of a FolderDataset, or of a Subset of one."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, list(dataset.indices)
    paths, targets = dataset.paths, dataset.targets
    if indices is not None:
        paths, targets = [paths[i] for i in indices], [targets[i] for i in indices]
    return paths, targets


def dali_loader(dataset, views, mean, std, batch_size, seed, rank=0, world_size=1, device="cpu", threads=2):
    """The pretraining loader of `--data-backend dali` for a folder dataset."""
    if any(spec.invert_p > 0 for spec, _ in views):
        raise UsageError("--invert-prob is not implemented in the DALI graph: use --data-backend torchvision or device")
    paths, targets = folder_samples(dataset)
    if len(paths) // world_size < batch_size:
        raise UsageError(f"dataset has {len(paths) // world_size} images per process, fewer than --batch-size {batch_size}")
    return DaliViewsLoader(paths, targets, views, mean, std, batch_size, seed, rank, world_size, device, threads)
