"""Training curves: curves_png and eval/plot.py on metrics files written here (no training needed)."""
import json

import torch

from common.plots import curves_png, read_epochs
from conftest import run_script


def write_run(folder, method, epochs, labelled=True, knn=True):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"method": method, "dataset": "synthetic"}))
    lines = []
    for e in range(epochs):
        lines.append({"type": "step", "epoch": e, "step": e + 1, "loss": 9.0})
        line = {"type": "epoch", "epoch": e, "step": e + 1, "loss": 5.0 - e}
        if labelled:
            line["probe_acc1"] = 10.0 + e
        if knn and e % 2 == 1:
            line["knn_acc1"] = 20.0 + e
        lines.append(line)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return folder


def test_epochs_are_read_once_each_in_order(tmp_path):
    run = write_run(tmp_path / "a", "byol", 3)
    with open(run / "metrics.jsonl", "a") as f:  # a resumed run logged epoch 1 again: the last line wins
        f.write(json.dumps({"type": "epoch", "epoch": 1, "step": 2, "loss": 0.5}) + "\n")
    epochs = read_epochs(run / "metrics.jsonl")
    assert [m["epoch"] for m in epochs] == [0, 1, 2] and epochs[1]["loss"] == 0.5


def test_one_line_per_run_and_metric(tmp_path):
    a = read_epochs(write_run(tmp_path / "a", "byol", 4) / "metrics.jsonl")
    b = read_epochs(write_run(tmp_path / "b", "simclr", 4, knn=False) / "metrics.jsonl")
    unlabelled = read_epochs(write_run(tmp_path / "c", "swav", 4, labelled=False, knn=False) / "metrics.jsonl")
    drawn = curves_png([("byol", a), ("simclr", b), ("swav", unlabelled)], tmp_path / "all.png")
    no_health = {"health_rank": 0, "health_std": 0, "health_alignment": 0}
    assert drawn == {"loss": 3, "probe_acc1": 2, "knn_acc1": 1, **no_health}
    assert (tmp_path / "all.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A run without labels (no probe, no kNN) still plots its loss.
    assert curves_png([("swav", unlabelled)], tmp_path / "u.png") == {"loss": 1, "probe_acc1": 0, "knn_acc1": 0,
                                                                       **no_health}
    # The health panels: one line per run that logged them (with labels or without), each scaled by its maximum.
    for e, line in enumerate(unlabelled):
        line.update(health_rank_embed=10.0 - e, health_rank_embed_max=128, health_std=0.01, health_std_healthy=0.1)
    drawn = curves_png([("byol", a), ("swav", unlabelled)], tmp_path / "h.png")
    assert drawn == {"loss": 2, "probe_acc1": 1, "knn_acc1": 1, "health_rank": 1, "health_std": 1,
                     "health_alignment": 0}


def test_plot_script_overlays_runs_and_rejects_a_folder_that_is_no_run(tmp_path):
    a, b = write_run(tmp_path / "a", "byol", 2), write_run(tmp_path / "b", "byol", 2)
    proc = run_script("eval/plot.py", a, b, "--out", tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").exists() and "'loss': 2" in proc.stdout
    (tmp_path / "empty").mkdir()
    proc = run_script("eval/plot.py", tmp_path / "empty", "--out", tmp_path / "x.png", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} has no metrics.jsonl: pass the --out-dir of a training run"]


def captured_figures(monkeypatch):
    """The figures common.plots would save, kept open for inspection instead of written."""
    from common import plots
    figures = []
    monkeypatch.setattr(plots, "save_png", lambda figure, path, dpi: figures.append(figure))
    return figures


def test_curves_count_epochs_from_0_and_say_when_knn_ran_once(tmp_path, monkeypatch):
    figures = captured_figures(monkeypatch)
    every_other = read_epochs(write_run(tmp_path / "a", "byol", 4) / "metrics.jsonl")  # kNN at epochs 1 and 3
    curves_png([("byol", every_other)], tmp_path / "a.png")
    loss, probe, knn = figures[-1].axes[:3]  # the health panels below them
    # metrics.jsonl, the progress bar and the UMAP title count epochs from 0: so does the x axis.
    assert list(loss.lines[0].get_xdata()) == [0, 1, 2, 3] and list(knn.lines[0].get_xdata()) == [1, 3]
    assert not [t for t in knn.texts if "--knn-every" in t.get_text()]
    at_end = [m if m["epoch"] == 3 else {k: v for k, v in m.items() if k != "knn_acc1"} for m in every_other]
    curves_png([("byol", at_end)], tmp_path / "b.png")
    knn = figures[-1].axes[2]
    assert list(knn.lines[0].get_xdata()) == [3]
    assert [t.get_text() for t in knn.texts] == ["kNN ran at the end only:\ntrain with --knn-every N for a curve"]


def test_umap_legend_names_the_classes(tmp_path, monkeypatch):
    from common.plots import scatter_png
    figures = captured_figures(monkeypatch)
    points = torch.arange(12, dtype=torch.float32).view(6, 2).numpy()
    labels = torch.tensor([2, 0, 1, -1, 0, 2])
    scatter_png(points, labels, tmp_path / "u.png", "t", class_names=["disk", "square", "triangle"])
    legend = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert legend == ["unlabelled", "disk", "square", "triangle"]
    scatter_png(points, labels, tmp_path / "u.png", "t")  # no names (a dataset without them): the indices
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == ["unlabelled", "0", "1", "2"]
