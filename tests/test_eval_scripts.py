"""eval/linear.py, eval/knn.py and eval/umap.py end to end on a random backbone and synthetic data.

The four successful runs start together as subprocesses (each pays ~5 s of imports, and
umap-learn's first fit ~15 s of numba compilation: the one UMAP fit of the session), so their
waits overlap. Error paths run in-process through `main(argv)`, the function the scripts'
`__main__` calls, which saves a ~5 s interpreter start per case.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.backbones import backbone_metadata, build_backbone

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("linear", "knn", "umap")
TIMEOUT = 300


def load_script(name):
    """Import eval/<name>.py as a module (eval/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"eval_{name}_script", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # Trained-at-16px metadata: the 32px synthetic images are resized, and forward passes cost 5x less.
    net, dim = build_backbone("resnet_narrow", 16)
    path = tmp_path_factory.mktemp("run") / "backbone.pt"
    torch.save({"backbone": net.state_dict(), **backbone_metadata("resnet_narrow", 16, dim, "simclr"),
                "dataset": "synthetic"}, path)
    return path


@pytest.fixture(scope="module")
def runs(ckpt):
    """Start every successful script run at once; each test waits for its own."""
    out = ckpt.parent
    common = ["--ckpt", ckpt, "--workers", "0", "--device", "cpu"]
    commands = {
        "linear_fast": ["eval/linear.py", *common, "--dataset", "synthetic", "--epochs", "2", "--max-train", "512",
                        "--fast", "--out", out / "fast.json"],
        "linear_full": ["eval/linear.py", *common, "--dataset", "synthetic", "--epochs", "2", "--max-train", "512",
                        "--out", out / "full.json"],
        "knn": ["eval/knn.py", *common, "--max-train", "512", "--k", "20"],  # --dataset and --out from defaults
        "umap": ["eval/umap.py", *common, "--max-points", "300"],
    }
    # One thread each: four processes share two cores better than they fight over them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes = {name: subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, argv in commands.items()}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def finished(process):
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    return stdout


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_linear_writes_json(runs, ckpt, mode):
    stdout = finished(runs[f"linear_{mode}"])
    assert f"linear eval ({mode})" in stdout and "acc@1" in stdout
    result = json.loads((ckpt.parent / f"{mode}.json").read_text())
    assert result["mode"] == mode and result["epochs"] == 2 and result["dataset"] == "synthetic"
    assert result["ckpt"] == str(ckpt) and result["train_images"] == 512
    assert 0 <= result["acc1"] <= result["acc5"] <= 100
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    assert result["history"][-1]["acc1"] == result["acc1"]
    # The checkpoint's method sets the lr (solo-learn's simclr linear config: 1.0 at batch 256; these runs use 256).
    assert result["method"] == "simclr" and result["base_lr"] == result["lr"] == 1.0 and result["batch_size"] == 256
    assert result["history"][0]["lr"] == 1.0
    assert result["history"][1]["lr"] == pytest.approx(0.1)  # 2 epochs: decayed at 60% = epoch 1


def test_knn_writes_json_next_to_ckpt(runs, ckpt):
    stdout = finished(runs["knn"])
    assert "kNN (k=20" in stdout
    result = json.loads((ckpt.parent / "knn.json").read_text())
    assert result["dataset"] == "synthetic"  # taken from the checkpoint
    assert result["k"] == 20 and result["temperature"] == 0.1 and result["train_images"] == 512
    assert 0 <= result["acc1"] <= result["acc5"] <= 100


def test_umap_writes_png_next_to_ckpt(runs, ckpt):
    finished(runs["umap"])
    png = ckpt.parent / "umap-val.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(ckpt.parent) if ".tmp" in p]  # temporary file renamed away


@pytest.fixture(scope="module")
def last_pt_like(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "last.pt"
    torch.save({"model": {}, "optimizer": {}, "epoch": 3, "method": "simclr"}, path)
    return path


def assert_usage_error(capsys, script, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main([str(a) for a in argv])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr, stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_errors_are_one_line_exit_2(capsys, tmp_path, ckpt, last_pt_like, script):
    assert_usage_error(capsys, script, ["--ckpt", tmp_path / "missing.pt"], "checkpoint not found")
    assert_usage_error(capsys, script, ["--ckpt", last_pt_like], "not a backbone.pt")
    assert_usage_error(capsys, script, ["--ckpt", ckpt, "--dataset", "mnist"], "invalid choice: 'mnist'")
    assert_usage_error(capsys, script, [], "--ckpt")


def test_linear_usage_errors_name_the_flag(capsys, tmp_path, ckpt):
    """Every numeric flag of eval/linear.py is range-checked, and --ckpt must be an existing file."""
    bad = [(["--epochs", "0"], "--epochs"), (["--batch-size", "-1"], "--batch-size"), (["--lr", "0"], "--lr"),
           (["--lr", "nan"], "--lr"), (["--weight-decay", "-1e-4"], "--weight-decay"), (["--workers", "-1"], "--workers"),
           (["--seed", "-1"], "--seed"), (["--max-train", "0"], "--max-train"), (["--epochs", "1.5"], "--epochs")]
    for extra, flag in bad:
        assert_usage_error(capsys, "linear", ["--ckpt", ckpt, *extra], f"argument {flag}")
    assert_usage_error(capsys, "linear", ["--ckpt", tmp_path], "checkpoint not found")  # a folder, not a file


def test_linear_lr_comes_from_the_checkpoints_method():
    linear = load_script("linear")
    assert linear.linear_lr("simsiam", 256) == (30.0, 30.0)  # scripts/linear/imagenet-100/simsiam.yaml
    assert linear.linear_lr("simsiam", 128) == (30.0, 15.0)  # scaled by batch / 256, as solo-learn does
    assert linear.linear_lr("barlow_twins", 512) == (0.1, 0.2)
    assert linear.linear_lr("supcon", 256) == (0.1, 0.1)  # no linear config in solo-learn: 0.1
    assert linear.linear_lr(None, 256) == (0.1, 0.1)  # a backbone.pt without a method
    assert linear.linear_lr("simsiam", 512, lr=0.5) == (0.5, 1.0)  # --lr overrides the method's


def test_linear_step_decay_at_solo_learns_epochs():
    linear = load_script("linear")
    lrs = [linear.step_lr(3.0, epoch, 100) for epoch in range(100)]
    assert lrs[59] == 3.0 and lrs[60] == pytest.approx(0.3) and lrs[79] == pytest.approx(0.3)  # lr_decay_steps
    assert lrs[80] == pytest.approx(0.03) and lrs[99] == pytest.approx(0.03)  # [60, 80], gamma 0.1


@pytest.mark.parametrize("script", ["linear", "knn"])
def test_a_dataset_without_labels_is_a_usage_error(capsys, tmp_path, ckpt, script):
    from PIL import Image
    for i in range(3):  # a flat folder: images but no class sub-folders, hence no labels
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    assert_usage_error(capsys, script, ["--ckpt", ckpt, "--dataset", "folder", "--data-dir", tmp_path],
                       "has no labels")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option_with_its_default(capsys, script):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--ckpt" in text and "--device" in text and text.count("[default:") >= 6


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_linear_training_separates_planted_clusters(mode):
    """The training loops themselves, on 'images' whose flattened pixels form 4 separated clusters."""
    linear = load_script("linear")
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 3, 2, 2, generator=gen) * 3

    def batches(count):
        labels = torch.arange(count) % 4
        images = centres[labels] + torch.randn(count, 3, 2, 2, generator=gen)
        return [(images[i:i + 64], labels[i:i + 64]) for i in range(0, count, 64)]

    torch.manual_seed(0)
    probe = torch.nn.Linear(12, 4)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(epochs=5, lr=0.1, batch_size=64, seed=0)
    ctx = dict(device=torch.device("cpu"), channels_last=False, autocast=None)
    train = linear.train_fast if mode == "fast" else linear.train_full
    history = train(args, torch.nn.Flatten(), probe, optimizer, batches(512), batches(256), torch.device("cpu"), ctx)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])  # decays at epochs 3 and 4
    assert history[-1]["acc1"] > 95 and history[-1]["loss"] < history[0]["loss"]
