"""common/backbones.py beyond the ResNets: solo-learn's other backbones (ViT-L, Swin-L, ConvNeXt, PoolFormer from
timm, the WideResNet-28 written here) at the crop sizes the multi-crop presets use, and their backbone.pt.

Cost: one backbone of each new family (wide_resnet28w2, convnext_tiny, poolformer_s12) is built for real at 32px and
224px, runs a large and a small crop, and goes through backbone.pt and back; swin_tiny (its any-size forward is
new) runs at 32px and 18px. Every new backbone is also built on the meta device with timm's truncated-normal init
skipped (shapes only, no memory, no random numbers): its stages, widths and heads are checked against solo-learn's
solo/backbones/*, and the others (the large ones among them: vit_large, swin_large, convnext_large,
poolformer_m48, wide_resnet28w8) run a meta forward at 32px and 224px for their output shape. wide_resnet28w8 also
runs a real forward on one 32px image. The backbone.pt round trip of the others is the code of their real
sibling's (build_backbone from the name and image size, then a strict load).
"""
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import cli
from common.backbones import (BACKBONES, WIDE_RESNETS, WideResNet, backbone_metadata, build_backbone, load_backbone,
                              timm_kwargs)
from common.checkpoint import export_backbone

# solo-learn's solo/backbones/*: blocks per stage, widths per stage (heads per stage for the transformers)
CONVNEXT = {"tiny": ((3, 3, 9, 3), (96, 192, 384, 768)), "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
            "base": ((3, 3, 27, 3), (128, 256, 512, 1024)), "large": ((3, 3, 27, 3), (192, 384, 768, 1536))}
POOLFORMER = {"s12": ((2, 2, 6, 2), (64, 128, 320, 512)), "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
              "s36": ((6, 6, 18, 6), (64, 128, 320, 512)), "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
              "m48": ((8, 8, 24, 8), (96, 192, 384, 768))}
VIT_LARGE = dict(depth=24, width=1024, heads=16)
SWIN_LARGE = dict(depths=(2, 2, 18, 2), width=192, heads=(6, 12, 24, 48))
NEW = ("vit_large", "swin_large", *(f"convnext_{s}" for s in CONVNEXT), *(f"poolformer_{s}" for s in POOLFORMER),
       *WIDE_RESNETS)
REAL = ("wide_resnet28w2", "convnext_tiny", "poolformer_s12")
# the crops of the multi-crop presets: (large, small) for CIFAR and for ImageNet
CROPS = {32: 18, 224: 96}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small forwards on a loaded 2-core machine: threads wait for each other
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def meta(monkeypatch):
    """Build on the meta device; timm's truncated-normal init runs through slow reference ops there: skip it."""
    import timm.layers.weight_init
    monkeypatch.setattr(timm.layers.weight_init, "_trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    with torch.device("meta"):
        yield


def expand(help_text):
    """'vit_tiny/small, poolformer_s12/m36, wide_resnet28w2/w8' -> every name: a short name after a slash replaces
    the part after the last underscore, or a letter-and-digits one the same ending."""
    names = []
    for item in re.split(r",\s*", help_text.strip()):
        first, *others = item.split("/")
        names.append(first)
        for other in others:
            cut = len(first) - len(other) if re.fullmatch(r"[a-z]\d+", other) else first.rindex("_") + 1
            names.append(first[:cut] + other)
    return names


def test_command_line_lists_every_backbone():
    assert cli.BACKBONE_NAMES == BACKBONES
    assert set(NEW) | {"resnet18", "resnet50", "resnet_narrow"} < set(BACKBONES)
    parser, _ = cli.parser("byol", "", {"cifar": {}, "imagenet": {}, "synthetic": {}})
    action = next(a for a in parser._actions if "--backbone" in a.option_strings)
    assert tuple(action.choices) == BACKBONES
    assert sorted(expand(action.help.split(" [")[0])) == sorted(BACKBONES)


def test_expand_help_names():
    assert expand("vit_tiny/small/base, poolformer_s12/m36, wide_resnet28w2/w8, resnet18") == [
        "vit_tiny", "vit_small", "vit_base", "poolformer_s12", "poolformer_m36", "wide_resnet28w2", "wide_resnet28w8",
        "resnet18"]


def stages_and_widths(name, net):
    if name.startswith("convnext"):
        return [len(s.blocks) for s in net.stages], [s.blocks[0].conv_dw.out_channels for s in net.stages]
    if name.startswith("poolformer"):
        return [len(s.blocks) for s in net.stages], [s.blocks[0].norm1.num_channels for s in net.stages]
    raise ValueError(name)


@pytest.mark.parametrize("name", [n for n in NEW if n not in WIDE_RESNETS])
def test_architecture_is_solo_learns(meta, name):
    """Stages, widths, heads and stems at 32px and 224px, and the output shape of a meta forward at that size (the
    backbones REAL runs for real skip it)."""
    for size in CROPS:
        net, dim = build_backbone(name, size)
        if name not in REAL:
            assert net(torch.empty(1, 3, size, size)).shape == (1, dim)
        family, variant = name.split("_")
        if family in ("convnext", "poolformer"):
            depths, widths = (CONVNEXT if family == "convnext" else POOLFORMER)[variant]
            assert stages_and_widths(name, net) == (list(depths), list(widths))
            assert dim == widths[-1]
        if family == "convnext":
            # below 64px a 1x1 stride-1 stem, and timm leaves the first stage at stride 1: total stride 8, as the
            # ResNets' CIFAR stem; above, solo-learn's 4x4 stride-4 patch stem
            stem = net.stem[0]
            assert stem.kernel_size == stem.stride == ((1, 1) if size < 64 else (4, 4))
            total = stem.stride[0] * math.prod(m.stride[0] for s in net.stages for m in s.downsample.modules()
                                               if isinstance(m, nn.Conv2d))
            assert total == (8 if size < 64 else 32)
        if family == "poolformer":
            assert (net.stem.conv.kernel_size, net.stem.conv.stride, net.stem.conv.padding) == ((7, 7), (4, 4), (2, 2))
            assert net.stages[0].blocks[0].token_mixer.pool.count_include_pad is False  # pool(x) - x, PoolFormer's
        if name == "vit_large":
            assert (len(net.blocks), net.embed_dim, net.blocks[0].attn.num_heads) == tuple(VIT_LARGE.values())
            assert net.patch_embed.patch_size == ((4, 4) if size < 64 else (16, 16)) and dim == 1024
        if name == "swin_large":
            assert [len(layer.blocks) for layer in net.layers] == list(SWIN_LARGE["depths"])
            assert [layer.blocks[0].attn.num_heads for layer in net.layers] == list(SWIN_LARGE["heads"])
            widths = [layer.blocks[0].norm1.normalized_shape[0] for layer in net.layers]
            assert widths == [SWIN_LARGE["width"] * 2 ** i for i in range(4)] and dim == widths[-1]
            assert net.patch_embed.patch_size == ((2, 2) if size < 64 else (4, 4))
            assert net.layers[0].blocks[0].window_size == ((4, 4) if size < 64 else (7, 7))


def wide_resnet_parameters(k):
    """WideResNet-28-k's parameter count, from its description: a 3x3 conv 3 -> 16 with bias; groups of 4 blocks
    (BN 2 per channel, 3x3 convs with bias, a 1x1 shortcut conv with bias where the width changes); the first
    blocks of groups 2 and 3 have no first BN (solo-learn discards it); a final BN."""
    def conv(c_in, c_out, size):
        return c_in * c_out * size * size + c_out
    total = conv(3, 16, 3) + 2 * 64 * k
    for g, (c_in, c_out) in enumerate(((16, 16 * k), (16 * k, 32 * k), (32 * k, 64 * k))):
        total += (2 * c_in if g == 0 else 0) + conv(c_in, c_out, 3) + 2 * c_out + conv(c_out, c_out, 3)
        total += conv(c_in, c_out, 1)
        total += 3 * (2 * c_out + conv(c_out, c_out, 3) + 2 * c_out + conv(c_out, c_out, 3))
    return total


@pytest.mark.parametrize("name,k", WIDE_RESNETS.items())
def test_wide_resnet_shape(meta, name, k):
    net, dim = build_backbone(name, 32)
    assert dim == 64 * k
    for size in CROPS:  # the same network at every size
        assert net(torch.empty(1, 3, size, size)).shape == (1, dim)
    assert sum(p.numel() for p in net.parameters()) == wide_resnet_parameters(k)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 2 * 12 - 2 and all(bn.momentum == 0.001 and bn.eps == 0.001 for bn in bns)


def test_wide_resnet28w8_forward_at_32px():
    torch.manual_seed(0)
    net, dim = build_backbone("wide_resnet28w8", 32)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def leaky(x):
    return torch.where(x > 0, x, 0.1 * x)


def bn(module, x):
    return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, 1e-3)


def test_wide_resnet_blocks_compute_solo_learns_function():
    """Eval-mode outputs against the formulas of solo-learn's blocks, with random BN statistics and affines."""
    torch.manual_seed(0)
    net = WideResNet(2).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
        x = torch.randn(2, 16, 8, 8)
        first = net.groups[0][0]  # 16 -> 32: activates, then conv and shortcut both read the activated input
        h = leaky(bn(first.bn1, x))
        expected = first.shortcut(h) + first.conv2(leaky(bn(first.bn2, first.conv1(h))))
        torch.testing.assert_close(first(x), expected, rtol=1e-5, atol=1e-5)
        y = torch.randn(2, 32, 8, 8)
        down = net.groups[1][0]  # 32 -> 64, stride 2: conv and shortcut both read the raw input
        expected = down.shortcut(y) + down.conv2(leaky(bn(down.bn2, down.conv1(y))))
        torch.testing.assert_close(down(y), expected, rtol=1e-5, atol=1e-5)
        same = net.groups[1][1]  # 64 -> 64: pre-activation, identity shortcut
        z = torch.randn(2, 64, 4, 4)
        expected = z + same.conv2(leaky(bn(same.bn2, same.conv1(leaky(bn(same.bn1, z))))))
        torch.testing.assert_close(same(z), expected, rtol=1e-5, atol=1e-5)
        images = torch.randn(2, 3, 16, 16)
        features = leaky(bn(net.bn, net.groups(net.conv1(images)))).mean((2, 3))
        torch.testing.assert_close(net(images), features, rtol=1e-5, atol=1e-5)
    # The float32 sums above run in other orders on both sides: 1e-5 holds for O(1) values with a few hundred terms.


def test_wide_resnet_batchnorm_momentum():
    """One training forward moves a fresh running mean 0.001 of the way to the batch mean (TensorFlow's 0.999)."""
    torch.manual_seed(0)
    net = WideResNet(2).train()
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        batch_mean = net.conv1(images).mean((0, 2, 3))
        net(images)
    torch.testing.assert_close(net.groups[0][0].bn1.running_mean, 0.001 * batch_mean)


@pytest.mark.parametrize("name", REAL)
def test_forward_at_every_crop_size_and_back_through_backbone_pt(tmp_path, name):
    for size, small in CROPS.items():
        torch.manual_seed(0)
        net, dim = build_backbone(name, size)
        net.eval()
        with torch.no_grad():
            large_out = net(torch.randn(1, 3, size, size))
            small_out = net(torch.randn(1, 3, small, small))
        assert large_out.shape == small_out.shape == (1, dim)
        assert torch.isfinite(large_out).all() and torch.isfinite(small_out).all()
        path = tmp_path / f"{size}" / "backbone.pt"
        path.parent.mkdir()
        export_backbone(path, net, {**backbone_metadata(name, size, dim, "simclr"), "dataset": "cifar10"})
        loaded, info = load_backbone(path)
        assert info["feature_dim"] == dim and info["image_size"] == size and not info["cifar_stem"]
        images = torch.randn(2, 3, small, small)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), net(images), rtol=0, atol=0)


def test_swin_takes_small_crops_and_keeps_the_fixed_size_model():
    """Swin now takes any crop size (dynamic_img_size): the same parameters as timm's fixed-size Swin, whose output
    it gives at its own size (so backbone.pt files written before load unchanged). 224px: swin_large on meta."""
    import timm
    torch.manual_seed(0)
    net, dim = build_backbone("swin_tiny", 32)
    kwargs = {**timm_kwargs("swin_tiny", 32), "dynamic_img_size": False}
    fixed = timm.create_model("swin_tiny_patch4_window7_224", **kwargs)
    fixed.load_state_dict(net.state_dict(), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images), fixed.eval()(images), rtol=0, atol=0)
        small = net(torch.randn(1, 3, CROPS[32], CROPS[32]))
    assert small.shape == (1, dim) and torch.isfinite(small).all()
