"""NNCLR: With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations
(Dwibedi, Aytar, Tompson, Sermanet and Zisserman, ICCV 2021).

Idea: SimCLR whose positive is not the other view of the same image but the nearest neighbour of the view's
embedding in a support set: a queue of embeddings of past batches. The neighbour is usually another image
of similar content, which gives more semantic variation than augmentations alone. A predictor head on the
other view's side takes the place of its embedding. The support set holds detached embeddings and the
neighbour is a lookup in it, so no gradient flows into the neighbour: the encoder learns only through the
predictions p (the paper's support set is a queue of stored embeddings, updated after each step).

Loss, with z = n(proj(x)), NN(z) = argmax_{s in Q} z.s (cosine: Q holds unit rows), p = pred(proj(x)),
over the global batch of N images:
    L(a, b) = -1/N sum_i log( exp(n(a_i).n(b_i) / T) / sum_k exp(n(a_i).n(b_k) / T) ),  T = 0.2
    L = (L(NN(z1), p2) + L(NN(z2), p1)) / 2,   then Q <- gathered z1 (a ring of 65536, with their labels)
The labels are never used for training: the share of labelled queries whose neighbour has their label
is logged as nn_acc.

    python nnclr.py --dataset synthetic                        # offline CPU demo, minutes
    python nnclr.py --dataset cifar10                          # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 nnclr.py --dataset imagenet100 --data-dir /data/imagenet100
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
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.4, weight_decay=1e-5,
                  warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=32, temperature=0.2,
                  proj_hidden_dim=2048, proj_output_dim=256, pred_hidden_dim=4096, queue_size=65536),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.4, weight_decay=1e-5,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, temperature=0.2,
                     proj_hidden_dim=2048, proj_output_dim=256, pred_hidden_dim=4096, queue_size=65536),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, temperature=0.2, proj_hidden_dim=512, proj_output_dim=128,
                      pred_hidden_dim=512, queue_size=2048, data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("nnclr", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "softmax temperature T of the contrastive loss")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    add("--pred-hidden-dim", cli.positive_int, "predictor hidden width")
    add("--queue-size", cli.positive_int, "embeddings in the support set (a multiple of the global batch)")
    return cli.resolve(p, argv, "nnclr", RECIPES)


# ---- heads ----
def projector(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN: NNCLR's projector."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim))


def predictor(dim, hidden_dim):
    """Linear-BN-ReLU-Linear: NNCLR's predictor (as BYOL's)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))


class NNCLR(nn.Module):
    """Backbone -> projector -> predictor, plus the online probe on sg(features) of both views (solo-learn:
    every large crop). Returns per view z = n(projection) (for the support set) and the prediction p."""

    def __init__(self, backbone, feature_dim, proj_hidden, proj_out, pred_hidden, num_classes):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(feature_dim, proj_hidden, proj_out)
        self.predictor = predictor(proj_out, pred_hidden)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        projections = [self.projector(f) for f in feats]
        z = [F.normalize(x.float(), dim=1) for x in projections]
        return z, [self.predictor(x) for x in projections], self.probe(torch.cat(feats).detach())


# ---- loss ----
@torch.no_grad()
def nearest_neighbour(z, queue):
    """(rows of `queue` (K, D) of largest z.Q^T, their indices): the cosine nearest neighbours of the unit rows
    of z in the support set of unit rows. A lookup: the result carries no gradient."""
    index = (z.float() @ queue.float().T).argmax(dim=1)
    return queue[index], index


def nnclr_loss(nn1, nn2, p1, p2, temperature=0.2):
    """Symmetric contrastive loss of NNCLR over the global batch. nn_v: (N, D) support-set neighbours of
    view v's embeddings, p_v: (N, D) predictions of view v; row i of all four belongs to image i. With
    L(a, b) = CE(n(a) n(b)^T / T, own index) = -mean_i log(exp(n(a_i).n(b_i)/T) / sum_k exp(n(a_i).n(b_k)/T)),
    L = (L(nn1, p2) + L(nn2, p1)) / 2. The neighbours are stored embeddings: only p receives gradient."""
    loss = 0.0
    for nn, p in ((nn1, p2), (nn2, p1)):
        nn, p = F.normalize(nn.detach().float(), dim=1), F.normalize(p.float(), dim=1)
        loss = loss + F.cross_entropy(nn @ p.T / temperature, torch.arange(len(nn), device=nn.device)) / 2
    return loss


def neighbour_accuracy(neighbour_labels, labels):
    """Share of the labelled rows (label >= 0) whose neighbour carries the same label; 0 with none labelled.
    A masked mean over a clamped count: no branch on the data, so no host sync."""
    labelled = labels >= 0
    return ((neighbour_labels == labels) & labelled).sum() / labelled.sum().clamp(min=1)


def check_queue_size(queue_size, global_batch):
    """The ring takes whole global batches: a queue that is not a multiple of one is refused."""
    if queue_size <= 0 or queue_size % global_batch:
        fix = max(1, round(queue_size / global_batch)) * global_batch
        raise cli.UsageError(f"--queue-size {queue_size} is not a positive multiple of the global batch "
                             f"{global_batch} (--batch-size x processes): use e.g. --queue-size {fix}")


@torch.no_grad()
def enqueue(queue, queue_labels, ptr, z, labels):
    """Write the embeddings and labels of every rank (all-gathered in rank order) into the ring at row ptr,
    oldest out; returns the next ptr. Every rank holds the same support set afterwards."""
    z, labels = dist.gather(z.detach().to(queue.dtype)), dist.gather(labels)
    queue[ptr:ptr + len(z)], queue_labels[ptr:ptr + len(z)] = z, labels
    return (ptr + len(z)) % len(queue)


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights and support set on every rank
    run = Run(args)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("nnclr trains on two views: use --num-large-crops 2 --num-small-crops 0")
    check_queue_size(args.queue_size, args.batch_size * run.world_size)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = NNCLR(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim,
                  datasets.num_classes)
    train_model = prepare_model(model, run)
    # random unit vectors (label -1) until real embeddings replace them, as in solo-learn
    queue = F.normalize(torch.randn(args.queue_size, args.proj_output_dim), dim=1).to(run.device)
    queue_labels = torch.full((args.queue_size,), -1, dtype=torch.long, device=run.device)
    ptr = 0
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector, model.predictor]),
                                args.weight_decay, exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "nnclr", state)
        if extra["queue"].shape != queue.shape:
            raise cli.UsageError(f"{path} holds a support set of shape {tuple(extra['queue'].shape)}, not "
                                 f"{tuple(queue.shape)}: resume with its --queue-size and --proj-output-dim")
        queue.copy_(extra["queue"]), queue_labels.copy_(extra["queue_labels"])
        ptr = extra["queue_ptr"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "nnclr", epoch, step, state,
                                        extra={"queue": queue, "queue_labels": queue_labels, "queue_ptr": ptr})

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train()
        labelled = datasets.num_classes > 0  # nn_acc needs labels; on unlabelled data it is not logged
        nn_acc_sum = torch.zeros((), device=run.device)  # the epoch's nn_acc, summed on the device
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                (z1, z2), (p1, p2), logits = train_model(views)
            (nn1, index1), (nn2, _) = nearest_neighbour(z1, queue), nearest_neighbour(z2, queue)
            # every rank computes the same loss of the global batch, as simclr.py does
            loss = nnclr_loss(*(dist.gather(x) for x in (nn1, nn2, p1, p2)), temperature=args.temperature)
            nn_acc = neighbour_accuracy(queue_labels[index1], labels)  # a tensor: read at log steps only
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            ptr = enqueue(queue, queue_labels, ptr, z1, labels)  # after the loss, as the paper's queue
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            step += 1
            nn_acc_sum += nn_acc
            if stop := meter.update(step, loss, len(labels), lr, **({"nn_acc": nn_acc} if labelled else {})):
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        final = stop == "max_steps" or (finished_epoch and epoch + 1 == args.epochs)
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), evaluation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        extra = {}
        if labelled:  # the epoch's mean nn_acc, averaged over ranks: one sync at the epoch's end
            (nn_acc_total,), _, _ = run.read_flags([nn_acc_sum])
            extra["nn_acc"] = nn_acc_total / max(1, meter.steps)
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final, embed=model.projector)
        epoch_summary(run, meter, step, lr, metrics, extra)
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
