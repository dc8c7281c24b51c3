"""Data backends compared on this machine, printed as markdown tables.

Table 1, views/s of each pretraining loader on two presets, each measured in its own process:
  cifar32    the asymmetric preset at 32px on 2048 synthetic images (in memory; as 32px JPEGs for DALI)
  folder224  the asymmetric preset at 224px (ImageNet variant, with blur) on 256 JPEGs of 256px
             (the device backend gets them decoded into one uint8 tensor: it serves in-memory data)
Backends and the cores they may use: torchvision with 0 workers (1 core) and 2 workers (2 cores),
device-batched with 1 and 2 intra-op threads, DALI CPU-only with 1 and 2 threads.

Table 2, simclr's training step fed by each backend on synthetic data, as a ratio to the same step
fed one batch from memory (bench/throughput.py's `--one simclr loader|step` runs; DALI reads the
synthetic images as 32px JPEGs with --dataset folder).

The load average (1 minute, read when each measurement ends) is printed next to every number: on
a shared machine it is the noise. On an oversubscribed CPU, intra-op threads that spin while
waiting (OpenMP's default) make 2-thread torch ops many times slower than 1 thread; run with
OMP_WAIT_POLICY=PASSIVE there (it reaches the children) to measure the cores rather than the spinning.

    python bench/data_backends.py
    python bench/data_backends.py --skip-steps --batches 4
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"cifar32": dict(size=32, batch=256, images=2048), "folder224": dict(size=224, batch=32, images=256)}
RUNS = [("torchvision", 1), ("torchvision", 2), ("device", 1), ("device", 2), ("dali", 1), ("dali", 2)]


def load():
    return f"{os.getloadavg()[0]:.1f}"


def write_images(root, count, size, seed=0):
    """Synthetic images as JPEG files in class folders: a `folder` dataset."""
    from PIL import Image
    from common import data
    images, labels = data.synthetic_images(count, seed, size=size)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = Path(root) / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def build_loader(case, backend, cores, folder):
    """The pretraining loader of one table cell, and its batch size."""
    import numpy as np
    import torch
    from common import augment, data, device_augment
    spec, mean_std = CASES[case], augment.NORMALIZATION["imagenet"]
    size, batch = spec["size"], spec["batch"]
    if backend == "dali":
        from common import dali
        dataset = data.load_dataset("folder", folder, "train")
        return dali.dali_loader(dataset, device_augment.view_specs("asymmetric", size), *mean_std, batch, 0,
                                threads=cores), batch
    if case == "cifar32":
        images, labels = data.synthetic_images(spec["images"], 0)
    else:  # the JPEGs decoded once: what an in-memory dataset of 256px images holds
        dataset = data.load_dataset("folder", folder, "train")
        images = torch.stack([torch.from_numpy(np.asarray(data.load_rgb(p))).permute(2, 0, 1) for p in dataset.paths])
        labels = torch.tensor(dataset.targets)
    dataset = data.ImageTensorDataset(images, labels, 10, size)
    if backend == "device":
        torch.set_num_threads(cores)
        return device_augment.device_loader(dataset, device_augment.view_specs("asymmetric", size), *mean_std,
                                            batch, 0), batch
    transform = augment.pretrain_transform("asymmetric", size, *mean_std)
    workers = 0 if cores == 1 else cores
    return data.pretrain_loader(dataset, transform, batch, workers, 0), batch


def measure_views(case, backend, cores, folder, batches):
    """Run in a subprocess: views/s of one loader after one warm-up batch; prints a JSON line."""
    loader, batch = build_loader(case, backend, cores, folder)
    done, start, epoch = -1, None, 0
    while done < batches:
        loader.sampler.set_epoch(epoch)
        for views, _, _ in loader:
            done += 1
            if done == 0:
                start = time.perf_counter()  # after the first batch: workers and pipelines are up
            if done == batches:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"views_per_s": batches * batch * len(views) / seconds, "load": load()}))


def child(cmd, env=None):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return json.loads(lines[-1]), None


def has_dali():
    import importlib.util
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def views_table(folders, opts):
    print("### Views/s of each loader (load average at the time in brackets)\n")
    print("| preset | " + " | ".join(f"{b} ({c} core{'s' * (c > 1)})" for b, c in RUNS) + " | device / torchvision, 1 core | 2 cores |")
    print("|---|" + "---|" * (len(RUNS) + 2))
    for case in CASES:
        cells, rate = [], {}
        for backend, cores in RUNS:
            if backend == "dali" and not has_dali():
                cells.append("not installed")
                continue
            result, error = child([sys.executable, __file__, "--one", case, backend, str(cores), folders[case],
                                   "--batches", str(opts.batches)], env={"OMP_NUM_THREADS": str(cores)})
            if error:
                cells.append(f"failed: {error[:60]}")
                continue
            rate[backend, cores] = result["views_per_s"]
            cells.append(f"{result['views_per_s']:.0f} ({result['load']})")
        ratios = [f"{rate['device', c] / rate['torchvision', c]:.1f}x" if ("device", c) in rate and ("torchvision", c) in rate
                  else "-" for c in (1, 2)]
        print(f"| {case} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


def steps_table(folder32, opts):
    print("\n### simclr training step fed by each backend, against the same step fed from memory\n")
    print(f"resnet_narrow, batch {opts.step_batch}, synthetic 32px, {opts.steps} timed steps, OMP_NUM_THREADS=1\n")
    print("| backend | in-memory step img/s (load) | with the loader img/s (load) | loader / in-memory |")
    print("|---|---|---|---|")
    setups = [("torchvision, 0 workers", ["--workers", "0"], ["--data-backend", "torchvision"]),
              ("torchvision, 2 workers", ["--workers", "2"], ["--data-backend", "torchvision"]),
              ("device", ["--workers", "0"], ["--data-backend", "device"]),
              ("dali (CPU, 2 threads)", ["--workers", "2"],
               ["--data-backend", "dali", "--dataset", "folder", "--data-dir", folder32, "--crop-size", "32"])]
    for name, workers, extra in setups:
        if "dali" in extra and not has_dali():
            print(f"| {name} | not installed | | |")
            continue
        results, loads = {}, {}
        for mode in ("step", "loader"):
            cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--one", "simclr", mode, "--backbone",
                   "resnet_narrow", "--batch-size", str(opts.step_batch), *workers, "--steps", str(opts.steps),
                   "--warmup", "2", "--device", "cpu", "--", *extra]
            results[mode], error = child(cmd, env={"OMP_NUM_THREADS": "1"})
            loads[mode] = load()
            if error:
                print(f"| {name} | failed: {error[:80]} | | |")
                break
        else:
            step, loader = results["step"]["images_per_s"], results["loader"]["images_per_s"]
            print(f"| {name} | {step:.0f} ({loads['step']}) | {loader:.0f} ({loads['loader']}) | {loader / step:.2f} |",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=6, help="timed batches per loader [default: %(default)s]")
    p.add_argument("--steps", type=int, default=8, help="timed training steps [default: %(default)s]")
    p.add_argument("--step-batch", type=int, default=64, help="batch size of the training steps [default: %(default)s]")
    p.add_argument("--skip-steps", action="store_true", help="only the views/s table")
    p.add_argument("--one", nargs=4, metavar=("CASE", "BACKEND", "CORES", "FOLDER"), help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.one:
        case, backend, cores, folder = opts.one
        return measure_views(case, backend, int(cores), folder, opts.batches)
    print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start, "
          f"DALI {'installed' if has_dali() else 'not installed'}\n")
    with tempfile.TemporaryDirectory() as tmp:
        folders = {case: os.path.join(tmp, case) for case in CASES}
        for case, spec in CASES.items():
            write_images(folders[case], spec["images"], 256 if case == "folder224" else 32)
        views_table(folders, opts)
        if not opts.skip_steps:
            steps_table(folders["cifar32"], opts)


if __name__ == "__main__":
    main()
