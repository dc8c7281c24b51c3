"""MoCo V2+: Improved Baselines with Momentum Contrastive Learning (Chen, Fan, Girshick and He, 2020),
in solo-learn's symmetrized form.

Idea: contrastive learning whose negatives come from a queue of keys of past batches, so the number of
negatives does not depend on the batch size. A query encoder (backbone + MLP projector) is trained to
pick out the key of the other view of its image, computed by a momentum encoder (a slowly moving average
of the query encoder that keeps the queued keys consistent), among all the keys in the queue. MoCo v2
added the MLP projector, blur and a cosine schedule to MoCo; the "+" uses both views as queries, with one
queue of keys per view.

Loss, with q = n(proj(x)), k = n(proj_m(x')) the momentum key of the other view, Q a queue of keys (K x D):
    L(q, k, Q) = -mean_i log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.Q_j / T)) ),  T = 0.2
    L = (L(q1, k2, Q2) + L(q2, k1, Q1)) / 2,   then Q1 <- gathered k1 and Q2 <- gathered k2 (a ring)
Momentum encoder after every step: xi <- tau * xi + (1 - tau) * theta, tau rising 0.99 -> 0.999 on a cosine.

    python mocov2plus.py --dataset synthetic                   # offline CPU demo, minutes
    python mocov2plus.py --dataset cifar10                     # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 mocov2plus.py --dataset imagenet100 --data-dir /data/imagenet100
    torchrun --nproc_per_node=2 mocov2plus.py --dataset imagenet --data-dir /data/imagenet --batch-size 64
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
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                  warmup_epochs=10, probe_lr=0.3, preset="symmetric_weak", crop_size=32, temperature=0.2,
                  proj_hidden_dim=2048, proj_output_dim=256, queue_size=32768, base_tau=0.99, final_tau=0.999),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                     warmup_epochs=10, probe_lr=0.3, preset="symmetric_weak", crop_size=224, temperature=0.2,
                     proj_hidden_dim=2048, proj_output_dim=256, queue_size=65536, base_tau=0.99, final_tau=0.999),
    # ImageNet-1k, scripts/pretrain/imagenet/mocov2plus.yaml: 64 per GPU on 2 GPUs (128 on one process).
    "imagenet1k": dict(backbone="resnet50", epochs=400, batch_size=128, optimizer="sgd", lr=0.3, weight_decay=3e-5,
                       warmup_epochs=10, probe_lr=0.4, preset="symmetric_weak", crop_size=224, temperature=0.2,
                       proj_hidden_dim=2048, proj_output_dim=256, queue_size=65536, base_tau=0.99, final_tau=0.999),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW, and the asymmetric preset: the blur of the others erases 16px shapes.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, temperature=0.2, proj_hidden_dim=512, proj_output_dim=128, queue_size=4096,
                      base_tau=0.99, final_tau=0.999, data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("mocov2plus", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "softmax temperature T of the contrastive loss")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (q, k)")
    add("--queue-size", cli.positive_int, "keys per view in the queue (a multiple of the global batch)")
    add("--base-tau", cli.momentum, "momentum-encoder momentum at the first step")
    add("--final-tau", cli.momentum, "momentum-encoder momentum at the last step")
    return cli.resolve(p, argv, "mocov2plus", RECIPES)


# ---- heads ----
class MoCoV2Plus(nn.Module):
    """Query encoder: backbone -> projector (Linear-ReLU-Linear, no BN), plus the online probe on sg(features)
    of both views (solo-learn: every large crop). `momentum_encoder()` builds the key encoder: a copy of
    backbone + projector."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, output_dim))
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.projector(f) for f in feats], self.probe(torch.cat(feats).detach())

    def momentum_encoder(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))


# ---- loss ----
def mocov2plus_loss(q1, q2, k1, k2, queue1, queue2, temperature=0.2):
    """Symmetric InfoNCE of MoCo V2+. q_v: (N, D) queries of view v, k_v: (N, D) momentum keys of view v,
    queue_v: (K, D) unit keys of view v from past batches. With q, k L2-normalized,
    L(q, k, Q) = CE([q.k, q.Q^T] / T, 0) = -mean_i log(exp(q_i.k_i/T) / (exp(q_i.k_i/T) + sum_j exp(q_i.Q_j/T)))
    and L = (L(q1, k2, queue2) + L(q2, k1, queue1)) / 2. Keys and queues get no gradient."""
    loss = 0.0
    for q, k, queue in ((q1, k2, queue2), (q2, k1, queue1)):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().float().T], dim=1) / temperature
        loss = loss + F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)) / 2
    return loss


def check_queue_size(queue_size, global_batch):
    """The ring takes whole global batches: a queue that is not a multiple of one is refused."""
    if queue_size <= 0 or queue_size % global_batch:
        fix = max(1, round(queue_size / global_batch)) * global_batch
        raise cli.UsageError(f"--queue-size {queue_size} is not a positive multiple of the global batch "
                             f"{global_batch} (--batch-size x processes): use e.g. --queue-size {fix}")


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Write the keys of every rank (all-gathered in rank order, (B, ...)) into the ring `queue` (K, ...) at
    row ptr, oldest keys out; returns the next ptr. Every rank holds the same queue afterwards."""
    keys = dist.gather(keys.detach().to(queue.dtype))
    queue[ptr:ptr + len(keys)] = keys
    return (ptr + len(keys)) % len(queue)


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights and queue on every rank
    run = Run(args)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("mocov2plus trains on two views: use --num-large-crops 2 --num-small-crops 0")
    check_queue_size(args.queue_size, args.batch_size * run.world_size)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = MoCoV2Plus(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes)
    momentum = model.momentum_encoder()  # starts equal to the query encoder
    train_model = prepare_model(model, run)
    momentum = prepare_model(momentum, run, trained=False)
    online = nn.Sequential(model.backbone, model.projector)  # the parameters the momentum encoder follows
    # queue[:, v] holds keys of view v; random unit vectors until real keys replace them
    queue = F.normalize(torch.randn(args.queue_size, 2, args.proj_output_dim), dim=-1).to(run.device)
    ptr = 0
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "momentum": momentum, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "mocov2plus", state)
        if extra["queue"].shape != queue.shape:
            raise cli.UsageError(f"{path} holds a queue of shape {tuple(extra['queue'].shape)}, not "
                                 f"{tuple(queue.shape)}: resume with its --queue-size and --proj-output-dim")
        queue.copy_(extra["queue"])
        ptr = extra["queue_ptr"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    # ptr is read when save() is called: the lambda sees the loop's latest value
    save = lambda epoch, step: run.save(last_pt, "mocov2plus", epoch, step, state,
                                        extra={"queue": queue, "queue_ptr": ptr})

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), momentum.train()  # the key encoder's BN uses batch statistics, like the query one
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            tau = optim.cosine_tau(step, total_steps, args.base_tau, args.final_tau)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                (q1, q2), logits = train_model(views)
                with torch.no_grad():
                    k1, k2 = (F.normalize(momentum(v).float(), dim=1) for v in views)
            # each rank's queries against its own keys and the shared queue: DDP's gradient average
            # then equals the gradient of the loss of the global batch
            loss = mocov2plus_loss(q1, q2, k1, k2, queue[:, 0], queue[:, 1], temperature=args.temperature)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            ptr = enqueue(queue, ptr, torch.stack([k1, k2], dim=1))  # after the loss: no key is its own negative
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            optim.momentum_update(online, momentum, tau)
            step += 1
            if stop := meter.update(step, loss, len(labels), lr, tau=tau):  # averaged over ranks at log steps
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        final = stop == "max_steps" or (finished_epoch and epoch + 1 == args.epochs)
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), evaluation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final, embed=model.projector)
        epoch_summary(run, meter, step, lr, metrics, {"tau": tau})
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
