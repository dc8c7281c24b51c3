"""Checkpoints: an atomic last.pt holding everything a resume needs, and backbone.pt for eval/.

A checkpoint is a plain dict of state dicts, tensors and Python values, so it loads with
`torch.load(..., weights_only=True)`. Both kinds carry `"format": FORMAT`; a reader refuses a higher
format (a file from a newer version of these scripts), and files without the key are format 1.

`read` opens a file as the kind a caller expects (last.pt or backbone.pt) and turns everything else
into one line naming what the file is: the other kind, an eval/export.py export, another method's
last.pt, an empty, truncated or corrupt file, a folder, a newer format.
"""
import contextlib
import io
import json
import logging
import os
import random
import socket
import sys
import warnings
import zipfile

import torch

from common.cli import UsageError

FORMAT = 1  # the layout of last.pt and backbone.pt; bump it when a reader could misread a new one
EXPORT_FORMATS = ("torchvision", "timm", "detectron2")  # eval/export.py's --format values


def write_atomic(path, write):
    """write(binary file) into a temporary file beside `path`, flush it to disk, then rename it to `path`: a kill,
    a crash or a failed write (disk full) at any moment leaves the previous file intact, and a failed write
    leaves no temporary file behind. The error itself is raised to the caller."""
    tmp = f"{path}.tmp{os.getpid()}"  # same folder: the rename is atomic; the pid keeps concurrent writers apart
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f))


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path, method, args, epoch, step, objects, extra=None):
    """objects: name -> anything with state_dict() (models, optimizer, scaler);
    extra: name -> tensors or plain values (queues, pointers, centers, memory banks)."""
    save_atomic({"format": FORMAT, "method": method, "args": vars(args), "epoch": epoch, "step": step,
                 "rng": rng_state(), **{name: obj.state_dict() for name, obj in objects.items()},
                 "extra": extra or {}}, path)


# ---- reading: what a file is, and a one-line error when it is not what was expected ----
def export_sidecar(path):
    """The FILE.json eval/export.py writes next to an export, or None."""
    try:
        with open(f"{path}.json") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") in EXPORT_FORMATS else None


def kind_of(obj):
    """"last.pt", "backbone.pt", "state dict" (bare weights, as eval/export.py writes) or None."""
    if not isinstance(obj, dict):
        return None
    if "backbone" in obj and "name" in obj:
        return "backbone.pt"
    if "method" in obj and "epoch" in obj and "rng" in obj:
        return "last.pt"
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return "state dict"
    return None


def describe(obj, path):
    """What a loaded file is, in a few words, for error messages."""
    kind, sidecar = kind_of(obj), export_sidecar(path)
    if sidecar is not None and kind in ("state dict", None):
        return f"an eval/export.py {sidecar['format']} export (of {sidecar.get('source', '?')})"
    if kind == "backbone.pt":
        return f"a backbone.pt (the final weights of a {obj.get('method', '?')} run)"
    if kind == "last.pt":
        return f"a last.pt (the resume state of a {obj['method']} run)"
    if kind == "state dict":
        return "a bare state dict (weights without metadata, like an eval/export.py export)"
    return "not a checkpoint written by these scripts"


def _unreadable(path):
    """Why torch.load failed on `path`, in words: empty, truncated, a plain pickle, ..."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (an interrupted copy or write?)"
    if zipfile.is_zipfile(path):
        return "its archive is corrupt"
    with open(path, "rb") as f:
        first = f.read(1)
    if first == b"\x80":  # a pickle, not torch.save's zip archive
        return "it is a pickle, not a torch.save file"
    return f"it is truncated or not a PyTorch file ({size} bytes, no zip archive)"


def read(path, expected, fix, map_location="cpu", mmap=False):
    """Load `path` (weights_only) and check it is `expected` ("last.pt" or "backbone.pt") in a format this code
    reads; anything else is a one-line UsageError naming what the file is, ending in `fix`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"checkpoint not found: {path} ({fix})")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a {expected} file ({fix})")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {path}: permission denied ({fix})")
    sidecar = export_sidecar(path)
    if sidecar is not None and sidecar["format"] == "detectron2":  # a pickle of numpy arrays: not for torch.load
        raise UsageError(f"{path} is an eval/export.py detectron2 export (of {sidecar.get('source', '?')}), "
                         f"not a {expected}: {fix}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of non-zip files
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:
        if "weights only load failed" in str(error).lower() and zipfile.is_zipfile(path):
            reason = "it holds Python objects other than tensors and plain values"
        else:
            reason = _unreadable(path)
        raise UsageError(f"cannot read {path} as a {expected}: {reason} ({fix})") from None
    version = obj.get("format", 1) if isinstance(obj, dict) else None
    if kind_of(obj) in ("last.pt", "backbone.pt") and (not isinstance(version, int) or version > FORMAT):
        raise UsageError(f"{path} has format {version!r}, newer than this code reads ({FORMAT}): it was written by a "
                         "newer version of these scripts; update them to read it")
    if kind_of(obj) != expected:
        raise UsageError(f"{path} is {describe(obj, path)}, not a {expected}: {fix}")
    return obj


def check_output_file(path, flag="--out", inputs=()):
    """A UsageError unless `path` can be written as a file: not a folder, not one of `inputs` (the files it is
    made from: writing it would destroy them), in a folder that exists and is writable or can be created.
    (Atomic writes rename over an existing file, so only the folder's permissions matter.)"""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: pass a file name")
    if os.path.exists(path) and any(os.path.exists(x) and os.path.samefile(path, x) for x in inputs):
        raise UsageError(f"{flag} {path} is the input file itself: pass another name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written: {parent} is not a writable folder")


def resume_path(args):
    """--resume if given, else <out-dir>/last.pt when a previous run left one, else None."""
    if args.resume:
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume {args.resume}: no such file (omit --resume to start afresh)")
        return args.resume
    path = os.path.join(args.out_dir, "last.pt")
    return path if os.path.lexists(path) else None  # a broken link or a folder there is named by load, not skipped


START_FRESH = "pass another --out-dir or move the file away to start fresh"


def _first_line(error, limit=200):
    """The informative line of a load_state_dict error ("Error(s) in loading state_dict for X:" says nothing)."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip() and not l.startswith("Error(s) in loading")]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _resume_fix(path):
    # <out-dir>/last.pt is what a rerun finds by itself; any other name came from --resume
    return START_FRESH if os.path.basename(path) == "last.pt" else "--resume takes the last.pt of a run's --out-dir"


def read_last(path, method, map_location="cpu", mmap=False):
    """The last.pt at `path` if `method` wrote it in a format this code reads, else a one-line UsageError."""
    ckpt = read(path, "last.pt", _resume_fix(path), map_location, mmap)
    if ckpt["method"] != method:
        raise UsageError(f"{path} was written by {ckpt['method']}, not {method}: {_resume_fix(path)}")
    return ckpt


def check_resumable(args, method):
    """Before a run writes anything (args.json included): the checkpoint it would resume from, if any, is a
    last.pt of `method` it can read; else the UsageError load would give later. Memory-mapped: the tensors are
    not read."""
    if path := resume_path(args):
        read_last(path, method, mmap=True)


def load(path, method, objects, map_location="cpu"):
    """Restore objects in place from a last.pt of `method`; returns (epoch, step, extra).

    A GradScaler's state is loaded only when the saved one is non-empty: a disabled scaler (fp32 or bf16)
    saves {}, so a run may resume under another --precision (bf16 <-> fp16) with a fresh scale."""
    ckpt, fix = read_last(path, method, map_location), _resume_fix(path)
    for name, obj in objects.items():
        if name not in ckpt:
            raise UsageError(f"{path} holds no {name!r} state (written by another version of {method}.py?): {fix}")
        if isinstance(obj, torch.amp.GradScaler) and not ckpt[name]:
            continue
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{path} does not fit this run's {name} ({_first_line(error)}): resume with the flags "
                             f"it was written with (its args.json); or {fix}") from None
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["step"], ckpt["extra"]


def export_backbone(path, backbone, metadata):
    """backbone.pt: {"format", "backbone": state_dict, "name", "image_size", "cifar_stem", "feature_dim", "method",
    "dataset", "data_dir" (absolute: eval/ tools default to it), ...}."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    save_atomic({"format": FORMAT, "backbone": state, **metadata}, path)


def _run_data_dir(ckpt, dataset):
    """The --data-dir in the args.json beside `ckpt` when that run trained on `dataset` (a backbone.pt written
    before it recorded its data_dir), else None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(os.path.join(os.path.dirname(os.path.abspath(ckpt)), "args.json")) as f:
            args = json.load(f)
        if args.get("dataset") == dataset and isinstance(args.get("data_dir"), str):
            return args["data_dir"]  # relative to where that run started: the best guess there is
    return None


FOLDER_DATASETS = ("imagenet", "imagenet100", "folder")  # read from --data-dir as it is, nothing downloaded


def add_eval_data_flags(p, task):
    """--dataset and --data-dir of an eval/ tool (`task`: what it does with the data), defaulted by eval_data."""
    from common.cli import DATASETS  # the names common.data serves
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help=f"dataset to {task} [default: the one stored in --ckpt]")
    p.add_argument("--data-dir", default=None,
                   help="where the dataset lives [default: the run's --data-dir, recorded in --ckpt, when --dataset is "
                        "the run's; else ./data]")


def eval_data(ckpt, meta, dataset=None, data_dir=None):
    """(dataset, data_dir, tag) of an eval/ tool from its --dataset, --data-dir and backbone.pt's metadata.

    --dataset defaults to the run's; --data-dir to the run's (recorded in backbone.pt, or in the args.json beside
    it) when the dataset is the run's, else ./data. tag is "" when the data is the run's own, else "-<dataset>"
    (plus "-<folder name>" for a folder dataset read from another folder): the tools name their default result
    files with it (knn<tag>.json), so an evaluation on other data never replaces the run's."""
    own = dataset is None or dataset == meta.get("dataset")
    dataset = dataset or meta.get("dataset")
    if dataset is None:
        raise UsageError(f"{ckpt} does not name its dataset: pass --dataset")
    recorded = (meta.get("data_dir") or _run_data_dir(ckpt, dataset)) if own else None
    data_dir = data_dir or recorded or "./data"
    same_folder = recorded is None or os.path.realpath(data_dir) == os.path.realpath(recorded)
    if own and (dataset not in FOLDER_DATASETS or same_folder):
        return dataset, data_dir, ""
    folder = f"-{os.path.basename(os.path.normpath(os.path.abspath(data_dir)))}" if dataset in FOLDER_DATASETS else ""
    return dataset, data_dir, f"-{dataset}{folder}"


# ---- --init: backbone weights to start from ----
CLASSIFIER_PREFIXES = ("fc.", "head.")  # torchvision ResNets' and timm models' classifiers: our backbones have none
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")  # DDP, and trainers that keep the network as a submodule


def _pretrained_state_dict(source):
    """The state dict of `torchvision:<name>` or `timm:<name>`, downloaded by that library into its cache (once);
    offline, a one-line UsageError naming the file to fetch and where to put it."""
    library, _, name = source.partition(":")
    if library == "torchvision":
        import torchvision
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError):
            raise UsageError(f"--init {source}: torchvision has no model named {name!r} (e.g. torchvision:resnet50)")
        said = io.StringIO()  # torch.hub's "Downloading: ..." line: shown once the download worked
        try:
            with contextlib.redirect_stdout(said):
                state = weights.get_state_dict(progress=False)
            sys.stdout.write(said.getvalue())
            return state
        except OSError as error:  # URLError and socket errors are OSErrors
            folder = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise UsageError(f"--init {source}: cannot download {weights.url} ({error}): fetch that file on a machine "
                             f"online and put it in {folder}/, or pass the file itself to --init") from None
    import timm
    from huggingface_hub import constants as hub_constants
    try:  # no network (no DNS): offline mode at once (the cache still serves), not a minute of retries
        socket.getaddrinfo("huggingface.co", 443)
        offline = hub_constants.HF_HUB_OFFLINE
    except OSError:
        offline = True
    was_offline, logger = hub_constants.HF_HUB_OFFLINE, logging.getLogger("huggingface_hub")
    level, hub_constants.HF_HUB_OFFLINE = logger.level, offline
    logger.setLevel(logging.ERROR)  # its retry warnings would bury the one line below
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except RuntimeError as error:
        if "unknown model" in str(error).lower():
            raise UsageError(f"--init {source}: timm has no model named {name!r} (e.g. timm:vit_small_patch16_224)")
        raise
    except (OSError, ValueError) as error:  # offline: huggingface_hub's errors are OSErrors or ValueErrors
        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None)
        where = f"https://huggingface.co/{hub}/resolve/main/model.safetensors" if hub else getattr(cfg, "url", "?")
        raise UsageError(f"--init {source}: cannot download its weights ({type(error).__name__}): fetch {where} on a "
                         "machine online and pass that file to --init (or run once online: timm caches it in "
                         "~/.cache/huggingface)") from None
    finally:
        hub_constants.HF_HUB_OFFLINE = was_offline
        logger.setLevel(level)
    return model.state_dict()


def _file_state_dict(path):
    """(state dict, what the file is) of a backbone.pt of ours or a torchvision / timm checkpoint file (a state
    dict, possibly under "state_dict" or "model"; .safetensors too)."""
    fix = "--init takes a backbone.pt, a torchvision or timm checkpoint file, torchvision:<name> or timm:<name>"
    if not os.path.isfile(path):
        raise UsageError(f"--init {path}: no such file ({fix})")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path), "a safetensors file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UsageError(f"--init {path}: cannot read it: {_unreadable(path)} ({fix})") from None
    if kind_of(obj) == "backbone.pt":
        return obj, "backbone.pt"
    for key in ("state_dict", "model"):  # training checkpoints of timm and others
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and kind_of(obj[key]) == "state dict":
            obj = obj[key]
    if kind_of(obj) != "state dict":
        raise UsageError(f"--init {path} is {describe(obj, path)}: {fix}")
    return obj, "a checkpoint file"


def init_state_dict(source, backbone, name, image_size):
    """The state dict of `backbone` (a `name` backbone at `image_size` px, our build_backbone) from an --init
    SOURCE: a backbone.pt of ours (which must name the same architecture), a torchvision or timm checkpoint file,
    torchvision:<name> or timm:<name>. Classifier weights (fc.*, head.*) the backbone lacks and the prefixes module.,
    backbone., encoder. are dropped; everything else must match exactly (strict), else one line naming the
    missing and unexpected keys and the mismatched shapes."""
    if source.startswith(("torchvision:", "timm:")):
        state, what = _pretrained_state_dict(source), source
    else:
        state, what = _file_state_dict(source)
        if what == "backbone.pt":
            stem = state.get("cifar_stem", False)
            from common.backbones import has_cifar_stem  # here: backbones imports this module
            here = has_cifar_stem(name, image_size)
            if state["name"] != name or stem != here:
                raise UsageError(f"--init {source} holds a {state['name']}{' with the CIFAR stem' if stem else ''} "
                                 f"({state.get('image_size')}px), this run builds a {name}"
                                 f"{' with the CIFAR stem' if here else ''} ({image_size}px): pass --backbone "
                                 f"{state['name']} --crop-size {state.get('image_size')}")
            state, what = state["backbone"], f"a backbone.pt of {state.get('method', '?')}"
    own = backbone.state_dict()
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        listed = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")  # noqa
        parts = [f"missing keys {listed(missing)}" if missing else "", f"unexpected keys {listed(unexpected)}"
                 if unexpected else "", f"shapes (file vs model) {listed(shapes)}" if shapes else ""]
        stem = " (below 64px our ResNets use a 3x3 CIFAR stem, ViT and Swin smaller patches: ImageNet weights need " \
            "--crop-size 64 or more)" if image_size < 64 and any(s.startswith(("conv1.weight", "patch_embed"))
                                                                for s in shapes) else ""
        raise UsageError(f"--init {source} ({what}) does not fit this run's {name} at {image_size}px: "
                         f"{'; '.join(p for p in parts if p)}{stem}")
    return state
