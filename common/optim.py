"""Optimization: LARS, parameter groups, the per-step warmup-cosine lr and the cosine momentum (tau)."""
import math

import torch


class LARS(torch.optim.SGD):
    """SGD with momentum whose step is rescaled per tensor by the trust ratio (You et al., 2017).

    ratio = min(eta * ||p|| / (||g|| + wd * ||p|| + 1e-8) / lr, 1)   (solo-learn's clip_lr form, the default)
    ratio = eta * ||p|| / (||g|| + wd * ||p|| + 1e-8)                  (clip=False: solo-learn without clip_lr)
    g <- (g + wd * p) * ratio, then the usual SGD momentum step. Groups with `lars_exclude`
    (biases and norm parameters) take the plain SGD step with neither adaptation nor weight decay.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True):
        # foreach: the multi-tensor momentum step (torch's default on CPU is a per-tensor loop). Not fused: torch's
        # fused SGD skips creating the momentum buffer of a parameter whose first gradient comes after the first
        # step (SwAV's prototypes, DINO's last layer are frozen at first) and then fails.
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0, foreach=True)
        for group in self.param_groups:
            group.setdefault("lars_weight_decay", weight_decay if not group.get("lars_exclude") else 0.0)
            group.setdefault("eta", eta)
            group.setdefault("lars_clip", clip)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group.get("lars_exclude") or not params:
                continue
            wd, eta, lr = group["lars_weight_decay"], group["eta"], group["lr"]
            grads = [p.grad for p in params]
            # All tensors of the group at once: a handful of kernels instead of several per tensor.
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            if group["lars_clip"]:
                ratio = ((eta / max(lr, 1e-12)) * p_norm / (g_norm + wd * p_norm + 1e-8)).clamp(max=1.0)
            else:
                ratio = eta * p_norm / (g_norm + wd * p_norm + 1e-8)
            # A zero weight or gradient tensor keeps ratio 1 (there is nothing to adapt to).
            ratio = torch.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)
            if wd:
                torch._foreach_add_(grads, params, alpha=wd)
            torch._foreach_mul_(grads, ratio.to(grads[0].dtype).unbind())
        return super().step(closure)


def param_groups(module, weight_decay, exclude_1d=True, **group_options):
    """Split a module's trainable parameters into a decayed group and a group of 1-D tensors
    (biases, norm scales) that gets no weight decay and no LARS adaptation when exclude_1d."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if exclude_1d and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, **group_options}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **group_options})
    return groups


def build_optimizer(name, groups, lr, weight_decay, momentum=0.9, eta=0.02, lars_clip=True):
    """groups carry their own "lr"; `lr`/`weight_decay` are the defaults for groups that do not."""
    for g in groups:
        g.setdefault("lr", lr)
        g["base_lr"] = g["lr"]
    if name == "lars":
        for g in groups:  # LARS applies weight decay itself, inside the trust ratio
            g["lars_weight_decay"] = g.pop("weight_decay", weight_decay)
        return LARS(groups, lr=lr, momentum=momentum, eta=eta, clip=lars_clip)
    # Adam(W) fused: a few kernels per step in all, with the step counters on the device (the multi-tensor path
    # reads them back with .item()), and a GradScaler's inf check folded in instead of read back. SGD foreach, as
    # LARS above: fused SGD fails on a parameter whose first gradient comes late.
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adam":  # W-MSE's optimizer: L2 penalty added to the gradient, not decoupled
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {name}")


def warmup_cosine(step, total_steps, warmup_steps, base_lr, start_lr=0.0, final_lr=0.0):
    """Linear warmup from start_lr to base_lr over warmup_steps, then cosine from base_lr to final_lr."""
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, step, total_steps, warmup_steps, start_lr=0.0, final_lr=0.0):
    """Apply warmup_cosine to every group from its own base_lr; groups marked `fixed_lr` keep
    base_lr (SimSiam's predictor). Returns the first group's lr, for logging."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] if g.get("fixed_lr") else warmup_cosine(
            step, total_steps, warmup_steps, g["base_lr"], min(start_lr, g["base_lr"]), final_lr)
    return optimizer.param_groups[0]["lr"]


def cosine_tau(step, total_steps, base_tau, final_tau):
    """Momentum of a target network: base_tau at step 0 rising to final_tau along a half cosine."""
    return final_tau - (final_tau - base_tau) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def momentum_update(online, target, tau):
    """target <- tau * target + (1 - tau) * online, for parameters only (BN buffers stay the target's own):
    one multi-tensor lerp, target + (1 - tau) * (online - target)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1 - tau)
