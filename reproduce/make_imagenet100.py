"""Make ImageNet-100 from an ImageNet folder: the 100 classes of the CMC split (Tian et al., 2019) that solo-learn
uses (scripts/utils/make_imagenet100.py), linked (or copied) into OUT/train and OUT/val.

    python reproduce/make_imagenet100.py --imagenet /data/imagenet --out /data/imagenet100          # symlinks
    python reproduce/make_imagenet100.py --imagenet /data/imagenet --out /data/imagenet100 --copy   # copies

--imagenet needs train/ and val/, each with one folder per wnid (n01558993, ...), as ImageNet's train archive
unpacks; the validation images must be sorted into class folders first (ImageNet ships them in one folder). Each
class of OUT/train and OUT/val is a symlink to the class folder (absolute path), or with --copy a copy of it.
Rerunning completes a partial OUT: classes already there are kept, an interrupted copy is redone (a class is copied
into a hidden folder and renamed when complete). Then train with `--dataset imagenet100 --data-dir OUT`.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

# `python reproduce/make_imagenet100.py` puts reproduce/ on sys.path, not the repository root that holds common/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import Parser, RunError, UsageError, run_main  # noqa: E402

SPLITS = ("train", "val")
# solo-learn's list (CMC's imagenet100.txt), in its order: 100 distinct wnids.
CLASSES = (
    "n02869837", "n01749939", "n02488291", "n02107142", "n13037406", "n02091831", "n04517823", "n04589890",
    "n03062245", "n01773797", "n01735189", "n07831146", "n07753275", "n03085013", "n04485082", "n02105505",
    "n01983481", "n02788148", "n03530642", "n04435653", "n02086910", "n02859443", "n13040303", "n03594734",
    "n02085620", "n02099849", "n01558993", "n04493381", "n02109047", "n04111531", "n02877765", "n04429376",
    "n02009229", "n01978455", "n02106550", "n01820546", "n01692333", "n07714571", "n02974003", "n02114855",
    "n03785016", "n03764736", "n03775546", "n02087046", "n07836838", "n04099969", "n04592741", "n03891251",
    "n02701002", "n03379051", "n02259212", "n07715103", "n03947888", "n04026417", "n02326432", "n03637318",
    "n01980166", "n02113799", "n02086240", "n03903868", "n02483362", "n04127249", "n02089973", "n03017168",
    "n02093428", "n02804414", "n02396427", "n04418357", "n02172182", "n01729322", "n02113978", "n03787032",
    "n02089867", "n02119022", "n03777754", "n04238763", "n02231487", "n03032252", "n02138441", "n02104029",
    "n03837869", "n03494278", "n04136333", "n03794056", "n03492542", "n02018207", "n04067472", "n03930630",
    "n03584829", "n02123045", "n04229816", "n02100583", "n03642806", "n04336792", "n03259280", "n02116738",
    "n02108089", "n03424325", "n01855672", "n02090622",
)


def build_parser():
    p = Parser(prog="reproduce/make_imagenet100.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", required=True, help="ImageNet folder holding train/ and val/ class folders [required]")
    p.add_argument("--out", required=True, help="ImageNet-100 folder to make (or to complete) [required]")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking the class folders "
                   "[default: symlinks]")
    return p


def check_source(imagenet):
    """Refuse a source that is not an ImageNet folder with the 100 classes in both splits."""
    if not os.path.isdir(imagenet):
        raise UsageError(f"--imagenet {imagenet}: no such folder (pass the folder that holds ImageNet's train/ and "
                         f"val/)")
    for split in SPLITS:
        if not os.path.isdir(os.path.join(imagenet, split)):
            raise UsageError(f"--imagenet {imagenet} has no {split}/ folder: pass the folder that holds ImageNet's "
                             f"train/ and val/")
    for split in SPLITS:
        root = os.path.join(imagenet, split)
        missing = [c for c in CLASSES if not os.path.isdir(os.path.join(root, c))]
        if missing:
            flat = split == "val" and any(name.lower().endswith((".jpeg", ".jpg")) for name in os.listdir(root))
            hint = ("its images lie directly in val/: sort them into one folder per wnid first" if flat else
                    "pass an ImageNet folder with one folder per wnid in train/ and val/")
            raise UsageError(f"{root} lacks {len(missing)} of the 100 ImageNet-100 classes "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): {hint}")


def check_out(imagenet, out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder: pass a folder path")
    source, target = os.path.realpath(imagenet), os.path.realpath(out)
    if target == source or target.startswith(source + os.sep):
        raise UsageError(f"--out {out} lies inside --imagenet {imagenet}: pass a folder outside it")
    for split in SPLITS:
        root = os.path.join(out, split)
        stray = sorted(set(os.listdir(root)) - set(CLASSES)) if os.path.isdir(root) else []
        stray = [name for name in stray if not name.startswith(".")]
        if stray:
            raise UsageError(f"{root} holds {len(stray)} entries that are not ImageNet-100 classes "
                             f"({', '.join(stray[:3])}): pass an empty --out, or the one of an earlier run")


def already_placed(source, target, copy):
    """True when an earlier run placed this class as `copy` asks; refuse what another run or someone else put there."""
    if not os.path.lexists(target):
        return False
    link = os.path.islink(target)
    if copy and link:
        raise UsageError(f"{target} is a link from a run without --copy: rerun without --copy, or remove {target}")
    if not copy and not link and os.path.isdir(target):
        raise UsageError(f"{target} is a copy from a --copy run: rerun with --copy, or remove it")
    if not copy and os.path.realpath(target) != os.path.realpath(source):
        raise UsageError(f"{target} is not a link to {source}: remove it, or pass the --imagenet of the earlier run")
    if copy and not os.path.isdir(target):
        raise UsageError(f"{target} is not a class folder: remove it")
    return True


def place(source, target, copy):
    if not copy:
        os.symlink(source, target, target_is_directory=True)
        return
    partial = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted copy: start that class again
    shutil.copytree(source, partial)
    os.rename(partial, target)  # a class folder appears only once complete


def make(imagenet, out, copy=False):
    """Link or copy the 100 classes that are not there yet; returns {split: number of classes placed now}."""
    check_source(imagenet)
    check_out(imagenet, out)
    pairs = {split: [(os.path.join(os.path.abspath(os.path.join(imagenet, split)), c), os.path.join(out, split, c))
                     for c in CLASSES] for split in SPLITS}
    # every conflict is refused before anything is written
    todo = {split: [(s, t) for s, t in pairs[split] if not already_placed(s, t, copy)] for split in SPLITS}
    try:
        for split in SPLITS:
            os.makedirs(os.path.join(out, split), exist_ok=True)
            for source, target in todo[split]:
                place(source, target, copy)
    except OSError as error:
        raise RunError(f"could not make {out}: {error}") from None
    return {split: len(todo[split]) for split in SPLITS}


def run(argv=None):
    args = build_parser().parse_args(argv)
    placed = make(args.imagenet, args.out, args.copy)
    verb = "copied" if args.copy else "linked"
    for split in SPLITS:
        kept = len(CLASSES) - placed[split]
        print(f"{os.path.join(args.out, split)}: {verb} {placed[split]} classes"
              f"{f', {kept} already there' if kept else ''}")
    print(f"train with: --dataset imagenet100 --data-dir {args.out}")


def main(argv=None):
    run_main(run, argv)


if __name__ == "__main__":
    main()
