"""Every input checked up front: a sweep over the numeric flags of every script, checkpoint files of every
kind, a failed write, a resume under another precision, and awkward data, end to end.

The sweep parses in-process (no training): each numeric flag of each method script (through its
`parse_args`) and eval tool (through its `build_parser()`) gets 0, -1, nan, inf and 1e300. A value is
accepted only when the rule its type documents admits it (the type's name, which argparse's message
quotes: "a positive integer", "an integer >= -1", "a probability in [0, 1]", ...; and, for every cli type,
finite and at most 1e12 in size); anything else must be a one-line UsageError naming the flag.
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from common import checkpoint, cli
from common.backbones import backbone_metadata, build_backbone, load_backbone
from common.cli import UsageError
from conftest import ROOT, TINY, run_script

METHODS = sorted(p.stem for p in ROOT.glob("*.py") if "def parse_args(" in p.read_text())
EVAL_TOOLS = sorted(p.stem for p in (ROOT / "eval").glob("*.py"))
VALUES = ("0", "-1", "nan", "inf", "1e300")
NEW_PARSER = re.compile(r"\w+\s*,\s*\w+\s*=\s*cli\.parser\(")  # `p, add = cli.parser(...)`: the range-typed API
HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32"]


def load_eval_tool(name):
    spec = importlib.util.spec_from_file_location(f"eval_{name}_tool", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the documented rules ----
RULE_ALIASES = {"every_n": "an integer >= -1"}  # cli.every_n: N > 0 every N epochs, 0 at the end only, -1 never
NUMBER = r"(-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)"


def admits(rule, text):
    """Whether `text` lies in the range that a cli type's rule documents."""
    rule = RULE_ALIASES.get(rule, rule)
    try:
        value = (int if "integer" in rule else float)(text)
    except ValueError:
        return False
    if not math.isfinite(value) or abs(value) > 1e12:  # every cli number: finite, at most 1e12 in size
        return False
    if interval := re.search(rf"in ([\[(]){NUMBER}, {NUMBER}([\])])$", rule):
        low, high = float(interval[2]), float(interval[3])
        return (low <= value if interval[1] == "[" else low < value) and \
            (value <= high if interval[4] == "]" else value < high)
    if bound := re.search(rf"(>=|>) {NUMBER}$", rule):
        return value >= float(bound[2]) if bound[1] == ">=" else value > float(bound[2])
    if "positive" in rule:
        return value > 0
    if rule == "a finite number":
        return True
    raise AssertionError(f"rule {rule!r} of a cli type is unknown to this test: teach admits() its range")


def numeric_flags(parser):
    """(flag, rule) of every option whose type makes a number; a number type not from common.cli fails the test."""
    flags = []
    for action in parser._actions:
        kind = action.type
        if kind is None or not action.option_strings:
            continue
        try:
            number = isinstance(kind("0"), (int, float))
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            number = kind in (int, float) or getattr(kind, "__module__", None) == "common.cli"
        if not number:
            continue  # a path or string type
        flag = action.option_strings[-1]
        assert kind not in (int, float) and getattr(kind, "__module__", None) == "common.cli", \
            f"{flag} is typed {getattr(kind, '__name__', kind)}: give it one of common.cli's range types"
        flags.append((flag, kind.__name__))
    return flags


def method_parser(module, monkeypatch):
    """The parser a method script's parse_args builds (captured where it is handed to cli.resolve)."""
    captured = []

    def capture(p, *args):
        captured.append(p)
        raise StopIteration
    with monkeypatch.context() as patch:
        patch.setattr(cli, "resolve", capture)
        with pytest.raises(StopIteration):
            module.parse_args([])
    return captured[0]


def check_value(parse, flag, rule, value):
    try:
        args = parse(flag, value)
    except UsageError as error:
        message = str(error)
        assert "\n" not in message, (flag, value, message)
        if not admits(rule, value):
            assert flag in message, (flag, value, message)
        return
    assert admits(rule, value), f"{flag} {value} was accepted, but its type's rule is {rule!r}"
    parsed = getattr(args, flag.lstrip("-").replace("-", "_"))
    assert math.isfinite(parsed) and parsed == float(value), (flag, value, parsed)


@pytest.mark.parametrize("method", METHODS)
def test_numeric_flags_of_method_scripts(method, tmp_path, monkeypatch):
    module = importlib.import_module(method)
    if not NEW_PARSER.search((ROOT / f"{method}.py").read_text()):
        pytest.skip(f"{method}.py is not on cli.parser's (parser, add) API yet")
    flags = numeric_flags(method_parser(module, monkeypatch))
    assert len(flags) >= 20, flags  # the common flags are there: the sweep sees the real parser
    out = str(tmp_path / "out")
    for flag, rule in flags:
        for value in VALUES:
            check_value(lambda f, v: module.parse_args([f, v, "--out-dir", out]), flag, rule, value)


@pytest.mark.parametrize("tool", EVAL_TOOLS)
def test_numeric_flags_of_eval_tools(tool, tmp_path):
    module = load_eval_tool(tool)
    parser = module.build_parser()
    (tmp_path / "backbone.pt").write_bytes(b"")  # parsing only: a --ckpt that exists
    required = []  # values for the required options and positionals (a --ckpt, a --format, run folders)
    for action in parser._actions:
        if action.required:
            value = action.choices[0] if action.choices else str(tmp_path / "backbone.pt")
            required += [action.option_strings[-1], value] if action.option_strings else [str(tmp_path)]
    flags = numeric_flags(parser)
    for flag, rule in flags:
        for value in VALUES:
            check_value(lambda f, v: module.build_parser().parse_args([*required, f, v]), flag, rule, value)


def test_admits_reads_the_rules():
    assert [admits("a positive integer", v) for v in VALUES] == [False, False, False, False, False]
    assert [admits("an integer >= -1", v) for v in ("-2", "-1", "0", "2.5")] == [False, True, True, False]
    assert [admits("a fraction in (0, 1]", v) for v in ("0", "1", "0.5", "1.5")] == [False, True, True, False]
    assert [admits("a finite number >= 0", v) for v in ("0", "-1", "nan", "1e300")] == [True, False, False, False]


def test_bad_numbers_from_the_command_line_are_one_line_exit_2(tmp_path):
    (tmp_path / "backbone.pt").write_bytes(b"")
    commands = [["byol.py", "--lr", "nan", "--out-dir", tmp_path / "out"],
                ["eval/knn.py", "--ckpt", tmp_path / "backbone.pt", "--k", "0"]]
    processes = [subprocess.Popen([sys.executable, *map(str, c)], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in commands]
    for process, expected in zip(processes, ["--lr: 'nan' is not", "--k: '0' is not"]):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
        assert stderr.startswith("error: argument ") and expected.replace("'", "") in stderr.replace("'", ""), stderr


# ---- checkpoint files of every kind ----
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every kind, named after what it is."""
    folder = tmp_path_factory.mktemp("kinds")
    export = load_eval_tool("export")
    paths = {"folder": folder / "a_folder", "missing": folder / "missing.pt"}
    paths["folder"].mkdir()
    net, dim = build_backbone("resnet_narrow", 16)
    paths["backbone"] = folder / "backbone.pt"
    checkpoint.export_backbone(paths["backbone"], net, backbone_metadata("resnet_narrow", 16, dim, "byol"))
    model = torch.nn.Linear(3, 2)
    paths["last"] = folder / "last.pt"
    checkpoint.save(paths["last"], "byol", argparse.Namespace(lr=1.0), 1, 4, {"model": model})
    paths["simclr"] = folder / "simclr_last.pt"
    checkpoint.save(paths["simclr"], "simclr", argparse.Namespace(), 1, 4, {"model": model})
    for fmt, size in (("torchvision", 32), ("detectron2", 224)):  # what eval/export.py writes, for real
        r18, dim = build_backbone("resnet18", size)
        source = folder / f"r18_{size}" / "backbone.pt"
        source.parent.mkdir()
        checkpoint.export_backbone(source, r18, backbone_metadata("resnet18", size, dim, "byol"))
        paths[f"r18_{size}"] = source
        paths[fmt] = export.export(str(source), fmt)[0]
    data = paths["last"].read_bytes()
    paths["truncated"], paths["empty"] = folder / "truncated.pt", folder / "empty.pt"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"].write_bytes(b"")
    paths["newer"] = folder / "newer.pt"
    torch.save({**torch.load(paths["last"], weights_only=True), "format": checkpoint.FORMAT + 1}, paths["newer"])
    paths["no_format"] = folder / "no_format.pt"  # written before the key existed: format 1
    torch.save({k: v for k, v in torch.load(paths["last"], weights_only=True).items() if k != "format"},
               paths["no_format"])
    return paths, model


AS_LAST_PT = {"backbone": "is a backbone.pt (the final weights of a byol run), not a last.pt",
              "last": None, "no_format": None, "simclr": "written by simclr, not byol",
              "torchvision": "is an eval/export.py torchvision export", "detectron2": "is an eval/export.py detectron2",
              "truncated": "truncated", "empty": "empty", "newer": f"format {checkpoint.FORMAT + 1}, newer than",
              "folder": "is a folder", "missing": "not found"}
AS_BACKBONE_PT = {**AS_LAST_PT, "backbone": None, "last": "is a last.pt (the resume state of a byol run), not a "
                  "backbone.pt", "no_format": "is a last.pt", "simclr": "is a last.pt (the resume state of a simclr"}


@pytest.mark.parametrize("kind", AS_LAST_PT)
def test_every_kind_of_file_is_named(files, kind):
    paths, model = files
    for expected, read in ((AS_LAST_PT[kind], lambda p: checkpoint.load(p, "byol", {"model": model})),
                           (AS_BACKBONE_PT[kind], load_backbone)):
        if expected is None:
            read(paths[kind])
            continue
        with pytest.raises(UsageError) as error:
            read(paths[kind])
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_writers_stamp_the_format(files):
    paths, _ = files
    for kind in ("last", "backbone"):
        assert torch.load(paths[kind], weights_only=True)["format"] == checkpoint.FORMAT == 1


def test_a_last_pt_that_does_not_fit_says_so(files):
    paths, _ = files
    with pytest.raises(UsageError, match="does not fit this run's model .*size mismatch"):
        checkpoint.load(paths["last"], "byol", {"model": torch.nn.Linear(4, 2)})
    with pytest.raises(UsageError, match="holds no 'target' state"):
        checkpoint.load(paths["last"], "byol", {"model": files[1], "target": files[1]})


def test_the_resume_file_can_be_checked_before_anything_is_written(files, tmp_path):
    paths, _ = files
    fresh = argparse.Namespace(resume=None, out_dir=str(tmp_path))
    checkpoint.check_resumable(fresh, "byol")  # nothing to resume: fine
    shutil.copy(paths["simclr"], tmp_path / "last.pt")
    with pytest.raises(UsageError, match="written by simclr, not byol: pass another --out-dir or move the file away"):
        checkpoint.check_resumable(fresh, "byol")
    checkpoint.check_resumable(argparse.Namespace(resume=str(paths["last"]), out_dir=str(tmp_path)), "byol")


def test_resume_under_another_precision(tmp_path):
    """A disabled scaler (fp32, bf16) saves {}: an enabled one (fp16) resumes with its fresh scale, and the
    reverse loads nothing; between two enabled scalers the scale carries over."""
    model, path = torch.nn.Linear(2, 2), tmp_path / "last.pt"
    for saved_on, resumed_on, scale in ((False, True, 2.0 ** 16), (True, False, None), (True, True, 2.0 ** 10)):
        saved = torch.amp.GradScaler("cpu", enabled=saved_on, init_scale=2.0 ** 10)
        checkpoint.save(path, "byol", argparse.Namespace(), 0, 1, {"model": model, "scaler": saved})
        resumed = torch.amp.GradScaler("cpu", enabled=resumed_on, init_scale=2.0 ** 16)
        checkpoint.load(path, "byol", {"model": model, "scaler": resumed})
        assert (resumed.get_scale() if resumed_on else None) == scale


# ---- writes that fail ----
def half_a_write_then_disk_full(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half of a checkpoint")
    raise OSError(28, "No space left on device")


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_a_write_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_atomic({"step": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.pt"]


def test_output_paths_are_checked(tmp_path, files):
    (tmp_path / "file").write_text("x")
    cases = {tmp_path: "is a folder", tmp_path / "file" / "out.json": "is a file, not a folder",
             files[0]["backbone"]: "is the input file itself"}
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            checkpoint.check_output_file(path, inputs=[files[0]["backbone"]])
    checkpoint.check_output_file(tmp_path / "new" / "deeper" / "out.json")  # folders are created on writing


@pytest.mark.parametrize("tool,ckpt,argv", [("knn", "backbone", ["--device", "cpu", "--out", "{dir}"]),
                                            ("umap", "backbone", ["--device", "cpu", "--out", "{ckpt}"]),
                                            ("export", "r18_32", ["--format", "timm", "--out", "{dir}"])])
def test_eval_tools_refuse_an_unwritable_out_before_work(tool, ckpt, argv, files, capsys):
    ckpt = files[0][ckpt]
    with pytest.raises(SystemExit) as exit_info:
        load_eval_tool(tool).main(["--ckpt", str(ckpt), *[a.format(dir=ckpt.parent, ckpt=ckpt) for a in argv]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--out" in err, err


# ---- end to end: one tiny byol run each ----
def error_lines(stderr):
    """stderr without the progress bars."""
    return [l for l in re.split(r"[\r\n]", stderr) if l.strip() and not re.match(r"\s*epoch \d+:", l)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byol run stopped after its first epoch: last.pt at epoch 1, step 4, and backbone.pt."""
    out = tmp_path_factory.mktemp("byol") / "run"
    run_script("byol.py", *TINY, *HEADS, "--max-steps", "4", "--out-dir", out)
    return out


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_last_pt(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = (out / "last.pt").read_bytes()
    proc = run_script("tests/failing_save_run.py", "byol", "0", *TINY, *HEADS, "--max-steps", "8", "--out-dir", out,
                      check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: could not write {out / 'last.pt'} (No space left on device)"), lines
    assert "resumed from" in proc.stdout  # it trained epoch 1 before the write failed
    assert (out / "last.pt").read_bytes() == before
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def test_an_unreadable_last_pt_stops_and_stays(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])  # a copy that stopped a third of the way
    truncated = (out / "last.pt").read_bytes()
    proc = run_script("byol.py", *TINY, *HEADS, "--max-steps", "8", "--out-dir", out, check=False)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "truncated" in lines[0] and "pass another --out-dir or move the file away" in lines[0], lines
    assert (out / "last.pt").read_bytes() == truncated


def test_an_awkward_folder_trains(tmp_path):
    from test_data import awkward_folder
    awkward_folder(tmp_path / "images")
    out = tmp_path / "run"
    proc = run_script("byol.py", "--dataset", "folder", "--data-dir", tmp_path / "images", "--backbone",
                      "resnet_narrow", "--crop-size", "16", "--batch-size", "4", "--workers", "0", "--epochs", "1",
                      "--warmup-epochs", "0", "--max-steps", "1", "--log-every", "1", "--knn-every", "-1",
                      "--umap-every", "-1", *HEADS, "--out-dir", out)
    assert [l for l in proc.stdout.splitlines() if "skipped" in l] == \
        [f"{tmp_path / 'images'}: skipped 5 files that are not images, are hidden, or lie outside the class folders "
         "(README.md, cat/.DS_Store, cat/._a.jpg, ...)"], proc.stdout
    assert json.loads((out / "args.json").read_text())["dataset"] == "folder"
    assert load_backbone(out / "backbone.pt")[1]["dataset"] == "folder"
