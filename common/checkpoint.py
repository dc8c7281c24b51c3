"""Checkpoints: an atomic last.pt holding everything a resume needs, and backbone.pt for eval/.

A checkpoint is a plain dict of state dicts, tensors and Python values, so it loads with
`torch.load(..., weights_only=True)`.
"""
import os
import random

import torch

from common.cli import UsageError


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a kill at any moment leaves the previous file intact."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    save_atomic({"method": method, "args": vars(args), "epoch": epoch, "step": step, "rng": rng_state(),
                 **{name: obj.state_dict() for name, obj in objects.items()}, "extra": extra or {}}, path)


def resume_path(args):
    """--resume if given, else <out-dir>/last.pt when a previous run left one, else None."""
    if args.resume:
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume {args.resume}: no such file (omit --resume to start afresh)")
        return args.resume
    path = os.path.join(args.out_dir, "last.pt")
    return path if os.path.isfile(path) else None


def load(path, method, objects, map_location="cpu"):
    """Restore objects in place from a checkpoint of `method`; returns (epoch, step, extra)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]} (delete it to start afresh)")
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise UsageError(f"{path} is not a last.pt written by a method script")
    if ckpt["method"] != method:
        raise UsageError(f"{path} was written by {ckpt['method']}, not {method}: use another --out-dir or --resume")
    for name, obj in objects.items():
        obj.load_state_dict(ckpt[name])
    set_rng_state(ckpt["rng"])
    return ckpt["epoch"], ckpt["step"], ckpt["extra"]


def export_backbone(path, backbone, metadata):
    """backbone.pt: {"backbone": state_dict, "name", "image_size", "cifar_stem", "feature_dim", "method", ...}."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    save_atomic({"backbone": state, **metadata}, path)
