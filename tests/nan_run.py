"""Run a method script whose loss turns NaN from step FROM on: `python nan_run.py METHOD FROM args...`."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
method, start = sys.argv[1], int(sys.argv[2])
module = importlib.import_module(method)
loss_fn, calls = getattr(module, f"{method}_loss"), [0]


def poisoned(*args, **kwargs):
    calls[0] += 1
    loss = loss_fn(*args, **kwargs)
    return loss * float("nan") if calls[0] > start else loss


setattr(module, f"{method}_loss", poisoned)
module.main(sys.argv[3:])
