"""Preemption: SIGTERM (Ctrl-C's SIGINT alike) and SLURM's SIGUSR1 checkpoint the run and exit with status 3."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.cli import PREEMPTED_EXIT
from conftest import ROOT, TINY, read_metrics


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_loadable_checkpoint_and_exits_3(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "simclr.py", *TINY, "--proj-hidden-dim", "32", "--proj-output-dim", "16", "--epochs", "100",
           "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and read_metrics(out)):
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT == 3, stderr
    assert f"{sig.name} received: saved" in stderr and "rerun the command to resume" in stderr
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] >= 1 and last["method"] == "simclr"
    assert not (out / "backbone.pt").exists()  # training did not end: only the resume state is written
