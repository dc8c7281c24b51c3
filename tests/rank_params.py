"""Run a method script under torchrun and let every rank save its final backbone parameters
(`python rank_params.py METHOD args...`), so a test can check that DDP kept the ranks identical."""
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
module = importlib.import_module(sys.argv[1])
finish = module.finish


def finish_and_save_rank(run, backbone, feature_dim):
    # parameters only: on CPU each rank's BatchNorm keeps running statistics of its own batches
    params = {name: p.detach() for name, p in backbone.named_parameters()}
    torch.save(params, os.path.join(run.args.out_dir, f"backbone-rank{run.rank}.pt"))
    finish(run, backbone, feature_dim)


module.finish = finish_and_save_rank
module.main(sys.argv[2:])
