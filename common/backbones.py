"""Backbones: one function that returns (module, feature_dim) with the classifier removed.

ResNets are torchvision's own classes, so a saved state dict loads into a stock
`torchvision.models.resnet18()` once the CIFAR stem is applied (see `cifar_stem`).
ViT, Swin, ConvNeXt and PoolFormer come from timm and are imported only when asked for (`import timm` costs
~10 s cold). The WideResNet-28 of FixMatch, which solo-learn writes itself for CIFAR, is `WideResNet` below.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common import checkpoint
from common.cli import UsageError

RESNETS = ("resnet18", "resnet50", "resnet_narrow")
TIMM_MODELS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "vit_large": "vit_large_patch16_224",
    "swin_large": "swin_large_patch4_window7_224",
    **{f"convnext_{size}": f"convnext_{size}" for size in ("tiny", "small", "base", "large")},
    **{f"poolformer_{size}": f"poolformer_{size}" for size in ("s12", "s24", "s36", "m36", "m48")},
}
WIDE_RESNETS = {"wide_resnet28w2": 2, "wide_resnet28w8": 8}  # name: widen factor k
BACKBONES = RESNETS + tuple(TIMM_MODELS) + tuple(WIDE_RESNETS)


def cifar_stem(resnet):
    """solo-learn's stem for images under 64px: 3x3 conv, stride 1, padding 2, no max-pool."""
    resnet.conv1 = nn.Conv2d(3, resnet.conv1.out_channels, 3, stride=1, padding=2, bias=False)
    resnet.maxpool = nn.Identity()
    return resnet


def narrow_resnet(width=16, blocks=(1, 1, 1, 1)):
    """A torchvision ResNet of BasicBlocks with widths (w, 2w, 4w, 8w): CPU-sized, same key names."""
    from torchvision.models.resnet import BasicBlock
    net = torchvision.models.ResNet(BasicBlock, list(blocks))
    net.inplanes = width  # _make_layer reads the input width from here
    net.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for i, n in enumerate(blocks):
        setattr(net, f"layer{i + 1}", net._make_layer(BasicBlock, width * 2 ** i, n, stride=1 if i == 0 else 2))
    for m in net.modules():  # torchvision's init, applied again to the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Linear(width * 8, 1000)
    return net


# solo-learn's (FixMatch's) BatchNorm: PyTorch momentum 0.001 (TensorFlow's decay 0.999), eps 0.001; leaky ReLU 0.1.
WIDE_SLOPE = 0.1


def wide_bn(width):
    return nn.BatchNorm2d(width, momentum=0.001, eps=0.001)


class WideBlock(nn.Module):
    """A pre-activation basic block of WideResNet-28 as solo-learn computes it (BN, leaky ReLU, 3x3 conv, twice).

    The shortcut is the identity, or a 1x1 conv where the width changes. The first block of the first group
    (`activate_first`) feeds the activated input to both its conv and its shortcut. The first blocks of the other
    groups feed the raw input to both: solo-learn computes their first BN and activation and throws the result
    away, so these blocks have no first BN here (same function, no parameter without a gradient, which DDP
    would refuse). FixMatch's TensorFlow code activates the conv's input there; see docs/fidelity.md."""

    def __init__(self, in_width, out_width, stride, activate_first=False):
        super().__init__()
        self.identity = in_width == out_width and stride == 1
        self.activate_input = self.identity or activate_first
        self.bn1 = wide_bn(in_width) if self.activate_input else None
        self.conv1 = nn.Conv2d(in_width, out_width, 3, stride=stride, padding=1, bias=True)
        self.bn2 = wide_bn(out_width)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, stride=1, padding=1, bias=True)
        self.shortcut = None if self.identity else nn.Conv2d(in_width, out_width, 1, stride=stride, bias=True)

    def forward(self, x):
        h = F.leaky_relu(self.bn1(x), WIDE_SLOPE) if self.activate_input else x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(h)), WIDE_SLOPE))
        if self.identity:
            return x + out
        return self.shortcut(h) + out


class WideResNet(nn.Module):
    """WideResNet-28-k (Zagoruyko & Komodakis, 2016) in FixMatch's form, as solo-learn's `wide_resnet28w2/w8`:
    a 3x3 conv to 16 channels, then three groups of 4 WideBlocks of widths 16k, 32k, 64k (strides 1, 2, 2),
    BN, leaky ReLU and global average pooling: feature_dim = 64k. A CIFAR network: no downsampling before the
    second group, so any crop size works (18px small crops too) and a 224px crop costs 49 times a 32px one."""

    def __init__(self, widen_factor, depth=28):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.num_features = widths[-1]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=True)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            width = widths[g + 1]
            first = WideBlock(widths[g], width, stride, activate_first=g == 0)
            groups.append(nn.Sequential(first, *(WideBlock(width, width, 1) for _ in range(blocks - 1))))
        self.groups = nn.Sequential(*groups)
        self.bn = wide_bn(widths[-1])
        for m in self.modules():  # solo-learn's init; conv biases keep PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x):
        x = F.leaky_relu(self.bn(self.groups(self.conv1(x))), WIDE_SLOPE)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def timm_kwargs(name, image_size):
    """timm.create_model's keyword arguments for a timm model of BACKBONES at `image_size`.

    ViT and Swin take any input size (multi-crop's 96px and 18px crops): ViT pads to a multiple of its patch
    and interpolates its position embeddings, Swin pads to its windows and builds its attention masks per
    forward. Below 64px (CIFAR) ViT uses patch 4, Swin patch 2 and windows of 4, ConvNeXt a 1x1 stem of stride 1
    (timm then strides its first stage by 1 instead of 2: maps of 32, 16, 8, 4 at 32px, as the ResNets' CIFAR stem;
    its stride-4 stem leaves 1x1 maps at 32px and fails on 18px crops). PoolFormer is timm's at every size."""
    kwargs = dict(num_classes=0)
    small = image_size < 64
    if name.startswith("vit"):
        kwargs.update(img_size=image_size, dynamic_img_size=True, dynamic_img_pad=True)
        if small:
            kwargs.update(patch_size=4)
    elif name.startswith("swin"):
        kwargs.update(img_size=image_size, dynamic_img_size=True)
        if small:
            kwargs.update(patch_size=2, window_size=4)
    elif name.startswith("convnext") and small:
        kwargs.update(patch_size=1)
    return kwargs


def has_cifar_stem(name, image_size):
    """Whether `name` at `image_size` px is built with the CIFAR stem (ResNets below 64px)."""
    return name in RESNETS and image_size < 64


def build_backbone(name, image_size=224):
    """Return (module, feature_dim); the module maps images (N, 3, H, W) to features (N, feature_dim).

    ResNets get the CIFAR stem when image_size < 64; the timm models are built with `timm_kwargs` and
    WideResNets are the same at every size: each takes crops of any size, so multi-crop works.
    """
    if name in RESNETS:
        net = narrow_resnet() if name == "resnet_narrow" else getattr(torchvision.models, name)()
        if has_cifar_stem(name, image_size):
            cifar_stem(net)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if name in TIMM_MODELS:
        import timm
        net = timm.create_model(TIMM_MODELS[name], **timm_kwargs(name, image_size))
        return net, net.num_features
    if name in WIDE_RESNETS:
        net = WideResNet(WIDE_RESNETS[name])
        return net, net.num_features
    raise UsageError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}")


def backbone_metadata(name, image_size, feature_dim, method):
    """What eval/ needs to rebuild a backbone; stored beside its state dict in backbone.pt."""
    return {"name": name, "image_size": image_size, "cifar_stem": has_cifar_stem(name, image_size),
            "feature_dim": feature_dim, "method": method}


def load_backbone(path, map_location="cpu"):
    """Load a backbone.pt written by any method script; returns (module in eval mode, metadata dict).
    Anything else (a last.pt, an eval/export.py export, a truncated file, a newer format, weights that do not
    fit the architecture the file names) is a one-line UsageError naming what the file is."""
    fix = "pass the backbone.pt a run writes to its --out-dir when it ends"
    ckpt = checkpoint.read(path, "backbone.pt", fix, map_location)
    if "image_size" not in ckpt or not isinstance(ckpt["backbone"], dict):
        raise UsageError(f"{path} is a damaged backbone.pt (no image size or no state dict): {fix}")
    if ckpt["name"] not in BACKBONES:
        raise UsageError(f"{path} holds a backbone named {ckpt['name']!r}, which this code does not know "
                         f"({', '.join(BACKBONES)})")
    net, dim = build_backbone(ckpt["name"], ckpt["image_size"])
    try:
        net.load_state_dict(ckpt["backbone"], strict=True)
    except RuntimeError as error:
        reason = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), "mismatch")
        raise UsageError(f"{path}: the weights do not fit a {ckpt['name']} at {ckpt['image_size']}px "
                         f"({reason[:200]}): the file is damaged or was edited") from None
    meta = {k: v for k, v in ckpt.items() if k != "backbone"}
    meta["feature_dim"] = dim
    return net.eval(), meta
