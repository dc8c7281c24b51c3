"""Export a backbone.pt to the weight files other libraries load: torchvision, timm or Detectron2.

    python eval/export.py --ckpt runs/byol-imagenet100/backbone.pt --format torchvision --out byol_r18.pth
    python eval/export.py --ckpt runs/byol-imagenet100/backbone.pt --format timm --out byol_r18_timm.pth
    python eval/export.py --ckpt runs/byol-imagenet100/backbone.pt --format detectron2 --out byol_r18.pkl

torchvision: a plain state dict that loads with strict=True into the untouched stock model
  (`torchvision.models.resnet18()` / `resnet50()`, `convnext_tiny()` ... `convnext_large()`). It includes a
  classifier of zeros (1000 classes; ConvNeXt's classifier[2]), since the backbone was trained without one:
  replace it to classify, or set `model.fc = nn.Identity()` (`model.classifier[2] = nn.Identity()`) after
  loading to get features. --no-fc leaves it out (then set the Identity first). ConvNeXt keys are renamed
  from timm's (stages.1.blocks.0.conv_dw -> features.3.0.block.0, gamma -> layer_scale, ...).
timm: a plain state dict for `timm.create_model(name, num_classes=0)`: "resnet18"/"resnet50" (same
  key names as torchvision), or the ViT/Swin/ConvNeXt/PoolFormer the backbone already is, created with the
  keyword arguments written in the metadata (patch, window and stem sizes differ below 64px).
WideResNet-28 (wide_resnet28w2/w8) and resnet_narrow have no stock model: load their backbone.pt with
  common.backbones.load_backbone.
detectron2: a pickle {"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}
  with Detectron2's ResNet names (stem.conv1.norm.*, res2.0.conv1.weight, res2.0.shortcut.norm.*, ...),
  as Detectron2's tools/convert-torchvision-to-d2.py writes them. ResNet-18/50 with the ImageNet stem
  only. matching_heuristics must be True: the names carry no "backbone.bottom_up." prefix, and
  Detectron2 matches them to its model's keys by suffix only when asked to.

A backbone trained on images under 64px (CIFAR) has solo-learn's CIFAR stem: conv1 is a 3x3 conv with
stride 1 and padding 2 (no bias), and there is no max-pool. A stock model needs both replaced before
loading:
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    model.maxpool = torch.nn.Identity()
A ConvNeXt trained under 64px has a 1x1 stride-1 stem: torchvision's model needs
    model.features[0][0] = torch.nn.Conv2d(3, <first width>, kernel_size=1)

Next to the weights, FILE.json records the metadata (method, dataset, image size, stem, input
normalization, fc) and the exact loading code; the same code is printed after the export.
"""
import argparse
import json
import os
import pickle
import re
import sys
from pathlib import Path

# `python eval/export.py` puts eval/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common import augment, checkpoint  # noqa: E402
from common.backbones import TIMM_MODELS, load_backbone, timm_kwargs  # noqa: E402
from common.cli import Parser, RunError, UsageError, run_main  # noqa: E402

FORMATS = ("torchvision", "timm", "detectron2")
# The ResNets that exist as stock torchvision, timm and Detectron2 models (resnet_narrow does not).
STOCK_RESNETS = {"resnet18": 18, "resnet50": 50}
# The timm models torchvision also has, with other key names (torchvision's ViT and Swin: not exported).
TORCHVISION_CONVNEXTS = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
DEFAULT_NAMES = {"torchvision": "backbone_torchvision.pth", "timm": "backbone_timm.pth",
                 "detectron2": "backbone_detectron2.pkl"}
IMAGENET_CLASSES = 1000  # the stock models' fc width
CIFAR_STEM_TEXT = ("CIFAR stem: conv1 = 3x3 conv, stride 1, padding 2, no bias; no max-pool. A stock model needs "
                   "conv1 replaced and maxpool = Identity before loading")
IMAGENET_STEM_TEXT = "ImageNet stem: conv1 = 7x7 conv, stride 2, padding 3, then 3x3 max-pool (the stock model's)"


def build_parser():
    p = Parser(prog="eval/export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="backbone.pt written by a method script [required]")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="torchvision or timm state dict, or Detectron2 pickle [required]")
    p.add_argument("--out", default=None,
                   help="output file; Detectron2 needs a .pkl name [default: backbone_<format>.pth "
                        "(.pkl for detectron2) next to --ckpt]")
    p.add_argument("--no-fc", action="store_true",
                   help="torchvision only: leave out the zero fc layer [default: include it, so the file loads "
                        "with strict=True into the untouched stock model]")
    return p


# ---- key names ----
_D2_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.(.+)")
_D2_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def detectron2_name(key):
    """torchvision ResNet key -> Detectron2 ResNet key, or None for keys Detectron2 has no use for
    (num_batches_tracked: its FrozenBatchNorm2d keeps no counter). Unknown keys raise ValueError,
    so a backbone with anything beyond a stock ResNet cannot be half-converted."""
    if key.endswith(".num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1.") and key[4:] in _D2_BN_PARAMS:
        return f"stem.conv1.norm.{key[4:]}"
    match = _D2_BLOCK.fullmatch(key)
    if match:
        stage, block, rest = int(match[1]) + 1, match[2], match[3]  # layer1 is Detectron2's res2
        prefix = f"res{stage}.{block}"
        if re.fullmatch(r"conv[1-3]\.weight", rest):
            return f"{prefix}.{rest}"
        if (bn := re.fullmatch(r"bn([1-3])\.(\w+)", rest)) and bn[2] in _D2_BN_PARAMS:
            return f"{prefix}.conv{bn[1]}.norm.{bn[2]}"
        if rest == "downsample.0.weight":
            return f"{prefix}.shortcut.weight"
        if (ds := re.fullmatch(r"downsample\.1\.(\w+)", rest)) and ds[1] in _D2_BN_PARAMS:
            return f"{prefix}.shortcut.norm.{ds[1]}"
    raise ValueError(f"no Detectron2 name for ResNet key '{key}'")


_CONVNEXT_BLOCK = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5"}


def torchvision_convnext_name(key):
    """timm ConvNeXt key -> torchvision ConvNeXt key: stage i is features[2i+1], the downsampling before it
    features[2i], the stem features[0], the head's norm classifier[0]. Unknown keys raise ValueError."""
    if match := re.fullmatch(r"stem\.([01])\.(weight|bias)", key):
        return f"features.0.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"stages\.([1-3])\.downsample\.([01])\.(weight|bias)", key):
        return f"features.{2 * int(match[1])}.{match[2]}.{match[3]}"
    if match := re.fullmatch(r"stages\.([0-3])\.blocks\.(\d+)\.(.+)", key):
        prefix = f"features.{2 * int(match[1]) + 1}.{match[2]}"
        if match[3] == "gamma":
            return f"{prefix}.layer_scale"
        layer, _, param = match[3].rpartition(".")
        if layer in _CONVNEXT_BLOCK and param in ("weight", "bias"):
            return f"{prefix}.{_CONVNEXT_BLOCK[layer]}.{param}"
    if match := re.fullmatch(r"head\.norm\.(weight|bias)", key):
        return f"classifier.0.{match[1]}"
    raise ValueError(f"no torchvision name for ConvNeXt key '{key}'")


def torchvision_convnext_state(state):
    """A timm ConvNeXt backbone state dict with torchvision's names (layer scales as (C, 1, 1))."""
    out = {}
    for key, tensor in state.items():
        name = torchvision_convnext_name(key)
        out[name] = tensor.reshape(-1, 1, 1) if name.endswith("layer_scale") else tensor
    return out


def detectron2_model(state):
    """{Detectron2 name: float32 numpy array} from a torchvision ResNet backbone state dict (no fc)."""
    model = {}
    for key, tensor in state.items():
        name = detectron2_name(key)
        if name is None:
            continue
        if name in model:
            raise ValueError(f"two keys map to Detectron2's '{name}'")
        # contiguous: channels_last training leaves permuted strides that numpy would keep
        model[name] = tensor.detach().cpu().float().contiguous().numpy()
    return model


# ---- metadata and loading code ----
def normalization(dataset):
    """The input normalization the backbone was trained with, in [0, 1] and in 0-255 units."""
    stats = augment.NORMALIZATION.get(dataset)
    if stats is None:
        return None
    mean, std = stats
    return {"mean": list(mean), "std": list(std), "mean_255": [round(255 * m, 3) for m in mean],
            "std_255": [round(255 * s, 3) for s in std], "channels": "RGB"}


def _stem_lines(meta):
    if meta["name"] in TORCHVISION_CONVNEXTS:
        if meta["image_size"] >= 64:
            return []
        width = meta["feature_dim"] // 8  # ConvNeXt's width doubles at each of its 3 downsamplings
        return [f"model.features[0][0] = torch.nn.Conv2d(3, {width}, kernel_size=1)  # 1x1 stride-1 stem below 64px"]
    if not meta["cifar_stem"]:
        return []
    return ["model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)  # CIFAR stem",
            "model.maxpool = torch.nn.Identity()"]


def loading_code(fmt, meta, path, fc):
    """Python that rebuilds the stock model and loads the exported file (run by the tests)."""
    load = f"model.load_state_dict(torch.load({str(path)!r}, map_location='cpu', weights_only=True))"
    name = meta["name"]
    if fmt == "torchvision":
        lines = ["import torch, torchvision", f"model = torchvision.models.{name}()", *_stem_lines(meta)]
        classifier = "model.classifier[2]" if name in TORCHVISION_CONVNEXTS else "model.fc"
        if fc:
            lines += [load, f"{classifier} = torch.nn.Identity()  # the exported classifier is zeros: drop it for "
                            "features or train a new one"]
        else:
            lines += [f"{classifier} = torch.nn.Identity()", load]
        return "\n".join(lines)
    if name in STOCK_RESNETS:
        return "\n".join(["import timm, torch", f"model = timm.create_model({name!r}, num_classes=0)",
                          *_stem_lines(meta), load])
    kwargs = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(name, meta["image_size"]).items())
    return "\n".join(["import timm, torch", f"model = timm.create_model({TIMM_MODELS[name]!r}, {kwargs})", load])


def detectron2_yaml(meta, path):
    """The config lines a Detectron2 FPN config (e.g. faster_rcnn_R_50_FPN_1x.yaml) needs for these weights."""
    norm, source = meta["normalization"], "the pretraining normalization"
    if norm is None:
        norm, source = normalization("imagenet"), "dataset unknown: ImageNet's assumed"
    depth = STOCK_RESNETS[meta["backbone"]]
    lines = ["MODEL:", f"  WEIGHTS: \"{os.path.abspath(path)}\"",
             f"  PIXEL_MEAN: {norm['mean_255']}  # RGB, 0-255: {source}",
             f"  PIXEL_STD: {norm['std_255']}",
             "  RESNETS:", f"    DEPTH: {depth}"]
    if depth == 18:
        lines.append("    RES2_OUT_CHANNELS: 64  # required by Detectron2 for R18/R34 (BasicBlock); "
                     "use an FPN config, C4 heads need bottleneck blocks")
    lines += ["    STRIDE_IN_1X1: False  # torchvision ResNets stride in the 3x3 conv", "INPUT:", "  FORMAT: \"RGB\""]
    return "\n".join(lines)


def check_supported(fmt, meta, out):
    """Refuse what a stock model of the format cannot hold, with the way out."""
    name = meta["name"]
    if name in TIMM_MODELS:
        if fmt != "timm" and not (fmt == "torchvision" and name in TORCHVISION_CONVNEXTS):
            raise UsageError(f"{name} is a timm model: use --format timm ({fmt} export supports resnet18/resnet50"
                             f"{' and ConvNeXt' if fmt == 'torchvision' else ''})")
        return
    if name not in STOCK_RESNETS:
        raise UsageError(f"{name} has no stock {fmt} model (export supports resnet18, resnet50 and the timm models: "
                         f"ViT, Swin, ConvNeXt, PoolFormer): load it with common.backbones.load_backbone instead")
    if fmt == "detectron2":
        if meta["cifar_stem"]:
            raise UsageError(f"{meta['name']} was trained at {meta['image_size']}px with the CIFAR stem (3x3 conv, "
                             f"no max-pool), which Detectron2's ResNet stem cannot hold: export a backbone trained "
                             f"at 64px or more")
        if not str(out).endswith(".pkl"):
            raise UsageError(f"--out {out}: Detectron2 reads a Detectron2 pickle only from a file named *.pkl")


def metadata(fmt, meta, ckpt, out, fc):
    info = {"format": fmt, "source": os.path.abspath(ckpt), "method": meta.get("method"),
            "dataset": meta.get("dataset"), "backbone": meta["name"], "image_size": meta["image_size"],
            "feature_dim": meta["feature_dim"], "cifar_stem": meta["cifar_stem"],
            "normalization": normalization(meta.get("dataset"))}
    if meta["name"] in STOCK_RESNETS:
        info["stem"] = CIFAR_STEM_TEXT if meta["cifar_stem"] else IMAGENET_STEM_TEXT
    if meta["name"] in TORCHVISION_CONVNEXTS and meta["image_size"] < 64:
        info["stem"] = "1x1 stride-1 stem (below 64px): replace model.features[0][0] before loading"
    if fmt == "torchvision":
        fc_name, fc_module = (("classifier.2", "model.classifier[2]") if meta["name"] in TORCHVISION_CONVNEXTS
                              else ("fc", "model.fc"))
        info["fc"] = (f"{fc_name}.weight/{fc_name}.bias are zeros ({IMAGENET_CLASSES} classes), not trained: replace "
                      f"{fc_module} to classify, or set {fc_module} = torch.nn.Identity() for {meta['feature_dim']}-d "
                      f"features" if fc else f"no classifier: set {fc_module} = torch.nn.Identity() before loading")
    if fmt == "timm":
        in_timm = meta["name"] in TIMM_MODELS
        info["timm_model"] = TIMM_MODELS[meta["name"]] if in_timm else meta["name"]
        info["timm_kwargs"] = timm_kwargs(meta["name"], meta["image_size"]) if in_timm else {"num_classes": 0}
    if fmt == "detectron2":
        info["detectron2_config"] = detectron2_yaml(info, out)
    else:
        info["load"] = loading_code(fmt, meta, out, fc)
    return info


# ---- export ----
def _write_atomic(path, write):
    """write(file) into a temporary file, then rename: an interrupted or failed export leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        checkpoint.write_atomic(path, write)
    except OSError as error:
        raise RunError(f"could not write {path} ({error.strerror or error})") from None


def exported_state(fmt, net, meta, fc):
    """The object written to --out for `fmt`."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if fmt == "timm":
        return state
    if fmt == "torchvision":
        fc_name = "fc"
        if meta["name"] in TORCHVISION_CONVNEXTS:
            state, fc_name = torchvision_convnext_state(state), "classifier.2"
        if fc:
            state[f"{fc_name}.weight"] = torch.zeros(IMAGENET_CLASSES, meta["feature_dim"])
            state[f"{fc_name}.bias"] = torch.zeros(IMAGENET_CLASSES)
        return state
    return {"model": detectron2_model(state), "__author__": f"eval/export.py ({meta.get('method')})",
            "matching_heuristics": True}


def peek_metadata(path):
    """backbone.pt's metadata without building the model (memory-mapped, so the weights are not read); anything
    but a backbone.pt is the one-line UsageError load_backbone would give."""
    ckpt = checkpoint.read(path, "backbone.pt", "pass the backbone.pt a run writes to its --out-dir", mmap=True)
    return {k: v for k, v in ckpt.items() if k != "backbone"}


def export(ckpt, fmt, out=None, fc=True):
    """Write --out and --out.json; returns (out, the metadata written)."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), DEFAULT_NAMES[fmt])
    check_supported(fmt, peek_metadata(ckpt), out)  # refuse before paying for building the model
    for path in (out, f"{out}.json"):
        checkpoint.check_output_file(path, inputs=[ckpt])
    net, meta = load_backbone(ckpt)
    check_supported(fmt, meta, out)
    fc = fc and fmt == "torchvision"
    obj = exported_state(fmt, net, meta, fc)
    if fmt == "detectron2":
        _write_atomic(out, lambda f: pickle.dump(obj, f))
    else:
        _write_atomic(out, lambda f: torch.save(obj, f))
    info = metadata(fmt, meta, ckpt, out, fc)
    _write_atomic(f"{out}.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    return out, info


def run(argv=None):
    args = build_parser().parse_args(argv)
    if args.no_fc and args.format != "torchvision":
        raise UsageError("--no-fc applies to --format torchvision only (timm and Detectron2 exports have no fc)")
    out, info = export(args.ckpt, args.format, args.out, fc=not args.no_fc)
    stem = f", {'CIFAR' if info['cifar_stem'] else 'ImageNet'} stem" if info["backbone"] in STOCK_RESNETS else ""
    print(f"wrote {out} ({args.format}, {info['backbone']}, {info['image_size']}px{stem}) and {out}.json")
    if info.get("stem"):
        print(f"stem: {info['stem']}")
    if info.get("fc"):
        print(f"fc: {info['fc']}")
    if info["normalization"]:
        print(f"normalize inputs with mean {info['normalization']['mean']} std {info['normalization']['std']}")
    if "load" in info:
        print("load it with:\n" + info["load"])
    else:
        print("Detectron2 config lines:\n" + info["detectron2_config"])
    return info


def main(argv=None):
    run_main(run, argv)


if __name__ == "__main__":
    main()
