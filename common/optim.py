"""Optimization: LARS, parameter groups, the per-step warmup-cosine lr and the cosine momentum (tau)."""
import math

import torch


class SGD(torch.optim.SGD):
    """torch's SGD with momentum (foreach, L2 weight decay added to the gradient, no dampening or Nesterov) that takes
    an fp16 GradScaler's scale and inf flag on the device, as torch's fused optimizers do.

    GradScaler.step calls step() directly on an optimizer with `_step_supports_amp_scaling`, after setting
    `self.grad_scale` (the scale, or None when unscale_ already ran: --grad-clip) and `self.found_inf` (the inf flags
    summed over devices). The gradients are unscaled inside the update, and a step that saw an inf or NaN leaves
    parameters and momentum as they were, through torch.where masks: no `.item()` (torch's path for other
    optimizers reads the flag back every step). Not fused: torch's fused SGD skips creating the momentum buffer of a
    parameter whose first gradient comes after the first step (SwAV's prototypes, DINO's last layer) and then fails;
    here a missing buffer starts at zero, which gives the same first step, m * 0 + g = g."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)

    def direction(self, group, params, grads):
        """The gradient the momentum step uses (LARS overrides it): plain SGD adds weight_decay * p."""
        return torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"] else grads

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf > 0  # on the device: never read back
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()  # as GradScaler.unscale_
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if inv_scale is not None:  # in place, as GradScaler.unscale_ does
                torch._foreach_mul_(grads, inv_scale)
            grads = self.direction(group, params, grads)
            bufs = []
            for p in params:
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            momentum, lr = group["momentum"], group["lr"]
            if skip is not None:  # a skipped step: gradient 0, momentum 1, lr 0. A mask, as inf * 0 is NaN: one op
                for g in grads:  # per tensor (no foreach op selects), on gradients spent by this step anyway
                    g.masked_fill_(skip, 0.0)
                momentum, lr = torch.where(skip, 1.0, momentum), torch.where(skip, 0.0, lr)
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            if torch.is_tensor(lr):
                torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))
            else:
                torch._foreach_add_(params, bufs, alpha=-lr)
        return loss


class LARS(SGD):
    """SGD with momentum whose step is rescaled per tensor by the trust ratio (You et al., 2017).

    ratio = min(eta * ||p|| / (||g|| + wd * ||p|| + 1e-8) / lr, 1)   (solo-learn's clip_lr form, the default)
    ratio = eta * ||p|| / (||g|| + wd * ||p|| + 1e-8)                  (clip=False: solo-learn without clip_lr)
    g <- (g + wd * p) * ratio, then the usual SGD momentum step. Groups with `lars_exclude`
    (biases and norm parameters) take the plain SGD step with neither adaptation nor weight decay.
    Under an fp16 GradScaler the ratio is computed from the unscaled gradient (SGD.step unscales first).
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars_weight_decay", weight_decay if not group.get("lars_exclude") else 0.0)
            group.setdefault("eta", eta)
            group.setdefault("lars_clip", clip)

    def direction(self, group, params, grads):
        if group.get("lars_exclude"):
            return grads
        wd, eta, lr = group["lars_weight_decay"], group["eta"], group["lr"]
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
        return grads


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
    # reads them back with .item()), and a GradScaler's inf check folded in instead of read back. SGD: ours, as
    # LARS above (the same inf check on the device; torch's fused SGD fails on a parameter whose first gradient
    # comes late).
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
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
