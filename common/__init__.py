"""Thin helpers shared by the method scripts: data, augmentations, backbones, optimization,
distributed training, online evaluation, checkpoints, plots and logging."""
