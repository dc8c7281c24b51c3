"""bench/gpu_check.py in its CPU smoke mode: every check runs at toy sizes, the CUDA-only ones report SKIP (never
pass: a check that did not run must not look like one that passed)."""
import importlib.util

from conftest import run_script


def test_gpu_check_smoke_writes_every_section(tmp_path):
    report = tmp_path / "smoke.md"
    proc = run_script("bench/gpu_check.py", "--cpu-smoke", "--out", report, timeout=900)
    assert "no check failed" in proc.stdout, proc.stdout
    text = report.read_text()
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    for title, status in (("Host syncs per step", "SKIP"), ("Throughput", "pass"), ("fp16 with a GradScaler", "SKIP"),
                          ("Resume across precision", "pass"), ("DALI", "pass" if dali else "SKIP"),
                          ("--compile against eager", "SKIP"), ("GPU busy fraction", "SKIP")):
        assert f"## {title} ({status}" in text, title
    assert "skipped: Host syncs per step" in proc.stdout
    assert "| byol |" in text  # the throughput table came back from bench/throughput.py
    assert "skipped (fp16 with a GradScaler needs CUDA)" in text
