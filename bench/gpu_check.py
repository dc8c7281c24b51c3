"""One-command GPU check: everything on the CUDA path that a CPU cannot run, in one markdown report.

Offline (synthetic data and a generated JPEG folder only) and sized for about 10 minutes on one GPU (unmeasured):

  1. host syncs per training step under torch.cuda.set_sync_debug_mode("warn"): byol, swav, dino with their
     synthetic recipes (AdamW, --precision auto), fp16 with LARS and with SGD (the real recipes' optimizers, one
     with --grad-clip), and byol on the DALI backend
  2. step / floor / loader throughput (bench/throughput.py) of five methods, ResNet-18, 32px, batch 256, bf16,
     device and torchvision backends
  3. 100-step fp16 runs of byol, swav, dino, wmse: no non-finite loss, and where the GradScaler's scale went
  4. resume across precision: 10 steps in bf16, then resumed in fp16 to 20
  5. DALI decoding on the GPU from a generated JPEG folder
  6. --compile against eager (images/s of BYOL per epoch: the first includes compiling)
  7. GPU busy fraction over 10 BYOL steps (torch.profiler: kernel time / wall time)

Each check runs the real scripts in subprocesses and reports pass / FAIL / SKIP with its numbers; a failing
check does not stop the others, and a check that cannot run here (no GPU, no DALI) is a SKIP, never a pass.
`--cpu-smoke` runs the same checks at toy sizes on the CPU (the CUDA-only ones report SKIP), so that this script
is tested in CI and cannot rot.

    python bench/gpu_check.py --out gpu_check.md          # on a CUDA machine
    python bench/gpu_check.py --cpu-smoke --out smoke.md  # anywhere, ~1 minute
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

THROUGHPUT_METHODS = ["byol", "simclr", "swav", "dino", "barlow_twins"]
FP16_METHODS = ["byol", "swav", "dino", "wmse"]
# (method, --precision, optimizer and other flags, label): the synthetic recipes first, then the optimizers of the
# real recipes in fp16 (LARS: 13 methods, SGD: 5; SwAV's prototypes get their first gradient late), then DALI.
SYNC_RUNS = [("byol", "auto", [], "AdamW"), ("swav", "auto", [], "AdamW"), ("dino", "auto", [], "AdamW"),
             ("byol", "fp16", ["--optimizer", "lars"], "LARS"), ("swav", "fp16", ["--optimizer", "lars"], "LARS"),
             ("simsiam", "fp16", ["--optimizer", "sgd"], "SGD"),
             ("mocov2plus", "fp16", ["--optimizer", "sgd", "--grad-clip", "1"], "SGD, --grad-clip 1"),
             ("byol", "auto", ["dali"], "AdamW, DALI backend")]


def script(method, out_dir, size, *flags, timeout=600):
    """Run `python method.py` on synthetic data; returns (exit status, stdout + stderr, metrics lines)."""
    argv = [sys.executable, f"{method}.py", "--dataset", "synthetic", "--out-dir", str(out_dir), "--knn-every", "-1",
            "--umap-every", "-1", *size, *flags]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics_file = Path(out_dir) / "metrics.jsonl"
    metrics = [json.loads(l) for l in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, metrics


def tail(text, lines=3):
    return " / ".join(l.strip() for l in text.strip().splitlines()[-lines:])[-400:]


def dali_installed():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def jpeg_folder(opts):
    """A generated folder dataset of random JPEGs (train: opts.dali_images, val: 16), made once per report."""
    if getattr(opts, "jpeg_root", None):
        return opts.jpeg_root
    from PIL import Image
    import numpy as np
    root = opts.jpeg_root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for split, count in (("train", opts.dali_images), ("val", 16)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count // 4):
                Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def check_syncs(opts, size):
    """Count the CUDA sync warnings of steps 3-10 of each run (torch warns once per sync in "warn" mode)."""
    if not opts.cuda:
        return "skipped (no CUDA: bench/step_ops.py counts the same syncs on the CPU)", None
    rows, ok = ["| method | precision | optimizer, backend | syncs over 8 steps (log every 1000) |",
                "|---|---|---|---|"], True
    for method, precision, flags, label in SYNC_RUNS:
        if flags == ["dali"]:
            if not dali_installed():
                rows.append(f"| {method} | {precision} | {label} | SKIP (DALI not installed) |")
                continue
            # batch 64: 32 steps an epoch, so that no epoch-end evaluation falls inside the counted steps
            flags = ["--dataset", "folder", "--data-dir", str(jpeg_folder(opts)), "--data-backend", "dali",
                     "--batch-size", "64", "--workers", "2"]
        argv = [*size, '--max-steps', '10', '--log-every', '1000', '--knn-every', '-1', '--umap-every', '-1',
                '--out-dir', tempfile.mkdtemp(), '--dataset', 'synthetic', '--precision', precision, *flags]
        code = (f"import sys, warnings, torch; sys.path.insert(0, '.'); import {method} as m; from common import run as r\n"
                "update = r.StepMeter.update\n"
                "def counted(self, step, *a, **k):\n"
                "    torch.cuda.set_sync_debug_mode('warn' if 2 <= step < 10 else 'default')\n"
                "    return update(self, step, *a, **k)\n"
                "r.StepMeter.update = counted\n"
                "with warnings.catch_warnings(record=True) as w:\n"
                "    warnings.simplefilter('always')\n"
                f"    m.train(m.parse_args({argv!r}))\n"
                "    torch.cuda.set_sync_debug_mode('default')\n"
                "print('SYNCS', sum('synchroniz' in str(x.message) for x in w))\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
        found = [l for l in proc.stdout.splitlines() if l.startswith("SYNCS")]
        count = int(found[-1].split()[1]) if found else None
        ok &= count == 0
        rows.append(f"| {method} | {precision} | {label} | "
                    f"{count if count is not None else 'failed: ' + tail(proc.stderr)} |")
    return "\n".join(rows), ok


def check_throughput(opts):
    rows, ok = [], True
    for backend in opts.backends:
        argv = [sys.executable, "bench/throughput.py", "--methods", *opts.throughput_methods, "--backbone",
                opts.backbone, "--batch-size", str(opts.batch_size), "--steps", str(opts.steps), "--warmup",
                "3" if opts.cuda else "1",
                "--workers", str(opts.workers), "--", "--data-backend", backend, "--crop-size", str(opts.crop_size),
                "--precision", opts.precision]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
        ok &= proc.returncode == 0
        table = [l for l in proc.stdout.splitlines() if l.startswith("|")]
        rows += [f"{backend} backend:", "", *(table or [f"failed: {tail(proc.stderr)}"]), ""]
    return "\n".join(rows), ok


def check_fp16(opts, size):
    if not opts.cuda:
        return "skipped (fp16 with a GradScaler needs CUDA)", None
    import torch
    # The scale halves at each overflow and doubles after 2000 clean steps: in 100 steps it moves only if an
    # early step overflowed, so "moved" is reported, and a pass needs a clean exit and a finite scale.
    rows, ok = ["| method | exit | final loss | GradScaler scale (start 65536) | moved |", "|---|---|---|---|---|"], True
    for method in FP16_METHODS:
        out = Path(tempfile.mkdtemp())
        status, text, metrics = script(method, out, size, "--precision", "fp16", "--max-steps", str(opts.fp16_steps),
                                       "--log-every", "10")
        scale = None
        if (out / "last.pt").exists():
            scale = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["scaler"].get("scale")
        losses = [m["loss"] for m in metrics if m["type"] == "step"]
        ok &= status == 0 and scale is not None and 0 < scale < float("inf")
        rows.append(f"| {method} | {status} | {losses[-1] if losses else tail(text)} | {scale} | "
                    f"{'yes' if scale not in (None, 65536.0) else 'no'} |")
    return "\n".join(rows), ok


def check_resume_precision(opts, size):
    first, second = ("bf16", "fp16") if opts.cuda else ("fp32", "bf16")
    n = opts.resume_steps
    out = Path(tempfile.mkdtemp())
    a = script("byol", out, size, "--precision", first, "--max-steps", str(n), "--log-every", "1")
    b = script("byol", out, size, "--precision", second, "--max-steps", str(2 * n), "--log-every", "1")
    steps = [m["step"] for m in b[2] if m["type"] == "step"]
    ok = a[0] == 0 and b[0] == 0 and steps and steps[-1] == 2 * n
    return f"{first} for {n} steps, then {second} to {2 * n}: exit {a[0]} / {b[0]}, last logged step " \
           f"{steps[-1] if steps else '-'}" \
           + ("" if ok else f" ({tail(b[1])})"), ok


def check_dali(opts):
    if not dali_installed():
        return "skipped (DALI not installed: pip install -r requirements-dali.txt)", None
    root = jpeg_folder(opts)
    out = Path(tempfile.mkdtemp())
    start = time.time()
    status, text, metrics = script("byol", out, ["--backbone", opts.backbone, "--batch-size", "8", "--crop-size",
                                                 str(opts.crop_size)], "--dataset", "folder", "--data-dir", str(root),
                                   "--data-backend", "dali", "--max-steps", "10" if opts.cuda else "1",
                                   "--log-every", "5",
                                   "--workers", "2")
    where = "GPU" if opts.cuda else "CPU-only mode"
    return f"byol on a {opts.dali_images}-image JPEG folder, DALI on the {where}: exit {status}, " \
           f"{time.time() - start:.0f} s" + ("" if status == 0 else f" ({tail(text)})"), status == 0


def check_compile(opts, size):
    if not opts.cuda and not opts.smoke_compile:
        return "skipped (compile on the CPU takes minutes; run on CUDA)", None
    rows, ok = [], True
    for mode in ("eager", "compile"):
        out = Path(tempfile.mkdtemp())
        flags = ["--compile"] if mode == "compile" else []
        status, text, metrics = script("byol", out, size, "--max-steps", str(opts.compile_steps), "--log-every",
                                       str(opts.compile_steps), *flags)
        # images/s of each epoch's training steps (evaluation excluded): with --compile the first includes compiling
        speeds = ", ".join(f"epoch {m['epoch']} {round(m['images_per_s'])}" for m in metrics if m["type"] == "epoch")
        ok &= status == 0
        rows.append(f"{mode}: exit {status}, images/s {speeds or '-'}" + ("" if status == 0 else f" ({tail(text)})"))
    return f"BYOL, {opts.compile_steps} steps; " + "; ".join(rows) + " (the first epoch includes compiling)", ok


def check_busy(opts, size):
    if not opts.cuda:
        return "skipped (needs CUDA kernels to time)", None
    code = ("import sys, time, torch; sys.path.insert(0, '.'); import byol as m; from common import run as r\n"
            "from torch.profiler import profile, ProfilerActivity\n"
            "update, state = r.StepMeter.update, {}\n"
            "def counted(self, step, *a, **k):\n"
            "    out = update(self, step, *a, **k)\n"
            "    if step == 10:\n"
            "        torch.cuda.synchronize(); state['p'] = profile(activities=[ProfilerActivity.CUDA]); state['p'].__enter__(); state['t'] = time.perf_counter()\n"
            "    if step == 20:\n"
            "        torch.cuda.synchronize(); wall = time.perf_counter() - state['t']; state['p'].__exit__(None, None, None)\n"
            "        busy = sum(e.device_time_total for e in state['p'].key_averages()) / 1e6\n"
            "        print('BUSY', busy / wall, wall)\n"
            "    return out\n"
            "r.StepMeter.update = counted\n"
            f"m.train(m.parse_args({[*size, '--max-steps', '21', '--log-every', '1000', '--knn-every', '-1', '--umap-every', '-1', '--out-dir', tempfile.mkdtemp(), '--dataset', 'synthetic']!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    found = [l.split() for l in proc.stdout.splitlines() if l.startswith("BUSY")]
    if not found:
        return f"failed: {tail(proc.stderr)}", False
    busy, wall = float(found[-1][1]), float(found[-1][2])
    return f"GPU busy {100 * busy:.0f}% of the wall time over 10 BYOL steps ({1000 * wall / 10:.1f} ms per step)", True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.md", help="markdown report [default: %(default)s]")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU; CUDA-only checks are skipped")
    opts = p.parse_args(argv)
    import torch
    opts.cuda = torch.cuda.is_available() and not opts.cpu_smoke
    if not opts.cuda and not opts.cpu_smoke:
        raise SystemExit("error: no CUDA GPU visible: run with --cpu-smoke to exercise the script on the CPU")
    if opts.cpu_smoke:  # the smallest sizes that still run every code path: a test runs this
        opts.backbone, opts.crop_size, opts.batch_size, opts.steps, opts.workers = "resnet_narrow", 16, 8, 2, 0
        opts.precision, opts.throughput_methods, opts.fp16_steps, opts.dali_images = "fp32", ["byol"], 4, 16
        opts.compile_steps, opts.smoke_compile, opts.backends, opts.resume_steps = 2, False, ["device"], 1
    else:
        opts.backbone, opts.crop_size, opts.batch_size, opts.steps, opts.workers = "resnet18", 32, 256, 30, 8
        opts.precision, opts.throughput_methods, opts.fp16_steps, opts.dali_images = "bf16", THROUGHPUT_METHODS, 100, 2048
        opts.compile_steps, opts.smoke_compile, opts.backends = 60, True, ["device", "torchvision"]
        opts.resume_steps = 10
    size = ["--backbone", opts.backbone, "--crop-size", str(opts.crop_size), "--batch-size", str(opts.batch_size),
            "--data-backend", "device", "--workers", str(opts.workers),
            "--train-subset", str(8000 if opts.cuda else 4 * opts.batch_size)]
    checks = [("Host syncs per step", lambda: check_syncs(opts, size)),
              ("Throughput", lambda: check_throughput(opts)),
              ("fp16 with a GradScaler", lambda: check_fp16(opts, size)),
              ("Resume across precision", lambda: check_resume_precision(opts, size)),
              ("DALI", lambda: check_dali(opts)),
              ("--compile against eager", lambda: check_compile(opts, size)),
              ("GPU busy fraction", lambda: check_busy(opts, size))]
    device = torch.cuda.get_device_name() if opts.cuda else "CPU (smoke mode)"
    report = [f"# GPU check: {device}, torch {torch.__version__}", ""]
    failed, skipped = [], []
    for title, check in checks:
        start = time.time()
        try:
            text, ok = check()  # ok: True, False, or None when the check cannot run here
        except Exception as e:  # one broken check must not hide the others' results
            text, ok = f"failed: {type(e).__name__}: {e}", False
        status = "SKIP" if ok is None else "pass" if ok else "FAIL"
        report += [f"## {title} ({status}, {time.time() - start:.0f} s)", "", text, ""]
        print(f"{title}: {status} ({time.time() - start:.0f} s)", flush=True)
        failed += [title] if ok is False else []
        skipped += [title] if ok is None else []
    Path(opts.out).write_text("\n".join(report))
    print(f"report written to {opts.out}; " + (f"failed: {', '.join(failed)}" if failed else "no check failed")
          + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
