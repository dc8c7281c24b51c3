"""eval/export.py and the README's ways of loading a backbone.pt.

Backbones are built with build_backbone and written with checkpoint.export_backbone, as a method script
does, with BatchNorm statistics and affine parameters randomized so that a swapped or dropped buffer
changes the features. Each export is loaded with strict=True into the stock model the README names and
must give the same features as common.backbones.load_backbone. Detectron2 has no wheel here: its key
mapping is checked exhaustively against names and shapes derived from Detectron2's ResNet rules
(stages of [2,2,2,2] BasicBlocks or [3,4,6,3] BottleneckBlocks, a shortcut wherever the channel count
changes), and against its suffix-matching loader.
"""
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from common.backbones import backbone_metadata, build_backbone, load_backbone
from common.checkpoint import export_backbone

ROOT = Path(__file__).resolve().parents[1]


def load_export_script():
    spec = importlib.util.spec_from_file_location("eval_export_script", ROOT / "eval" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export = load_export_script()

# (backbone, image size, dataset). ResNet features are compared on 16px (CIFAR stem) and 32px images:
# convolutions don't care about the size they were trained at, CPUs do.
CKPTS = {"r18_32": ("resnet18", 32, "cifar10"), "r18_224": ("resnet18", 224, "imagenet100"),
         "r50_32": ("resnet50", 32, "cifar100"), "r50_224": ("resnet50", 224, "imagenet100"),
         "vit_32": ("vit_tiny", 32, "cifar10"), "swin_32": ("swin_tiny", 32, "cifar10"),
         "narrow": ("resnet_narrow", 32, "synthetic"), "convnext_32": ("convnext_tiny", 32, "cifar10"),
         "convnext_224": ("convnext_tiny", 224, "imagenet100"), "poolformer_224": ("poolformer_s12", 224, "imagenet"),
         "wrn": ("wide_resnet28w2", 32, "cifar10")}
RESNET_CKPTS = ("r18_32", "r18_224", "r50_32", "r50_224")
CLI_RUN = []  # the `python eval/export.py` subprocess, started by the ckpts fixture


def randomize_norms(net, generator):
    """Distinct, plausible values in every BatchNorm tensor (a fresh BN has means 0 and variances 1), and in
    ConvNeXt's LayerNorms and layer scales (1e-6 when fresh: a block's output would vanish, and with it any
    mix-up of its weights)."""
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are small: on a loaded machine, OpenMP threads waiting for each other cost more
    # than they gain (timm's weight init takes seconds instead of a fraction of one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts_and_features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    generator = torch.Generator().manual_seed(0)
    paths, features = {}, {}
    for key, (name, size, dataset) in CKPTS.items():
        torch.manual_seed(len(paths))
        net, dim = build_backbone(name, size)
        randomize_norms(net, generator)
        paths[key] = folder / key / "backbone.pt"
        paths[key].parent.mkdir()
        export_backbone(paths[key], net, {**backbone_metadata(name, size, dim, "simclr"), "dataset": dataset})
        with torch.no_grad():
            features[key] = net.eval()(images(key))
    # The command-line run starts now and works on the second core while the in-process tests run;
    # test_command_line_from_the_repository_root collects it.
    CLI_RUN.append(subprocess.Popen(
        [sys.executable, "eval/export.py", "--ckpt", str(paths["r18_32"]), "--format", "torchvision"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    yield paths, features
    if CLI_RUN and CLI_RUN[0].poll() is None:
        CLI_RUN[0].kill()


@pytest.fixture(scope="module")
def reference(ckpts_and_features):
    """The features of each saved backbone: what every export must reproduce."""
    return ckpts_and_features[1]


@pytest.fixture(scope="module")
def ckpts(ckpts_and_features):
    return ckpts_and_features[0]


def images(key, n=2):
    name, trained_size, _ = CKPTS[key]
    size = trained_size if name.startswith("swin") else 16 if trained_size < 64 else 32  # Swin wants its own size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))




def features(model, key):
    with torch.no_grad():
        return model.eval()(images(key))


def run_load_code(info):
    """Execute the loading code the export printed and wrote to FILE.json; returns its `model`."""
    scope = {}
    exec(info["load"], scope)
    return scope["model"]


def apply_cifar_stem(model):
    # The two lines the README shows.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    model.maxpool = nn.Identity()


# ---- torchvision ----
@pytest.mark.parametrize("key", RESNET_CKPTS)
def test_torchvision_export_loads_strictly_into_the_stock_model(ckpts, reference, tmp_path, key):
    name, size, _ = CKPTS[key]
    out = tmp_path / f"{key}.pth"
    info = export.run(["--ckpt", str(ckpts[key]), "--format", "torchvision", "--out", str(out)])
    assert json.loads(Path(f"{out}.json").read_text()) == info
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = getattr(torchvision.models, name)()
    cifar = size < 64
    assert info["cifar_stem"] is cifar
    if cifar:
        assert "padding 2" in info["stem"] and "no max-pool" in info["stem"]
        with pytest.raises(RuntimeError, match="conv1.weight"):
            model.load_state_dict(state)  # the untouched stock stem cannot take the CIFAR conv1
        apply_cifar_stem(model)
    model.load_state_dict(state, strict=True)
    assert not model.fc.weight.any() and not model.fc.bias.any()
    assert model.fc.weight.shape == (1000, info["feature_dim"])
    model.fc = nn.Identity()
    torch.testing.assert_close(features(model, key), reference[key])
    torch.testing.assert_close(features(run_load_code(info), key), reference[key])


def test_torchvision_without_fc(ckpts, reference, tmp_path):
    out = tmp_path / "r18.pth"
    info = export.run(["--ckpt", str(ckpts["r18_224"]), "--format", "torchvision", "--out", str(out), "--no-fc"])
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(features(model, "r18_224"), reference["r18_224"])
    torch.testing.assert_close(features(run_load_code(info), "r18_224"), reference["r18_224"])


# ---- timm ----
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_resnet_keys_are_torchvision_keys(name):
    import timm
    timm_state = timm.create_model(name, num_classes=0).state_dict()
    tv_state = {k: v for k, v in getattr(torchvision.models, name)().state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in timm_state.items()} == {k: v.shape for k, v in tv_state.items()}


@pytest.mark.parametrize("key", ["convnext_32", "convnext_224"])
def test_torchvision_convnext_export(ckpts, reference, tmp_path, key):
    """timm's ConvNeXt keys renamed to torchvision's: the stock model gives the same features."""
    _, size, _ = CKPTS[key]
    out = tmp_path / f"{key}.pth"
    info = export.run(["--ckpt", str(ckpts[key]), "--format", "torchvision", "--out", str(out)])
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = torchvision.models.convnext_tiny()
    if size < 64:
        assert "1x1 stride-1 stem" in info["stem"]
        with pytest.raises(RuntimeError, match="features.0.0.weight"):
            model.load_state_dict(state)  # the stock 4x4 stride-4 stem cannot take it
        model.features[0][0] = nn.Conv2d(3, 96, kernel_size=1)
    model.load_state_dict(state, strict=True)
    assert not model.classifier[2].weight.any() and model.classifier[2].weight.shape == (1000, 768)
    model.classifier[2] = nn.Identity()
    torch.testing.assert_close(features(model, key), reference[key])
    torch.testing.assert_close(features(run_load_code(info), key), reference[key])


def test_torchvision_convnext_names_are_one_to_one():
    import timm
    timm_state = timm.create_model("convnext_tiny", num_classes=0).state_dict()
    renamed = export.torchvision_convnext_state(timm_state)
    stock = {k: v.shape for k, v in torchvision.models.convnext_tiny().state_dict().items()
             if not k.startswith("classifier.2.")}
    assert len(renamed) == len(timm_state) and {k: v.shape for k, v in renamed.items()} == stock
    with pytest.raises(ValueError):
        export.torchvision_convnext_name("head.fc.weight")


@pytest.mark.parametrize("key", ["r18_32", "r18_224", "r50_224", "vit_32", "swin_32", "convnext_32", "poolformer_224"])
def test_timm_export_loads_strictly_into_timm(ckpts, reference, tmp_path, key):
    import timm
    name, size, _ = CKPTS[key]
    out = tmp_path / f"{key}.pth"
    info = export.run(["--ckpt", str(ckpts[key]), "--format", "timm", "--out", str(out)])
    state = torch.load(out, weights_only=True)
    model = timm.create_model(info["timm_model"], **info["timm_kwargs"])
    if info["cifar_stem"]:
        apply_cifar_stem(model)
    model.load_state_dict(state, strict=True)
    # timm's ResNet computes what torchvision's does: same features from the same weights
    torch.testing.assert_close(features(model, key), reference[key])
    torch.testing.assert_close(features(run_load_code(info), key), reference[key])


# ---- Detectron2 ----
D2_NORM = ("weight", "bias", "running_mean", "running_var")
D2_NAME = re.compile(r"stem\.conv1\.(weight|norm\.(weight|bias|running_mean|running_var))"
                     r"|res[2-5]\.\d+\.(conv[1-3]|shortcut)\.(weight|norm\.(weight|bias|running_mean|running_var))")


def detectron2_resnet(depth):
    """{name: shape} of Detectron2's ResNet-18/50 backbone (FrozenBN), from its construction rules."""
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    bottleneck = depth >= 50
    shapes = {}

    def conv(prefix, out_ch, in_ch, k):
        shapes[f"{prefix}.weight"] = (out_ch, in_ch, k, k)
        shapes.update({f"{prefix}.norm.{p}": (out_ch,) for p in D2_NORM})

    conv("stem.conv1", 64, 3, 7)
    in_ch = 64
    for i, n in enumerate(blocks):
        width = 64 * 2 ** i
        out_ch = 4 * width if bottleneck else width  # RES2_OUT_CHANNELS: 256 for R50, 64 for R18
        for b in range(n):
            prefix = f"res{i + 2}.{b}"
            if bottleneck:
                conv(f"{prefix}.conv1", width, in_ch, 1)
                conv(f"{prefix}.conv2", width, width, 3)  # STRIDE_IN_1X1 False: the stride is here
                conv(f"{prefix}.conv3", out_ch, width, 1)
            else:
                conv(f"{prefix}.conv1", width, in_ch, 3)
                conv(f"{prefix}.conv2", width, width, 3)
            if in_ch != out_ch:
                conv(f"{prefix}.shortcut", out_ch, in_ch, 1)
            in_ch = out_ch
    return shapes


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_detectron2_names_cover_a_stock_resnet_exactly_once(name):
    stock = getattr(torchvision.models, name)().state_dict()
    with pytest.raises(ValueError):
        export.detectron2_name("fc.weight")  # the classifier is never part of a backbone
    backbone = {k: v for k, v in stock.items() if not k.startswith("fc.")}
    mapped = {}
    for key, tensor in backbone.items():
        new = export.detectron2_name(key)
        if key.endswith("num_batches_tracked"):
            assert new is None
            continue
        assert new is not None and D2_NAME.fullmatch(new), (key, new)
        assert new not in mapped, f"{key} and another key both map to {new}"
        mapped[new] = tuple(tensor.shape)
    assert mapped == detectron2_resnet(STOCK_DEPTH[name])
    # Detectron2 loads with matching_heuristics: each model key takes the longest checkpoint key that is
    # a dot-bounded suffix of it. Every one must find its own name, unambiguously.
    model_keys = [f"backbone.bottom_up.{k}" for k in mapped]
    for model_key in model_keys:
        matches = [k for k in mapped if model_key == k or model_key.endswith("." + k)]
        assert max(matches, key=len) == model_key.removeprefix("backbone.bottom_up.")
    assert len({max([k for k in mapped if m.endswith("." + k)], key=len) for m in model_keys}) == len(mapped)


STOCK_DEPTH = {"resnet18": 18, "resnet50": 50}


def test_detectron2_names_of_known_keys():
    pairs = {"conv1.weight": "stem.conv1.weight", "bn1.running_var": "stem.conv1.norm.running_var",
             "layer1.0.conv2.weight": "res2.0.conv2.weight", "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
             "layer3.5.bn3.running_mean": "res4.5.conv3.norm.running_mean",
             "layer4.0.downsample.0.weight": "res5.0.shortcut.weight",
             "layer2.0.downsample.1.running_var": "res3.0.shortcut.norm.running_var",
             "layer4.1.bn1.num_batches_tracked": None}
    assert {k: export.detectron2_name(k) for k in pairs} == pairs


@pytest.mark.parametrize("key", ["r18_224", "r50_224"])
def test_detectron2_pickle(ckpts, tmp_path, key):
    out = tmp_path / f"{key}.pkl"
    info = export.run(["--ckpt", str(ckpts[key]), "--format", "detectron2", "--out", str(out)])
    with open(out, "rb") as f:
        data = pickle.load(f, encoding="latin1")  # how Detectron2's checkpointer reads .pkl files
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["matching_heuristics"] is True
    source = torch.load(ckpts[key], weights_only=True)["backbone"]
    expected = {export.detectron2_name(k): v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    assert set(data["model"]) == set(expected)
    for name, array in data["model"].items():
        assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.flags.c_contiguous
        np.testing.assert_array_equal(array, expected[name].numpy())
    config = info["detectron2_config"]
    depth = STOCK_DEPTH[CKPTS[key][0]]
    assert f"DEPTH: {depth}" in config and "STRIDE_IN_1X1: False" in config and 'FORMAT: "RGB"' in config
    assert ("RES2_OUT_CHANNELS: 64" in config) == (depth == 18)
    assert "PIXEL_MEAN: [123.675, 116.28, 103.53]" in config and "PIXEL_STD: [58.395, 57.12, 57.375]" in config
    assert str(out) in config


# ---- bad input: one line on stderr, exit 2, nothing written ----
@pytest.mark.parametrize("key,fmt,out,message", [
    ("r18_32", "detectron2", "x.pkl", "CIFAR stem"),
    ("r18_224", "detectron2", "x.pth", ".pkl"),
    ("vit_32", "torchvision", "x.pth", "--format timm"),
    ("swin_32", "detectron2", "x.pkl", "--format timm"),
    ("narrow", "torchvision", "x.pth", "load_backbone"),
    ("narrow", "timm", "x.pth", "no stock"),
    ("poolformer_224", "torchvision", "x.pth", "--format timm"),
    ("wrn", "torchvision", "x.pth", "load_backbone"),
    ("wrn", "timm", "x.pth", "no stock"),
])
def test_unsupported_exports_are_refused(ckpts, tmp_path, capsys, key, fmt, out, message):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--ckpt", str(ckpts[key]), "--format", fmt, "--out", str(tmp_path / out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(ckpts, tmp_path, capsys):
    last_pt = tmp_path / "last.pt"
    torch.save({"method": "simclr", "model": {}}, last_pt)
    cases = [(["--ckpt", str(tmp_path / "missing.pt"), "--format", "timm"], "not found"),
             (["--ckpt", str(last_pt), "--format", "timm"], "not a backbone.pt"),
             (["--ckpt", str(ckpts["r18_224"]), "--format", "onnx"], "invalid choice"),
             (["--ckpt", str(ckpts["r18_224"]), "--format", "timm", "--no-fc"], "--no-fc"),
             (["--format", "timm"], "--ckpt")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            export.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert list(tmp_path.iterdir()) == [last_pt]


def test_command_line_from_the_repository_root(ckpts):
    """`python eval/export.py` works from the repo root; --out defaults to a file next to --ckpt."""
    proc = CLI_RUN[0]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    out = ckpts["r18_32"].parent / "backbone_torchvision.pth"
    assert out.is_file() and Path(f"{out}.json").is_file()
    assert "padding=2" in stdout and "maxpool = torch.nn.Identity()" in stdout


# ---- loading a backbone.pt: the README's two ways ----
@pytest.mark.parametrize("key", ["r18_32", "r50_224"])
def test_readme_loading_of_backbone_pt(ckpts, reference, key):
    path = str(ckpts[key])
    # 1. with this repository
    from common.backbones import load_backbone
    net, meta = load_backbone(path)
    assert meta["feature_dim"] == (512 if key.startswith("r18") else 2048)
    # 2. without it: torch.load and a stock torchvision model
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = getattr(torchvision.models, ckpt["name"])()
    if ckpt["cifar_stem"]:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.load_state_dict(ckpt["backbone"])
    torch.testing.assert_close(features(net, key), reference[key])
    torch.testing.assert_close(features(model, key), reference[key])
