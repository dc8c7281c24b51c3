"""The method scripts as users run them: files written, resume, signals, NaN, bad input, DDP."""
import json
import re

import pytest
import torch
import torchvision

from common import checkpoint
from common.backbones import backbone_metadata, build_backbone, cifar_stem, load_backbone
from conftest import TINY, read_metrics as metrics, run_script, step_losses, torchrun
HEADS = {"simclr": ["--proj-hidden-dim", "32", "--proj-output-dim", "16"],
         "byol": ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32"]}


def tiny(method, out_dir, *extra):
    return [f"{method}.py", *TINY, *HEADS[method], "--out-dir", out_dir, *extra]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_run_writes_every_file(method, tmp_path):
    out = tmp_path / "run"
    umap = ["--umap-every", "0"] if method == "simclr" else []  # fit UMAP once in the suite: it is slow
    run_script(*tiny(method, out, "--max-steps", "3", "--knn-every", "0", *umap))
    args = json.loads((out / "args.json").read_text())
    assert args["method"] == method and args["world_size"] == 1 and args["torch"] == torch.__version__
    lines = metrics(out)
    assert [m["step"] for m in lines if m["type"] == "step"] == [1, 2, 3]
    final = [m for m in lines if m["type"] == "epoch"][-1]
    for key in ("loss", "lr", "images_per_s", "probe_acc1", "probe_acc5", "knn_acc1", "time"):
        assert key in final
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["method"] == method and last["step"] == 3 and "optimizer" in last and "rng" in last
    if method == "byol":
        assert "target" in last
    net, meta = load_backbone(out / "backbone.pt")
    assert meta["method"] == method and meta["dataset"] == "synthetic"
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, meta["feature_dim"])
    assert (out / "umap.png").exists() == (method == "simclr")
    assert (out / "curves.png").exists() == (method == "simclr")  # curves follow --umap-every


def test_backbone_pt_loads_into_stock_torchvision_resnet18(tmp_path):
    net, dim = build_backbone("resnet18", 32)
    checkpoint.export_backbone(tmp_path / "backbone.pt", net, backbone_metadata("resnet18", 32, dim, "simclr"))
    ckpt = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert ckpt["cifar_stem"] and ckpt["feature_dim"] == 512
    stock = cifar_stem(torchvision.models.resnet18())
    stock.fc = torch.nn.Identity()
    stock.load_state_dict(ckpt["backbone"], strict=True)
    assert stock.conv1.padding == (2, 2) and isinstance(stock.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(stock.eval()(x), net.eval()(x))


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_continues_exactly(method, tmp_path):
    """Stopped at step 2 (mid-epoch 0) and resumed to step 6 (into epoch 1) = one run to step 6."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(method, straight, "--max-steps", "6"))
    run_script(*tiny(method, resumed, "--max-steps", "2"))
    run_script(*tiny(method, resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    end_a = [m for m in metrics(straight) if m["type"] == "epoch"][-1]
    end_b = [m for m in metrics(resumed) if m["type"] == "epoch"][-1]
    assert end_a["probe_acc1"] == end_b["probe_acc1"]
    wa, wb = torch.load(straight / "last.pt")["model"], torch.load(resumed / "last.pt")["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_script(*tiny("simclr", out, "--max-steps", "4"))  # a good last.pt at the end of epoch 0
    good = (out / "last.pt").read_bytes()
    proc = run_script("tests/nan_run.py", "simclr", "1", *tiny("simclr", out, "--max-steps", "8")[1:], check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: loss is not finite at epoch 1, step 5"), proc.stderr
    assert (out / "last.pt").read_bytes() == good


def bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken" / "cat"
    broken.mkdir(parents=True)
    for i in range(4):
        (broken / f"{i}.png").write_bytes(b"not an image")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "last.pt").write_bytes(b"garbage")
    net, dim = build_backbone("resnet_narrow", 16)
    checkpoint.export_backbone(tmp_path / "backbone.pt", net, backbone_metadata("resnet_narrow", 16, dim, "simclr"))
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "unknown backbone": ["--backbone", "resnet9000"],
        "unknown dataset": ["--dataset", "mnist"],
        "missing folder": ["--dataset", "folder", "--data-dir", str(tmp_path / "nowhere")],
        "empty folder": ["--dataset", "folder", "--data-dir", str(empty)],
        "unreadable image": ["--dataset", "folder", "--data-dir", str(broken.parent), "--batch-size", "2",
                             "--crop-size", "32"],
        "missing resume file": ["--resume", str(tmp_path / "nothing.pt")],
        "corrupt last.pt": ["--out-dir", str(garbage)],
        "resume from a backbone.pt": ["--resume", str(tmp_path / "backbone.pt")],
        "data dir is a file": ["--dataset", "folder", "--data-dir", str(tmp_path / "a_file")],
        "batch larger than dataset": ["--train-subset", "10", "--batch-size", "16"],
        "fp16 on cpu": ["--precision", "fp16"],
        "cuda without gpu": ["--device", "cuda"],
        "zero epochs": ["--epochs", "0"],
        "not a number": ["--lr", "fast"],
        "crop scale out of range": ["--min-scale", "1.5"],
        "inversion probability out of range": ["--invert-prob", "2"],
    }


def test_bad_input_gives_one_line_and_status_2(tmp_path):
    for name, flags in bad_inputs(tmp_path).items():
        if name == "cuda without gpu" and torch.cuda.is_available():
            continue
        argv = ["simclr.py", "--workers", "0", "--max-steps", "1", "--out-dir", str(tmp_path / "out"), *flags]
        proc = run_script(*argv, check=False)
        # the progress bar may have started before a broken image is met: it is not an error line
        lines = [l for l in proc.stderr.splitlines() if l.strip() and not re.match(r"epoch \d+:", l)]
        assert proc.returncode == 2 and len(lines) == 1, (name, proc.returncode, proc.stderr)
    assert (tmp_path / "garbage" / "last.pt").read_bytes() == b"garbage"  # refused, never replaced


def test_checkpoint_of_another_method_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    run_script(*tiny("simclr", out, "--max-steps", "1"))
    before = (out / "last.pt").read_bytes()
    proc = run_script(*tiny("byol", out, "--max-steps", "2"), check=False)
    assert proc.returncode == 2 and "written by simclr, not byol" in proc.stderr
    assert (out / "last.pt").read_bytes() == before


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_ddp_two_processes_keep_ranks_identical(method, tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", method, *tiny(method, out, "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    args = json.loads((out / "args.json").read_text())
    assert args["world_size"] == 2 and args["global_batch_size"] == 32
    assert (out / "backbone.pt").exists()
