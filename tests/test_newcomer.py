"""A newcomer's first hour (issue 24): the frictions a new user met, each checked in-process.

--recipe picks a recipe family for any dataset, and a folder of small images gets the CIFAR one with one printed
line; a warmup as long as the run warns; a labelled folder without val/ says what it loses; a data error leaves
no run folder (nor an empty data folder after an offline download); backbone.pt records its data folder and the
eval tools default to it, naming results on other data by that data instead of replacing the run's.
"""
import importlib
import json
import signal
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from common import checkpoint, cli, data
from common.backbones import backbone_metadata, build_backbone
from common.cli import UsageError
from common.run import build_data, finish
from conftest import ROOT

METHODS = sorted(p.stem for p in ROOT.glob("*.py") if "def parse_args(" in p.read_text())


def image_folder(root, side, classes=("cat", "dog"), per_class=2):
    """root/<class>/<i>.png, images of side x (side - 4) pixels (the longer side is `side`)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (side, side - 4), (100 * c, 20 * i, 0)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def keep_signal_handlers():
    """Run() installs its SIGTERM/SIGINT/SIGUSR1 handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


# ---- recipes ----
@pytest.mark.parametrize("method", METHODS)
def test_recipe_flag_picks_a_family_for_any_dataset(method, tmp_path):
    module = importlib.import_module(method)
    out = ["--out-dir", str(tmp_path / "out")]
    for family, recipe in module.RECIPES.items():
        args = module.parse_args(["--dataset", "cifar10", "--recipe", family, *out])
        assert args.recipe == family  # recorded in args.json
        assert {k: getattr(args, k) for k in recipe} == recipe, family
    # The dataset's own family by default; a flag given still overrides the recipe.
    assert module.parse_args(["--dataset", "cifar100", *out]).recipe == "cifar"
    assert module.parse_args(["--dataset", "cifar10", "--recipe", "imagenet", "--epochs", "3", *out]).epochs == 3


def test_recipe_details(tmp_path, capsys):
    simclr = importlib.import_module("simclr")
    out = ["--out-dir", str(tmp_path / "out")]
    parse = lambda *argv: simclr.parse_args([*argv, *out])
    # STL-10's 96px crops belong to its own (imagenet) family; another family brings its own crop size.
    assert parse("--dataset", "stl10").crop_size == 96
    assert parse("--dataset", "stl10", "--recipe", "cifar").crop_size == simclr.RECIPES["cifar"]["crop_size"] == 32
    # The synthetic recipe's on-device augmentation serves in-memory sets: a folder gets the torchvision loader,
    # unless asked for by name (then build_data names the problem).
    folder = image_folder(tmp_path / "imgs", 24)
    synthetic = parse("--dataset", "folder", "--data-dir", str(folder), "--recipe", "synthetic")
    assert synthetic.data_backend == "torchvision"
    assert parse("--dataset", "cifar10", "--recipe", "synthetic").data_backend == "device"
    assert parse("--dataset", "folder", "--data-dir", str(folder), "--recipe", "synthetic",
                 "--data-backend", "device").data_backend == "device"
    with pytest.raises(UsageError, match="--recipe: invalid choice"):
        parse("--recipe", "tiny")
    capsys.readouterr()


def test_a_folder_of_small_images_gets_the_cifar_recipe_with_one_line(tmp_path, capsys, monkeypatch):
    simclr = importlib.import_module("simclr")
    out = ["--out-dir", str(tmp_path / "out")]
    parse = lambda folder, *argv: simclr.parse_args(["--dataset", "folder", "--data-dir", str(folder), *argv, *out])
    small, edge, large = (image_folder(tmp_path / name, side) for name, side in (("s", 24), ("e", 64), ("l", 65)))
    assert parse(small).recipe == "cifar" and parse(small).crop_size == 32
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and f"{small} holds small images (at most 24px): using the cifar recipe" in lines[0]
    assert parse(edge).recipe == "cifar"  # cli.SMALL_IMAGE_SIDE = 64 is small
    assert parse(large).recipe == "imagenet" and parse(large).crop_size == 224
    capsys.readouterr()
    # DATA/train is looked at when it exists; a given --recipe, a missing or empty folder: no look, no line.
    (tmp_path / "split").mkdir()
    small.rename(tmp_path / "split" / "train")
    assert parse(tmp_path / "split").recipe == "cifar"
    capsys.readouterr()
    assert parse(tmp_path / "split", "--recipe", "imagenet").recipe == "imagenet"
    assert parse(tmp_path / "missing").recipe == "imagenet"
    (tmp_path / "empty").mkdir()
    assert parse(tmp_path / "empty").recipe == "imagenet"
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
    assert parse(tmp_path / "split").recipe == "cifar" and capsys.readouterr().out == ""


def test_a_warmup_as_long_as_the_run_warns_once(tmp_path, capsys, monkeypatch):
    simclr = importlib.import_module("simclr")
    out = ["--out-dir", str(tmp_path / "out")]
    warmup = simclr.RECIPES["cifar"]["warmup_epochs"]  # 10
    simclr.parse_args(["--dataset", "cifar10", "--epochs", str(warmup), *out])
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: --warmup-epochs {warmup} >= --epochs {warmup}: the lr warms up for the whole run and "
                   f"never decays; pass a smaller --warmup-epochs (e.g. {warmup / 10:g})"]
    simclr.parse_args(["--dataset", "cifar10", "--epochs", str(warmup + 1), *out])
    simclr.parse_args(["--dataset", "cifar10", "--epochs", "3", "--warmup-epochs", "2.5", *out])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")
    simclr.parse_args(["--dataset", "cifar10", "--epochs", "3", *out])
    assert capsys.readouterr().err == ""


# ---- data ----
def fake_run(tmp_path):
    opened = []
    return SimpleNamespace(is_main=True, rank=0, world_size=1, device=torch.device("cpu"),
                           open_outputs=lambda: opened.append(True), opened=opened)


def build_args(dataset, data_dir, **kw):
    return SimpleNamespace(dataset=dataset, data_dir=str(data_dir), data_backend="torchvision", seed=0, train_subset=0,
                           num_large_crops=2, num_small_crops=0, small_crop_size=None, min_scale=None, invert_prob=0.0,
                           preset="symmetric", crop_size=16, batch_size=2, workers=0, accumulate_steps=1, health_every=-1, **kw)


def test_a_labelled_folder_without_val_says_what_it_loses(tmp_path, capsys):
    root = tmp_path / "real"
    image_folder(root / "train", 24), image_folder(root / "val", 24, per_class=1)
    run = fake_run(tmp_path)
    datasets = build_data(build_args("folder", root / "train"), run)
    assert datasets.val is None and datasets.class_names == ["cat", "dog"] and run.opened == [True]
    assert capsys.readouterr().out.splitlines() == [
        f"{root / 'train'} has labels but no val/ folder: no probe validation, kNN or UMAP in this run; "
        f"pass --data-dir {root}, which holds train/ and val/"]
    datasets = build_data(build_args("folder", root), fake_run(tmp_path))
    assert datasets.val is not None and capsys.readouterr().out == ""
    flat = tmp_path / "flat"  # no labels: nothing to validate, nothing to say
    flat.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(flat / f"{i}.png")
    datasets = build_data(build_args("folder", flat), fake_run(tmp_path))
    assert datasets.class_names is None and capsys.readouterr().out == ""
    only_train = tmp_path / "only"  # a labelled folder with no val/ anywhere near: where to put one
    image_folder(only_train, 24)
    build_data(build_args("folder", only_train), fake_run(tmp_path))
    assert capsys.readouterr().out.endswith(f"put labelled images in {only_train / 'val'}, one sub-folder per class "
                                            "as in training\n")


def test_class_names_of_every_kind_of_dataset(tmp_path):
    assert data.load_dataset("synthetic", None, "val").classes == list(data.SYNTHETIC_CLASSES)
    image_folder(tmp_path / "f", 24, classes=("b_cat", "a_dog"))
    assert data.load_dataset("folder", str(tmp_path / "f"), "train").classes == ["a_dog", "b_cat"]  # label order
    # torchvision sets: their .classes (CIFAR's batches.meta); tests/test_data.py fakes the files.


@pytest.mark.usefixtures("keep_signal_handlers")
def test_a_data_error_writes_nothing(tmp_path, monkeypatch, capsys):
    simclr = importlib.import_module("simclr")
    out = tmp_path / "runs" / "x"
    for argv in (["--dataset", "folder", "--data-dir", str(tmp_path / "missing")],
                 ["--dataset", "imagenet", "--data-dir", str(image_folder(tmp_path / "no_split", 24))]):
        with pytest.raises(SystemExit) as exit_info:
            simclr.main([*argv, "--out-dir", str(out), "--workers", "0"])
        assert exit_info.value.code == 2 and not (tmp_path / "runs").exists()
    # An offline download of CIFAR-10 into a new folder: torchvision creates the folder before it fails.
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exit_info:
        simclr.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data" / "cifar"), "--out-dir", str(out)])
    assert exit_info.value.code == 2 and "could not be downloaded" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    # Only empty folders the download made go: a folder that holds something stays, and so does one that existed.
    (tmp_path / "kept").mkdir()
    with pytest.raises(UsageError):
        data.load_dataset("cifar10", str(tmp_path / "kept" / "new"), "train")
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "note.txt").write_text("x")
    data.remove_empty_folders(tmp_path / "a" / "b", tmp_path)
    assert (tmp_path / "a" / "note.txt").exists() and not (tmp_path / "a" / "b").exists()


# ---- eval tools and the run's data folder ----
def test_backbone_pt_records_the_absolute_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net, dim = build_backbone("resnet_narrow", 16)
    args = SimpleNamespace(backbone="resnet_narrow", crop_size=16, method="simclr", dataset="folder",
                           data_dir="imgs", out_dir=str(tmp_path), umap_every=-1)
    finish(SimpleNamespace(is_main=True, args=args), net, dim)
    meta = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert meta["data_dir"] == str(tmp_path / "imgs") and meta["dataset"] == "folder"


def test_eval_data_defaults_and_result_names(tmp_path):
    meta = {"dataset": "folder", "data_dir": str(tmp_path / "imgs")}
    assert checkpoint.eval_data("b.pt", meta) == ("folder", str(tmp_path / "imgs"), "")
    assert checkpoint.eval_data("b.pt", meta, "folder", f"{tmp_path}/imgs/") == ("folder", f"{tmp_path}/imgs/", "")
    assert checkpoint.eval_data("b.pt", meta, "folder", str(tmp_path / "other")) == ("folder", str(tmp_path / "other"),
                                                                                   "-folder-other")
    assert checkpoint.eval_data("b.pt", meta, "synthetic") == ("synthetic", "./data", "-synthetic")
    assert checkpoint.eval_data("b.pt", meta, "cifar10", "/d") == ("cifar10", "/d", "-cifar10")
    cifar = {"dataset": "cifar10", "data_dir": "/data"}  # a torchvision set is the same set wherever it lies
    assert checkpoint.eval_data("b.pt", cifar, None, "/elsewhere") == ("cifar10", "/elsewhere", "")
    # A backbone.pt written before data_dir was recorded: the args.json beside it, for the run's dataset only.
    old = tmp_path / "old" / "backbone.pt"
    old.parent.mkdir()
    assert checkpoint.eval_data(old, {"dataset": "folder"}) == ("folder", "./data", "")
    (old.parent / "args.json").write_text(json.dumps({"dataset": "folder", "data_dir": "/photos"}))
    assert checkpoint.eval_data(old, {"dataset": "folder"}) == ("folder", "/photos", "")
    assert checkpoint.eval_data(old, {"dataset": "folder"}, "synthetic") == ("synthetic", "./data", "-synthetic")
    with pytest.raises(UsageError, match="b.pt does not name its dataset: pass --dataset"):
        checkpoint.eval_data("b.pt", {})


def test_knn_reads_the_runs_folder_and_keeps_its_result(tmp_path):
    from test_eval_scripts import load_script
    run_data, other = tmp_path / "run_data", tmp_path / "other"
    for root in (run_data, other):
        image_folder(root, 24, per_class=3), image_folder(root / "val", 24, per_class=1)
    net, dim = build_backbone("resnet_narrow", 16)
    ckpt = tmp_path / "run" / "backbone.pt"
    ckpt.parent.mkdir()
    torch.save({"backbone": net.state_dict(), **backbone_metadata("resnet_narrow", 16, dim, "simclr"),
                "dataset": "folder", "data_dir": str(run_data)}, ckpt)
    knn = load_script("knn")
    common = ["--ckpt", str(ckpt), "--workers", "0", "--device", "cpu", "--k", "2"]
    own = knn.run(common)  # no --dataset, no --data-dir: the run's
    assert own["data_dir"] == str(run_data) and own["train_images"] == 6 and own["val_images"] == 2
    elsewhere = knn.run([*common, "--data-dir", str(other)])
    assert elsewhere["data_dir"] == str(other)
    assert json.loads((ckpt.parent / "knn.json").read_text()) == own  # not replaced
    assert json.loads((ckpt.parent / "knn-folder-other.json").read_text()) == elsewhere
