"""reproduce/make_imagenet100.py on a fake ImageNet: the 100 CMC classes plus two others, two 8x8 JPEGs per class in
train/ and one in val/. Links and copies, resuming a partial output, and every refusal (one line, exit 2)."""
import importlib.util
import io
import os
import re
import shutil

import pytest
from PIL import Image

from common import data
from conftest import ROOT, run_script

spec = importlib.util.spec_from_file_location("make_imagenet100", ROOT / "reproduce" / "make_imagenet100.py")
make_imagenet100 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_imagenet100)
CLASSES = make_imagenet100.CLASSES
OTHERS = ("n01440764", "n15075141")  # ImageNet classes outside ImageNet-100
IMAGES = {"train": 2, "val": 1}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(jpeg, "JPEG")
    for split, count in IMAGES.items():
        for wnid in CLASSES + OTHERS:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg.getvalue())
    return root


def fails(argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        make_imagenet100.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_class_list_is_100_distinct_wnids():
    assert len(CLASSES) == len(set(CLASSES)) == 100
    assert all(re.fullmatch(r"n\d{8}", wnid) for wnid in CLASSES)
    assert not set(OTHERS) & set(CLASSES)


def check_output(out, imagenet, links):
    for split, count in IMAGES.items():
        assert sorted(os.listdir(out / split)) == sorted(CLASSES)  # the two other classes stay out
        for wnid in CLASSES:
            target = out / split / wnid
            assert target.is_symlink() == links
            if links:
                assert os.readlink(target) == str((imagenet / split / wnid).resolve())
        dataset = data.load_folder("imagenet100", str(out), split)
        assert dataset.num_classes == 100 and len(dataset) == 100 * count


def test_links_and_resumes(imagenet, tmp_path):
    out = tmp_path / "imagenet100"
    proc = run_script("reproduce/make_imagenet100.py", "--imagenet", imagenet, "--out", out)
    assert f"{out / 'train'}: linked 100 classes" in proc.stdout and "--data-dir" in proc.stdout
    check_output(out, imagenet, links=True)
    # an interrupted run: some links missing in val; the rerun makes only those and keeps the others
    for wnid in CLASSES[:3]:
        (out / "val" / wnid).unlink()
    kept = os.lstat(out / "val" / CLASSES[3]).st_ino
    assert make_imagenet100.make(str(imagenet), str(out)) == {"train": 0, "val": 3}
    assert os.lstat(out / "val" / CLASSES[3]).st_ino == kept
    assert make_imagenet100.make(str(imagenet), str(out)) == {"train": 0, "val": 0}
    check_output(out, imagenet, links=True)


def test_copies_and_resumes(imagenet, tmp_path):
    out = tmp_path / "imagenet100"
    assert make_imagenet100.make(str(imagenet), str(out), copy=True) == {"train": 100, "val": 100}
    check_output(out, imagenet, links=False)
    # a class copied earlier is kept as it is; a class whose copy was interrupted is copied again
    edited = out / "train" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG"
    edited.write_bytes(b"kept")
    shutil.move(out / "train" / CLASSES[1], out / "train" / f".{CLASSES[1]}.partial")
    (out / "train" / f".{CLASSES[1]}.partial" / f"{CLASSES[1]}_0.JPEG").unlink()
    assert make_imagenet100.make(str(imagenet), str(out), copy=True) == {"train": 1, "val": 0}
    assert edited.read_bytes() == b"kept"
    assert sorted(os.listdir(out / "train" / CLASSES[1])) == [f"{CLASSES[1]}_{i}.JPEG" for i in range(2)]
    assert not (out / "train" / f".{CLASSES[1]}.partial").exists()


def test_refusals(imagenet, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    fails(["--imagenet", tmp_path / "missing", "--out", tmp_path / "o"], capsys, "no such folder")
    fails(["--imagenet", bad, "--out", tmp_path / "o"], capsys, "no val/ folder")
    # a split without some classes, and ImageNet's raw validation layout (all images in val/)
    shutil.copytree(imagenet / "train", bad / "train", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.JPEG"))
    shutil.rmtree(bad / "train" / CLASSES[5])
    (bad / "val").mkdir()
    fails(["--imagenet", bad, "--out", tmp_path / "o"], capsys, f"train lacks 1 of the 100 ImageNet-100 classes "
          f"({CLASSES[5]})")
    (bad / "train" / CLASSES[5]).mkdir()
    (bad / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    fails(["--imagenet", bad, "--out", tmp_path / "o"], capsys, "lie directly in val/")
    assert not (tmp_path / "o").exists()
    # outputs that cannot be made or completed
    (tmp_path / "file").write_text("")
    fails(["--imagenet", imagenet, "--out", tmp_path / "file"], capsys, "is a file")
    fails(["--imagenet", imagenet, "--out", imagenet / "train" / "x"], capsys, "inside --imagenet")
    (tmp_path / "other" / "train" / "cats").mkdir(parents=True)
    fails(["--imagenet", imagenet, "--out", tmp_path / "other"], capsys, "not ImageNet-100 classes (cats)")
    out = tmp_path / "linked"
    make_imagenet100.make(str(imagenet), str(out))
    fails(["--imagenet", imagenet, "--out", out, "--copy"], capsys, "rerun without --copy")
    copied = tmp_path / "copied"
    (copied / "val").mkdir(parents=True)
    shutil.copytree(imagenet / "val" / CLASSES[0], copied / "val" / CLASSES[0])
    fails(["--imagenet", imagenet, "--out", copied], capsys, "rerun with --copy")
    assert not (copied / "train").exists()  # refused before anything was written
