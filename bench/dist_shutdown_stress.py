"""Stress the end of two-process runs: the tests' torchrun workers started RUNS times, PARALLEL at a time, while a
CPU-bound process keeps the machine busy, counting the runs that fail (rank aborts at shutdown: "terminate called
without an active exception", SIGABRT; see common/dist.exit_process).

    nice -n 10 python bench/dist_shutdown_stress.py [--runs 50] [--parallel 2] [--minutes 20] [--no-load]

Each run is `torchrun --standalone --nproc_per_node=2 tests/dist_noncontrastive.py CHECK OUT` with CHECK cycling
through barlow_twins, vicreg and wmse (DDP, gathers and all-reduces with gradients, then the workers' shutdown).
Stops starting runs after --minutes. Prints one line per failure and a JSON summary; exit status 1 if any failed."""
import argparse
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("barlow_twins", "vicreg", "wmse")


def burn(seconds):
    """The other CPU-heavy process: a busy loop."""
    end = time.time() + seconds
    while time.time() < end:
        sum(i * i for i in range(10000))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="[default: %(default)s]")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time [default: %(default)s]")
    p.add_argument("--minutes", type=float, default=20, help="start no run after this [default: %(default)s]")
    p.add_argument("--no-load", action="store_true", help="without the CPU-bound process")
    opts = p.parse_args()
    start = time.time()
    load = None if opts.no_load else multiprocessing.Process(target=burn, args=(opts.minutes * 60 + 600,), daemon=True)
    if load:
        load.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    checks, running, results = itertools.cycle(CHECKS), [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(opts.runs):
            if time.time() - start > opts.minutes * 60:
                break
            check = next(checks)
            out = os.path.join(tmp, str(i))
            os.makedirs(out)
            log = open(os.path.join(tmp, f"{i}.log"), "w+")
            proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", "tests/dist_noncontrastive.py", check, out],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((i, check, out, proc, log))
            while len(running) >= opts.parallel or (i == opts.runs - 1 and running):
                for item in list(running):
                    if item[3].poll() is not None:
                        running.remove(item)
                        results.append(finished(*item))
                time.sleep(0.2)
        for item in running:
            item[3].wait()
            results.append(finished(*item))
    if load:
        load.terminate()
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"run {r['run']} ({r['check']}): exit {r['exit']}, abort={r['abort']}: {r['tail']}")
    print(json.dumps({"runs": len(results), "failed": len(failed), "aborts": sum(r["abort"] for r in results),
                      "parallel": opts.parallel, "cpu_load": not opts.no_load,
                      "minutes": round((time.time() - start) / 60, 1)}))
    sys.exit(1 if failed else 0)


def finished(i, check, out, proc, log):
    log.seek(0)
    text = log.read()
    log.close()
    abort = "terminate called" in text or "SIGABRT" in text
    saved = all(os.path.exists(os.path.join(out, f"{check}-rank{r}.pt")) for r in range(2))
    return {"run": i, "check": check, "exit": proc.returncode, "abort": abort,
            "ok": proc.returncode == 0 and saved and not abort, "tail": text.strip().splitlines()[-1:] if text else ""}


if __name__ == "__main__":
    main()
