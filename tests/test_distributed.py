"""Two gloo processes under torchrun compute what one process computes on the same global batch; prepare_model's
SyncBatchNorm and --compile on one process."""
from types import SimpleNamespace

import pytest
import torch

from common.run import prepare_model
from conftest import torchrun
from simclr import simclr_loss


def run_check(name, tmp_path):
    torchrun("tests/dist_worker.py", name, tmp_path)
    return [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(2)]


def test_simclr_loss_and_gradients_match_single_process(tmp_path):
    ranks = run_check("simclr_gather", tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)  # same seed -> same initial weights as in the workers
    g = lambda s: torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
    loss = simclr_loss(model(torch.cat([g(1), g(2)])), torch.arange(8).repeat(2), temperature=0.5)
    loss.backward()
    for r in ranks:  # 2 x B/2 gives the loss of 1 x B, and DDP-averaged gradients equal the single-process ones
        assert torch.allclose(r["loss"], loss.detach(), atol=1e-6)
        for got, want in zip(r["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(got, want, atol=1e-6)


def test_reductions(tmp_path):
    for r in run_check("reductions", tmp_path):
        assert torch.equal(r["sum"], torch.tensor([3.0, 10.0]))
        assert torch.equal(r["mean"], torch.tensor([1.5, 5.0]))
        assert torch.equal(r["gathered"], torch.tensor([[1.0, 0.0], [2.0, 10.0]]))


class CompileSpy:
    """Stands in for torch.compile (which Module.compile calls): records each module compiled and whether it held
    SyncBatchNorm by then, and returns a wrapper that counts the calls taking the compiled path."""

    def __init__(self):
        self.compiled, self.had_sync_bn, self.calls = [], [], 0

    def __call__(self, call_impl, **kwargs):
        module = call_impl.__self__
        self.compiled.append(module)
        self.had_sync_bn.append(any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()))

        def compiled(*args, **kw):
            self.calls += 1
            return call_impl(*args, **kw)
        return compiled


def byol_pair():
    import byol
    from common.backbones import build_backbone
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("resnet_narrow", 16)
    model = byol.BYOL(backbone, feature_dim, 32, 16, 32, num_classes=10)
    return model, model.target()  # the target: nn.Sequential(backbone copy, projector copy)


def fake_run(compile, world_size=1, device="cpu"):
    return SimpleNamespace(device=torch.device(device), world_size=world_size,
                           args=SimpleNamespace(channels_last=False, compile=compile))


@pytest.mark.parametrize("compile", [False, True])
def test_prepare_model_compiles_online_and_target_backbones_in_place(compile, monkeypatch):
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    model, target = byol_pair()
    keys = (list(model.state_dict()), list(target.state_dict()))
    train_model = prepare_model(model, fake_run(compile))
    prepared_target = prepare_model(target, fake_run(compile), trained=False)
    assert train_model is model and prepared_target is target  # one process: no wrapper
    assert (list(model.state_dict()), list(target.state_dict())) == keys  # checkpoints load either way
    assert spy.compiled == ([model.backbone, target[0]] if compile else [])  # the heads stay eager
    assert not any(p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in model.parameters())
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    with torch.no_grad():
        target(views[0])
        model(views)
    assert spy.calls == (3 if compile else 0)  # the compiled path is the one forward takes: 1 target + 2 online


def test_prepare_model_converts_to_sync_batchnorm_and_refuses_to_compile_it(monkeypatch):
    """Under DDP on GPUs (faked here: the move to the device is skipped) BN becomes SyncBatchNorm, which
    torch.compile cannot compile whole: --compile is refused with one line (compile_backbone) before compiling."""
    from common.cli import UsageError
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    _, target = byol_pair()
    keys = list(target.state_dict())
    monkeypatch.setattr(target, "to", lambda *args, **kwargs: target)
    with pytest.raises(UsageError, match="--compile with several GPUs.*SyncBatchNorm"):
        prepare_model(target, fake_run(True, world_size=2, device="cuda"), trained=False)
    assert spy.compiled == []
    assert not any(type(m) is torch.nn.BatchNorm2d or type(m) is torch.nn.BatchNorm1d for m in target.modules())
    assert list(target.state_dict()) == keys


def test_auto_precision_is_native_bf16_else_fp16_on_cuda_and_bf16_on_cpus_with_native_bf16(monkeypatch):
    from common.cli import UsageError
    from common.run import resolve_precision
    asked = []

    def bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # a V100 / T4: bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert resolve_precision("auto", "cuda") == "fp16" and asked == [False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert resolve_precision("auto", "cuda") == "bf16"
    for amx, avx512_bf16, want in ((True, True, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        # Sapphire Rapids (AMX); AMD EPYC Zen 4 (AVX512-BF16, no AMX); AVX2 only or AVX-512 without BF16
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert resolve_precision("auto", "cpu") == want, (amx, avx512_bf16)
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(UsageError):
        resolve_precision("fp16", "cpu")
