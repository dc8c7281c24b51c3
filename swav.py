"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments (Caron et al., NeurIPS 2020).

Idea: instead of comparing features directly, map every view onto K learnable prototypes and swap
the prediction problem: the code (soft cluster assignment) of one view must be predicted from the
scores of another view of the same image. Codes come from a few Sinkhorn-Knopp iterations that
split the batch equally among the prototypes, which is what prevents the trivial all-in-one-cluster
solution. Codes are computed on the large crops only; every other view (large or small: multi-crop)
predicts them. When the batch is small against K, features of the last batches are kept in a queue
and take part in the equal partition (their codes are computed and dropped).

Loss, with z = n(proj(x)), prototypes c_k of unit norm, scores s_v = z_v . c, T = temperature:
    q_i = SinkhornKnopp(sg([s_queue_i; s_i]) / eps)[batch rows]     for each large crop i
    L   = 1/|large| sum_{i large} 1/(V-1) sum_{v != i} mean_b  -sum_k q_i[b, k] log softmax(s_v[b] / T)_k
The prototypes receive no update during the first --freeze-prototypes-epochs.

Prototype normalisation follows official SwAV (facebookresearch/swav, main_swav.py): the rows are renormalised
to unit norm, without gradient, before every step, and the step updates them as a plain Linear. solo-learn
(solo/methods/swav.py, lines 72-77) instead wraps them in weight_norm with g fixed to 1, so W = V / ||V||_row
is computed in the forward and the gradient flows through the normalisation to V. Both score with unit
prototypes; the updates differ (ours: the plain gradient, then a projection onto the sphere; solo-learn's:
the gradient projected onto the tangent of each row, scaled by 1 / ||V||_row).
With --preset multicrop the cosine ends at --min-lr 0.0006 (solo-learn's scripts/pretrain/cifar-multicrop/
swav.yaml) unless --min-lr is given.

    python swav.py --dataset synthetic                         # offline CPU demo, minutes
    python swav.py --dataset cifar10                           # solo-learn CIFAR recipe (2 crops)
    python swav.py --dataset cifar10 --preset multicrop --num-small-crops 6     # 2 x 32px + 6 x 18px
    torchrun --nproc_per_node=4 swav.py --dataset imagenet100 --data-dir /data/imagenet100 \
        --preset multicrop --num-small-crops 6                                  # 2 x 224px + 6 x 96px
"""
import os

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.6, weight_decay=1e-6,
                  warmup_epochs=10, probe_lr=0.1, preset="symmetric", crop_size=32, temperature=0.1,
                  epsilon=0.05, sinkhorn_iters=3, num_prototypes=3000, queue_size=3840, queue_start_epoch=50,
                  freeze_prototypes_epochs=2, proj_hidden_dim=2048, proj_output_dim=128),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.6, weight_decay=1e-6,
                     warmup_epochs=10, probe_lr=0.1, preset="symmetric", crop_size=224, temperature=0.1,
                     epsilon=0.05, sinkhorn_iters=3, num_prototypes=3000, queue_size=3840, queue_start_epoch=50,
                     freeze_prototypes_epochs=2, proj_hidden_dim=2048, proj_output_dim=128),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW, and the asymmetric preset: the blur of the others erases 16px shapes.
    # 8000 images: 100 prototypes and a queue of 3 batches keep several samples per prototype in Sinkhorn.
    # eps 0.02 (harder codes than the paper's 0.05): kNN 70% against 33% at 0.05 (docs/synthetic.md).
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, temperature=0.1, epsilon=0.02, sinkhorn_iters=3, num_prototypes=100,
                      queue_size=768, queue_start_epoch=2, freeze_prototypes_epochs=1, proj_hidden_dim=512,
                      proj_output_dim=128, data_backend="device", workers=2),
}


MULTICROP_MIN_LR = 6e-4  # solo-learn's scripts/pretrain/cifar-multicrop/swav.yaml (scheduler.min_lr: 0.0006)


def parse_args(argv=None):
    p, add = cli.parser("swav", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "softmax temperature T of the swapped prediction")
    add("--epsilon", cli.positive_float, "Sinkhorn-Knopp entropy regularisation eps")
    add("--sinkhorn-iters", cli.positive_int, "Sinkhorn-Knopp iterations")
    add("--num-prototypes", cli.positive_int, "number of prototypes K")
    add("--queue-size", cli.nonneg_int, "queued features per large crop (0: no queue)")
    add("--queue-start-epoch", cli.nonneg_int, "first epoch whose Sinkhorn uses the queue")
    add("--freeze-prototypes-epochs", cli.nonneg_int, "epochs during which the prototypes are not updated")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    args = cli.resolve(p, argv, "swav", RECIPES)
    if args.preset == "multicrop" and p.parse_args(argv).min_lr is None:  # --min-lr not on the command line
        args.min_lr = MULTICROP_MIN_LR
    return args


# ---- heads ----
class SwAV(nn.Module):
    """Backbone -> projector (Linear-BN-ReLU-Linear) -> n(z) -> prototype scores (Linear without bias, whose
    rows `normalize_prototypes` keeps unit-norm), and the online probe on sg(features) of every large crop."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_prototypes, num_classes,
                 num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                       nn.ReLU(inplace=True), nn.Linear(hidden_dim, output_dim))
        self.prototypes = nn.Linear(output_dim, num_prototypes, bias=False)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        """views: list of image batches, large crops first. Returns (z per view, scores per view, probe logits)."""
        feats = [self.backbone(v) for v in views]
        z = [F.normalize(self.projector(f).float(), dim=1) for f in feats]
        with torch.autocast(z[0].device.type, enabled=False):  # float32 scores: the loss divides them by T = 0.1
            scores = [self.prototypes(x) for x in z]
        return z, scores, self.probe(torch.cat(feats[:self.num_large_crops]).detach())

    @torch.no_grad()
    def normalize_prototypes(self):
        # Unit rows make the scores cosine similarities, the scale that eps and T are tuned for (the paper's
        # normalized prototypes); the gradient step moves them off the sphere, so this runs before each forward.
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


# ---- loss ----
def _global_max(x):
    """Element-wise max of x over ranks (no gradient)."""
    x = x.detach().clone()
    if dist.is_distributed():
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


@torch.no_grad()
def sinkhorn_knopp(scores, epsilon=0.05, iterations=3):
    """Codes of SwAV's Algorithm 1: scores (N, K) of this rank's N samples -> (N, K) codes, no gradient.
    Q = exp(scores / eps)^T (K x B, B = samples of all ranks) scaled to total 1; then `iterations` times:
    rows (prototypes) to 1/K each, then columns (samples) to 1/B each; returned as B * Q^T. So every
    sample's codes sum to 1, and right before the last column step every prototype held B/K samples.
    All sums over samples are all-reduced: 2 ranks give the codes of 1 process on the joint batch.
    The constants drop out: a row step divides every row by its own sum and a column step every column by its
    own, so a factor common to all of Q before either (the total, 1/K, 1/B, the final B) is undone by it. Rows
    to sum 1, then columns to sum 1, give the same codes with no sample count to all-reduce (iterations >= 1)."""
    if iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least 1 iteration, not {iterations}")
    logits = scores.double() / epsilon  # float64: exp(s / eps) keeps its range down to e^-700 for small eps
    # Shifting each prototype's row by its max over all samples scales that row of Q by a constant, which
    # the first row normalization undoes exactly.
    q = torch.exp(logits - _global_max(logits.max(dim=0).values)).T
    for _ in range(iterations):
        q /= dist.all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype's mass over every rank's samples
        q /= q.sum(dim=0, keepdim=True)  # each sample's codes sum to 1
    return q.T.float()


def swav_loss(scores, queue_scores=None, num_large_crops=2, temperature=0.1, epsilon=0.05, sinkhorn_iters=3):
    """Swapped prediction. scores: one (B, K) tensor of z . c per view, large crops first; queue_scores: None or
    one (Q, K) tensor per large crop, joined to that crop's batch for Sinkhorn only.
    q_i = sinkhorn_knopp(sg([queue_i; s_i]))[last B rows];
    L = 1/num_large sum_{i < num_large} 1/(V-1) sum_{v != i} mean_b -sum_k q_i[b, k] log_softmax(s_v[b] / T)_k"""
    log_probs = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = 0.0
    for i in range(num_large_crops):
        joint = scores[i].float() if queue_scores is None else torch.cat([queue_scores[i].float(), scores[i].float()])
        codes = sinkhorn_knopp(joint.detach(), epsilon, sinkhorn_iters)[-len(scores[i]):]
        others = [v for v in range(len(scores)) if v != i]
        loss = loss + sum(-(codes * log_probs[v]).sum(1).mean() for v in others) / len(others)
    return loss / num_large_crops


# ---- training ----
def train(args):
    if args.num_large_crops + args.num_small_crops < 2:
        raise cli.UsageError("SwAV predicts one view's codes from another: use at least 2 crops")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = SwAV(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.num_prototypes,
                 datasets.num_classes, args.num_large_crops)
    train_model = prepare_model(model, run)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector, model.prototypes]),
                                args.weight_decay, exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)
    # The queue is the same on every rank (filled with all-gathered features), newest first; each rank puts its
    # own slice of it into Sinkhorn, whose sums are all-reduced, so the ranks together use it exactly once.
    queue = torch.zeros(args.num_large_crops, args.queue_size, args.proj_output_dim, device=run.device)
    queue_filled = 0

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "swav", state)
        if extra["queue"].shape != queue.shape:
            raise cli.UsageError(f"{path} holds a queue of shape {tuple(extra['queue'].shape)}, not "
                                 f"{tuple(queue.shape)}: resume with the same --queue-size, --num-large-crops "
                                 "and --proj-output-dim")
        queue, queue_filled = extra["queue"].to(run.device), extra["queue_filled"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "swav", epoch, step, state,
                                        extra={"queue": queue.cpu(), "queue_filled": queue_filled})
    freeze = lambda: setattr(model.prototypes.weight, "grad", None)  # no step, no momentum, no weight decay

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
            model.normalize_prototypes()
            with run.autocast():
                z, scores, logits = train_model(views)
            queue_scores = None  # queue_filled is a Python count: choosing the queue never reads the device
            if args.queue_size and epoch >= args.queue_start_epoch and queue_filled:
                mine = queue[:, :queue_filled].tensor_split(run.world_size, dim=1)[run.rank]
                queue_scores = [rows @ model.prototypes.weight.detach().T for rows in mine]
            loss = swav_loss(scores, queue_scores, num_large_crops=args.num_large_crops, temperature=args.temperature,
                             epsilon=args.epsilon, sinkhorn_iters=args.sinkhorn_iters)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip,
                                     before_step=freeze if epoch < args.freeze_prototypes_epochs else None)
            if args.queue_size:
                keys = torch.stack([dist.gather(z[i].detach().float()) for i in range(args.num_large_crops)])
                queue = torch.cat([keys, queue], dim=1)[:, :args.queue_size]
                queue_filled = min(queue_filled + keys.shape[1], args.queue_size)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            step += 1
            if stop := meter.update(step, loss, len(labels), lr, queue_used=int(queue_scores is not None)):
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
