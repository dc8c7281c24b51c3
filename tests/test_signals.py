"""Preemption: SIGTERM (Ctrl-C's SIGINT alike) and SLURM's SIGUSR1 checkpoint the run and exit with status 3; a
second signal cannot cut the save short; one run at a time in a run folder."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from common.cli import PREEMPTED_EXIT
from conftest import ROOT, TINY, read_metrics


def started_run(out):
    """(command, process) of a long tiny SimCLR run into `out`, returned once it has logged its first metrics."""
    cmd = [sys.executable, "simclr.py", *TINY, "--proj-hidden-dim", "32", "--proj-output-dim", "16", "--epochs", "100",
           "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and read_metrics(out)):
        time.sleep(0.2)
    return cmd, proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_loadable_checkpoint_and_exits_3(tmp_path, sig):
    out = tmp_path / "run"
    _, proc = started_run(out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT == 3, stderr
    assert f"{sig.name} received: saved" in stderr and "rerun the command to resume" in stderr
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] >= 1 and last["method"] == "simclr"
    assert not (out / "backbone.pt").exists()  # training did not end: only the resume state is written


def test_a_busy_folder_refuses_a_second_run_and_a_double_sigterm_still_saves(tmp_path):
    """One run holds its --out-dir: a second run into it stops with one line naming the holder, exit 2, before it
    writes anything. Then two SIGTERMs 0.1 s apart (SLURM and torchrun both signal a worker): the second is
    ignored, the first run still saves last.pt at the step it stopped at and exits 3."""
    out = tmp_path / "run"
    cmd, first = started_run(out)
    written = {name: (out / name).stat().st_mtime_ns for name in ("args.json", "run.lock")}
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"error: --out-dir {out} is in use by another run (pid {first.pid} on {socket.gethostname()}): wait for it "
        "to end, or pass another --out-dir"], second.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written  # the second run wrote nothing
    assert first.poll() is None  # ... and left the first one running
    first.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == PREEMPTED_EXIT, stderr
    epoch, step = map(int, re.search(r"SIGTERM received: saved .* at epoch (\d+), step (\d+);", stderr).groups())
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (epoch, step) and step >= max(m["step"] for m in read_metrics(out))


def test_folder_lock_names_its_holder_and_is_released_on_close(tmp_path):
    from common.cli import UsageError
    from common.run import lock_run_folder
    held = lock_run_folder(tmp_path / "run")  # creates the folder; a second open file conflicts, even in-process
    with pytest.raises(UsageError, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}\)"):
        lock_run_folder(tmp_path / "run")
    held.close()  # what the end of the process does, however it ends
    lock_run_folder(tmp_path / "run").close()
