"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., ICCV 2021).

Idea: self-distillation with no labels. A student network (backbone + head ending in K prototypes)
learns to match the output distribution that a momentum teacher (an exponential moving average of
the student) gives for another view of the same image. The teacher sees only the large crops, the
student sees every crop (multi-crop), so local views learn to predict the global ones. Collapse is
avoided by centering (subtracting a running mean of the teacher logits, against one dominant
prototype) and sharpening (a low teacher temperature, against the uniform output).

Loss, with s_v = student logits of view v, t_u = teacher logits of large view u, c = center:
    P_t(u) = softmax((t_u - c) / tau_t)   (stop-gradient)     log P_s(v) = log_softmax(s_v / tau_s)
    L = mean over pairs (u large, v any view, v != u) of mean_i [ -sum_k P_t(u)_ik log P_s(v)_ik ]
After every step: c <- m c + (1 - m) mean(teacher logits of all ranks), m = 0.9; teacher <- EMA of
student with momentum 0.9995 -> 1.0 on a cosine; tau_t rises linearly 0.04 -> 0.07 over
--warmup-teacher-temp-epochs, then stays. The prototypes are frozen during the first epoch.

ViT/Swin backbones switch to the official DINO optimization (VIT_OVERRIDES below: AdamW, weight
decay 0.04 -> 0.4 on a cosine, lr 5e-4, clip 3.0) for every flag not given on the command line.

    python dino.py --dataset synthetic                         # offline CPU demo, minutes
    python dino.py --dataset cifar10                           # solo-learn CIFAR recipe
    python dino.py --dataset cifar10 --backbone vit_small --num-small-crops 6
    torchrun --nproc_per_node=4 dino.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import argparse
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
_DINO = dict(proj_hidden_dim=2048, proj_output_dim=256, num_prototypes=4096, base_tau=0.9995, final_tau=1.0,
             student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, center_momentum=0.9,
             freeze_last_layer_epochs=1, use_bn_in_head=False)
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-6,
                  warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=32, **_DINO,
                  warmup_teacher_temp_epochs=0),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-6,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, **_DINO,
                     warmup_teacher_temp_epochs=50),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops, AdamW.
    # 20 epochs are 620 steps, over which a 0.9995 teacher would barely leave its random init;
    # 0.99 (BYOL's base) lets it follow the student. Views inverted with p 0.5, BN in the head, a teacher at 0.02
    # and crops of at least 80% of the image: without them it learnt the background brightness and little else
    # (docs/synthetic.md).
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.8, invert_prob=0.5,
                      **{**_DINO, "proj_hidden_dim": 512, "proj_output_dim": 128, "num_prototypes": 1024,
                         "base_tau": 0.99, "use_bn_in_head": True, "teacher_temp": 0.02},
                      warmup_teacher_temp_epochs=0, data_backend="device", workers=2),
}
# Transformers: facebookresearch/dino main_dino.py defaults (commit 7c446df): AdamW, lr 5e-4 per 256
# images after 10 warmup epochs from 0 (lr_schedule = cosine_scheduler(lr * batch / 256, min_lr 1e-6,
# warmup_epochs=10)), weight decay cosine 0.04 -> 0.4 per step on the weights (not biases and norms),
# --clip_grad 3.0. The probe lr is solo-learn's dino_vit.yaml classifier_lr (an SGD-sized 0.1 is too
# large for Adam). Applied to flags not given on the command line, whatever the dataset.
VIT_OVERRIDES = dict(optimizer="adamw", lr=5e-4, warmup_start_lr=0.0, min_lr=1e-6, weight_decay=0.04,
                     weight_decay_end=0.4, grad_clip=3.0, probe_lr=3e-3)
TRANSFORMERS = ("vit", "swin")


def parse_args(argv=None):
    p, add = cli.parser("dino", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "head hidden width")
    add("--proj-output-dim", cli.positive_int, "head bottleneck width (before the prototypes)")
    add("--num-prototypes", cli.positive_int, "K: output width of the weight-normed last layer")
    add("--use-bn-in-head", help="BatchNorm after the head's hidden layers", action=argparse.BooleanOptionalAction)
    add("--student-temp", cli.positive_float, "student temperature tau_s")
    add("--teacher-temp", cli.positive_float, "teacher temperature tau_t after its warm-up")
    add("--warmup-teacher-temp", cli.positive_float, "teacher temperature at epoch 0")
    add("--warmup-teacher-temp-epochs", cli.nonneg_int, "epochs of linear teacher-temperature warm-up")
    add("--center-momentum", cli.momentum, "momentum m of the center's moving average")
    add("--freeze-last-layer-epochs", cli.nonneg_int, "epochs during which the prototypes get no update")
    add("--base-tau", cli.momentum, "teacher momentum at the first step")
    add("--final-tau", cli.momentum, "teacher momentum at the last step")
    add("--weight-decay-end", cli.nonneg_float,
        "weight decay at the last step, reached on a cosine [default: --weight-decay, constant]")
    # Parsed twice: the backbone (given or not) decides which recipe fills the other flags.
    backbone = p.parse_args(argv).backbone or ""
    recipes = RECIPES
    if backbone.startswith(TRANSFORMERS):
        recipes = {family: {**recipe, **VIT_OVERRIDES} for family, recipe in RECIPES.items()}
    args = cli.resolve(p, argv, "dino", recipes)
    if args.weight_decay_end is None:
        args.weight_decay_end = args.weight_decay
    if args.num_large_crops + args.num_small_crops < 2:
        raise cli.UsageError("DINO needs two views or more: raise --num-large-crops or --num-small-crops")
    return args


# ---- heads ----
class NormalizedLinear(nn.Linear):
    """Linear without bias whose rows (prototypes) are used at unit norm: weight_norm with g fixed to 1,
    W = V / ||V||_row. V is stored as a plain `weight`, so the state dict is an nn.Linear's (no
    g/v pair whose key names differ between torch's two weight_norm APIs, no frozen g to keep at 1)."""

    def __init__(self, in_dim, out_dim):
        super().__init__(in_dim, out_dim, bias=False)

    def forward(self, x):  # float32 whatever the autocast: the logits are divided by temperatures of 0.04-0.1
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """F -> hidden -GELU-> hidden -GELU-> bottleneck, n(), then K unit-norm prototypes; BN after the
    hidden layers only with use_bn (the official --use_bn_in_head, off by default)."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, num_prototypes, use_bn=False):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if use_bn else nn.Identity
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 norm(), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:  # the paper's init; the last layer keeps nn.Linear's, as in the official code
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, num_prototypes)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x).float(), dim=-1))


class DINO(nn.Module):
    """Student: backbone -> DINO head, plus the online probe on sg(features) of every large crop.
    `teacher()` builds the momentum copy of backbone + head."""

    def __init__(self, backbone, feature_dim, hidden_dim, bottleneck_dim, num_prototypes, num_classes, use_bn=False,
                 num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.head = DINOHead(feature_dim, hidden_dim, bottleneck_dim, num_prototypes, use_bn)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.head(f) for f in feats], self.probe(torch.cat(feats[:self.num_large_crops]).detach())

    def teacher(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.head))


def cancel_last_layer_grad(head):
    """before_step hook of the frozen epochs: with no gradient the optimizer leaves the prototypes
    (weight decay included) untouched, which the paper finds stabilises the start of training."""
    for p in head.last_layer.parameters():
        p.grad = None


# ---- loss ----
def dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.07):
    """student: V_s logit tensors (B, K), the large crops first; teacher: V_t tensors (B, K) of the large
    crops (teacher[u] and student[u] are the same crop); center: (K,). Teacher and center get no gradient.
    L = mean over pairs (u, v), v != u, of mean_i -sum_k softmax((t_u - c) / tau_t)_ik
        * log_softmax(s_v / tau_s)_ik."""
    targets = [F.softmax((t.float() - center).detach() / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    terms = [-(q * log_p).sum(dim=-1).mean() for u, q in enumerate(targets)
             for v, log_p in enumerate(log_probs) if v != u]
    return sum(terms) / len(terms)


@torch.no_grad()
def update_center(center, teacher, momentum=0.9):
    """c <- m c + (1 - m) mean of the teacher logits (rows of every view; all-reduced over ranks, so
    every rank holds the same center). teacher: (..., K). Returns the new center."""
    batch_mean = dist.all_reduce_mean(teacher.float().reshape(-1, teacher.shape[-1]).mean(dim=0))
    return center * momentum + batch_mean * (1 - momentum)


def teacher_temperature(epoch, warmup_epochs, start=0.04, final=0.07):
    """Linear from `start` at epoch 0 to `final` at epoch warmup_epochs - 1 (np.linspace in the official
    code), then constant; no warm-up when warmup_epochs is 0."""
    if epoch >= warmup_epochs:
        return final
    return start + (final - start) * epoch / max(warmup_epochs - 1, 1)


def set_weight_decay(optimizer, weight_decay):
    """Scheduled weight decay of the decayed group (biases, norms and the probe stay at 0); LARS keeps
    its decay under its own key."""
    for g in optimizer.param_groups:
        if g.get("scheduled_wd"):
            g["lars_weight_decay" if "lars_weight_decay" in g else "weight_decay"] = weight_decay


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = DINO(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.num_prototypes,
                 datasets.num_classes, args.use_bn_in_head, args.num_large_crops)
    teacher = model.teacher()  # starts equal to the student's backbone + head
    train_model = prepare_model(model, run)
    teacher = prepare_model(teacher, run, trained=False)
    student = nn.Sequential(model.backbone, model.head)  # the parameters the teacher follows
    # biases and norms get no weight decay with any optimizer (official DINO's get_params_groups)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.head]), args.weight_decay,
                                lr=run.scale_lr(args.lr))
    groups[0]["scheduled_wd"] = True
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "teacher": teacher, "optimizer": optimizer, "scaler": run.scaler}
    center = torch.zeros(args.num_prototypes, device=run.device)
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, extra = checkpoint.load(path, "dino", state)
        center = extra["center"].to(run.device)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "dino", epoch, step, state, extra={"center": center})

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), teacher.train()  # the teacher's BN uses batch statistics, like the student's
        # the schedules (temperature per epoch; lr, tau, weight decay per step) are Python numbers, never tensors
        temp = teacher_temperature(epoch, args.warmup_teacher_temp_epochs, args.warmup_teacher_temp, args.teacher_temp)
        freeze = (lambda: cancel_last_layer_grad(model.head)) if epoch < args.freeze_last_layer_epochs else None
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            tau = optim.cosine_tau(step, total_steps, args.base_tau, args.final_tau)
            wd = optim.cosine_tau(step, total_steps, args.weight_decay, args.weight_decay_end)  # same half cosine
            set_weight_decay(optimizer, wd)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                student_logits, logits = train_model(views)
                with torch.no_grad():
                    teacher_logits = [teacher(v) for v in views[:args.num_large_crops]]
            loss = dino_loss(student_logits, teacher_logits, center, student_temp=args.student_temp,
                             teacher_temp=temp)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip,
                                     freeze)
            # all-reduced on the device (no host sync): every rank holds the same center
            center = update_center(center, torch.stack(teacher_logits), momentum=args.center_momentum)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            optim.momentum_update(student, teacher, tau)
            step += 1
            if stop := meter.update(step, loss, len(labels), lr, tau=tau, weight_decay=wd, teacher_temp=temp):
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        final = stop == "max_steps" or (finished_epoch and epoch + 1 == args.epochs)
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), evaluation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final, embed=model.head.mlp)
        epoch_summary(run, meter, step, lr, metrics, {"tau": tau, "teacher_temp": temp, "weight_decay": wd})
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
