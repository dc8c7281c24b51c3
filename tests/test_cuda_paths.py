"""The CUDA-only decisions, checked on the CPU: TF32 off inside the float32 losses, SwAV's and DINO's sharpened
logits in float32 under autocast, one precision rule for training and eval/, --compile whole and never around
SyncBatchNorm, and images/s that does not count the epoch-end evaluation."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from barlow_twins import barlow_twins_loss
from common import run as run_lib
from common.backbones import build_backbone
from common.cli import UsageError
from dino import DINOHead
from swav import SwAV
from vibcreg import IterNorm, vibcreg_loss
from vicreg import vicreg_loss

ROOT = Path(__file__).resolve().parents[1]


class TF32AtMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records torch.backends.cuda.matmul.allow_tf32 as every matrix product (mm, bmm, addmm, baddbmm) runs: on the
    CPU the flag changes no value, so what the loss code sets it to is observed from inside."""
    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "mm" in func.__name__.split(".")[0]:
            self.flags.append(torch.backends.cuda.matmul.allow_tf32)
        return func(*args, **(kwargs or {}))


def iternorm_forward(z1, z2):
    return IterNorm(8, num_groups=2).train()(torch.cat([z1, z2]))


@pytest.mark.parametrize("loss", [barlow_twins_loss, vicreg_loss, vibcreg_loss, iternorm_forward],
                         ids=["barlow_twins", "vicreg", "vibcreg", "iternorm"])
def test_float32_losses_run_without_tf32(loss, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    reference = loss(z1, z2)
    torch.backends.cuda.matmul.allow_tf32 = True  # as Run sets it on CUDA (monkeypatch restores it)
    with TF32AtMatmuls() as seen:
        value = loss(z1, z2)
    assert seen.flags and not any(seen.flags)  # every product ran with TF32 off...
    assert torch.backends.cuda.matmul.allow_tf32  # ...and the global flag is back on afterwards
    assert torch.equal(value, reference)


def test_full_float32_restores_the_flag_after_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    with pytest.raises(RuntimeError):
        barlow_twins_loss(torch.zeros(4, 3), torch.zeros(4, 5))  # mismatched widths
    assert torch.backends.cuda.matmul.allow_tf32


def test_swav_and_dino_logits_are_float32_under_bf16_autocast():
    """The scores are divided by T = 0.04-0.1 before a softmax: bf16's 3 digits would become the logits' error.
    Under CPU bf16 autocast the outputs must be float32 and equal the float32 computation on the same inputs."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    swav = SwAV(backbone, 10, hidden_dim=16, output_dim=8, num_prototypes=5, num_classes=3)
    views = [torch.randn(4, 3, 2, 2) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, scores, _ = swav(views)
    for zv, s in zip(z, scores):
        assert zv.dtype == s.dtype == torch.float32
        assert torch.equal(s, zv @ swav.prototypes.weight.T)
    head = DINOHead(10, 16, 8, 5)
    x = torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        hidden = head.mlp(x)  # bf16 under autocast, as in training
    assert logits.dtype == torch.float32
    expected = F.normalize(hidden.float(), dim=-1) @ F.normalize(head.last_layer.weight, dim=1).T
    assert torch.allclose(logits, expected, rtol=0, atol=1e-6)  # float32 rounding of a 8-term dot product


def test_one_precision_rule_for_training_and_eval(monkeypatch):
    """--precision auto: bf16 where the GPU has it natively, fp16 on a V100/T4 (bf16 there is emulated, slowly);
    eval/ follows the same function instead of its own is_bf16_supported() (which counts emulation)."""
    for native, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
        assert run_lib.resolve_precision("auto", "cuda") == expected
    for fast_bf16, expected in ((False, "fp32"), (True, "bf16")):  # AVX2 only; AMX or AVX512-BF16
        monkeypatch.setattr(run_lib, "cpu_has_fast_bf16", lambda: fast_bf16)
        assert run_lib.resolve_precision("auto", "cpu") == expected
    assert run_lib.AMP_DTYPES.get("fp32") is None
    for fast_bf16, expected in ((False, None), (True, torch.bfloat16)):  # the eval tools' frozen forward passes
        monkeypatch.setattr(run_lib, "cpu_has_fast_bf16", lambda: fast_bf16)
        _, ctx = run_lib.frozen_forward(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert (ctx["autocast"] and ctx["autocast"]().fast_dtype) == expected
    for script in ("linear", "knn", "umap"):
        source = (ROOT / "eval" / f"{script}.py").read_text()
        assert "is_bf16_supported" not in source and "frozen_forward(backbone, device)" in source, script


def test_compile_refuses_sync_batchnorm_and_compiles_whole():
    backbone, _ = build_backbone("resnet_narrow", 16)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(build_backbone("resnet_narrow", 16)[0])
    with pytest.raises(UsageError, match="--compile with several GPUs.*SyncBatchNorm"):
        run_lib.compile_backbone(synced)
    run_lib.compile_backbone(backbone)  # lazy: compiles at the first call
    assert backbone._compiled_call_impl is not None
    # What fullgraph=True promises, traced by Dynamo alone (the eager backend: no code generation, seconds): the
    # training-mode ResNet has no graph break. Batch statistics make both outputs functions of the batch alone.
    eager, _ = build_backbone("resnet_narrow", 16)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    try:
        traced = torch.compile(eager, backend="eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(traced, eager(x), rtol=0, atol=1e-5)


def test_images_per_second_stops_before_evaluation(monkeypatch):
    """2 steps of 8 images at t = 101 and 102 (start 100): 16 images in 2 s = 8 images/s, whatever the time the
    evaluation then takes (here 98 s, which would give 16 / 100 s = 0.16 if counted)."""
    times = [100.0, 101.0, 102.0]  # the meter's start, then one reading per step; the evaluation ends at 200
    monkeypatch.setattr(run_lib.time, "time", lambda: times.pop(0) if times else 200.0)
    logged = []
    run = SimpleNamespace(device=torch.device("cpu"), world_size=1, is_main=False, stop_signal=None,
                          accumulation=run_lib.Accumulation(1, 1),
                          args=SimpleNamespace(max_steps=0, log_every=1000, umap_every=-1),
                          read_flags=lambda values: ([float(v) for v in values], None, False),
                          raise_if_nonfinite=lambda bad: None, log=logged.append, print=lambda *a: None)
    meter = run_lib.StepMeter(run, 0, bar=None)
    for step in (1, 2):
        assert meter.update(step, torch.tensor(1.0), 8, 0.1) is None
    run_lib.epoch_summary(run, meter, 2, 0.1, {"probe_acc1": 0.5})  # after evaluate(): t = 200
    assert logged[0]["images_per_s"] == pytest.approx(8.0)
