"""VIbCReg: Variance-Invariance-better-Covariance Regularization for Self-Supervised Learning on Time Series
(Lee and Aune, 2021; solo-learn's vibcreg.py applies it to images).

Idea: VICReg's three terms (invariance, variance, covariance) on the projections of two views, with two changes
that make the decorrelation work better. The projector ends in IterNorm (Huang et al., CVPR 2019), which whitens
each group of features of the batch by a few Newton iterations towards Sigma^(-1/2); and the covariance term is
taken on feature columns scaled to unit norm, so it penalises correlations (in [-1, 1]) instead of covariances,
whatever the features' scale. No negatives, no predictor, no momentum encoder.

Loss, with z1, z2 the (N, D) projections, Var over the batch (unbiased), eps 1e-4, and zc(z) = z - mean(z)
with every column divided by its L2 norm (so that C(z) = zc^T zc is the correlation matrix):
    inv(z1, z2) = mean_{n,d} (z1_nd - z2_nd)^2                          (this process's batch)
    v(z)        = mean_d ReLU(1 - sqrt(Var(z_d) + eps))                 (all-gathered batch)
    c(z)        = (1 / D^2) * sum_{i != j} C(z)_ij^2                     (all-gathered batch)
    L = 25 * inv + 25 * (v(z1) + v(z2)) + 200 * (c(z1) + c(z2))
as solo-learn (solo/losses/vibcreg.py) and the official code (ML4ITS/vibcreg) compute it, the variance terms
summed over the views. IterNorm (64 groups, 5 iterations, eps 1e-5, running statistics with momentum 0.1, a
learnt per-feature scale and shift) whitens each process's batch: like solo-learn, the layer is not synchronised
across processes. solo-learn's projector uses GELU; the official code ReLU: `--activation relu`.

    python vibcreg.py --dataset synthetic                         # offline CPU demo, minutes
    python vibcreg.py --dataset cifar10                           # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 vibcreg.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import (Run, build_data, epoch_summary, evaluate, finish, full_float32, optimizer_step,
                        prepare_model, probe_loss)

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
_VIBCREG = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=200.0, activation="gelu", iternorm=True, iternorm_groups=64,
                iternorm_iters=5)
RECIPES = {
    # solo-learn scripts/pretrain/cifar/vibcreg.yaml
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                  warmup_epochs=10, probe_lr=0.1, preset="vicreg", crop_size=32, proj_hidden_dim=2048,
                  proj_output_dim=2048, lars_clip=False, **_VIBCREG),  # the one CIFAR yaml without clip_lr
    # solo-learn scripts/pretrain/imagenet-100/vibcreg.yaml (128 per GPU on 2 GPUs: a global batch of 256)
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                     warmup_epochs=10, probe_lr=0.1, preset="vicreg", crop_size=224, proj_hidden_dim=2048,
                     proj_output_dim=2048, lars_clip=True, **_VIBCREG),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW; VICReg's synthetic projector widths.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="vicreg", crop_size=16,
                      min_scale=0.3, proj_hidden_dim=512, proj_output_dim=512, **_VIBCREG, data_backend="device",
                      workers=2, lars_clip=True),
}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def parse_args(argv=None):
    p, add = cli.parser("vibcreg", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width D")
    add("--activation", None, "projector activation: gelu (solo-learn) or relu (official code)",
        choices=tuple(ACTIVATIONS))
    add("--iternorm", None, "end the projector in IterNorm whitening (--no-iternorm: plain linear output)",
        action=argparse.BooleanOptionalAction)
    add("--iternorm-groups", cli.positive_int, "IterNorm groups (features are whitened within a group)")
    add("--iternorm-iters", cli.positive_int, "IterNorm Newton iterations T towards Sigma^(-1/2)")
    add("--sim-coeff", cli.nonneg_float, "weight of the invariance (MSE) term")
    add("--std-coeff", cli.nonneg_float, "weight of the variance term")
    add("--cov-coeff", cli.nonneg_float, "weight of the normalised covariance term")
    args = cli.resolve(p, argv, "vibcreg", RECIPES)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("vibcreg trains on two views: use --num-large-crops 2 --num-small-crops 0")
    return args


# ---- heads ----
def iternorm_groups(num_features, num_groups):
    """(groups, features per group) as solo-learn's IterNorm picks them: ceil(D / num_groups) features a group,
    halved until it divides D. 2048 features in 64 groups: 64 groups of 32."""
    per_group = (num_features - 1) // num_groups + 1
    while num_features % per_group:
        per_group //= 2
    return num_features // per_group, per_group


def whitening_matrix(xc, iters, eps=1e-5):
    """Sigma^(-1/2) of the centred groups xc (G, C, N) by IterNorm's Newton iterations, differentiable.
    Sigma = xc xc^T / N + eps I; with Sigma_N = Sigma / tr(Sigma) (eigenvalues in (0, 1], so the iteration
    converges): P_0 = I, P_{k+1} = (3 P_k - P_k^3 Sigma_N) / 2, and Sigma^(-1/2) ~ P_T / sqrt(tr(Sigma))."""
    eye = torch.eye(xc.shape[1], dtype=xc.dtype, device=xc.device).expand(len(xc), -1, -1)
    sigma = torch.baddbmm(eye, xc, xc.transpose(1, 2), beta=eps, alpha=1 / xc.shape[2])
    trace_inv = 1 / torch.diagonal(sigma, dim1=1, dim2=2).sum(-1, keepdim=True).unsqueeze(-1)  # (G, 1, 1)
    sigma_n, p = sigma * trace_inv, eye
    for _ in range(iters):
        p = torch.baddbmm(p, torch.linalg.matrix_power(p, 3), sigma_n, beta=1.5, alpha=-0.5)
    return p * trace_inv.sqrt()


class IterNorm(nn.Module):
    """Group whitening of a (N, D) batch: features split into consecutive groups, each centred and multiplied by
    its whitening_matrix (batch statistics in training, running ones in eval), then a learnt per-feature scale
    (ones) and shift (zeros). Always float32 (solo-learn: custom_fwd(cast_inputs=float32)), TF32 off."""

    def __init__(self, num_features, num_groups=64, iters=5, eps=1e-5, momentum=0.1):
        super().__init__()
        self.groups, self.per_group = iternorm_groups(num_features, num_groups)
        self.iters, self.eps, self.momentum = iters, eps, momentum
        self.weight, self.bias = nn.Parameter(torch.ones(num_features)), nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(self.groups, self.per_group, 1))
        self.register_buffer("running_wm", torch.eye(self.per_group).repeat(self.groups, 1, 1))

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False), full_float32():  # Newton steps: no TF32
            x = x.float()
            groups = x.T.reshape(self.groups, self.per_group, len(x))  # (G, C, N): group g = features gC..gC+C-1
            if self.training:
                mean = groups.mean(-1, keepdim=True)
                xc = groups - mean
                wm = whitening_matrix(xc, self.iters, self.eps)
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum), self.running_wm.lerp_(wm, self.momentum)
            else:
                xc, wm = groups - self.running_mean, self.running_wm
            return (wm @ xc).reshape(x.shape[1], len(x)).T * self.weight + self.bias


def projector(in_dim, hidden_dim, out_dim, activation="gelu", iternorm=True, groups=64, iters=5):
    """Linear-BN-act-Linear-BN-act-Linear-IterNorm (solo-learn's VIbCReg projector; act GELU there)."""
    act = ACTIVATIONS[activation]
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), act(),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), act(),
                         nn.Linear(hidden_dim, out_dim),
                         IterNorm(out_dim, groups, iters) if iternorm else nn.Identity())


class VIbCReg(nn.Module):
    """Backbone -> projector, plus the online linear probe on sg(features) of every large crop."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes, num_large_crops=2, **head):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(feature_dim, hidden_dim, output_dim, **head)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.projector(f) for f in feats], self.probe(torch.cat(feats[:self.num_large_crops]).detach())


# ---- loss ----
@full_float32()  # no TF32: the (co)variance entries are small, TF32 keeps ~3 digits
def vibcreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=200.0, eps=1e-4):
    """L = sim_coeff * mean (z1 - z2)^2 + std_coeff * (v(z1) + v(z2)) + cov_coeff * (c(z1) + c(z2)),
    v(z) = mean_d ReLU(1 - sqrt(Var(z_d) + eps)) (unbiased Var), c(z) = sum_{i != j} C_ij^2 / D^2 with C the
    correlation matrix of z's features (centred columns scaled to unit norm, then zc^T zc).

    z1, z2: (B, D) projections of this process's images. The invariance term uses them as they are; v and c use
    the batch all-gathered from every rank (gradients flow back through the gather), as solo-learn does."""
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance, covariance = 0.0, 0.0
    for z in (dist.gather(z1), dist.gather(z2)):
        variance = variance + F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()
        zc = F.normalize(z - z.mean(0), dim=0)  # every feature column of unit norm: C holds correlations
        corr = zc.T @ zc
        covariance = covariance + (corr.pow(2).sum() - torch.diagonal(corr).pow(2).sum()) / corr.numel()
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = VIbCReg(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes,
                    args.num_large_crops, activation=args.activation, iternorm=args.iternorm,
                    groups=args.iternorm_groups, iters=args.iternorm_iters)
    train_model = prepare_model(model, run)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}  # IterNorm's running stats: in model
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "vibcreg", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "vibcreg", epoch, step, state)

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
                (z1, z2), logits = train_model(views)
            loss = vibcreg_loss(z1, z2, sim_coeff=args.sim_coeff, std_coeff=args.std_coeff, cov_coeff=args.cov_coeff)
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
