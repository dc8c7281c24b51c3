"""ReSSL: Relational Self-Supervised Learning with Weak Augmentation (Zheng, You, Wang, Qian, Zhang, Wang and Xu,
NeurIPS 2021).

Idea: instead of pulling two views together and pushing other images away, match relations. A momentum
(teacher) encoder embeds a weakly augmented view and measures its similarity to every key in a queue of
past keys; a sharp softmax (T_t = 0.04) of these similarities is the target. The online (student) encoder
sees a strongly augmented view of the same image and must reproduce that distribution over the queue with
a softer softmax (T_s = 0.1). As in the paper and its official code, the relation is taken against the
queue only: the current batch's keys join the queue after the loss, so a key is never compared with itself.
As in solo-learn, both views go through the online backbone: its BatchNorm statistics and the online probe
see the weak view too, while only the strong view's projection enters the loss. The official code sends the
strong view alone through the online encoder: --online-views strong.

Loss, with q = n(proj(strong view)), k = n(proj_m(weak view)), Q the queue of past keys (K x D):
    L = -1/N sum_i sum_j softmax(k_i Q^T / T_t)_j * log softmax(q_i Q^T / T_s)_j     (not symmetrized)
then Q <- gathered k (a ring of 65536). Teacher after every step: xi <- tau xi + (1 - tau) theta, tau 0.99 -> 1.

    python ressl.py --dataset synthetic                        # offline CPU demo, minutes
    python ressl.py --dataset cifar10                          # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 ressl.py --dataset imagenet100 --data-dir /data/imagenet100
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
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="sgd", lr=0.05, weight_decay=1e-4,
                  warmup_epochs=10, probe_lr=0.1, preset="ressl", crop_size=32, student_temperature=0.1,
                  teacher_temperature=0.04, proj_hidden_dim=4096, proj_output_dim=256, queue_size=65536,
                  base_tau=0.99, final_tau=1.0),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                     warmup_epochs=10, probe_lr=0.1, preset="ressl", crop_size=224, student_temperature=0.1,
                     teacher_temperature=0.04, proj_hidden_dim=4096, proj_output_dim=256, queue_size=65536,
                     base_tau=0.99, final_tau=1.0),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW. Two changes, measured at seeds 0-2: a softer teacher (0.085; at 0.04 the targets
    # sharpen the background brightness until kNN falls below the random init) and 40 epochs instead of 20.
    "synthetic": dict(backbone="resnet_narrow", epochs=40, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="ressl", crop_size=16,
                      min_scale=0.3, student_temperature=0.1, teacher_temperature=0.085, proj_hidden_dim=512,
                      proj_output_dim=128, queue_size=4096, base_tau=0.99, final_tau=1.0, data_backend="device",
                      workers=2, online_views="strong"),  # as when its kNN was measured (docs/synthetic.md)
}


def parse_args(argv=None):
    p, add = cli.parser("ressl", __doc__, RECIPES)
    add("--student-temperature", cli.positive_float, "T_s of the online (strong view) relation")
    add("--teacher-temperature", cli.positive_float, "T_t of the momentum (weak view) relation")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (q, k)")
    add("--queue-size", cli.positive_int, "keys in the queue (a multiple of the global batch)")
    add("--base-tau", cli.momentum, "teacher momentum at the first step")
    add("--final-tau", cli.momentum, "teacher momentum at the last step")
    add("--online-views", help="views through the online backbone: both (solo-learn: its BN statistics and the "
        "probe see the weak view too) or strong (official code) [default: both]", choices=("both", "strong"))
    args = cli.resolve(p, argv, "ressl", RECIPES)
    args.online_views = args.online_views or "both"  # solo-learn's, on every dataset
    return args


# ---- heads ----
class ReSSL(nn.Module):
    """Student: backbone -> projector (Linear-ReLU-Linear, no BN), plus the online probe on sg(features).
    forward([strong, weak]) (or [strong]) runs the backbone on each view, so its BN statistics and the probe
    see them all, and projects the strong view alone: the only one the loss uses (the projector has no BN,
    so projecting the weak view would change nothing). `teacher()` builds the momentum copy of backbone +
    projector."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, output_dim))
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def forward(self, views):
        feats = [self.backbone(v) for v in views]  # one call per view: BN statistics per view, as solo-learn
        return self.projector(feats[0]), self.probe(torch.cat(feats).detach())

    def teacher(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))


# ---- loss ----
def ressl_loss(q, k, queue, student_temperature=0.1, teacher_temperature=0.04):
    """Relational loss. q: (N, D) student embeddings of the strong views, k: (N, D) teacher embeddings of the
    weak views, queue: (K, D) unit keys of past batches (the batch's own keys are not in it).
    L = -mean_i sum_j softmax(n(k_i) Q^T / T_t)_j log softmax(n(q_i) Q^T / T_s)_j; k and the queue get no gradient."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
    queue = queue.detach().float()
    target = (k @ queue.T / teacher_temperature).softmax(dim=1)
    return -(target * (q @ queue.T / student_temperature).log_softmax(dim=1)).sum(1).mean()


def check_queue_size(queue_size, global_batch):
    """The ring takes whole global batches: a queue that is not a multiple of one is refused."""
    if queue_size <= 0 or queue_size % global_batch:
        fix = max(1, round(queue_size / global_batch)) * global_batch
        raise cli.UsageError(f"--queue-size {queue_size} is not a positive multiple of the global batch "
                             f"{global_batch} (--batch-size x processes): use e.g. --queue-size {fix}")


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """Write the keys of every rank (all-gathered in rank order) into the ring `queue` (K, D) at row ptr,
    oldest keys out; returns the next ptr. Every rank holds the same queue afterwards."""
    keys = dist.gather(keys.detach().to(queue.dtype))
    queue[ptr:ptr + len(keys)] = keys
    return (ptr + len(keys)) % len(queue)


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights and queue on every rank
    run = Run(args)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("ressl trains on a strong and a weak view: use --num-large-crops 2 --num-small-crops 0")
    check_queue_size(args.queue_size, args.batch_size * run.world_size)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = ReSSL(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes)
    teacher = model.teacher()  # starts equal to the student
    train_model = prepare_model(model, run)
    teacher = prepare_model(teacher, run, trained=False)
    online = nn.Sequential(model.backbone, model.projector)  # the parameters the teacher follows
    # random unit vectors until real keys replace them, as in the official code
    queue = F.normalize(torch.randn(args.queue_size, args.proj_output_dim), dim=1).to(run.device)
    ptr = 0
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "teacher": teacher, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "ressl", state)
        if extra["queue"].shape != queue.shape:
            raise cli.UsageError(f"{path} holds a queue of shape {tuple(extra['queue'].shape)}, not "
                                 f"{tuple(queue.shape)}: resume with its --queue-size and --proj-output-dim")
        queue.copy_(extra["queue"])
        ptr = extra["queue_ptr"]
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "ressl", epoch, step, state, extra={"queue": queue, "queue_ptr": ptr})

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), teacher.train()  # the teacher's BN uses batch statistics, like the student's
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            tau = optim.cosine_tau(step, total_steps, args.base_tau, args.final_tau)
            strong, weak = (run.to_device(v) for v in views)  # the ressl preset: view 1 strong, view 2 weak
            labels = run.labels_to_device(labels)
            with run.autocast():
                q, logits = train_model([strong, weak] if args.online_views == "both" else [strong])
                with torch.no_grad():
                    k = F.normalize(teacher(weak).float(), dim=1)
            # per-sample loss against the shared queue: DDP's gradient average is the global batch's gradient
            loss = ressl_loss(q, k, queue, student_temperature=args.student_temperature,
                              teacher_temperature=args.teacher_temperature)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            ptr = enqueue(queue, ptr, k)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            optim.momentum_update(online, teacher, tau)
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
