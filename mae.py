"""MAE: Masked Autoencoders Are Scalable Vision Learners (He, Chen, Xie, Li, Dollar and Girshick, CVPR 2022).

Idea: hide most of an image and learn to paint it back. The image is cut into patches; a random 75% of them
are dropped per image (per-sample shuffling by the argsort of uniform noise), and the ViT encoder sees only
the visible quarter, which makes it cheap. A light Transformer decoder takes the encoded visible patches,
puts a shared learnt mask token at every dropped position (the inverse shuffle `ids_restore` gives the
original order), adds its own fixed sin-cos position table and predicts every patch's pixels; only the
dropped patches count in the loss. No second view, no negatives, no momentum network: one crop and flip.

Loss, with x the (normalised) crop cut into L patches of P = 3p^2 values, t_n patch n's pixels, m_n = 1 when
patch n is masked, y_n the decoder's prediction, and with --norm-pix-loss (default, as the paper):
    t_n <- (t_n - mean(t_n)) / sqrt(var(t_n) + 1e-6)        (per patch, unbiased var, as the official code)
    loss = sum_{i,n} m_in * mean_k (y_ink - t_ink)^2 / sum_{i,n} m_in   (mean squared error of masked patches)
Masked count per image: L - int(L * (1 - mask_ratio)); the official code and solo-learn round the same way.

Defaults reproduce solo-learn (scripts/pretrain/{cifar,imagenet-100}/mae.yaml, solo/methods/mae.py): AdamW
lr 2e-4, betas (0.9, 0.95), weight decay 0.05 on every parameter (--exclude-bias-norm-wd: the official
code's no decay on biases and norms), decoder 512 wide, 8 blocks, 16 heads; the online probe trains on the
class token of the masked encoding, as solo-learn (--probe-unmasked: an extra full-image pass for it) and
is validated, like kNN, on the full image. The paper's ImageNet-1k recipe: batch 4096, lr 1.5e-4 per 256 images
(scaled like ours), 40 warmup epochs, 800-1600 epochs (`--lr 1.5e-4 --warmup-epochs 40 --epochs 800`), crops of
area 0.2-1 (`--min-scale 0.2`).

    python mae.py --dataset synthetic                          # offline CPU demo
    python mae.py --dataset cifar10                            # solo-learn CIFAR recipe (vit_small, patch 4)
    torchrun --nproc_per_node=2 mae.py --dataset imagenet100 --data-dir /data/imagenet100 --batch-size 128
    torchrun --nproc_per_node=2 mae.py --dataset imagenet --data-dir /data/imagenet --batch-size 64
"""
import argparse
import os

import torch
import torch.nn as nn

from common import checkpoint, cli, optim
from common.backbones import build_backbone, timm_kwargs
from common.data import mix_seed
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
# solo-learn scripts/pretrain/{cifar,imagenet-100,imagenet}/mae.yaml (imagenet-100: 128 per GPU on 2 GPUs = 256;
# imagenet: 64 per GPU on 2 GPUs = 128, its other values the same) and
# augmentations/reconstruction.yaml (one crop, crop and flip only); warmup 10 epochs is solo-learn's default.
_MAE = dict(optimizer="adamw", lr=2e-4, probe_lr=2e-4, weight_decay=0.05, betas=(0.9, 0.95),
            exclude_bias_norm_wd=False, warmup_epochs=10, preset="reconstruction", num_large_crops=1,
            mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True,
            probe_unmasked=False)
RECIPES = {
    "cifar": dict(backbone="vit_small", epochs=1000, batch_size=256, crop_size=32, **_MAE),
    "imagenet": dict(backbone="vit_base", epochs=400, batch_size=256, crop_size=224, warmup_start_lr=0.0, **_MAE),
    "imagenet1k": dict(backbone="vit_base", epochs=400, batch_size=128, crop_size=224, warmup_start_lr=0.0, **_MAE),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least 30% of
    # the image, AdamW lr 2e-3, one warmup epoch; the smallest ViT (16 patches of 4px) and a 2-block decoder.
    "synthetic": dict(backbone="vit_tiny", epochs=20, batch_size=256, crop_size=16, min_scale=0.3,
                      **{**_MAE, "lr": 2e-3, "probe_lr": 2e-3, "warmup_epochs": 1, "decoder_embed_dim": 128,
                         "decoder_depth": 2, "decoder_num_heads": 4}, data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("mae", __doc__, RECIPES)
    add("--mask-ratio", cli.probability, "fraction of each image's patches hidden from the encoder")
    add("--decoder-embed-dim", cli.positive_int, "decoder width (a multiple of 4 and of --decoder-num-heads)")
    add("--decoder-depth", cli.positive_int, "decoder Transformer blocks")
    add("--decoder-num-heads", cli.positive_int, "decoder attention heads")
    add("--norm-pix-loss", help="targets are each patch's pixels normalised by their mean and std (the paper's "
        "best; off: the raw normalised crop)", action=argparse.BooleanOptionalAction)
    add("--betas", cli.momentum, "Adam/AdamW betas (beta1 beta2, each below 1)", nargs=2, metavar=("B1", "B2"))
    add("--exclude-bias-norm-wd", help="no weight decay on biases and LayerNorm parameters (the official code; "
        "solo-learn decays every parameter)", action=argparse.BooleanOptionalAction)
    add("--probe-unmasked", help="train the online probe on a full-image encoder pass (no gradient) instead of "
        "the masked pass's class token (solo-learn)", action=argparse.BooleanOptionalAction)
    args = cli.resolve(p, argv, "mae", RECIPES)
    if not args.backbone.startswith("vit"):
        raise cli.UsageError(f"mae needs a ViT backbone (vit_tiny, vit_small, vit_base), not {args.backbone}")
    if args.num_small_crops:
        raise cli.UsageError("mae reconstructs large crops only: use --num-small-crops 0")
    patch = timm_kwargs(args.backbone, args.crop_size).get("patch_size", 16)  # common.backbones' rule
    if args.crop_size % patch:
        raise cli.UsageError(f"--crop-size {args.crop_size} is not a multiple of the ViT's patch size {patch}")
    patches = (args.crop_size // patch) ** 2
    visible = int(patches * (1 - args.mask_ratio))
    if not 0 < visible < patches:
        raise cli.UsageError(f"--mask-ratio {args.mask_ratio} leaves {visible} of {patches} patches visible: "
                             "the encoder needs one and the loss one masked patch")
    if args.decoder_embed_dim % 4 or args.decoder_embed_dim % args.decoder_num_heads:
        raise cli.UsageError(f"--decoder-embed-dim {args.decoder_embed_dim} must be a multiple of 4 (sin-cos "
                             f"table) and of --decoder-num-heads {args.decoder_num_heads}")
    if max(args.betas) >= 1:
        raise cli.UsageError(f"--betas {' '.join(map(str, args.betas))}: each beta must be below 1")
    return args


# ---- heads: the masked encoder (the timm ViT's own parts) and the decoder ----
def sincos_positions(dim, grid_h, grid_w):
    """MAE's fixed 2-D sin-cos position table, (1 + h*w, dim): a zero row for the class token, then the patches
    in row-major order. Columns [0, dim/2) encode the patch's column j, [dim/2, dim) its row i, each half as
    [sin(pos * omega_k), cos(pos * omega_k)], omega_k = 10000^(-k / (dim/4)), k < dim/4 (the official layout)."""
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
    halves = [pos.flatten()[:, None] * omega for pos in (cols, rows)]
    table = torch.cat([torch.cat([h.sin(), h.cos()], dim=1) for h in halves], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


@torch.no_grad()
def xavier_init_(module):
    """Official MAE's init of Linear layers (Xavier-uniform, q, k, v as one matrix; zero bias) and LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def mae_vit_(vit):
    """MAE's ViT in place (solo-learn's vit_mae.py, as official): the fixed sin-cos table as position embedding
    (never trained), xavier_init_, the patch projection Xavier-uniform as a Linear of its 3p^2 inputs, the class
    token N(0, 0.02^2). The full-image forward (evaluation, backbone.pt) is timm's own, with the same table."""
    vit.pos_embed.copy_(sincos_positions(vit.embed_dim, *vit.patch_embed.grid_size)[None])
    vit.pos_embed.requires_grad_(False)
    xavier_init_(vit)
    weight = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(len(weight), -1))
    nn.init.normal_(vit.cls_token, std=0.02)
    return vit


def random_masking(tokens, mask_ratio, noise):
    """Per-sample shuffle by argsort(noise), keeping the int(L * (1 - mask_ratio)) lowest-noise tokens.
    tokens (N, L, D), noise (N, L). Returns (visible (N, keep, D) in shuffled order, mask (N, L) with 1 where
    masked in the original order, ids_restore (N, L): position of each original token in the shuffle).
    Gathers by index only: no boolean mask, no host sync."""
    n, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    visible = tokens.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    return visible, (ids_restore >= keep).float(), ids_restore  # float32 even under autocast: exact counts


def restore_order(visible, mask_token, ids_restore):
    """Inverse of random_masking: (N, keep, D) visible tokens + the mask token at every dropped position,
    back in the original patch order (N, L, D)."""
    n, length = ids_restore.shape
    filled = torch.cat([visible, mask_token.expand(n, length - visible.shape[1], -1)], dim=1)
    return filled.gather(1, ids_restore[..., None].expand(-1, -1, visible.shape[2]))


def encode_visible(vit, images, mask_ratio, noise):
    """The ViT on the visible patches only, with the timm model's parts: patch embedding plus position table,
    random_masking, the class token (plus its position) in front, blocks, final norm. Returns (tokens
    (N, 1 + keep, D), mask, ids_restore). The crop must have the size the position table was built for."""
    x = vit.patch_embed(images).flatten(1, -2)  # (N, L, D); timm's dynamic-size ViTs give (N, h, w, D)
    x = x + vit.pos_embed[:, 1:]
    visible, mask, ids_restore = random_masking(x, mask_ratio, noise)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1)
    x = vit.norm(vit.blocks(vit.norm_pre(torch.cat([cls, visible], dim=1))))
    return x, mask, ids_restore


class MAEDecoder(nn.Module):
    """solo-learn's MAEDecoder (as official): Linear to the decoder width, mask tokens, a fixed sin-cos table,
    timm Blocks (MLP ratio 4, qkv bias), LayerNorm, and a Linear to each patch's 3p^2 pixels."""

    def __init__(self, in_dim, dim, depth, num_heads, grid_size, patch_size):
        super().__init__()
        from timm.models.vision_transformer import Block  # timm imports slowly: only when a model is built
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_positions(dim, *grid_size)[None])  # fixed: a buffer
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size ** 2 * 3)
        xavier_init_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded, ids_restore):
        """encoded (N, 1 + keep, D_enc) -> predicted pixels of every patch (N, L, 3p^2), class token dropped."""
        x = self.embed(encoded)
        x = torch.cat([x[:, :1], restore_order(x[:, 1:], self.mask_token.to(x.dtype), ids_restore)], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.pred(x[:, 1:])


class MAE(nn.Module):
    """Masked encoder (the backbone, a timm ViT) -> decoder, plus the online probe on the detached class token
    (of the masked pass, solo-learn; of a full-image pass with probe_unmasked)."""

    def __init__(self, vit, decoder_dim, decoder_depth, decoder_heads, num_classes, mask_ratio=0.75,
                 probe_unmasked=False):
        super().__init__()
        self.backbone = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_patches = vit.pos_embed.shape[1] - 1
        self.decoder = MAEDecoder(vit.embed_dim, decoder_dim, decoder_depth, decoder_heads,
                                  vit.patch_embed.grid_size, self.patch_size)
        self.probe = nn.Linear(vit.embed_dim, max(num_classes, 1))
        self.mask_ratio, self.probe_unmasked = mask_ratio, probe_unmasked

    def forward(self, images, noise):
        """images (N, 3, H, W), noise (N, L) -> (predicted patches, mask, probe logits)."""
        encoded, mask, ids_restore = encode_visible(self.backbone, images, self.mask_ratio, noise)
        feats = self.backbone.forward_head(encoded)  # timm's pooling: the class token, as in evaluation
        if self.probe_unmasked:
            with torch.no_grad():
                feats = self.backbone(images)
        return self.decoder(encoded, ids_restore), mask, self.probe(feats.detach())


# ---- loss ----
def patchify(images, patch_size):
    """(N, 3, H, W) -> (N, H/p * W/p, p*p*3): patches in row-major order, each as (row, column, channel)."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def mae_loss(images, pred, mask, patch_size, norm_pix_loss=True):
    """loss = sum_{i,n} m_in mean_k (y_ink - t_ink)^2 / sum_{i,n} m_in, t = patchify(images), each patch normalised
    to (t - mean) / sqrt(var + 1e-6) with norm_pix_loss (unbiased var). pred (N, L, 3p^2), mask (N, L), 1 =
    masked: visible patches carry no loss. The target carries no gradient."""
    target = patchify(images.detach().float(), patch_size)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = MAE(mae_vit_(backbone), args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads,
                datasets.num_classes, args.mask_ratio, args.probe_unmasked)
    if args.compile:  # the training forward calls the ViT's parts, not backbone(): compile the whole model
        model.compile()
    train_model = prepare_model(model, run)
    exclude_1d = args.exclude_bias_norm_wd or args.optimizer == "lars"
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.decoder]), args.weight_decay,
                                exclude_1d=exclude_1d, lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    if args.optimizer in ("adam", "adamw"):
        for g in groups:  # solo-learn passes the betas to the optimizer: every group, the probe's too
            g["betas"] = tuple(args.betas)
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "mae", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "mae", epoch, step, state)

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
            images = torch.cat([run.to_device(v) for v in views])  # every large crop, one batch after another
            labels = run.labels_to_device(labels)
            # masks a function of (seed, batch, rank) alone: a run resumed mid-epoch draws the same ones
            torch.manual_seed(mix_seed("mae", args.seed, run.accumulation.batch_number(step), run.rank))
            noise = torch.rand(len(images), model.num_patches, device=run.device)
            with run.autocast():
                pred, mask, logits = train_model(images, noise)
            # the mean over this rank's masked patches; every rank masks as many, so DDP's gradient average is
            # the mean over all of them: nothing to gather
            loss = mae_loss(images, pred, mask, model.patch_size, norm_pix_loss=args.norm_pix_loss)
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
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final=final)
        epoch_summary(run, meter, step, lr, metrics)
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
