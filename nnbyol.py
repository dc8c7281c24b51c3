"""NNBYOL: BYOL with nearest-neighbour targets, from With a Little Help from My Friends: Nearest-Neighbor
Contrastive Learning of Visual Representations (Dwibedi, Aytar, Tompson, Sermanet and Zisserman, ICCV 2021).

Idea: BYOL (an online network predicts a momentum target network's projection of the other view), with the
target replaced by its nearest neighbour in a support set: a queue of the momentum network's normalized
projections of past batches. The neighbour is usually another image of similar content, which gives more
semantic variation than augmentations alone (the NNCLR paper's BYOL variant; solo-learn's nnbyol.py).
The neighbour is a lookup among stored embeddings: no gradient reaches it, nor the momentum network.

Loss, with p = pred(proj(x)) (online), z' = n(proj_m(x)) (momentum), NN(z') = argmax_{s in Q} z'.s (cosine,
Q holds unit rows), byol(p, t) = 2 - 2 * mean_i cos(p_i, sg(t_i)):
    L = byol(p1, NN(z'2)) + byol(p2, NN(z'1)),   then Q <- all-gathered z'1 (a ring of 65536, with labels)
Every step uses the neighbour, from the first one (the queue starts as random unit rows, as in solo-learn).
Momentum update after every step: xi <- tau * xi + (1 - tau) * theta, tau rising 0.99 -> 1.0 on a cosine.
The labels never enter training: the share of neighbours with the query's label is logged as nn_acc.

    python nnbyol.py --dataset synthetic                         # offline CPU demo, minutes
    python nnbyol.py --dataset cifar10                           # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 nnbyol.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
_NNBYOL = dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, queue_size=65536, base_tau=0.99,
               final_tau=1.0)
RECIPES = {
    # solo-learn scripts/pretrain/cifar/nnbyol.yaml
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=1.0, weight_decay=1e-5,
                  warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=32, **_NNBYOL),
    # solo-learn has no imagenet-100 nnbyol.yaml: the CIFAR values at 224px over 400 epochs
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=1.0, weight_decay=1e-5,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, **_NNBYOL),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW; a support set of 8 batches.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, **{**_NNBYOL, "proj_hidden_dim": 512, "proj_output_dim": 128,
                                        "pred_hidden_dim": 512, "queue_size": 2048}, data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("nnbyol", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    add("--pred-hidden-dim", cli.positive_int, "predictor hidden width")
    add("--queue-size", cli.positive_int, "embeddings in the support set (a multiple of the global batch)")
    add("--base-tau", cli.momentum, "target momentum at the first step")
    add("--final-tau", cli.momentum, "target momentum at the last step")
    args = cli.resolve(p, argv, "nnbyol", RECIPES)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("nnbyol trains on two views: use --num-large-crops 2 --num-small-crops 0")
    return args


# ---- heads ----
def mlp(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear: BYOL's projector and predictor."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class NNBYOL(nn.Module):
    """Online network: backbone -> projector -> predictor, plus the online probe on sg(features) of both crops.
    `target()` builds the momentum copy of backbone + projector."""

    def __init__(self, backbone, feature_dim, proj_hidden, proj_out, pred_hidden, num_classes):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feature_dim, proj_hidden, proj_out)
        self.predictor = mlp(proj_out, pred_hidden, proj_out)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.predictor(self.projector(f)) for f in feats], self.probe(torch.cat(feats).detach())

    def target(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))


# ---- loss: the support set, then the loss itself ----
@torch.no_grad()
def nearest_neighbour(z, queue):
    """(rows of `queue` (K, D) of largest z.Q^T, their indices): the cosine nearest neighbours of the unit rows
    of z in the support set of unit rows. A lookup: the result carries no gradient."""
    index = (z.float() @ queue.float().T).argmax(dim=1)
    return queue[index], index


def check_queue_size(queue_size, global_batch):
    """The ring takes whole global batches: a queue that is not a multiple of one is refused."""
    if queue_size % global_batch:
        fix = max(1, round(queue_size / global_batch)) * global_batch
        raise cli.UsageError(f"--queue-size {queue_size} is not a multiple of the global batch {global_batch} "
                             f"(--batch-size x processes): use e.g. --queue-size {fix}")


@torch.no_grad()
def enqueue(queue, queue_labels, ptr, z, labels):
    """Write the embeddings and labels of every rank (all-gathered in rank order) into the ring at row ptr
    (a Python int: no device read), oldest out; returns the next ptr. Every rank holds the same support set."""
    z, labels = dist.gather(z.detach().to(queue.dtype)), dist.gather(labels)
    queue[ptr:ptr + len(z)], queue_labels[ptr:ptr + len(z)] = z, labels
    return (ptr + len(z)) % len(queue)


def nnbyol_loss(p1, p2, nn1, nn2):
    """L = byol(p1, nn2) + byol(p2, nn1), byol(p, t) = 2 - 2 * mean_i cos(p_i, sg(t_i)): BYOL's loss with each
    target the support-set neighbour nn_v of the momentum projection of view v. From 0 (aligned) to 8; the
    neighbours get no gradient."""
    def byol(p, t):
        return 2 - 2 * F.cosine_similarity(p.float(), t.detach().float(), dim=-1).mean()
    return byol(p1, nn2) + byol(p2, nn1)


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights and support set on every rank
    run = Run(args)
    check_queue_size(args.queue_size, args.batch_size * run.world_size)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = NNBYOL(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim,
                   datasets.num_classes)
    target = model.target()  # starts equal to the online backbone + projector
    train_model = prepare_model(model, run)
    target = prepare_model(target, run, trained=False)
    online = nn.Sequential(model.backbone, model.projector)  # the parameters the target follows
    # random unit rows (label -1) until real embeddings replace them, as in solo-learn
    queue = F.normalize(torch.randn(args.queue_size, args.proj_output_dim), dim=1).to(run.device)
    queue_labels = torch.full((args.queue_size,), -1, dtype=torch.long, device=run.device)
    ptr = 0
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector, model.predictor]),
                                args.weight_decay, exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "target": target, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "nnbyol", state)
        if extra["queue"].shape != queue.shape:
            raise cli.UsageError(f"{path} holds a support set of shape {tuple(extra['queue'].shape)}, not "
                                 f"{tuple(queue.shape)}: resume with its --queue-size and --proj-output-dim")
        queue.copy_(extra["queue"]), queue_labels.copy_(extra["queue_labels"])
        ptr = extra["queue_ptr"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "nnbyol", epoch, step, state,
                                        extra={"queue": queue, "queue_labels": queue_labels, "queue_ptr": ptr})
    labelled = datasets.num_classes > 0  # nn_acc needs labels; on unlabelled data it is not logged

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), target.train()  # the target's BN uses batch statistics, like the online one
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss and nn_acc stay on the device: read only every --log-every steps
        nn_acc_sum = torch.zeros((), device=run.device)
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            tau = optim.cosine_tau(step, total_steps, args.base_tau, args.final_tau)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                (p1, p2), logits = train_model(views)
                with torch.no_grad():
                    z1, z2 = (F.normalize(target(v).float(), dim=1) for v in views)
            (nn1, index1), (nn2, _) = nearest_neighbour(z1, queue), nearest_neighbour(z2, queue)
            loss = nnbyol_loss(p1, p2, nn1, nn2)
            nn_acc = (queue_labels[index1] == labels).float().mean()  # the neighbour has the view's label
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            ptr = enqueue(queue, queue_labels, ptr, z1, labels)  # after the loss, as solo-learn's queue
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            optim.momentum_update(online, target, tau)
            step += 1
            nn_acc_sum += nn_acc
            if stop := meter.update(step, loss, len(labels), lr, tau=tau, **({"nn_acc": nn_acc} if labelled else {})):
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        final = stop == "max_steps" or (finished_epoch and epoch + 1 == args.epochs)
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), evaluation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final, embed=model.projector)
        if labelled:  # the epoch's mean over steps and ranks: one sync, at the epoch's end
            metrics["nn_acc"] = dist.all_reduce_mean(nn_acc_sum).item() / max(1, meter.steps)
        epoch_summary(run, meter, step, lr, metrics, {"tau": tau})
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
