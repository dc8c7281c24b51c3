"""DeepCluster V2 (Caron et al., NeurIPS 2020, the SwAV paper's improved DeepCluster).

Idea: alternate clustering and classification. A memory bank keeps, for every training image, the
normalized embedding n(z) of each of its large crops from the last time the image was seen. At the
start of every epoch, spherical k-means (on the unit sphere, cosine similarity) clusters the bank,
once per head with its own number of clusters; each head's centroids become its frozen prototypes
and each image's cluster becomes its pseudo-label. During the epoch every view of an image is
classified by each head into its image's cluster. Several heads (3 k-means with different
initialisations) smooth out the noise of any single clustering. Here the bank is filled by one
pass over the data before epoch 0, so the first epoch already trains on real clusters. solo-learn does not:
its on_train_epoch_start (solo/methods/deepclusterv2.py, lines 149-152) sets every assignment to -1 in epoch 0
and its loss (solo/losses/deepclusterv2.py) is a cross-entropy with ignore_index=-1, so epoch 0 has no target
at all (the loss is NaN, its gradient zero: backbone and projector get only weight decay, the online probe alone
learns) while the bank, initialised with random unit vectors, fills; k-means first runs at the start of epoch 1. This departure is deliberate
(docs/fidelity.md): a wasted epoch, 1 of 1000 on CIFAR, and a NaN in the logs.

Loss, with z = n(proj(x)), C_h the unit centroids of head h, y_h(i) the cluster of image i, T = temperature:
    L = 1/H sum_h mean_{views v, images i} CE(z_v[i] C_h^T / T, y_h(i))
Head h clusters the bank of large crop h mod (number of large crops), like the official code.

    python deepclusterv2.py --dataset synthetic                # offline CPU demo, minutes
    python deepclusterv2.py --dataset cifar10                  # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 deepclusterv2.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.data import mix_seed
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.6, weight_decay=1e-6,
                  warmup_epochs=11, warmup_start_lr=0.0, min_lr=6e-4, probe_lr=0.1, preset="symmetric",
                  crop_size=32, temperature=0.1, num_prototypes=[3000, 3000, 3000], kmeans_iters=10,
                  proj_hidden_dim=2048, proj_output_dim=128),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.6, weight_decay=1e-6,
                     warmup_epochs=11, warmup_start_lr=0.0, min_lr=6e-4, probe_lr=0.1, preset="symmetric",
                     crop_size=224, temperature=0.1, num_prototypes=[3000, 3000, 3000], kmeans_iters=10,
                     proj_hidden_dim=2048, proj_output_dim=128),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW, and the asymmetric preset: the blur of the others erases 16px shapes.
    # 8000 images: 200 clusters of about 40 images, like 3000 clusters of about 17 on CIFAR's 50000.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, warmup_start_lr=0.0, probe_lr=2e-3, preset="asymmetric",
                      crop_size=16, min_scale=0.3, temperature=0.1, num_prototypes=[200, 200, 200],
                      kmeans_iters=10, proj_hidden_dim=512, proj_output_dim=128, data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("deepclusterv2", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "softmax temperature T of the classification")
    add("--num-prototypes", cli.positive_int, "clusters of each head (one number per head)", nargs="+")
    add("--kmeans-iters", cli.nonneg_int, "spherical k-means iterations (M-steps) at every epoch start")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    return cli.resolve(p, argv, "deepclusterv2", RECIPES)


# ---- heads ----
class DeepClusterV2(nn.Module):
    """Backbone -> projector (Linear-BN-ReLU-Linear) -> n(z); one frozen prototype layer per head (the k-means
    centroids, copied in at every epoch start); the online probe on sg(features) of every large crop."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_prototypes, num_classes,
                 num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                       nn.ReLU(inplace=True), nn.Linear(hidden_dim, output_dim))
        self.prototypes = nn.ModuleList(nn.Linear(output_dim, k, bias=False) for k in num_prototypes)
        self.prototypes.requires_grad_(False)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        """views: list of image batches, large crops first. Returns (n(z) per view, probe logits)."""
        feats = [self.backbone(v) for v in views]
        z = [F.normalize(self.projector(f), dim=1) for f in feats]
        return z, self.probe(torch.cat(feats[:self.num_large_crops]).detach())


# ---- loss and clustering ----
def deepclusterv2_loss(z, prototypes, targets, temperature=0.1):
    """z: one (B, D) tensor per view; prototypes: one (K_h, D) tensor of unit centroids per head (no gradient);
    targets: (H, B) cluster of each image per head, -100 where unknown (ignored).
    L = 1/H sum_h mean_{v, b} CE(n(z_v[b]) C_h^T / T, targets[h, b])   (0 when no target is known)"""
    z = F.normalize(torch.cat(z).float(), dim=1)
    losses = []
    for c, t in zip(prototypes, targets):
        t = t.repeat(len(z) // len(t))
        # The mean over known targets as their sum over their count (at least 1): 0, not NaN, when none is known,
        # with z still in the graph (DDP), and no branch that would have to read the targets back from the device.
        total = F.cross_entropy(z @ c.detach().float().T / temperature, t, ignore_index=-100, reduction="sum")
        losses.append(total / (t >= 0).sum().clamp(min=1))
    return sum(losses) / len(losses)


@torch.no_grad()
def spherical_kmeans(x, centroids, iterations=10, chunk=8192):
    """Spherical k-means of unit rows x (this rank's share of the data) from initial unit centroids (the same
    on every rank). E-step: each row goes to its most similar centroid. M-step: a centroid becomes the
    normalized sum of its rows, sums and counts all-reduced over ranks; a centroid left without rows keeps
    its place. `iterations` M-steps, then a final E-step. Returns (centroids, assignments of x)."""
    centroids = centroids.clone().float()
    for it in range(iterations + 1):
        assignments = torch.cat([(rows @ centroids.T).argmax(dim=1) for rows in x.split(chunk)])
        if it == iterations:
            return centroids, assignments
        sums = dist.all_reduce_sum(torch.zeros_like(centroids).index_add_(0, assignments, x.float()))
        counts = dist.all_reduce_sum(torch.bincount(assignments, minlength=len(centroids)))
        centroids[counts > 0] = F.normalize(sums[counts > 0], dim=1)


def update_bank(bank, filled, z, indexes):
    """Write the n(z) of every rank's large crops (z: one (B, D) tensor per large crop) into the bank rows of
    their dataset indexes, in place. Gathered from all ranks, so every rank holds the same bank. Index copies
    with the indexes on the device: nothing is read back (the step never waits for the device)."""
    indexes = dist.gather(indexes)
    for view, rows in enumerate(z):
        bank[view].index_copy_(0, indexes, dist.gather(rows.detach().float()))
    filled.index_fill_(0, indexes, True)


def cluster_bank(bank, filled, num_prototypes, iterations=10, seed=0, epoch=0):
    """Centroids and assignments of every head: head h runs spherical k-means on the bank of large crop
    h mod V, from K_h distinct filled rows drawn by (seed, epoch, h). Each rank clusters a slice of the
    rows and the sums are all-reduced, so every rank gets the same result. Returns (list of (K_h, D)
    centroids, (H, N) assignments with -100 for rows never filled)."""
    valid = filled.nonzero().squeeze(1)
    mine = valid.tensor_split(dist.get_world_size())[dist.get_rank()]
    assignments = torch.full((len(num_prototypes), len(filled)), -100, dtype=torch.long, device=bank.device)
    centroids = []
    for head, k in enumerate(num_prototypes):
        view = bank[head % len(bank)]
        generator = torch.Generator().manual_seed(mix_seed("kmeans", seed, epoch, head))
        start = valid[torch.randperm(len(valid), generator=generator)[:k].to(valid.device)]
        c, local = spherical_kmeans(view[mine], view[start], iterations)
        spread = torch.zeros(len(filled), dtype=torch.long, device=bank.device)
        spread[mine] = local
        assignments[head, valid] = dist.all_reduce_sum(spread)[valid]
        centroids.append(c)
    return centroids, assignments


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    seen = datasets.batches_per_epoch * args.batch_size * run.world_size  # images in the bank after one pass
    if max(args.num_prototypes) > seen:
        raise cli.UsageError(f"--num-prototypes {max(args.num_prototypes)} exceeds the {seen} images clustered "
                             "per epoch: use fewer prototypes")
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = DeepClusterV2(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.num_prototypes,
                          datasets.num_classes, args.num_large_crops)
    train_model = prepare_model(model, run)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)
    size = datasets.train_size
    bank = torch.zeros(args.num_large_crops, size, args.proj_output_dim, device=run.device)
    filled = torch.zeros(size, dtype=torch.bool, device=run.device)
    assignments, assigned_epoch = None, -1  # the epoch whose start computed `assignments`

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "deepclusterv2", state)
        if extra["bank"].shape != bank.shape:
            raise cli.UsageError(f"{path} holds a memory bank of shape {tuple(extra['bank'].shape)}, not "
                                 f"{tuple(bank.shape)}: resume with the same data, crops and --proj-output-dim")
        bank, filled = extra["bank"].to(run.device), extra["filled"].to(run.device)
        assignments, assigned_epoch = extra["assignments"].to(run.device), extra["assigned_epoch"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    else:  # one pass without training, so that epoch 0 already has clusters to learn
        datasets.loader.sampler.set_epoch(0)
        model.train()
        with torch.no_grad(), run.autocast():
            for views, _, indexes in run.progress(datasets.loader, "0 (filling the memory bank)"):
                z, _ = model([run.to_device(v) for v in views[:args.num_large_crops]])
                update_bank(bank, filled, z, run.labels_to_device(indexes))
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(  # the bank (1.3 GB on ImageNet) goes to the host on rank 0 alone, which writes
        last_pt, "deepclusterv2", epoch, step, state,
        extra={"bank": bank.cpu(), "filled": filled.cpu(), "assignments": assignments.cpu(),
               "assigned_epoch": assigned_epoch} if run.is_main else None)

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        if assigned_epoch != epoch:  # not when resuming mid-epoch: that epoch's clusters are in last.pt
            # k-means syncs with the host (masks, nonzero), once an epoch: outside the step
            centroids, assignments = cluster_bank(bank, filled, args.num_prototypes, args.kmeans_iters, args.seed,
                                                  epoch)
            with torch.no_grad():
                for layer, c in zip(model.prototypes, centroids):
                    layer.weight.copy_(c)
            assigned_epoch = epoch
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train()
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            views = [run.to_device(v) for v in views]
            labels, indexes = run.labels_to_device(labels, indexes)
            with run.autocast():
                z, logits = train_model(views)
            targets = assignments.index_select(1, indexes)  # (H, B) pseudo-labels, looked up on the device
            loss = deepclusterv2_loss(z, [layer.weight for layer in model.prototypes], targets,
                                      temperature=args.temperature)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            update_bank(bank, filled, z[:args.num_large_crops], indexes)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            step += 1
            if stop := meter.update(step, loss, len(labels), lr):
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        final = stop == "max_steps" or (finished_epoch and epoch + 1 == args.epochs)
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), evaluation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final, embed=model.projector)
        epoch_summary(run, meter, step, lr, metrics)
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
