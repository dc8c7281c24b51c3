"""Two gloo processes under torchrun compute what one process computes on the same global batch."""
import torch

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
