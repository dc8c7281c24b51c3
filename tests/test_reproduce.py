"""reproduce/tables.py: the commands it prints, the published numbers it holds, and a whole run.

The run is exercised in-process against a fake repository (tiny stand-in method scripts and
eval/linear.py that write what the real ones write: metrics.jsonl, backbone.pt, linear.json), so
resuming, skipping, failures and the table are tested in seconds. The real repository is used for
the dry run, from the command line.
"""
import contextlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tables():
    spec = importlib.util.spec_from_file_location("reproduce_tables_script", ROOT / "reproduce" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_tables()

PAPER = ("barlow_twins", "byol", "deepclusterv2", "dino", "mocov2plus", "nnclr", "ressl", "simclr", "supcon",
         "simsiam", "swav", "vicreg", "wmse")
ALL = PAPER + ("all4one", "mocov3", "vibcreg")  # the methods with published numbers in the three tables


# ---- the dry run, from the command line of the real repository ----
def dry_run(*argv, out_dir):
    proc = subprocess.run([sys.executable, "reproduce/tables.py", *argv, "--dry-run", "--out-dir", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("table", ["cifar10", "cifar100"])
def test_dry_run_lists_every_method_with_published_numbers(tmp_path, table):
    lines = dry_run("--table", table, "--data-dir", "/data/cifar", out_dir=tmp_path)
    for method in ALL:
        if (ROOT / f"{method}.py").is_file():
            pretrain = [l for l in lines if re.search(rf"(^| ){method}\.py --dataset {table} ", l)]
            assert len(pretrain) == 1, (method, lines)
            assert f"--out-dir {tmp_path / table / method}" in pretrain[0] and "--batch-size 256" in pretrain[0]
            assert "--data-dir /data/cifar" in pretrain[0] and "--epochs" not in pretrain[0]  # the recipe's 1000
            assert any(f"eval/linear.py --ckpt {tmp_path / table / method / 'backbone.pt'}" in l for l in lines)
        else:
            assert f"# {method}: {method}.py missing: skipped" in lines
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_imagenet100_under_torchrun(tmp_path):
    lines = dry_run("--table", "imagenet100", "--nproc-per-node", "4", out_dir=tmp_path)
    commands = [l for l in lines if not l.startswith("#")]
    pretrain = [l for l in commands if "--dataset imagenet100 --data-dir" in l and "linear.py" not in l]
    present = [m for m in ALL if m != "supcon" and (ROOT / f"{m}.py").is_file()]
    assert len(pretrain) == len(present)  # Table 1 has no SupCon row: not run by default
    for line in pretrain:
        assert re.search(r"(torchrun|torch\.distributed\.run) --standalone --nproc_per_node=4 ", line)
        assert "--batch-size 64" in line  # solo-learn's global batch of 256 over 4 processes
    assert not any("supcon" in l for l in lines)


def test_dry_run_imagenet_1k_uses_solo_learns_per_gpu_batch(tmp_path):
    """scripts/pretrain/imagenet/: 64 images per GPU on 2 GPUs (BYOL, MoCo V2+) or 4 (Barlow Twins), the rest
    (ResNet-50, BYOL's 16 accumulated batches, LARS eta) from the scripts' imagenet1k recipes."""
    lines = dry_run("--table", "imagenet", "--nproc-per-node", "2", "--data-dir", "/data/in1k", out_dir=tmp_path)
    commands = [l for l in lines if not l.startswith("#")]
    pretrain = {m: [l for l in commands if f"{m}.py --dataset imagenet --data-dir /data/in1k " in l]
                for m in ("barlow_twins", "byol", "mocov2plus")}
    assert all(len(found) == 1 for found in pretrain.values()) and len(commands) == 6, lines
    assert "--batch-size 64" in pretrain["byol"][0] and "--epochs" not in pretrain["byol"][0]  # 2 x 64
    assert "--batch-size 128" in pretrain["barlow_twins"][0]  # 4 x 64 over 2 processes
    assert "--batch-size 64 --epochs 100" in pretrain["mocov2plus"][0]  # the published row's epochs, not 400
    for method in pretrain:
        linear = [l for l in commands if "linear.py" in l and f"/{method}/" in l]
        assert len(linear) == 1 and "--dataset imagenet " in linear[0]  # eval/linear.py: imagenet's lr and wd


def test_dry_run_shows_what_resuming_skips(tmp_path):
    done, pretrained, partial = (tmp_path / "cifar10" / m for m in ("byol", "simclr", "swav"))
    for folder in (done, pretrained, partial):
        folder.mkdir(parents=True)
    (done / "linear.json").write_text("{}")
    (pretrained / "backbone.pt").write_text("")
    (partial / "last.pt").write_text("")
    argv = ["--table", "cifar10", "--methods", "byol,simclr", "swav", "--dry-run", "--out-dir", str(tmp_path)]
    lines = capture_run(argv, root=ROOT)
    assert lines[1] == f"# byol: done ({done / 'linear.json'} exists): skipped"
    assert lines[2] == "# simclr: backbone.pt exists: linear evaluation only"
    assert "linear.py" in lines[3] and not any("simclr.py" in l for l in lines)
    assert lines[4] == f"# swav: resumes from {partial / 'last.pt'}"
    assert "swav.py --dataset cifar10" in lines[5] and "linear.py" in lines[6] and len(lines) == 7


def capture_run(argv, root):
    """tables.run(argv) with the repository root at `root`; returns the printed lines (dry runs)."""
    saved, tables.ROOT = tables.ROOT, Path(root)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = tables.run(argv)
    finally:
        tables.ROOT = saved
    assert code == 0
    return buffer.getvalue().splitlines()


# ---- published numbers ----
def test_published_numbers():
    assert set(tables.PUBLISHED["cifar10"]) == set(tables.PUBLISHED["cifar100"]) == set(ALL)
    assert set(tables.PUBLISHED["imagenet100"]) == set(ALL) - {"supcon"}
    assert tables.PUBLISHED["cifar10"]["byol"]["online"] == (92.58, 99.79)
    assert tables.PUBLISHED["cifar100"]["wmse"]["online"] == (61.33, 87.26)
    assert tables.PUBLISHED["cifar10"]["supcon"]["online"] == (93.82, None)
    assert tables.PUBLISHED["imagenet100"]["simsiam"] == {"online": (74.54, 93.16), "linear": (78.72, 94.78)}
    assert tables.PUBLISHED["imagenet100"]["barlow_twins"] == {"online": (80.38, 95.28), "linear": (80.16, 95.14)}
    assert set(tables.NAMES) == set(tables.METHODS) == set(ALL) | {"nnbyol", "nnsiam", "mae"}
    assert tables.PUBLISHED["cifar10"]["all4one"]["online"] == (93.24, 99.88)
    assert tables.PUBLISHED["imagenet100"]["mocov3"] == {"online": (80.36, 95.18), "linear": (80.36, 94.96)}
    assert tables.PUBLISHED["imagenet"]["byol"] == {"online": (68.63, 88.80), "linear": (68.37, 88.66)}
    assert tables.PUBLISHED["imagenet"]["barlow_twins"] == {"online": (67.18, 87.69), "linear": (67.23, 87.98)}
    assert set(tables.PUBLISHED["imagenet"]) == {"barlow_twins", "byol", "mocov2plus"} and \
        tables.PUBLISHED_EPOCHS["imagenet"] == 100


# ---- a whole run against a fake repository ----
FAKE_METHOD = textwrap.dedent("""
    import json, os, sys
    argv = sys.argv[1:]
    out = argv[argv.index("--out-dir") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "calls"), "a") as f:
        f.write(os.path.basename(__file__) + " " + " ".join(argv) + "\\n")
    behaviour = os.environ.get("FAKE_" + os.path.basename(__file__)[:-3].upper(), "ok")
    if behaviour.startswith("exit"):
        sys.exit(int(behaviour[4:]))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"type": "epoch", "epoch": 0, "probe_acc1": 50.0, "probe_acc5": 90.0}) + "\\n")
        f.write(json.dumps({"type": "epoch", "epoch": 1, "probe_acc1": 91.25, "probe_acc5": 99.5}) + "\\n")
    open(os.path.join(out, "last.pt"), "w").close()
    if behaviour != "preempted":
        open(os.path.join(out, "backbone.pt"), "w").close()
""")
FAKE_LINEAR = textwrap.dedent("""
    import json, os, sys
    argv = sys.argv[1:]
    out = argv[argv.index("--out") + 1]
    with open(os.path.join(os.path.dirname(out), "calls"), "a") as f:
        f.write("linear.py " + " ".join(argv) + "\\n")
    if os.environ.get("FAKE_LINEAR") == "exit1":
        sys.exit(1)
    with open(out, "w") as f:
        json.dump({"acc1": 90.5, "acc5": 99.25, "mode": "fast" if "--fast" in argv else "full"}, f)
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "eval").mkdir(parents=True)
    for method in ("simclr", "byol", "dino"):
        (root / f"{method}.py").write_text(FAKE_METHOD)
    (root / "eval" / "linear.py").write_text(FAKE_LINEAR)
    monkeypatch.setattr(tables, "ROOT", root)
    out = tmp_path / "out"
    return out, lambda *extra: ["--table", "cifar10", "--methods", "simclr", "byol", "swav",
                                "--out-dir", str(out), "--data-dir", "/d", *extra]


def calls(out, method):
    path = out / "cifar10" / method / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_run_collects_a_table_and_resumes(fake, capsys):
    out, argv = fake
    assert tables.run(argv("--epochs", "2", "--linear-args", "--fast --epochs 3")) == 0
    printed = capsys.readouterr().out
    for method in ("simclr", "byol"):
        pretrain, linear = calls(out, method)
        assert pretrain == f"{method}.py --dataset cifar10 --data-dir /d --out-dir {out / 'cifar10' / method} " \
                           f"--batch-size 256 --epochs 2"
        assert linear.endswith("--dataset cifar10 --data-dir /d --out "
                               f"{out / 'cifar10' / method / 'linear.json'} --fast --epochs 3")
    markdown = (out / "cifar10.md").read_text()
    assert markdown in printed
    simclr_row = next(l for l in markdown.splitlines() if l.startswith("| SimCLR |"))
    # published online, ours online (last epoch, minus published), published linear (none), ours linear
    assert simclr_row == ("| SimCLR | 90.74 / 99.75 | 91.25 / 99.50 (+0.51) | – | 90.50 / 99.25 | "
                          "pretrained 2 epochs, not 1000; linear eval in --fast mode |")
    assert "| SwAV | 89.17 / 99.68 | – | – | – | swav.py missing: skipped |" in markdown
    assert "DINO" not in markdown  # not selected
    data = json.loads((out / "cifar10.json").read_text())
    assert data["methods"]["byol"]["ours"]["online"] == [91.25, 99.5]
    assert data["methods"]["byol"]["published"]["online"] == [92.58, 99.79]

    # Rerun: everything is done, nothing runs again.
    assert tables.run(argv()) == 0
    assert len(calls(out, "simclr")) == len(calls(out, "byol")) == 2
    # Without linear.json, only the linear evaluation runs again; without backbone.pt, pretraining resumes.
    (out / "cifar10" / "simclr" / "linear.json").unlink()
    (out / "cifar10" / "byol" / "linear.json").unlink()
    (out / "cifar10" / "byol" / "backbone.pt").unlink()
    assert tables.run(argv()) == 0
    assert [c.split()[0] for c in calls(out, "simclr")] == ["simclr.py", "linear.py", "linear.py"]
    assert [c.split()[0] for c in calls(out, "byol")] == ["byol.py", "linear.py", "byol.py", "linear.py"]


def test_a_failed_method_does_not_stop_the_others(fake, monkeypatch, capsys):
    out, argv = fake
    monkeypatch.setenv("FAKE_SIMCLR", "exit1")
    assert tables.run(argv()) == 1
    assert [c.split()[0] for c in calls(out, "simclr")] == ["simclr.py"]  # no linear eval of a failed run
    assert [c.split()[0] for c in calls(out, "byol")] == ["byol.py", "linear.py"]
    assert "| SimCLR | 90.74 / 99.75 | – | – | – | pretraining failed (exit status 1) |" in (out / "cifar10.md").read_text()
    assert "simclr: pretraining failed (exit status 1)" in capsys.readouterr().err


def test_bad_input_to_a_script_stops_the_table(fake, monkeypatch, capsys):
    out, argv = fake
    monkeypatch.setenv("FAKE_SIMCLR", "exit2")
    with pytest.raises(SystemExit) as exit_info:
        tables.main(argv())
    assert exit_info.value.code == 2
    assert calls(out, "byol") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rejected its input" in err[0]


def test_a_preempted_pretraining_stops_and_resumes(fake, monkeypatch, capsys):
    out, argv = fake
    monkeypatch.setenv("FAKE_SIMCLR", "preempted")  # exits 0 with last.pt and no backbone.pt, as after SIGTERM
    with pytest.raises(SystemExit) as exit_info:
        tables.main(argv())
    assert exit_info.value.code == 130
    assert calls(out, "byol") == [] and "rerun the same command" in capsys.readouterr().err
    monkeypatch.delenv("FAKE_SIMCLR")
    assert tables.run(argv()) == 0
    assert [c.split()[0] for c in calls(out, "simclr")] == ["simclr.py", "simclr.py", "linear.py"]


@pytest.mark.parametrize("extra,message", [
    (["--methods", "simclr,moco9"], "unknown method(s) moco9"),
    (["--nproc-per-node", "3"], "multiple of --nproc-per-node 3"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be 1 or more"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--pretrain-args", "--workers '4"], "cannot split"),
    (["--table", "imagenet1k"], "invalid choice"),
])
def test_bad_arguments(tmp_path, capsys, extra, message):
    argv = ["--table", "cifar10", "--dry-run", "--out-dir", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as exit_info:
        tables.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


SLOW_METHOD = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[sys.argv.index("--out-dir") + 1]
    os.makedirs(out, exist_ok=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    open(os.path.join(out, "started"), "w").close()
    deadline = time.time() + 60
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    open(os.path.join(out, "saved on SIGTERM" if stop else "timed out"), "w").close()  # like a last.pt
""")


def test_sigterm_is_passed_on_and_the_script_may_save(tmp_path):
    """Cluster preemption: SIGTERM to reproduce/tables.py reaches the running method script, which
    saves and exits; the table stops there with status 130."""
    root = tmp_path / "repo"
    root.mkdir()
    (root / "simclr.py").write_text(SLOW_METHOD)
    out = tmp_path / "out"
    code = (f"import importlib.util, pathlib, sys\n"
            f"spec = importlib.util.spec_from_file_location('t', {str(ROOT / 'reproduce' / 'tables.py')!r})\n"
            f"t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)\n"
            f"t.ROOT = pathlib.Path({str(root)!r})\n"
            f"t.main(['--table', 'cifar10', '--methods', 'simclr', '--out-dir', {str(out)!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "cifar10" / "simclr"
    deadline = time.time() + 30
    while not (run / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert (run / "saved on SIGTERM").exists()
    assert "SIGTERM received" in stderr and "rerun the same command" in stderr
