"""Pictures of a run: UMAP of a feature space (umap_png) and training curves from metrics.jsonl (curves_png).
Imported lazily: umap-learn takes seconds to import and its first fit ~15 s more to JIT-compile (it is imported
inside umap_png only), matplotlib about a second."""
import os

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed (clusters, CI, ssh)
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402


def umap_png(features, labels, path, title, max_points=10000, seed=0, class_names=None):
    """Embed `features` (N, D) in 2-D with UMAP and save a scatter plot coloured by `labels` to `path`.

    At most `max_points` rows are drawn (a seeded random subset, so repeated plots of one run
    are comparable). Label -1 (unlabelled) is grey; the legend names label i class_names[i] when given.
    The PNG is written to a temporary file and renamed, so a reader never sees half a picture.
    """
    import umap  # here, not at the top: seconds to import, so only when a plot is drawn

    features = torch.as_tensor(features).float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    if features.size(0) < 3:
        raise ValueError(f"UMAP needs at least 3 points, got {features.size(0)}")
    if features.size(0) > max_points:
        keep = torch.randperm(features.size(0), generator=torch.Generator().manual_seed(seed))[:max_points]
        features, labels = features[keep], labels[keep]
    # n_neighbors must stay below the number of points; cosine matches how kNN compares features.
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, features.size(0) - 1), min_dist=0.1,
                        metric="cosine", random_state=seed, n_jobs=1)
    scatter_png(reducer.fit_transform(features.numpy()), labels, path, title, class_names)


def scatter_png(points, labels, path, title, class_names=None):
    """2-D `points` (N, 2) coloured by `labels`, legend entries named by class_names (else the label index)."""
    classes = sorted(set(labels.tolist()) - {-1})
    colormap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    figure, axes = plt.subplots(figsize=(8, 8))
    size = min(max(40000 / len(labels), 2), 16)  # large dots for a few points, small for many
    unlabelled = (labels == -1).numpy()
    if unlabelled.any():
        axes.scatter(points[unlabelled, 0], points[unlabelled, 1], s=size, c="lightgrey", label="unlabelled")
    for rank, label in enumerate(classes):
        rows = (labels == label).numpy()
        # Listed colormaps are indexed by integer; continuous ones by a float in [0, 1].
        colour = colormap(rank) if len(classes) <= 20 else colormap(rank / max(len(classes) - 1, 1))
        name = class_names[label] if class_names is not None and label < len(class_names) else label
        axes.scatter(points[rows, 0], points[rows, 1], s=size, color=colour, label=str(name))
    if len(classes) <= 20:
        legend = axes.legend(fontsize="small", loc="best")
        for handle in legend.legend_handles:  # legend dots readable whatever the plot's dot size
            handle.set_sizes([30])
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    save_png(figure, path, dpi=150)


def save_png(figure, path, dpi):
    """Write the figure to a temporary file in the same folder, then rename: a reader never sees half a picture."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"  # same folder, so the rename below is atomic
    try:
        figure.savefig(temporary, format="png", dpi=dpi)
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.unlink(temporary)


CURVES = (("loss", "training loss"), ("probe_acc1", "online probe acc@1 (%)"), ("knn_acc1", "kNN acc@1 (%)"))
# The health panels (docs/health.md): each draws lines of (metric, or metric / its scale, line style) per run.
HEALTH = (("health_rank", "effective rank / max (solid: embedding, dashed: backbone)",
           (("health_rank_embed", "health_rank_embed_max", "-"), ("health_rank_backbone", "health_rank_backbone_max",
                                                                  "--"))),
          ("health_std", "std of the normalised embedding x sqrt(D) (1: healthy)",
           (("health_std", "health_std_healthy", "-"),)),
          ("health_alignment", "alignment (solid) and uniformity (dashed)",
           (("health_alignment", None, "-"), ("health_uniformity", None, "--"))))


def read_epochs(metrics_path):
    """The per-epoch lines of a metrics.jsonl, one per epoch (the last one written, should a resumed run have
    logged an epoch twice), in epoch order."""
    import json
    epochs = {}
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                m = json.loads(line)
                if m.get("type") == "epoch":
                    epochs[m["epoch"]] = m
    return [epochs[e] for e in sorted(epochs)]


def curves_png(runs, path, title=None):
    """Loss, probe acc@1 and kNN acc@1 against epoch, one panel each, one colour per run, and below them the
    label-free health (HEALTH: effective rank, std of the normalised embedding, alignment and uniformity).

    runs: [(legend label, per-epoch metric dicts)]. A metric a run never logged (no labels: no probe; kNN off)
    is left out of its panel. Epochs count from 0, as metrics.jsonl, the progress bar and the UMAP title do.
    A kNN panel of single points (kNN ran at the end only) says how to get a curve.
    Returns {panel: number of runs drawn in it}. Written atomically (save_png)."""
    panels = [(key, name, ((key, None, "-"),)) for key, name in CURVES] + list(HEALTH)
    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = plt.get_cmap("tab10")
    drawn = {}
    for (key, name, lines), ax in zip(panels, axes.flat):
        drawn[key], longest = 0, 0
        for i, (label, epochs) in enumerate(runs):
            shown = False
            for metric, scale, style in lines:
                points = [(m["epoch"], m[metric] / (m[scale] if scale else 1)) for m in epochs
                          if m.get(metric) is not None and (scale is None or m.get(scale))]
                longest = max(longest, len(points))
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, style, marker="o" if len(points) < 30 else None, markersize=3,
                            color=colours(i % 10), label=None if shown else label)
                    shown = True
            drawn[key] += shown
        ax.set_xlabel("epoch (from 0, as logged)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))  # no epoch 0.25
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if drawn[key]:
            ax.legend(fontsize="small")
            if key == "knn_acc1" and longest == 1:
                ax.text(0.5, 0.1, "kNN ran at the end only:\ntrain with --knn-every N for a curve", ha="center",
                        va="bottom", transform=ax.transAxes, color="grey")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    save_png(figure, path, dpi=120)
    return drawn


def run_curves_png(run_dir, path=None):
    """curves.png of one run folder, labelled with its method and dataset (args.json)."""
    import json
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    label = f"{args.get('method')} on {args.get('dataset')}"
    return curves_png([(label, read_epochs(os.path.join(run_dir, "metrics.jsonl")))],
                      path or os.path.join(run_dir, "curves.png"), label)
