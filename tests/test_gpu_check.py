"""bench/gpu_check.py in its CPU smoke mode: every check runs at toy sizes, the CUDA-only ones say "skipped"."""
from conftest import run_script


def test_gpu_check_smoke_writes_every_section(tmp_path):
    report = tmp_path / "smoke.md"
    proc = run_script("bench/gpu_check.py", "--cpu-smoke", "--out", report, timeout=900)
    assert "all checks passed" in proc.stdout, proc.stdout
    text = report.read_text()
    for title in ("Host syncs per step", "Throughput", "fp16 with a GradScaler", "Resume across precision", "DALI",
                  "--compile against eager", "GPU busy fraction"):
        assert f"## {title} (pass" in text, title
    assert "| byol |" in text  # the throughput table came back from bench/throughput.py
    assert "skipped (fp16 with a GradScaler needs CUDA)" in text
