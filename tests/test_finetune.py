"""eval/finetune.py and --fraction: layer-decay groups, mixup targets, the class-balanced subset, resume, and a
2-process torchrun run that computes what one process computes."""
import importlib.util
import json
import signal

import pytest
import torch
import torch.nn.functional as F

from common import checkpoint, data
from common.backbones import backbone_metadata, build_backbone
from common.cli import UsageError
from conftest import ROOT, torchrun


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"eval_{name}_finetune_test", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


finetune = load_tool("finetune")


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """common.run.Run installs SIGTERM / SIGINT / SIGUSR1 handlers: give pytest its own back after in-process runs."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def write_backbone(folder, name):
    """A seeded random `name` backbone.pt at 16px (synthetic's recipe crop), as a method script would write it."""
    torch.manual_seed(0)
    net, dim = build_backbone(name, 16)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**backbone_metadata(name, 16, dim, "simclr"), "dataset": "synthetic"}
    checkpoint.export_backbone(folder / "backbone.pt", net, meta)
    return folder / "backbone.pt"


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    return write_backbone(tmp_path_factory.mktemp("resnet"), "resnet_narrow")


def run_finetune(ckpt, out_dir, *extra):
    argv = ["--ckpt", str(ckpt), "--out-dir", str(out_dir), "--device", "cpu", "--precision", "fp32", "--workers", "0",
            "--log-every", "1", *map(str, extra)]  # fp32 on every CPU: the tolerances are float32's
    return finetune.train(finetune.build_parser().parse_args(argv))


# ---- the recipes ----
def test_defaults_are_solo_learns_vit_config_and_simclrs_resnet_protocol():
    # solo-learn scripts/finetune/imagenet-100/mae.yaml: optimizer adamw, lr 5e-4, weight_decay 0.05, layer_decay
    # 0.75, backbone kwargs drop_path_rate 0.1, mixup 0.8, cutmix 1.0, label_smoothing 0.1, max_epochs 100,
    # batch_size 64 (per GPU), warmup_cosine with solo-learn's default warmup_epochs 10.
    assert finetune.RECIPES["transformer"] == dict(
        epochs=100, batch_size=64, optimizer="adamw", lr=5e-4, weight_decay=0.05, layer_decay=0.75, drop_path=0.1,
        mixup=0.8, cutmix=1.0, label_smoothing=0.1, warmup_epochs=10.0)
    # SimCLR appendix B.5: Nesterov momentum, lr 0.05 x batch / 256, no warmup, no regularization at all.
    resnet = finetune.RECIPES["resnet"]
    assert (resnet["optimizer"], resnet["lr"], resnet["warmup_epochs"]) == ("sgd", 0.05, 0.0)
    assert resnet["weight_decay"] == resnet["mixup"] == resnet["cutmix"] == resnet["label_smoothing"] == 0
    assert (finetune.resnet_epochs(0.01), finetune.resnet_epochs(0.1)) == (60, 30)  # B.5: 1% 60 epochs, 10% 30


# ---- layer-wise lr decay ----
def test_layer_decay_groups_by_hand():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, num_classes=0)
    model = finetune.Classifier(vit, 8, 3)
    groups = finetune.param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    got = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in got, "a parameter in two groups"
            got[id(p)] = (group["lr"], group["weight_decay"])
    # By hand, depth L = 2: layer 0 = patch embedding, cls token, position embedding; layer 1 + i = block i; the
    # final norm shares the last block's layer L = 2 (timm's and solo-learn's grouping). Layer j trains at
    # 0.5 ** (2 - j). Weight decay on matrices only, never on 1-D tensors or the cls token / position embedding
    # (timm's no_weight_decay); the head: lr 1 and decay on both (solo-learn's classifier group).
    expected = {}
    for name, p in model.named_parameters():
        if name.startswith("head."):
            expected[name] = (1.0, 0.05)
            continue
        name = name.removeprefix("backbone.")
        layer = 0 if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed") else \
            1 + int(name.split(".")[1]) if name.startswith("blocks.") else 2
        decayed = p.ndim > 1 and name not in ("cls_token", "pos_embed")
        expected["backbone." + name] = (0.5 ** (2 - layer), 0.05 if decayed else 0.0)
    assert {name: got[id(p)] for name, p in model.named_parameters()} == expected  # powers of 2: exact
    assert {lr for lr, _ in expected.values()} == {0.25, 0.5, 1.0}  # every layer was reached


def test_refusals_name_the_flag(resnet_ckpt, tmp_path):
    for flag, value in (("--layer-decay", 0.75), ("--drop-path", 0.1)):
        with pytest.raises(UsageError, match="need a ViT or Swin"):
            run_finetune(resnet_ckpt, tmp_path / "x", flag, value)
    with pytest.raises(UsageError, match="must be even"):
        run_finetune(resnet_ckpt, tmp_path / "x", "--mixup", 0.8, "--batch-size", 15)
    with pytest.raises(UsageError, match="80 training images .* smaller --batch-size"):  # 1% of synthetic's 8000
        run_finetune(resnet_ckpt, tmp_path / "x", "--fraction", 0.01)


# ---- mixup / cutmix targets and the loss ----
def test_mixup_targets_sum_to_one_and_match_the_mixed_images():
    from timm.data import Mixup
    classes, smoothing = 5, 0.1
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=smoothing, num_classes=classes)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])  # each row's label differs from its pair's (row 5 - i)
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    smooth = torch.full((6, classes), smoothing / classes)
    smooth[torch.arange(6), labels] += 1 - smoothing
    kinds = set()
    for step in range(12):
        finetune.seed_step(0, step, 0)
        mixed, targets = mixup(images.clone(), labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))  # 5 float32 terms: default tolerance
        # row 0 on its own class: smoothing / C + lam (1 - smoothing)
        lam = (targets[0, labels[0]].item() - smoothing / classes) / (1 - smoothing)
        torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
        own = (mixed == images).all(dim=(0, 1))  # cutmix: pixels of the image itself, the rest from its pair
        if torch.equal(mixed, torch.where(own, images, images.flip(0))) and 0 < lam < 1:
            assert own.float().mean().item() == pytest.approx(lam, abs=1e-6)  # lam is the box's true share
            kinds.add("cutmix")
        else:  # mixup: every pixel blended, in float32 (|x| < 5: error below 1e-6)
            torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6, rtol=0)
            kinds.add("mixup")
        finetune.seed_step(0, step, 0)  # the same step draws the same
        assert torch.equal(mixup(images.clone(), labels)[1], targets)
    assert kinds == {"mixup", "cutmix"}  # switch_prob 0.5: both kinds in 12 draws (fails with odds 2 ** -11)


def test_loss_smooths_class_indexes_but_not_mixed_targets():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1, 4])
    smooth = torch.full((4, 5), 0.1 / 5)
    smooth[torch.arange(4), labels] += 0.9
    by_hand = -(smooth * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(finetune.finetune_loss(logits, labels, 0.1), by_hand)
    torch.testing.assert_close(finetune.finetune_loss(logits, smooth, 0.1), by_hand)  # soft targets: not again
    torch.testing.assert_close(finetune.finetune_loss(logits, labels), F.cross_entropy(logits, labels))


# ---- the class-balanced fraction ----
def test_fraction_is_class_balanced_and_seeded():
    counts = [100, 50, 30, 7]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)] + [torch.full((9,), -1)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    chosen = data.class_balanced_subset(labels, 0.1, seed=0)
    # round(0.1 n) per class: 10, 5, 3, and 0.7 -> 1; never an unlabelled image; sorted indexes
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [10, 5, 3, 1]
    assert torch.equal(chosen, chosen.sort().values) and len(set(chosen.tolist())) == len(chosen)
    assert torch.equal(chosen, data.class_balanced_subset(labels.tolist(), 0.1, seed=0))  # same seed, same subset
    assert not torch.equal(chosen, data.class_balanced_subset(labels, 0.1, seed=1))
    assert torch.equal(data.class_balanced_subset(labels, 1.0, seed=3), torch.nonzero(labels >= 0).flatten())


def test_linear_and_finetune_train_on_the_fraction():
    linear = load_tool("linear")  # load_splits is what both tools call
    train_set, _, _ = linear.load_splits("synthetic", "", 0, None, 0.1)
    targets = data.load_dataset("synthetic", "", "train", 0).targets
    assert train_set.indices == data.class_balanced_subset(targets, 0.1, 0).tolist()  # the JSONs' train_indexes
    assert torch.bincount(targets[train_set.indices]).tolist() == [80] * 10  # 10% of each class's 800
    fewer, _, _ = linear.load_splits("synthetic", "", 0, 50, 0.1)  # --max-train draws from the fraction
    assert len(fewer) == 50 and set(fewer.indices) < set(train_set.indices)


# ---- resume and DDP ----
TINY = ["--epochs", 2, "--max-train", 64, "--batch-size", 16, "--max-val", 32]


def test_resumed_run_ends_where_the_uninterrupted_one_does(resnet_ckpt, tmp_path):
    mix = ["--mixup", 0.8, "--cutmix", 1.0, "--label-smoothing", 0.1]  # per-step randomness must resume too
    whole = run_finetune(resnet_ckpt, tmp_path / "whole", *TINY, *mix)
    run_finetune(resnet_ckpt, tmp_path / "cut", *TINY, *mix, "--max-steps", 3)  # stops inside epoch 0 of 2
    assert torch.load(tmp_path / "cut" / "last.pt")["step"] == 3
    resumed = run_finetune(resnet_ckpt, tmp_path / "cut", *TINY, *mix)
    # The same steps on the same batches, crops and mixup draws in one process: the same float operations, so the
    # weights (and BatchNorm statistics) are equal exactly, not only close.
    final = [torch.load(tmp_path / d / "last.pt")["model"] for d in ("whole", "cut")]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key
    assert resumed == whole
    result = json.loads((tmp_path / "cut" / "finetune.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1] and result["steps"] == 8
    with pytest.raises(UsageError, match="another subset"):  # a resume on another subset would mix two runs
        run_finetune(resnet_ckpt, tmp_path / "cut", *TINY, *mix, "--fraction", 0.5)


def test_two_processes_compute_what_one_process_computes(tmp_path):
    # A ViT (LayerNorm, no BatchNorm statistics per process), SGD, no mixup or drop path (drawn per process): the
    # global batch of 16 split 8 + 8 gives the same mean gradient as one process up to float32 summation order.
    ckpt = write_backbone(tmp_path / "vit", "vit_tiny")
    flags = ["--epochs", 1, "--max-train", 32, "--max-val", 32, "--optimizer", "sgd", "--lr", 0.5,
             "--warmup-epochs", 0, "--mixup", 0, "--cutmix", 0, "--drop-path", 0]
    torchrun("eval/finetune.py", "--ckpt", ckpt, "--out-dir", tmp_path / "two", "--device", "cpu", "--precision", "fp32",
             "--workers", 0, "--batch-size", 8, *flags)
    run_finetune(ckpt, tmp_path / "one", "--batch-size", 16, *flags)
    one, two = (json.loads((tmp_path / d / "finetune.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"], one["steps"], two["steps"]) == (1, 2, 2, 2)
    assert one["lr"] == two["lr"] == 0.5 * 16 / 256  # scaled by the global batch
    assert two["acc1"] == one["acc1"]
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-5)
    start = torch.load(ckpt)["backbone"]
    weights = [torch.load(tmp_path / d / "last.pt")["model"] for d in ("one", "two")]
    moved = max((weights[0][f"backbone.{k}"] - v).abs().max().item() for k, v in start.items())
    # Gradients differ by ~1e-6 relative (summation order); two steps of lr 0.031 keep the weights within 1e-5,
    # while training moved them by far more.
    assert moved > 1e-3
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-5, rtol=1e-5, msg=key)
