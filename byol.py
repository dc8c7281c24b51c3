"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).

Idea: no negatives at all. An online network (backbone, projector, predictor) learns to predict the
projection that a slowly moving target network (an exponential moving average of the online backbone
and projector) gives for another view of the same image. The asymmetry (predictor on one side,
stop-gradient and a momentum encoder on the other) is what keeps the representation from collapsing.

Loss, with p = online prediction, z' = target projection of the other view, sg = stop-gradient:
    byol(p, z') = 2 - 2 * mean_i cos(p_i, sg(z'_i))
    L = byol(p1, z'2) + byol(p2, z'1)        (with multi-crop: every view predicts every other large view)
Target update after every step: xi <- tau * xi + (1 - tau) * theta, tau rising 0.99 -> 1.0 on a cosine.

    python byol.py --dataset synthetic                         # offline CPU demo, minutes
    python byol.py --dataset cifar10                           # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 byol.py --dataset imagenet100 --data-dir /data/imagenet100
    torchrun --nproc_per_node=2 byol.py --dataset imagenet --data-dir /data/imagenet --batch-size 64
"""
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=1.0, weight_decay=1e-5,
                  warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=32, proj_hidden_dim=4096,
                  proj_output_dim=256, pred_hidden_dim=4096, base_tau=0.99, final_tau=1.0),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.5, weight_decay=1e-6,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, proj_hidden_dim=4096,
                     proj_output_dim=256, pred_hidden_dim=8192, base_tau=0.99, final_tau=1.0),
    # ImageNet-1k, scripts/pretrain/imagenet/byol.yaml: 64 per GPU on 2 GPUs (128 on one process) and 16 batches
    # accumulated per optimizer step; LARS eta 0.001 unclipped; the warmup starts at 3e-5 x 16 (solo-learn's
    # base.py multiplies it by accumulate_grad_batches).
    "imagenet1k": dict(backbone="resnet50", epochs=100, batch_size=128, accumulate_steps=16, optimizer="lars",
                       lr=0.45, weight_decay=1e-6, lars_eta=0.001, lars_clip=False, warmup_epochs=10,
                       warmup_start_lr=3e-5 * 16, probe_lr=0.2, preset="asymmetric", crop_size=224,
                       proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, base_tau=0.99, final_tau=1.0),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, proj_hidden_dim=512, proj_output_dim=128, pred_hidden_dim=512, base_tau=0.99,
                      final_tau=1.0, data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("byol", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    add("--pred-hidden-dim", cli.positive_int, "predictor hidden width")
    add("--base-tau", cli.momentum, "target momentum at the first step")
    add("--final-tau", cli.momentum, "target momentum at the last step")
    return cli.resolve(p, argv, "byol", RECIPES)


# ---- heads ----
def mlp(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear: BYOL's projector and predictor."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BYOL(nn.Module):
    """Online network: backbone -> projector -> predictor, plus the online probe on sg(features) of every large
    crop. `target()` builds the momentum copy of backbone + projector."""

    def __init__(self, backbone, feature_dim, proj_hidden, proj_out, pred_hidden, num_classes, num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feature_dim, proj_hidden, proj_out)
        self.predictor = mlp(proj_out, pred_hidden, proj_out)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        predictions = [self.predictor(self.projector(f)) for f in feats]
        return predictions, self.probe(torch.cat(feats[:self.num_large_crops]).detach())

    def target(self):
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))


# ---- loss ----
def byol_loss(p, z):
    """byol(p, z) = 2 - 2 * mean_i cos(p_i, sg(z_i)): 0 when aligned, 4 when opposite; z gets no gradient."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = BYOL(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim,
                 datasets.num_classes, args.num_large_crops)
    target = model.target()  # starts equal to the online backbone + projector
    train_model = prepare_model(model, run)
    target = prepare_model(target, run, trained=False)
    online = nn.Sequential(model.backbone, model.projector)  # the parameters the target follows
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector, model.predictor]),
                                args.weight_decay, exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "target": target, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "byol", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "byol", epoch, step, state)

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train(), target.train()  # the target's BN uses batch statistics, like the online one
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            tau = optim.cosine_tau(step, total_steps, args.base_tau, args.final_tau)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                predictions, logits = train_model(views)
                with torch.no_grad():
                    targets = [target(v) for v in views[:args.num_large_crops]]
            loss = sum(byol_loss(predictions[i], targets[j]) for j in range(len(targets))
                       for i in range(len(predictions)) if i != j)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            optim.momentum_update(online, target, tau)
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
