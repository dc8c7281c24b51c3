"""Tests import the method scripts from the repository root and run them as subprocesses there."""
import hashlib
import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The synthetic images, generated once and read back by every run of the suite (common/data.py
# cached_synthetic_images); the folder is named after the generator's source, so a change to it starts afresh.
_GENERATOR = hashlib.sha1((ROOT / "common" / "data.py").read_bytes()).hexdigest()[:12]
os.environ.setdefault("SSL_SYNTHETIC_CACHE", os.path.join(tempfile.gettempdir(), f"ssl-synthetic-{_GENERATOR}"))
if "PYTEST_XDIST_WORKER" in os.environ:  # two workers share two cores: one thread each, in process too
    import torch
    torch.set_num_threads(1)


def run_script(*argv, env=None, timeout=600, check=True):
    """Run `python argv...` (or any command when argv[0] is an executable) from the repo root."""
    cmd = [sys.executable, *argv] if str(argv[0]).endswith(".py") else list(argv)
    # Under pytest-xdist (two workers on two cores) a subprocess gets one thread, else two.
    threads = os.environ.get("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                             f"--- stderr\n{proc.stderr[-3000:]}")
    return proc


def torchrun(*argv, nproc=2, **kw):
    """torchrun with nproc CPU processes (gloo) on a free local port, one thread each (more would
    oversubscribe the cores and make every collective wait on a descheduled thread)."""
    env = {"OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return run_script(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      *argv, env=env, **kw)


@pytest.fixture(autouse=True)
def seeded_randomness():
    """Every test starts from seed 0 (torch, random, numpy): a test that draws from the global generators gets the
    same inputs whatever ran before it in its worker, so it passes or fails the same way every time."""
    import random
    import numpy
    import torch
    torch.manual_seed(0)
    random.seed(0)
    numpy.random.seed(0)


@pytest.fixture
def run():
    return run_script


# A few steps on 64 synthetic images: 4 steps per epoch at batch 16, no kNN or UMAP (the slow parts), the health
# pass on 16 of them at the end only (~1 s of CPU per pass on 64 images). fp32 on every CPU: --precision auto would
# pick bf16 on bf16-capable CPUs, and the tests' tolerances are derived for float32.
TINY = ["--dataset", "synthetic", "--train-subset", "64", "--batch-size", "16", "--workers", "0",
        "--epochs", "3", "--log-every", "1", "--knn-every", "-1", "--umap-every", "-1", "--health-every", "0",
        "--health-samples", "16", "--precision", "fp32"]


def read_metrics(out_dir):
    """The lines of a run's metrics.jsonl as dicts."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir):
    """{step: loss} of the per-step lines of metrics.jsonl."""
    return {m["step"]: m["loss"] for m in read_metrics(out_dir) if m["type"] == "step"}
