"""Distributed helpers: set-up from torchrun's environment, gathers that keep gradients, all-reduces.

Every function is a no-op (or the identity) in a single process, so method code reads the same
with and without torchrun.
"""
import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist

# How long a collective may wait for its slowest rank before the run fails. Every rank evaluates its share, but
# rank 0 alone draws UMAP and writes last.pt and backbone.pt while the others wait in their next collective; on
# ImageNet-size sets that can take minutes, and NCCL's default of 10 minutes killed runs at their final evaluation.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)


def setup(device="auto"):
    """Initialise the process group when launched by torchrun; returns (rank, world_size, device).

    NCCL on CUDA, gloo on CPU, with PROCESS_GROUP_TIMEOUT. Each process drives the GPU of its LOCAL_RANK.
    """
    device = resolve_device(device).type
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    return rank, world_size, torch.device(device)


def resolve_device(name):
    """--device auto|cpu|cuda -> torch.device: auto is CUDA when present; cuda without a GPU is a UsageError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from common.cli import UsageError
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return torch.device(name)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    """Rank 0 alone prints, logs and writes files."""
    return get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the sum, over all ranks, of the gradient that
    flowed into its slice: every rank's loss depends on every rank's samples."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):
    """Concatenate x (same shape on every rank) from all ranks along dim 0, in rank order.
    Gradients flow back to each rank's own slice."""
    if not is_distributed():
        return x
    if x.requires_grad:
        return _GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_sum(x):
    """Sum of x over ranks (a new tensor; no gradient)."""
    if is_distributed():
        x = x.detach().clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Mean of x over ranks (a new tensor; no gradient)."""
    return all_reduce_sum(x) / get_world_size()


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is a sum too: d(sum_r x_r)/dx_r = 1 for every rank's loss."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(x):
    """Sum of x over ranks that keeps gradients (Barlow Twins' cross-correlation, for example)."""
    return _AllReduceWithGrad.apply(x) if is_distributed() else x


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    """Leave the process group: a barrier first, so that no rank tears its sockets down while another still has a
    collective in flight, then destroy_process_group."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(status=0):
    """End a torchrun process now, skipping the interpreter's teardown (after cleanup(); atexit functions still run,
    streams are flushed, DataLoader workers stopped).

    Why: runs and the two-process tests aborted now and then on a loaded machine after their results were saved
    ("terminate called without an active exception", SIGABRT; torchrun then reports the run failed). Once a
    DistributedDataParallel has used the gloo group, destroy_process_group does not end the group's threads (its
    pt_gloo_runloop and gloo_tcp_loop threads are still there after destroy, del and gc.collect(): measured), so they
    live into the interpreter's teardown and C++ exit. The likely path (no core dump was caught): a thread that still
    holds a collective's tensors (it frees them after waking the caller, late when descheduled) needs the GIL of a
    finalizing interpreter, which ends it with pthread_exit; unwinding that through C++ noexcept code is
    std::terminate. Skipping the teardown leaves no such window, whichever thread it was."""
    from common.cli import stop_worker_processes
    stop_worker_processes()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)
