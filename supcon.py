"""SupCon: Supervised Contrastive Learning (Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu and
Krishnan, NeurIPS 2020).

Idea: SimCLR with labels. Every view of every image with the same class label (across all GPUs) is a
positive of a view, not only the other views of its own image; all remaining views are negatives. It is
supervised pretraining with a contrastive loss, an upper reference for the self-supervised methods.

Loss, for the set A of all views, A(i) = A \\ {i}, P(i) = views in A(i) with view i's label, s = cosine similarity,
p_ia = exp(s(z_i, z_a)/T) / sum_{a' in A(i)} exp(s(z_i, z_a')/T), T = 0.2:
    L_in  = -1/|A| sum_i log( sum_{p in P(i)} p_ip )                (default: solo-learn's form)
    L_out = -1/|A| sum_i 1/|P(i)| sum_{p in P(i)} log p_ip        (--supcon-form out: the paper's recommended form)
L_in is exactly what solo-learn computes: its SupCon calls its SimCLR loss with the labels as ids
(solo/losses/simclr.py), -mean_i log(sum_{p in P(i)} exp / sum_{a != i} exp), over the views gathered from
every rank, the view itself left out of both sums. The paper writes L_in with 1/|P(i)| inside the log: a
constant log|P(i)| above this one, the same gradient. By Jensen L_in <= L_out. The paper finds L_out trains
better: the 1/|P(i)| outside the log weights every positive alike in the gradient, while inside it the easiest
positives dominate. With one positive per view (unique labels, two views) both equal SimCLR's NT-Xent.

    python supcon.py --dataset synthetic                       # offline CPU demo, minutes
    python supcon.py --dataset cifar10                         # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 supcon.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="sgd", lr=0.4, weight_decay=1e-5,
                  warmup_epochs=10, probe_lr=0.1, preset="symmetric", crop_size=32, temperature=0.2,
                  supcon_form="in", proj_hidden_dim=2048, proj_output_dim=256),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="sgd", lr=0.5, weight_decay=1e-5,
                     warmup_epochs=10, probe_lr=0.1, preset="symmetric", crop_size=224, temperature=0.2,
                     supcon_form="in", proj_hidden_dim=2048, proj_output_dim=512),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW, and the asymmetric preset: the blur of the others erases 16px shapes.
    "synthetic": dict(backbone="resnet_narrow", epochs=25, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, temperature=0.2, supcon_form="out", proj_hidden_dim=512, proj_output_dim=128,
                      data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("supcon", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "softmax temperature T")
    add("--supcon-form", None, "in: log of the summed probabilities of the positives (solo-learn); out: mean of "
        "their log-probabilities (the paper's recommended form)", choices=SUPCON_FORMS)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    args = cli.resolve(p, argv, "supcon", RECIPES)
    args.supcon_form = args.supcon_form or "in"
    return args


# ---- heads ----
class SupCon(nn.Module):
    """Backbone -> projector (Linear-ReLU-Linear, no BN) and the online linear probe on sg(features) of every
    large crop."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes, num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, output_dim))
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        z = torch.cat([self.projector(f) for f in feats])
        return z, self.probe(torch.cat(feats[:self.num_large_crops]).detach())


# ---- loss ----
SUPCON_FORMS = ("in", "out")


def supcon_loss(z, labels, temperature=0.2, form="in"):
    """Supervised contrastive loss. z: (N, D) projections of all views (all ranks); labels: (N,) class of each
    row's image; every row needs a positive (another view). p_ia = softmax_{a != i}(cos(z_i, z_a) / T)_a;
    form "in" (default, solo-learn): L = -mean_i log sum_{p in P(i)} p_ip;
    form "out" (the paper's recommended form): L = -mean_i mean_{p in P(i)} log p_ip."""
    if form not in SUPCON_FORMS:
        raise ValueError(f"form must be 'in' or 'out', got {form!r}")
    z = F.normalize(z.float(), dim=1)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = (z @ z.T / temperature).masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    if form == "out":
        per_row = log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1)
    else:  # log of the summed probability, computed in log space for stability
        per_row = log_prob.masked_fill(~positives, float("-inf")).logsumexp(1)
    return -per_row.mean()


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    if not datasets.num_classes:
        raise cli.UsageError(f"supcon needs labels and --dataset {args.dataset} has none here: "
                             "put the images in one sub-folder per class")
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = SupCon(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes,
                   args.num_large_crops)
    train_model = prepare_model(model, run)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "supcon", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "supcon", epoch, step, state)

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train()
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                z, logits = train_model(views)
            # all views of all ranks with their labels: each rank computes the same global loss
            loss = supcon_loss(dist.gather(z), dist.gather(labels.repeat(len(views))),
                               temperature=args.temperature, form=args.supcon_form)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
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
