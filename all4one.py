"""All4One: Symbiotic Neighbour Contrastive Learning via Self-Attention and Redundancy Reduction
(Estepa, Sarasua, Nagarajan and Radeva, ICCV 2023).

Idea: NNCLR contrasts a view's prediction with the nearest neighbour of the other view in a support set (a queue
of past embeddings). All4One reads k = 5 neighbours at once: a small self-attention transformer summarises the
sequence of a view's neighbours into a "centroid", and the centroid of the other view's sequence whose first
token is that view's own prediction must match it (centroid contrast). Beside it, NNCLR's neighbour contrast and
a Barlow-Twins-like feature contrast that pushes the feature-by-feature similarity matrix of the two views
towards the identity (redundancy reduction). A momentum encoder gives the embeddings of the support set, the
queries of the neighbour search, and the targets of the feature contrast.

Loss, with z = proj(x), p = pred(z), q = pred2(z) (online), m = n(proj_m(x)) (momentum, sg), NN_k(m) the k rows
of the support set Q (unit rows) with largest m.Q^T (nearest first), ctr(S) = Transformer(S + PE)[token 0] for a
sequence S of k vectors, l(a, b; T) = CE(n(a) n(b_all)^T / T, own index) (NNCLR's loss: this rank's rows against
the all-gathered b), and R_ab = m_a^T z_b with every column scaled to unit norm over this rank's batch (D x D):
    L_ctr = (l(ctr(NN_k(m1)), ctr([q2, NN_k(m2)[:k-1]]); 0.1) + l(ctr(NN_k(m2)), ctr([q1, NN_k(m1)[:k-1]]); 0.1)) / 2
    L_nn  = (l(NN_1(m1), p2; 0.2) + l(NN_1(m2), p1; 0.2)) / 2
    on    = sqrt((mean_i ((R_12)_ii - 1)^2 + mean_i ((R_21)_ii - 1)^2) / 2)
    off   = sqrt((mean_{i!=j} (R_12)_ij^2 + mean_{i!=j} (R_21)_ij^2) / 2),     L_red = 10 * (on + off) / 2
    L = 0.5 * L_ctr + 0.5 * L_nn + 0.5 * L_red,   then Q <- all-gathered m1 (a ring of 98304, with labels)
as solo-learn's all4one.py (the authors' code) computes it: the transformer (3 post-norm layers, 8 heads,
feed-forward 2D, dropout 0.1) has its own lr of 0.1, and PE is its PositionalEncodingPermute1D(5), which runs
the sinusoid along the feature axis: token j gets sin(d f) (j even) or cos(d f) (j odd) at feature d, with
f = 10000^(-2 floor(j/2) / 6). Momentum update of backbone + projector after every step, tau 0.99 -> 1.0.
The labels never enter training: the share of nearest neighbours with the query's label is logged as nn_acc.

    python all4one.py --dataset synthetic                        # offline CPU demo, minutes
    python all4one.py --dataset cifar100                         # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 all4one.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.data import mix_seed
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
_ALL4ONE = dict(temperature=0.2, centroid_temperature=0.1, proj_hidden_dim=2048, proj_output_dim=256,
                pred_hidden_dim=4096, num_neighbours=5, transformer_lr=0.1, centroid_weight=0.5, neighbour_weight=0.5,
                redundancy_weight=0.5, base_tau=0.99, final_tau=1.0)
RECIPES = {
    # solo-learn scripts/pretrain/cifar/all4one.yaml
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=1.0, weight_decay=1e-5,
                  warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=32, queue_size=98304, **_ALL4ONE),
    # solo-learn scripts/pretrain/imagenet-100/all4one.yml; its queue_size 98340 is no multiple of the global batch
    # (solo-learn's enqueue asserts it is): the CIFAR yaml's 98304 = 384 batches of 256 (docs/fidelity.md)
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=1.0, weight_decay=1e-5,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, queue_size=98304, **_ALL4ONE),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW; a support set of 8 batches; the transformer's lr a tenth of the base lr, as in
    # solo-learn's recipes (0.1 against 1.0).
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, queue_size=2048, **{**_ALL4ONE, "proj_hidden_dim": 512, "proj_output_dim": 128,
                                                         "pred_hidden_dim": 512, "transformer_lr": 2e-4},
                      data_backend="device", workers=2),
}
TRANSFORMER_LAYERS, TRANSFORMER_HEADS, TRANSFORMER_DROPOUT = 3, 8, 0.1  # solo-learn's nn.TransformerEncoder


def parse_args(argv=None):
    p, add = cli.parser("all4one", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "temperature of the neighbour contrast (NNCLR's loss)")
    add("--centroid-temperature", cli.positive_float, "temperature of the centroid contrast")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width D (the transformer's width: a multiple of 8)")
    add("--pred-hidden-dim", cli.positive_int, "hidden width of both predictors")
    add("--queue-size", cli.positive_int, "embeddings in the support set (a multiple of the global batch)")
    add("--num-neighbours", cli.int_at_least(2), "neighbours k in the transformer's sequences")
    add("--transformer-lr", cli.nonneg_float, "lr of the transformer (scaled like --lr)")
    add("--centroid-weight", cli.nonneg_float, "weight of the centroid contrast")
    add("--neighbour-weight", cli.nonneg_float, "weight of the neighbour contrast")
    add("--redundancy-weight", cli.nonneg_float, "weight of the feature contrast (redundancy reduction)")
    add("--base-tau", cli.momentum, "momentum of the momentum encoder at the first step")
    add("--final-tau", cli.momentum, "momentum of the momentum encoder at the last step")
    args = cli.resolve(p, argv, "all4one", RECIPES)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("all4one trains on two views: use --num-large-crops 2 --num-small-crops 0")
    if args.proj_output_dim % TRANSFORMER_HEADS:
        fix = max(1, round(args.proj_output_dim / TRANSFORMER_HEADS)) * TRANSFORMER_HEADS
        raise cli.UsageError(f"--proj-output-dim {args.proj_output_dim} is not a multiple of the transformer's "
                             f"{TRANSFORMER_HEADS} heads: use e.g. --proj-output-dim {fix}")
    return args


# ---- heads ----
def projector(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN: NNCLR's projector."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim))


def predictor(dim, hidden_dim):
    """Linear-BN-ReLU-Linear: both predictors (as BYOL's)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))


def positional_encoding(length, dim):
    """(length, dim): row j is sin(d f_j) for even j, cos(d f_j) for odd j, at feature d = 0..dim-1, with
    f_j = 10000^(-2 floor(j/2) / c), c = length rounded up to even: solo-learn's PositionalEncodingPermute1D(length)
    on a (batch, length, dim) sequence, which puts the sinusoid along the feature axis."""
    channels = 2 * math.ceil(length / 2)
    freq = 10000.0 ** (-torch.arange(0, channels, 2).float() / channels)
    angles = torch.arange(dim).float()[:, None] * freq  # (dim, channels / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :length].T.contiguous()


class All4One(nn.Module):
    """Online network: backbone -> projector -> predictor and predictor2, the transformer that turns a sequence of
    k embeddings into a centroid, and the online probe on sg(features) of both crops. `target()` builds the
    momentum copy of backbone + projector."""

    def __init__(self, backbone, feature_dim, proj_hidden, proj_out, pred_hidden, num_classes, num_neighbours=5,
                 dropout=TRANSFORMER_DROPOUT):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(feature_dim, proj_hidden, proj_out)
        self.predictor, self.predictor2 = predictor(proj_out, pred_hidden), predictor(proj_out, pred_hidden)
        layer = nn.TransformerEncoderLayer(proj_out, TRANSFORMER_HEADS, dim_feedforward=2 * proj_out, dropout=dropout,
                                           batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, TRANSFORMER_LAYERS, enable_nested_tensor=False)
        self.register_buffer("pos_enc", positional_encoding(num_neighbours, proj_out), persistent=False)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def centroid(self, sequence):
        """ctr(S) = Transformer(S + PE)[token 0] for S (B, k, D)."""
        return self.transformer(sequence + self.pos_enc)[:, 0]

    def forward(self, views, neighbours):
        """views: the two crops; neighbours: NN_k of each view's momentum embedding, (B, k, D) each. Returns per
        view z, p, the centroid of its neighbours and the centroid of [q, its k-1 nearest], and the probe's logits."""
        feats = [self.backbone(v) for v in views]
        z = [self.projector(f) for f in feats]
        q = [self.predictor2(x) for x in z]
        centroids = [self.centroid(nn_k) for nn_k in neighbours]
        own = [self.centroid(torch.cat([qv.unsqueeze(1), nn_k[:, :-1]], dim=1)) for qv, nn_k in zip(q, neighbours)]
        return z, [self.predictor(x) for x in z], centroids, own, self.probe(torch.cat(feats).detach())

    def target(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))


# ---- loss: the support set, the three objectives, then the loss itself ----
@torch.no_grad()
def nearest_neighbours(z, queue, k):
    """(rows (B, k, D) of `queue` (K, D) of largest z.Q^T, nearest first; their indices (B, k)): the cosine
    neighbours of the unit rows of z among the unit rows of the support set. A lookup: no gradient."""
    index = (z.float() @ queue.float().T).topk(k, dim=1).indices
    return queue[index], index


def check_queue_size(queue_size, global_batch, num_neighbours):
    """The ring takes whole global batches and must hold the k neighbours of a query."""
    if queue_size % global_batch or queue_size < num_neighbours:
        fix = max(1, round(queue_size / global_batch), math.ceil(num_neighbours / global_batch)) * global_batch
        raise cli.UsageError(f"--queue-size {queue_size} must be a multiple of the global batch {global_batch} "
                             f"(--batch-size x processes) and at least --num-neighbours {num_neighbours}: use e.g. "
                             f"--queue-size {fix}")


@torch.no_grad()
def enqueue(queue, queue_labels, ptr, z, labels):
    """Write the embeddings and labels of every rank (all-gathered in rank order) into the ring at row ptr
    (a Python int: no device read), oldest out; returns the next ptr. Every rank holds the same support set."""
    z, labels = dist.gather(z.detach().to(queue.dtype)), dist.gather(labels)
    queue[ptr:ptr + len(z)], queue_labels[ptr:ptr + len(z)] = z, labels
    return (ptr + len(z)) % len(queue)


def contrastive(a, b, temperature):
    """l(a, b; T) = -mean_i log softmax_k(n(a_i).n(b_k) / T)_(own i): NNCLR's loss (solo-learn's nnclr_loss_func),
    this rank's rows of a (B, D) against b (B, D) all-gathered from every rank; a's row i pairs with b's row
    rank * B + i. Gradients reach both a and b."""
    a, b = F.normalize(a.float(), dim=1), dist.gather(F.normalize(b.float(), dim=1))
    own = torch.arange(len(a), device=a.device) + dist.get_rank() * len(a)
    return F.cross_entropy(a @ b.T / temperature, own)


def redundancy(m1, m2, z1, z2):
    """L_red = 10 * (on + off) / 2 with R_ab = m_a^T z_b over this rank's batch, every column of m and z scaled to
    unit norm: on = sqrt(mean over both R of mean_i (R_ii - 1)^2), off = the same of the off-diagonal R_ij^2.
    0 when the two views' features match one to one and are orthogonal to each other; m gets no gradient."""
    ons, offs = [], []
    for m, z in ((m1, z2), (m2, z1)):
        r = F.normalize(m.detach().float(), dim=0).T @ F.normalize(z.float(), dim=0)
        diagonal = torch.diagonal(r)
        ons.append((diagonal - 1).pow(2).mean())
        offs.append((r.pow(2).sum() - diagonal.pow(2).sum()) / (r.numel() - len(diagonal)))
    return 10 * (torch.sqrt((ons[0] + ons[1]) / 2) + torch.sqrt((offs[0] + offs[1]) / 2)) / 2


def all4one_loss(nn1, nn2, p1, p2, c1, c2, own1, own2, m1, m2, z1, z2, temperature=0.2, centroid_temperature=0.1,
                 centroid_weight=0.5, neighbour_weight=0.5, redundancy_weight=0.5):
    """L = centroid_weight * L_ctr + neighbour_weight * L_nn + redundancy_weight * L_red (module docstring), with
    nn_v = NN_1(m_v) (B, D) the nearest neighbour of view v, c_v = ctr(NN_k(m_v)), own_v = ctr([q_v, NN_k(m_v)[:k-1]]),
    m_v the momentum embeddings and z_v the projections. This rank's rows; contrasts run against the global batch."""
    centroid = (contrastive(c1, own2, centroid_temperature) + contrastive(c2, own1, centroid_temperature)) / 2
    neighbour = (contrastive(nn1.detach(), p2, temperature) + contrastive(nn2.detach(), p1, temperature)) / 2
    return (centroid_weight * centroid + neighbour_weight * neighbour
            + redundancy_weight * redundancy(m1, m2, z1, z2))


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights and support set on every rank
    run = Run(args)
    check_queue_size(args.queue_size, args.batch_size * run.world_size, args.num_neighbours)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = All4One(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim,
                    datasets.num_classes, args.num_neighbours)
    target = model.target()  # starts equal to the online backbone + projector
    train_model = prepare_model(model, run)
    target = prepare_model(target, run, trained=False)
    online = nn.Sequential(model.backbone, model.projector)  # the parameters the target follows
    # random unit rows (label -1) until real embeddings replace them, as in solo-learn
    queue = F.normalize(torch.randn(args.queue_size, args.proj_output_dim), dim=1).to(run.device)
    queue_labels = torch.full((args.queue_size,), -1, dtype=torch.long, device=run.device)
    ptr = 0
    lars = args.optimizer == "lars"
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector, model.predictor, model.predictor2]),
                                args.weight_decay, exclude_1d=lars, lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.transformer, args.weight_decay, exclude_1d=lars,
                                 lr=run.scale_lr(args.transformer_lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "target": target, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "all4one", state)
        if extra["queue"].shape != queue.shape:
            raise cli.UsageError(f"{path} holds a support set of shape {tuple(extra['queue'].shape)}, not "
                                 f"{tuple(queue.shape)}: resume with its --queue-size and --proj-output-dim")
        queue.copy_(extra["queue"]), queue_labels.copy_(extra["queue_labels"])
        ptr = extra["queue_ptr"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "all4one", epoch, step, state,
                                        extra={"queue": queue, "queue_labels": queue_labels, "queue_ptr": ptr})
    labelled = datasets.num_classes > 0  # nn_acc needs labels; on unlabelled data it is not logged
    weights = dict(temperature=args.temperature, centroid_temperature=args.centroid_temperature,
                   centroid_weight=args.centroid_weight, neighbour_weight=args.neighbour_weight,
                   redundancy_weight=args.redundancy_weight)

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), target.train()  # the momentum network's BN uses batch statistics, like the online one
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss and nn_acc stay on the device: read only every --log-every steps
        nn_acc_sum = torch.zeros((), device=run.device)
        for views, labels, indexes in bar:
            # the transformer's dropout draws from the global RNG: seeded per batch, a resumed run draws the same masks
            torch.manual_seed(mix_seed("all4one", args.seed, run.accumulation.batch_number(step), run.rank))
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            tau = optim.cosine_tau(step, total_steps, args.base_tau, args.final_tau)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with torch.no_grad(), run.autocast():  # the neighbours first: the transformer's sequences are made of them
                m1, m2 = (F.normalize(target(v).float(), dim=1) for v in views)
            # the search outside autocast: float32 scores, as NNCLR's (a bf16 top-k over the queue is full of ties)
            (nn1, index1), (nn2, _) = (nearest_neighbours(m, queue, args.num_neighbours) for m in (m1, m2))
            with run.autocast():
                (z1, z2), (p1, p2), (c1, c2), (own1, own2), logits = train_model(views, (nn1, nn2))
            loss = all4one_loss(nn1[:, 0], nn2[:, 0], p1, p2, c1, c2, own1, own2, m1, m2, z1, z2, **weights)
            nn_acc = (queue_labels[index1[:, 0]] == labels).float().mean()  # the nearest has the view's label
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            ptr = enqueue(queue, queue_labels, ptr, m1, labels)  # after the loss, as solo-learn's queue
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
