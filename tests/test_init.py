"""--init SOURCE and --freeze-backbone-epochs N (common/checkpoint.py init_state_dict, common/run.py prepare_model and
optimizer_step): every kind of source from local files, the one-line errors, the offline messages, frozen parameters
that get neither an update nor optimizer state, and a run resumed in the middle of its frozen phase."""
import json
import sys
import types
import urllib.error
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision

from common import checkpoint, optim
from common.backbones import backbone_metadata, build_backbone, narrow_resnet
from common.run import Accumulation
from common.cli import UsageError
from common.run import optimizer_step
from conftest import TINY, read_metrics, run_script


def seeded(name, size, seed=1):
    torch.manual_seed(seed)
    return build_backbone(name, size)[0]


def same_weights(a, b):
    return all(torch.equal(x, b[k]) for k, x in a.items()) and a.keys() == b.keys()


def test_a_backbone_pt_of_ours_loads_and_names_another_architecture(tmp_path):
    source = seeded("resnet_narrow", 16)
    path = tmp_path / "backbone.pt"
    checkpoint.export_backbone(path, source, {**backbone_metadata("resnet_narrow", 16, 128, "byol"), "init": None})
    target = seeded("resnet_narrow", 16, seed=2)
    target.load_state_dict(checkpoint.init_state_dict(str(path), target, "resnet_narrow", 16))
    assert same_weights(target.state_dict(), source.state_dict())
    with pytest.raises(UsageError, match=r"holds a resnet_narrow with the CIFAR stem \(16px\), this run builds a "
                                         r"resnet_narrow \(64px\): pass --backbone resnet_narrow --crop-size 16"):
        checkpoint.init_state_dict(str(path), seeded("resnet_narrow", 64), "resnet_narrow", 64)
    import byol  # a path that is no file: one line before anything is written
    with pytest.raises(UsageError, match=r"--init nowhere.pt: no such file \(pass a backbone.pt"):
        byol.parse_args(["--init", "nowhere.pt", "--out-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="the file is empty"):
        checkpoint.init_state_dict(str(tmp_path / "last.pt"), target, "resnet_narrow", 16)


def test_torchvision_and_timm_checkpoint_files_load_without_their_classifier(tmp_path):
    # A torchvision ResNet's state dict (with its fc) at 64px (ImageNet stem), bare and as a trainer's checkpoint
    # {"state_dict": {"module." + key}} (DDP): fc.* and the prefix are dropped, everything else must fit.
    torch.manual_seed(3)
    stock = narrow_resnet()  # torchvision's ResNet class and key names, fc included
    bare, wrapped = tmp_path / "resnet.pth", tmp_path / "trainer.pth.tar"
    torch.save(stock.state_dict(), bare)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in stock.state_dict().items()}}, wrapped)
    expected = {k: v for k, v in stock.state_dict().items() if not k.startswith("fc.")}
    for path in (bare, wrapped):
        target = seeded("resnet_narrow", 64, seed=4)
        target.load_state_dict(checkpoint.init_state_dict(str(path), target, "resnet_narrow", 64))
        assert same_weights(target.state_dict(), expected)
    # Below 64px our ResNets have the 3x3 CIFAR stem: the ImageNet 7x7 conv1 does not fit, and the error says why.
    with pytest.raises(UsageError) as error:
        checkpoint.init_state_dict(str(bare), seeded("resnet_narrow", 16), "resnet_narrow", 16)
    message = str(error.value)
    assert "shapes (file vs model) conv1.weight (16, 3, 7, 7) vs (16, 3, 3, 3)" in message
    assert "CIFAR stem" in message and "\n" not in message
    # Another architecture: missing and unexpected keys, counted beyond the first three.
    with pytest.raises(UsageError, match=r"does not fit this run's resnet18 at 64px: missing keys layer1.1.conv1.weight,"
                                         r" .* \(\+\d+ more\); shapes"):
        checkpoint.init_state_dict(str(bare), seeded("resnet18", 64), "resnet18", 64)
    # A timm checkpoint: its classifier is head.*, and a timm backbone of ours has none.
    vit_like = nn.Sequential()
    vit_like.add_module("blocks", nn.Linear(4, 4))
    vit_like.add_module("head", nn.Linear(4, 10))
    torch.save({"state_dict": vit_like.state_dict()}, tmp_path / "timm.pth")
    target = nn.Sequential()
    target.add_module("blocks", nn.Linear(4, 4))
    target.add_module("head", nn.Identity())
    target.load_state_dict(checkpoint.init_state_dict(str(tmp_path / "timm.pth"), target, "vit_tiny", 224))
    assert torch.equal(target.blocks.weight, vit_like.blocks.weight)


def test_torchvision_names_load_from_the_cache_and_say_what_to_fetch_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = seeded("resnet18", 64)
    with pytest.raises(UsageError) as error:
        checkpoint.init_state_dict("torchvision:resnet18", target, "resnet18", 64)
    assert f"cannot download {weights.url}" in str(error.value) and f"put it in {cached.parent}/" in str(error.value)
    # The file fetched elsewhere and put there: it loads (fc dropped).
    stock = torchvision.models.resnet18()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stock.state_dict(), cached)
    target.load_state_dict(checkpoint.init_state_dict("torchvision:resnet18", target, "resnet18", 64))
    assert torch.equal(target.layer4[1].conv2.weight, stock.layer4[1].conv2.weight)
    with pytest.raises(UsageError, match="torchvision has no model named 'resnet7'"):
        checkpoint.init_state_dict("torchvision:resnet7", target, "resnet18", 64)


def test_torchvision_names_download_once_when_online(tmp_path, monkeypatch, capsys):
    # torch.hub's download is the only thing faked: it "serves" a stock ResNet-18 (with its fc); the rest is
    # torchvision's and torch.hub's own code path (cache folder, file name, loading), then the cache serves it.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    stock, fetched = torchvision.models.resnet18(), []

    def serve(url, dst, *args, **kwargs):
        fetched.append(url)
        torch.save(stock.state_dict(), dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", serve)
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    for _ in range(2):
        target = seeded("resnet18", 64)
        target.load_state_dict(checkpoint.init_state_dict("torchvision:resnet18", target, "resnet18", 64))
        assert same_weights(target.state_dict(), {k: v for k, v in stock.state_dict().items() if k in
                                                  target.state_dict()})
    assert fetched == [weights.url]  # downloaded once, then read from the cache
    assert f'Downloading: "{weights.url}"' in capsys.readouterr().out


def test_timm_names_download_through_the_hub_when_online(tmp_path, monkeypatch):
    # huggingface_hub's download is faked (it "serves" a stock timm model's safetensors, 1000-class head included);
    # the DNS probe is made to succeed. timm's own create_model(pretrained=True) path does the rest.
    import socket
    import timm
    import timm.models._hub as timm_hub
    from safetensors.torch import save_file
    name = "vit_tiny_patch16_224"
    torch.manual_seed(3)
    stock = timm.create_model(name, pretrained=False)
    served, asked = tmp_path / "model.safetensors", []
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(served))

    def hf_hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(served)
    monkeypatch.setattr(timm_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    target = seeded("vit_tiny", 224)
    target.load_state_dict(checkpoint.init_state_dict(f"timm:{name}", target, "vit_tiny", 224))
    assert asked and asked[0][0] == timm.models.get_pretrained_cfg(name).hf_hub_id
    expected = {k: v for k, v in stock.state_dict().items() if not k.startswith("head.")}
    assert same_weights(target.state_dict(), expected)


def test_timm_names_offline_say_what_to_fetch(monkeypatch):
    # timm itself stands in (importing it costs seconds): create_model fails as huggingface_hub does offline.
    def create_model(name, pretrained=False, num_classes=None):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    cfg = SimpleNamespace(hf_hub_id="timm/vit_small_patch16_224.augreg_in21k_ft_in1k", url=None)
    fake = types.ModuleType("timm")
    fake.create_model, fake.models = create_model, SimpleNamespace(get_pretrained_cfg=lambda name: cfg)
    monkeypatch.setitem(sys.modules, "timm", fake)
    with pytest.raises(UsageError) as error:
        checkpoint.init_state_dict("timm:vit_small_patch16_224", nn.Linear(1, 1), "vit_small", 224)
    assert ("fetch https://huggingface.co/timm/vit_small_patch16_224.augreg_in21k_ft_in1k/resolve/main/"
            "model.safetensors on a machine online and pass that file to --init") in str(error.value)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_frozen_parameters_get_no_update_and_no_optimizer_state(name):
    torch.manual_seed(0)
    backbone, head = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(backbone, head)
    groups = optim.param_groups(model, 1e-2, exclude_1d=name == "lars", lr=0.1)
    optimizer = optim.build_optimizer(name, groups, 0.1, 1e-2)  # weight decay: a step would move them too
    run = SimpleNamespace(args=SimpleNamespace(freeze_backbone_epochs=1), frozen=list(backbone.parameters()),
                          scaler=torch.amp.GradScaler("cpu", enabled=False), watch_finite=lambda *a: None,
                          accumulation=Accumulation(1, 1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    for step in range(2):
        optimizer_step(run, model(x).square().mean(), optimizer, 0, step)
    assert torch.equal(backbone.weight, start["0.weight"]) and torch.equal(backbone.bias, start["0.bias"])
    assert not torch.equal(head.weight, start["1.weight"])
    assert all(p not in optimizer.state for p in backbone.parameters()) and head.weight in optimizer.state
    optimizer_step(run, model(x).square().mean(), optimizer, 1, 2)  # epoch 1: unfrozen
    assert not torch.equal(backbone.weight, start["0.weight"]) and backbone.weight in optimizer.state


def test_init_run_logs_a_baseline_freezes_and_resumes_in_the_frozen_phase(tmp_path):
    torch.manual_seed(5)
    source = build_backbone("resnet_narrow", 16)[0]
    init = tmp_path / "init.pt"
    checkpoint.export_backbone(init, source, {**backbone_metadata("resnet_narrow", 16, 128, "simclr"), "init": None})
    out = tmp_path / "run"
    flags = [*TINY, "--knn-every", "0", "--proj-hidden-dim", "32", "--proj-output-dim", "16", "--init", init,
             "--freeze-backbone-epochs", "2", "--out-dir", out]
    run_script("byol.py", *flags, "--max-steps", "6")  # stops in epoch 1, inside the frozen phase
    params = dict(source.named_parameters())
    saved = torch.load(out / "last.pt")["model"]
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in params.items())  # the init weights, untouched
    run_script("byol.py", *flags)  # resumes at step 6: frozen until step 8, then trained
    final = torch.load(out / "backbone.pt")
    assert final["init"] == str(init) and json.loads((out / "args.json").read_text())["init"] == str(init)
    assert not all(torch.equal(final["backbone"][k], v) for k, v in params.items())
    epochs = [m for m in read_metrics(out) if m["type"] == "epoch"]
    baseline = [m for m in epochs if m["epoch"] == -1]
    assert len(baseline) == 1 and "knn_acc1" in baseline[0] and "probe_acc1" not in baseline[0]  # not on resume
    assert "health_rank_backbone" in baseline[0] and "health_rank_embed" in epochs[-1]
