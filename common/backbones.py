"""Backbones: one function that returns (module, feature_dim) with the classifier removed.

ResNets are torchvision's own classes, so a saved state dict loads into a stock
`torchvision.models.resnet18()` once the CIFAR stem is applied (see `cifar_stem`).
ViT and Swin come from timm and are imported only when asked for (`import timm` costs ~10 s cold).
"""
import torch.nn as nn
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
}
BACKBONES = RESNETS + tuple(TIMM_MODELS)


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


def timm_kwargs(name, image_size):
    """timm.create_model's keyword arguments for a ViT/Swin of BACKBONES at `image_size`."""
    vit = name.startswith("vit")  # dynamic size and padding: crops of any side (multi-crop's 18px too)
    kwargs = dict(num_classes=0, img_size=image_size, dynamic_img_size=vit)
    if vit:
        kwargs["dynamic_img_pad"] = True
    if image_size < 64:
        kwargs.update(dict(patch_size=4) if vit else dict(patch_size=2, window_size=4))
    return kwargs


def build_backbone(name, image_size=224):
    """Return (module, feature_dim); the module maps images (N, 3, H, W) to features (N, feature_dim).

    ResNets get the CIFAR stem when image_size < 64. ViTs use patch 4 below 64px, patch 16 above,
    pad inputs to a multiple of the patch and interpolate their position embeddings for any input
    size, so multi-crop works.
    """
    if name in RESNETS:
        net = narrow_resnet() if name == "resnet_narrow" else getattr(torchvision.models, name)()
        if image_size < 64:
            cifar_stem(net)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    if name in TIMM_MODELS:
        import timm
        net = timm.create_model(TIMM_MODELS[name], **timm_kwargs(name, image_size))
        return net, net.num_features
    raise UsageError(f"unknown backbone '{name}': choose one of {', '.join(BACKBONES)}")


def backbone_metadata(name, image_size, feature_dim, method):
    """What eval/ needs to rebuild a backbone; stored beside its state dict in backbone.pt."""
    return {"name": name, "image_size": image_size, "cifar_stem": name in RESNETS and image_size < 64,
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
