"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie and He, ICCV 2021).

Idea: contrastive learning without a memory queue. The online network (backbone, projector, predictor)
predicts, for each image, the momentum encoder's projection of the other view of that image, against the
momentum projections of every other image of the global batch (all-gathered keys) as negatives. The
momentum encoder is an exponential moving average of the online backbone and projector. For ViTs the
paper freezes a random patch projection (--freeze-patch-embed), which it finds stabilises training;
solo-learn does not, so it is off by default. ViTs get MoCo v3's fixed 2-D sin-cos position embedding and
initialisation (as solo-learn's vit_mocov3.py and the official code).

Loss, with q = n(pred(proj(x))) of this rank's B images, k = n(proj_m(x)) of all W*B images (rank order),
T = temperature, r = this rank, sg = stop-gradient:
    ctr(q, k) = 2T * mean_i -log( exp(q_i.sg(k_{rB+i}) / T) / sum_j exp(q_i.sg(k_j) / T) )
    L = ctr(q1, k2) + ctr(q2, k1)          (the 2T factor as the paper's pseudocode and solo-learn)
Momentum update after every step: xi <- tau * xi + (1 - tau) * theta, tau rising 0.99 -> 1.0 on a cosine.
Temperature 0.2 for every backbone (solo-learn); the official ResNet-50 recipe uses 1.0 (--temperature 1.0).

ViT/Swin backbones switch to solo-learn's mocov3_vit.yaml optimisation (VIT_OVERRIDES: AdamW, lr 3e-4,
weight decay 0.1) for every flag not given, and to the paper's ViT heads (3-layer projector, predictor
ending in BN).

    python mocov3.py --dataset synthetic                          # offline CPU demo, minutes
    python mocov3.py --dataset cifar10                            # solo-learn CIFAR recipe
    torchrun --nproc_per_node=8 mocov3.py --dataset imagenet100 --data-dir /data/imagenet100 --backbone vit_small
"""
import argparse
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
# solo-learn scripts/pretrain/{cifar,imagenet-100}/mocov3.yaml (imagenet-100: 128 per GPU on 2 GPUs = 256).
_MOCOV3 = dict(proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, temperature=0.2, base_tau=0.99,
               final_tau=1.0, freeze_patch_embed=False)
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-6,
                  warmup_epochs=10, probe_lr=0.3, preset="asymmetric", crop_size=32, **_MOCOV3),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-6,
                     warmup_epochs=10, probe_lr=0.3, preset="asymmetric", crop_size=224, **_MOCOV3),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, **{**_MOCOV3, "proj_hidden_dim": 512, "proj_output_dim": 128,
                                        "pred_hidden_dim": 512}, data_backend="device", workers=2),
}
# Transformers: solo-learn scripts/pretrain/imagenet-100/mocov3_vit.yaml (vit_small, 128 per GPU on 8 GPUs):
# AdamW, lr 3e-4, weight decay 0.1, classifier lr 3e-4. Applied to flags not given, whatever the dataset.
VIT_OVERRIDES = dict(optimizer="adamw", lr=3e-4, weight_decay=0.1, probe_lr=3e-4)
TRANSFORMERS = ("vit", "swin")


def parse_args(argv=None):
    p, add = cli.parser("mocov3", __doc__, {**RECIPES, "vit/swin": VIT_OVERRIDES})
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (q, k)")
    add("--pred-hidden-dim", cli.positive_int, "predictor hidden width")
    add("--temperature", cli.positive_float, "softmax temperature T (the loss is scaled by 2T)")
    add("--base-tau", cli.momentum, "momentum of the momentum encoder at the first step")
    add("--final-tau", cli.momentum, "momentum of the momentum encoder at the last step")
    add("--freeze-patch-embed", help="the paper's frozen random patch projection (ViT/Swin only)",
        action=argparse.BooleanOptionalAction)
    # Parsed twice: the backbone (given or not) decides which recipe fills the other flags.
    backbone = p.parse_args(argv).backbone or ""
    recipes = RECIPES
    if backbone.startswith(TRANSFORMERS):
        recipes = {family: {**recipe, **VIT_OVERRIDES} for family, recipe in RECIPES.items()}
    args = cli.resolve(p, argv, "mocov3", recipes)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("mocov3 trains on two views: use --num-large-crops 2 --num-small-crops 0")
    if args.freeze_patch_embed and not args.backbone.startswith(TRANSFORMERS):
        raise cli.UsageError(f"--freeze-patch-embed needs a ViT or Swin backbone, not {args.backbone}")
    return args


# ---- heads ----
def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """num_layers Linear layers without bias, BN-ReLU between them; with last_bn a BN without affine at the end
    (SimCLR's design, as MoCo v3)."""
    layers = []
    for i in range(num_layers):
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim,
                                bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class MoCoV3(nn.Module):
    """Online network: backbone -> projector -> predictor, plus the online probe on sg(features) of both crops.
    ResNets: 2-layer projector and a predictor without final BN; transformers: 3-layer projector, and the
    predictor ends in BN (the paper's and solo-learn's two designs). `momentum_encoder()` copies backbone +
    projector."""

    def __init__(self, backbone, feature_dim, proj_hidden, proj_out, pred_hidden, num_classes, transformer=False):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(3 if transformer else 2, feature_dim, proj_hidden, proj_out)
        self.predictor = mlp(2, proj_out, pred_hidden, proj_out, last_bn=transformer)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.predictor(self.projector(f)) for f in feats], self.probe(torch.cat(feats).detach())

    def momentum_encoder(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))


@torch.no_grad()
def mocov3_vit_(vit, base=10000.0):
    """MoCo v3's ViT, in place: a fixed (not learnt) 2-D sin-cos position embedding, zero for the class token,
    and the official initialisation (Xavier-uniform Linear layers, q, k and v each as its own matrix; the patch
    projection Xavier-uniform as a Linear of its 3*p*p inputs; class token N(0, 1e-6^2)); biases zero."""
    h, w = vit.patch_embed.grid_size
    dim = vit.embed_dim
    omega = 1.0 / base ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    vit.pos_embed.copy_(torch.cat([torch.zeros(1, dim), table])[None])
    vit.pos_embed.requires_grad_(False)
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            fan_out = m.weight.shape[0] // 3 if "qkv" in name else m.weight.shape[0]
            bound = math.sqrt(6.0 / (fan_out + m.weight.shape[1]))
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * proj.kernel_size[0] * proj.kernel_size[1] + dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    return vit


# ---- loss ----
def mocov3_loss(q1, q2, k1, k2, temperature=0.2, rank=0):
    """L = ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = 2T * CE(n(q) n(sg(k))^T / T, rank * B + arange(B)).
    q_v: (B, D) this rank's predictions of view v; k_v: (W*B, D) momentum projections of view v from all W
    ranks in rank order, so row i of this rank's queries has its positive at row rank * B + i. Only q learns."""
    def ctr(q, k):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        positives = torch.arange(len(q), device=q.device) + rank * len(q)
        return F.cross_entropy(q @ k.T / temperature, positives) * (2 * temperature)
    return ctr(q1, k2) + ctr(q2, k1)


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    transformer = args.backbone.startswith(TRANSFORMERS)
    if args.backbone.startswith("vit"):
        mocov3_vit_(backbone)
    if args.freeze_patch_embed:  # the paper's random patch projection: never trained
        backbone.patch_embed.proj.requires_grad_(False)
    model = MoCoV3(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim,
                   datasets.num_classes, transformer)
    momentum = model.momentum_encoder()  # starts equal to the online backbone + projector
    train_model = prepare_model(model, run)
    momentum = prepare_model(momentum, run, trained=False)
    online = nn.Sequential(model.backbone, model.projector)  # the parameters the momentum encoder follows
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector, model.predictor]),
                                args.weight_decay, exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "momentum": momentum, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "mocov3", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "mocov3", epoch, step, state)

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), momentum.train()  # the momentum encoder's BN uses batch statistics, like the online one
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
                    k1, k2 = (momentum(v) for v in views)
            # keys of every rank, in rank order: the other images of the global batch are the negatives
            k1, k2 = dist.gather(k1.float()), dist.gather(k2.float())
            loss = mocov3_loss(q1, q2, k1, k2, temperature=args.temperature, rank=run.rank)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            optim.momentum_update(online, momentum, tau)
            step += 1
            if stop := meter.update(step, loss, len(labels), lr, tau=tau):
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
