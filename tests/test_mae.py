"""MAE: the loss by hand on a 2-patch image, patch order, masking (counts, restore order, per-sample masks, the
lowest noise kept), gradient paths (visible patches carry no loss; masked pixels never reach the encoder), the
fixed sin-cos tables, the recipes and bad flags, DDP gradients equal one process's (MAE gathers nothing), and
the script end to end with an exact resume. timm is imported by the tests that build a ViT only."""
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from mae import mae_loss, parse_args, patchify, random_masking, restore_order, sincos_positions


def tiny(out_dir, *extra):
    return ["mae.py", *TINY, "--out-dir", out_dir, *extra]


def two_patch_image():
    """(1, 3, 2, 4): with 2px patches, patch 0 is six 0s and six 2s (mean 1, unbiased var 12/11), patch 1 all 5s."""
    image = torch.full((1, 3, 2, 4), 5.0)
    image[..., :2] = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    return image


def test_patchify_cuts_row_major_patches_of_row_column_channel():
    images = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).reshape(2, 3, 4, 8)
    patches = patchify(images, 4)  # 1 x 2 patches of 4 x 4 x 3
    assert patches.shape == (2, 2, 48)
    for j in range(2):
        want = images[:, :, :, 4 * j:4 * j + 4].permute(0, 2, 3, 1).reshape(2, 48)  # (row, column, channel)
        assert torch.equal(patches[:, j], want)


def test_hand_values_on_a_two_patch_image():
    image = two_patch_image()
    zeros, ones = torch.zeros(1, 2, 12), torch.ones(1, 2, 12)
    left_only, right_only, both = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    # normalised patch 0 is +-1 / sqrt(12/11 + 1e-6): predicting 0 costs 1 / (12/11 + 1e-6) per value
    left = 1 / (12 / 11 + 1e-6)
    assert abs(mae_loss(image, zeros, left_only, 2).item() - left) < 1e-6
    # patch 1 is constant: normalised to 0 (0 / sqrt(1e-6)), so predicting 1 costs exactly 1
    assert mae_loss(image, zeros, right_only, 2).item() == 0
    assert abs(mae_loss(image, ones, right_only, 2).item() - 1) < 1e-6
    assert abs(mae_loss(image, ones, both, 2).item() - (left + 1 + 1) / 2) < 1e-5  # patch 0: mean (x - 1)^2 + 1
    # without normalisation: mean of x^2 over patch 0 is (6 * 4) / 12 = 2, over patch 1 it is 25
    assert abs(mae_loss(image, zeros, left_only, 2, norm_pix_loss=False).item() - 2) < 1e-6
    assert abs(mae_loss(image, zeros, both, 2, norm_pix_loss=False).item() - 13.5) < 1e-5
    # the mean runs over masked patches of the whole batch: 3 masked patches -> (left + 1 + 1) / 3 with ones
    batch, masks = torch.cat([image, image]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert abs(mae_loss(batch, ones.repeat(2, 1, 1), masks, 2).item() - (2 * (left + 1) + 1) / 3) < 1e-5


def test_visible_patches_carry_no_loss_and_no_gradient():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 8, 8, generator=g, requires_grad=True)
    _, mask, _ = random_masking(torch.zeros(4, 16, 1), 0.75, torch.rand(4, 16, generator=g))
    pred = torch.randn(4, 16, 12, generator=g, requires_grad=True)
    loss = mae_loss(images, pred, mask, 2)
    loss.backward()
    grad_norms = pred.grad.norm(dim=-1)
    assert torch.all(grad_norms[mask == 0] == 0) and torch.all(grad_norms[mask == 1] > 0)
    assert images.grad is None  # the target is the data, not something to learn
    changed = pred.detach() + 100 * (1 - mask)[..., None]  # any prediction at visible patches
    assert torch.equal(mae_loss(images, changed, mask, 2), loss.detach())
    assert not torch.equal(mae_loss(images, pred.detach() + 1, mask, 2), loss.detach())


@pytest.mark.parametrize("length", [16, 64, 196])  # 16px and 32px crops of 4px patches, 224px of 16px
def test_masking_counts_restore_order_and_per_sample_masks(length):
    g = torch.Generator().manual_seed(length)
    tokens, noise = torch.randn(8, length, 3, generator=g), torch.rand(8, length, generator=g)
    visible, mask, ids_restore = random_masking(tokens, 0.75, noise)
    keep = length - round(0.75 * length)
    assert visible.shape == (8, keep, 3)
    assert torch.equal(mask.sum(1), torch.full((8,), float(length - keep)))  # exactly round(0.75 L) per image
    ids_shuffle = noise.argsort(dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(length).expand(8, -1))  # the inverse
    lowest = noise.topk(keep, dim=1, largest=False).indices  # the kept ones: lowest noise first
    assert torch.equal(visible, tokens.gather(1, lowest[..., None].expand(-1, -1, 3)))
    assert torch.equal(mask.gather(1, lowest), torch.zeros(8, keep))
    restored = restore_order(visible, torch.zeros(1, 1, 3), ids_restore)
    assert torch.equal(restored, tokens * (1 - mask)[..., None])  # visible back in place, mask token elsewhere
    assert len({tuple(m.tolist()) for m in mask}) == 8  # every image its own mask


def test_sincos_table_by_hand():
    table = sincos_positions(8, 2, 3)  # omega = (1, 10000^(-1/2)) = (1, 0.01); 6 patches + the class row
    assert table.shape == (7, 8) and torch.equal(table[0], torch.zeros(8))
    row, col = 1, 2
    want = [math.sin(col), math.sin(col * 0.01), math.cos(col), math.cos(col * 0.01),
            math.sin(row), math.sin(row * 0.01), math.cos(row), math.cos(row * 0.01)]
    assert torch.allclose(table[1 + row * 3 + col], torch.tensor(want), atol=1e-6)


def test_encoder_runs_on_visible_patches_with_the_timm_parts_and_the_probe_reads_the_class_token():
    from dist_mae import tiny_vit
    from mae import MAE, encode_visible
    torch.manual_seed(0)
    vit = tiny_vit(size=16)  # 16 patches of 4px
    assert torch.equal(vit.pos_embed[0], sincos_positions(16, 4, 4)) and not vit.pos_embed.requires_grad
    images = torch.randn(3, 3, 16, 16)
    # nothing masked, identity order: exactly timm's own forward (the same position table and parts)
    full, _, _ = encode_visible(vit, images, 0.0, torch.arange(16.0).expand(3, -1))
    assert torch.allclose(full, vit.forward_features(images), atol=1e-5)
    noise = torch.rand(3, 16)
    encoded, mask, ids_restore = encode_visible(vit, images, 0.75, noise)
    assert encoded.shape == (3, 1 + 4, 16) and torch.equal(mask.sum(1), torch.full((3,), 12.0))
    # masked pixels never reach the encoder; a visible patch's pixels do
    masked_patch, visible_patch = int(mask[0].argmax()), int((1 - mask[0]).argmax())

    def with_patch_changed(n):
        out = images.clone()
        out[0, :, 4 * (n // 4):4 * (n // 4) + 4, 4 * (n % 4):4 * (n % 4) + 4] += 3.0
        return encode_visible(vit, out, 0.75, noise)[0]
    assert torch.allclose(with_patch_changed(masked_patch), encoded, atol=1e-6)
    assert not torch.allclose(with_patch_changed(visible_patch)[0], encoded[0], atol=1e-3)

    model = MAE(vit, 8, 1, 2, num_classes=5)
    assert torch.equal(model.decoder.pos_embed[0], sincos_positions(8, 4, 4))
    pred, mask, logits = model(images, noise)
    assert pred.shape == (3, 16, 48) and logits.shape == (3, 5)
    assert torch.allclose(logits, model.probe(encoded[:, 0]), atol=1e-6)  # the masked pass's class token
    mae_loss(images, pred, mask, model.patch_size).backward()
    assert vit.pos_embed.grad is None and model.probe.weight.grad is None  # fixed table; probe on sg(features)
    assert all(p.grad is not None for p in [*model.decoder.parameters(), vit.cls_token, vit.patch_embed.proj.weight])
    model.probe_unmasked = True  # the full-image class token instead
    assert torch.allclose(model(images, noise)[2], model.probe(vit(images)), atol=1e-5)


def test_recipes_and_bad_flags(tmp_path):
    out = ["--out-dir", str(tmp_path / "x")]
    cifar = parse_args(["--dataset", "cifar10", *out])
    assert (cifar.backbone, cifar.crop_size, cifar.optimizer, cifar.lr, cifar.probe_lr, cifar.weight_decay) == \
        ("vit_small", 32, "adamw", 2e-4, 2e-4, 0.05)
    assert (cifar.betas, cifar.preset, cifar.num_large_crops, cifar.mask_ratio, cifar.norm_pix_loss) == \
        ((0.9, 0.95), "reconstruction", 1, 0.75, True)
    assert (cifar.decoder_embed_dim, cifar.decoder_depth, cifar.decoder_num_heads) == (512, 8, 16)
    imagenet = parse_args(["--dataset", "imagenet100", *out])
    assert (imagenet.backbone, imagenet.crop_size, imagenet.epochs, imagenet.warmup_start_lr) == \
        ("vit_base", 224, 400, 0.0)
    assert parse_args(["--betas", "0.8", "0.9", "--no-norm-pix-loss", *out]).betas == [0.8, 0.9]
    for argv, message in [(["--backbone", "resnet18"], "ViT backbone"), (["--num-small-crops", "2"], "large crops"),
                          (["--crop-size", "18"], "multiple of the ViT's patch size 4"),
                          (["--mask-ratio", "0.99"], "leaves 0 of 16"), (["--mask-ratio", "0"], "leaves 16 of 16"),
                          (["--decoder-num-heads", "3"], "multiple of 4"), (["--betas", "0.9", "1"], "below 1")]:
        with pytest.raises(UsageError, match=message):
            parse_args([*argv, *out])


def test_two_processes_give_the_single_process_gradients(tmp_path):
    from dist_mae import batch, step
    torchrun("tests/dist_mae.py", tmp_path)
    want = step(*batch())
    assert len(want["grads"]) > 10 and "backbone.pos_embed" not in want["grads"]
    for rank in range(2):
        got = torch.load(tmp_path / f"mae-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
        for name, grad in want["grads"].items():
            assert torch.allclose(got["grads"][name], grad, atol=1e-6), name


def test_run_resume_is_exact_end_to_end(tmp_path):
    """Stopped at step 2 (mid-epoch) and resumed to step 6 = one run to step 6: same masks, data and weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with ThreadPoolExecutor(2) as pool:  # the two first runs are independent: overlap their timm imports
        list(pool.map(lambda argv: run_script(*argv), [tiny(straight, "--max-steps", "6"),
                                                         tiny(resumed, "--max-steps", "2")]))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    assert all(math.isfinite(v) and v > 0 for v in a.values())
    la, lb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert all(torch.allclose(la["model"][k].float(), lb["model"][k].float(), atol=1e-6) for k in la["model"])
    assert torch.equal(la["model"]["backbone.pos_embed"][0], sincos_positions(192, 4, 4))  # never trained
    groups = la["optimizer"]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.95)] * len(groups)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0]  # solo-learn: all decayed; not the probe
    args = json.loads((straight / "args.json").read_text())
    assert (args["backbone"], args["preset"], args["num_large_crops"]) == ("vit_tiny", "reconstruction", 1)
    assert any("probe_acc1" in m for m in read_metrics(straight) if m["type"] == "epoch")
    from common.backbones import load_backbone
    net, meta = load_backbone(straight / "backbone.pt")
    assert meta["feature_dim"] == 192 and net(torch.randn(2, 3, 16, 16)).shape == (2, 192)
