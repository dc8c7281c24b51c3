"""fp32 against bf16 autocast on this CPU: a plain torch loop (CIFAR-stem ResNet-18, batch 128, channels_last,
forward + backward + SGD step), the two precisions interleaved so that a shared machine's load hits both alike.

    python bench/cpu_precision.py [--batch-size 128] [--steps 10] [--repeats 3] [--threads N] [--clock wall]

Prints one JSON line: the CPU, what torch reports about it, the median seconds per step of each precision and the
ratio fp32 / bf16 (> 1: bf16 is faster). The default clock is the process's CPU time with one thread, which a
machine shared with other jobs disturbs far less than the wall clock does (waiting for a core costs no CPU time).
common.run.resolve_precision's CPU rule rests on these numbers (docs/benchmarks.md)."""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.backbones import build_backbone  # noqa: E402
from common.run import cpu_has_fast_bf16  # noqa: E402


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128, help="[default: %(default)s]")
    p.add_argument("--steps", type=int, default=10, help="timed steps per block [default: %(default)s]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per block [default: %(default)s]")
    p.add_argument("--repeats", type=int, default=3, help="blocks per precision, interleaved [default: %(default)s]")
    p.add_argument("--threads", type=int, default=1, help="[default: %(default)s]")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time "
                   "[default: %(default)s]")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", 32)
    net = net.to(memory_format=torch.channels_last).train()
    head = torch.nn.Linear(512, 10)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    x = torch.randn(opts.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (opts.batch_size,))

    def step(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = head(net(x))
        loss = torch.nn.functional.cross_entropy(logits.float(), y)  # the loss in float32, as in the scripts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    clock = time.process_time if opts.clock == "cpu" else time.perf_counter
    times = {"fp32": [], "bf16": []}
    for _ in range(opts.repeats):
        for dtype in times:
            for i in range(opts.warmup + opts.steps):
                start = clock()
                step(dtype)
                if i >= opts.warmup:
                    times[dtype].append(clock() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
        "auto_picks_bf16": cpu_has_fast_bf16(), "threads": opts.threads, "clock": opts.clock,
        "batch_size": opts.batch_size, "timed_steps_each": len(times["fp32"]),
        "fp32_s_per_step": round(median["fp32"], 4), "bf16_s_per_step": round(median["bf16"], 4),
        "fp32_img_s": round(opts.batch_size / median["fp32"], 1),
        "bf16_img_s": round(opts.batch_size / median["bf16"], 1),
        "speedup_bf16": round(median["fp32"] / median["bf16"], 2)}))


if __name__ == "__main__":
    main()
