"""Every recipe default against solo-learn HEAD (9187ea3), field by field.

SOLO below writes out, per method, what solo-learn's configs and code set for the CIFAR recipe
(scripts/pretrain/cifar/<file>), the ImageNet-size recipe (scripts/pretrain/imagenet-100/<file>) and, for the
methods solo-learn has one for, the ImageNet-1k recipe (scripts/pretrain/imagenet/<file>),
under our field names (the solo-learn key is in the comment where it differs), with the defaults its
code fills in for keys a yaml leaves unset (solo/methods/*.py `add_and_assert_specific_cfg`,
solo/methods/base.py, solo/args/pretrain.py). Each script's resolved recipe (its RECIPES entry over
common.cli.GENERIC_DEFAULTS) must agree, or docs/fidelity.md must list the field as a departure.
Adding a method is one SOLO entry; a method whose script does not exist yet is skipped.

Batch size: solo-learn's imagenet-100 yamls run 128 per GPU on 2 GPUs with SyncBatchNorm, a global
batch of 256 (solo/args/pretrain.py scales the lr by batch_size * len(devices) / 256). Our recipes
give the global batch on one process; `128 * 2` below says so. Its imagenet yamls run 64 per GPU on 2 or 4 GPUs.
"""
import functools
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from common import augment, cli, optim
from common.augment import Pipeline

ROOT = Path(__file__).resolve().parents[1]
FIDELITY = ROOT / "docs" / "fidelity.md"
# our recipe family -> solo-learn's scripts folder
FAMILIES = {"cifar": "cifar", "imagenet": "imagenet-100", "imagenet1k": "imagenet"}

# What every method shares unless its yaml says otherwise: solo/methods/base.py (scheduler.warmup_epochs 10,
# warmup_start_lr 3e-5, min_lr 0.0), no gradient clipping, 2 large crops and no small ones (the augmentation
# files), ResNet-18, the yamls' max_epochs, optimizer.batch_size, optimizer.classifier_lr and crop_size.
# LARS (solo/args/pretrain.py's defaults under the yamls' optimizer.kwargs): eta and clip_lr, and no gradient
# accumulation (base.py's accumulate_grad_batches 1).
SHARED = dict(backbone="resnet18", warmup_epochs=10, warmup_start_lr=3e-5, min_lr=0.0, probe_lr=0.1, grad_clip=0.0,
              num_large_crops=2, num_small_crops=0, lars_eta=0.02, lars_clip=True, accumulate_steps=1)
CIFAR = dict(SHARED, epochs=1000, batch_size=256, crop_size=32)
IMAGENET = dict(SHARED, epochs=400, batch_size=128 * 2, crop_size=224)
IMAGENET1K = dict(SHARED, backbone="resnet50", epochs=100, crop_size=224)


def facts(both, cifar=(), imagenet=(), imagenet1k=None):
    """Per-family facts: the family's shared ones, then the method's for both families, then per family.
    imagenet=None: solo-learn has no scripts/pretrain/imagenet-100/ config for the method (not compared).
    imagenet1k: the scripts/pretrain/imagenet/ config's facts, complete (most methods have none: None)."""
    return {"cifar": {**CIFAR, **both, **dict(cifar)},
            "imagenet": None if imagenet is None else {**IMAGENET, **both, **dict(imagenet)},
            "imagenet1k": None if imagenet1k is None else {**IMAGENET1K, **imagenet1k}}


SOLO = {
    "barlow_twins": facts(dict(  # barlow.yaml
        optimizer="lars", lr=0.3, weight_decay=1e-4, preset="asymmetric", proj_hidden_dim=2048, proj_output_dim=2048,
        lamb=0.0051,  # method default (the yaml leaves it unset)
        scale_loss=0.1),
        imagenet1k=dict(  # imagenet/barlow.yaml: 64 per GPU on 4 GPUs; optimizer.kwargs eta, clip_lr
            batch_size=64 * 4, optimizer="lars", lr=0.8, weight_decay=1.5e-6, lars_eta=0.001, lars_clip=False,
            preset="asymmetric", proj_hidden_dim=4096, proj_output_dim=4096, lamb=0.0051, scale_loss=0.048)),
    "byol": facts(dict(  # byol.yaml
        optimizer="lars", preset="asymmetric", proj_hidden_dim=4096, proj_output_dim=256,
        base_tau=0.99, final_tau=1.0),  # momentum.base_tau, momentum.final_tau
        cifar=dict(lr=1.0, weight_decay=1e-5, pred_hidden_dim=4096),
        imagenet=dict(lr=0.5, weight_decay=1e-6, pred_hidden_dim=8192),
        imagenet1k=dict(  # imagenet/byol.yaml: 64 per GPU on 2 GPUs, accumulate_grad_batches 16
            batch_size=64 * 2, accumulate_steps=16, optimizer="lars", lr=0.45, probe_lr=0.2, weight_decay=1e-6,
            lars_eta=0.001, lars_clip=False,
            warmup_start_lr=3e-5 * 16,  # base.py multiplies warmup_start_lr (and min_lr 0) by accumulate_grad_batches
            preset="asymmetric", proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, base_tau=0.99,
            final_tau=1.0)),
    "deepclusterv2": facts(dict(  # deepclusterv2.yaml
        optimizer="lars", lr=0.6, weight_decay=1e-6, preset="symmetric", proj_hidden_dim=2048, proj_output_dim=128,
        warmup_epochs=11, warmup_start_lr=0.0, min_lr=6e-4,  # scheduler.warmup_epochs, warmup_start_lr, min_lr
        num_prototypes=[3000, 3000, 3000],
        temperature=0.1, kmeans_iters=10)),  # method defaults
    "dino": facts(dict(  # dino.yaml
        optimizer="lars", lr=0.3, weight_decay=1e-6, preset="asymmetric", proj_hidden_dim=2048, proj_output_dim=256,
        num_prototypes=4096, base_tau=0.9995, final_tau=1.0,
        # method defaults: student_temperature, teacher_temperature, warmup_teacher_temperature, freeze_last_layer
        # (epochs), use_bn_in_head; center_momentum is solo/losses/dino.py DINOLoss's default
        student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, freeze_last_layer_epochs=1,
        use_bn_in_head=False, center_momentum=0.9),
        cifar=dict(warmup_teacher_temp_epochs=0),  # method default
        imagenet=dict(warmup_teacher_temp_epochs=50)),  # method_kwargs.warmup_teacher_temperature_epochs
    "mocov2plus": facts(dict(  # mocov2plus.yaml
        optimizer="sgd", lr=0.3, probe_lr=0.3, weight_decay=1e-4, preset="symmetric_weak", temperature=0.2,
        proj_hidden_dim=2048, proj_output_dim=256, base_tau=0.99, final_tau=0.999),
        cifar=dict(queue_size=32768), imagenet=dict(queue_size=65536),
        imagenet1k=dict(  # imagenet/mocov2plus.yaml: 64 per GPU on 2 GPUs
            epochs=400, batch_size=64 * 2, optimizer="sgd", lr=0.3, probe_lr=0.4, weight_decay=3e-5,
            preset="symmetric_weak", temperature=0.2, proj_hidden_dim=2048, proj_output_dim=256, queue_size=65536,
            base_tau=0.99, final_tau=0.999)),
    "nnclr": facts(dict(  # nnclr.yaml
        optimizer="lars", lr=0.4, weight_decay=1e-5, preset="asymmetric", temperature=0.2, proj_hidden_dim=2048,
        proj_output_dim=256, pred_hidden_dim=4096, queue_size=65536)),
    "ressl": facts(dict(  # ressl.yaml (augmentations: ressl.yaml)
        optimizer="sgd", weight_decay=1e-4, preset="ressl",
        student_temperature=0.1, teacher_temperature=0.04,  # method_kwargs.temperature_q, temperature_k
        proj_hidden_dim=4096, proj_output_dim=256, queue_size=65536,  # queue_size: method default
        base_tau=0.99, final_tau=1.0),
        cifar=dict(lr=0.05), imagenet=dict(lr=0.3)),
    "simclr": facts(dict(  # simclr.yaml
        optimizer="lars", weight_decay=1e-4, preset="symmetric", temperature=0.2),
        cifar=dict(lr=0.4, proj_hidden_dim=2048, proj_output_dim=256),
        imagenet=dict(lr=0.3, proj_hidden_dim=4096, proj_output_dim=512)),
    "simsiam": facts(dict(  # simsiam.yaml (its method_kwargs.temperature is unused by SimSiam)
        optimizer="sgd", lr=0.5, weight_decay=1e-5, proj_hidden_dim=2048, proj_output_dim=2048, pred_hidden_dim=512),
        cifar=dict(preset="symmetric_weak"), imagenet=dict(preset="asymmetric")),
    "supcon": facts(dict(  # supcon.yaml
        optimizer="sgd", weight_decay=1e-5, preset="symmetric", temperature=0.2, proj_hidden_dim=2048,
        supcon_form="in"),  # solo/methods/supcon.py calls simclr_loss_func with the labels: log of summed positives
        cifar=dict(lr=0.4, proj_output_dim=256), imagenet=dict(lr=0.5, proj_output_dim=512)),
    "swav": facts(dict(  # swav.yaml
        optimizer="lars", lr=0.6, weight_decay=1e-6, preset="symmetric", temperature=0.1,
        epsilon=0.05, sinkhorn_iters=3,  # method defaults sk_epsilon, sk_iters
        num_prototypes=3000, queue_size=3840,
        queue_start_epoch=50,  # method_kwargs.epoch_queue_starts
        freeze_prototypes_epochs=2, proj_hidden_dim=2048, proj_output_dim=128)),
    "vicreg": facts(dict(  # vicreg.yaml (augmentations inline in cifar/, vicreg.yaml in imagenet-100/)
        optimizer="lars", lr=0.3, weight_decay=1e-4, preset="vicreg", proj_hidden_dim=2048, proj_output_dim=2048,
        sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0)),  # sim_loss_weight, var_loss_weight, cov_loss_weight
    "wmse": facts(dict(  # wmse.yaml (augmentations inline in cifar/, wmse.yaml in imagenet-100/)
        optimizer="adam", lr=2e-3, weight_decay=1e-6, warmup_start_lr=0.0, probe_lr=3e-3, preset="wmse",
        proj_hidden_dim=1024, proj_output_dim=64, whitening_size=128,
        whitening_iters=1, whitening_eps=0.0),  # method defaults
        imagenet=dict(num_small_crops=6)),  # imagenet-100/augmentations/wmse.yaml: 6 crops of 96px
    "mocov3": facts(dict(  # mocov3.yaml (ResNet-18; mocov3_vit.yaml is the ViT variant)
        optimizer="lars", lr=0.3, probe_lr=0.3, weight_decay=1e-6, preset="asymmetric", proj_hidden_dim=4096,
        proj_output_dim=256, pred_hidden_dim=4096, temperature=0.2, base_tau=0.99, final_tau=1.0,
        freeze_patch_embed=False)),  # solo-learn has no such option: the patch embedding always trains
    "nnbyol": facts(dict(  # cifar/nnbyol.yaml
        optimizer="lars", lr=1.0, weight_decay=1e-5, preset="asymmetric", proj_hidden_dim=4096, proj_output_dim=256,
        pred_hidden_dim=4096, queue_size=65536, base_tau=0.99, final_tau=1.0), imagenet=None),
    "nnsiam": facts(dict(  # cifar/nnsiam.yaml (its momentum section is unused: NNSiam has no momentum network)
        optimizer="sgd", lr=0.5, weight_decay=1e-5, preset="asymmetric", proj_hidden_dim=2048, proj_output_dim=2048,
        pred_hidden_dim=4096, queue_size=65536), imagenet=None),
    "mae": facts(dict(  # mae.yaml (augmentations: reconstruction.yaml, num_crops 1)
        optimizer="adamw", lr=2e-4, probe_lr=2e-4, weight_decay=0.05, betas=(0.9, 0.95),  # optimizer.kwargs.betas
        exclude_bias_norm_wd=False,  # optimizer.exclude_bias_n_norm_wd, base.py's default
        preset="reconstruction", num_large_crops=1, mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8,
        decoder_num_heads=16, norm_pix_loss=True,
        probe_unmasked=False),  # solo/methods/mae.py forward: the classifier reads the masked pass's features
        cifar=dict(backbone="vit_small"),  # backbone.kwargs patch_size 4, img_size 32: common.backbones' rule
        imagenet=dict(backbone="vit_base", warmup_start_lr=0.0),
        imagenet1k=dict(  # imagenet/mae.yaml: 64 per GPU on 2 GPUs; its momentum section is unused (no momentum net)
            backbone="vit_base", epochs=400, batch_size=64 * 2, warmup_start_lr=0.0, optimizer="adamw", lr=2e-4,
            probe_lr=2e-4, weight_decay=0.05, betas=(0.9, 0.95), exclude_bias_norm_wd=False, preset="reconstruction",
            num_large_crops=1, mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
            norm_pix_loss=True, probe_unmasked=False)),
    "vibcreg": facts(dict(  # vibcreg.yaml (augmentations inline in cifar/, vicreg.yaml in imagenet-100/)
        optimizer="lars", lr=0.3, weight_decay=1e-4, preset="vicreg", proj_hidden_dim=2048, proj_output_dim=2048,
        sim_coeff=25.0, std_coeff=25.0, cov_coeff=200.0,  # sim_loss_weight, var_loss_weight, cov_loss_weight
        iternorm=True,  # method_kwargs.iternorm (the method's own default is False)
        # solo/methods/vibcreg.py's projector: nn.GELU, IterNorm(proj_output_dim, num_groups=64, T=5, dim=2)
        activation="gelu", iternorm_groups=64, iternorm_iters=5),
        cifar=dict(lars_clip=False), imagenet=dict(lars_clip=True)),  # optimizer.kwargs.clip_lr (absent in cifar/)
    "all4one": facts(dict(  # cifar/all4one.yaml, imagenet-100/all4one.yml (augmentations: asymmetric.yaml)
        optimizer="lars", lr=1.0, weight_decay=1e-5, preset="asymmetric", temperature=0.2, proj_hidden_dim=2048,
        proj_output_dim=256, pred_hidden_dim=4096,
        base_tau=0.99, final_tau=1.0,  # cifar: momentum.base_tau / final_tau; imagenet-100: base.py's defaults
        # solo/methods/all4one.py: the transformer's param group {"lr": 0.1}; the centroid contrast calls
        # nnclr_loss_func without a temperature (its default 0.1); find_nn's topk(5) and
        # PositionalEncodingPermute1D(5); training_step's 0.5 * att_nnclr_loss + 0.5 * nnclr_loss + 0.5 * feature_loss
        transformer_lr=0.1, centroid_temperature=0.1, num_neighbours=5, centroid_weight=0.5, neighbour_weight=0.5,
        redundancy_weight=0.5),
        cifar=dict(queue_size=98304), imagenet=dict(queue_size=98340)),  # method_kwargs.queue_size
}

# solo-learn's augmentation files as Pipelines (bicubic RandomResizedCrop, flip 0.5 everywhere).
STRONG = (0.8, 0.8, 0.8, 0.2)
WEAK_SAT = (0.4, 0.4, 0.4, 0.1)
NO_COLOUR = Pipeline(jitter=(0, 0, 0, 0), jitter_p=0.0, gray_p=0.0)  # ressl's weak view: crop and flip
PRESET_FILES = {  # (preset, crop size): (large pipelines in view order, small pipeline or None if solo has none)
    ("asymmetric", 32): ([Pipeline(), Pipeline(solarize_p=0.2)], None),  # cifar/augmentations/asymmetric.yaml
    ("asymmetric", 224): ([Pipeline(blur_p=1.0), Pipeline(blur_p=0.1, solarize_p=0.2)],  # imagenet-100/...
                          Pipeline()),  # imagenet-100-multicrop/augmentations/asymmetric.yaml, 6 x 96px
    ("symmetric", 32): ([Pipeline(jitter=STRONG, blur_p=0.5)], None),
    ("symmetric", 224): ([Pipeline(jitter=STRONG, blur_p=0.5)],
                         Pipeline(jitter=STRONG)),  # imagenet-100-multicrop/augmentations/symmetric.yaml
    ("symmetric_weak", 32): ([Pipeline(jitter=WEAK_SAT, blur_p=0.5)], None),
    ("symmetric_weak", 224): ([Pipeline(jitter=WEAK_SAT, blur_p=0.5)], None),
    ("ressl", 32): ([Pipeline(blur_p=0.5), NO_COLOUR], None),
    ("ressl", 224): ([Pipeline(blur_p=0.5), NO_COLOUR], None),
    ("vicreg", 32): ([Pipeline(scale=(0.2, 1.0), solarize_p=0.1)], None),  # cifar/vicreg.yaml augmentations
    ("vicreg", 224): ([Pipeline(scale=(0.2, 1.0), blur_p=0.5, solarize_p=0.1)], None),
    ("wmse", 32): ([Pipeline(scale=(0.2, 1.0), jitter=STRONG)], None),  # cifar/wmse.yaml augmentations
    # imagenet-100/augmentations/wmse.yaml's 6 small crops never reach W-MSE's loss (docs/fidelity.md): not compared
    ("wmse", 224): ([Pipeline(scale=(0.2, 1.0), jitter=STRONG, blur_p=0.2)], None),
    ("reconstruction", 32): ([NO_COLOUR], None),  # cifar/augmentations/reconstruction.yaml: crop and flip
    ("reconstruction", 224): ([NO_COLOUR], None),  # imagenet-100/augmentations/reconstruction.yaml
    ("multicrop", 32): ([Pipeline(scale=(0.2, 1.0), jitter=(0.6, 0.6, 0.6, 0.2)),  # cifar-multicrop/augmentations/
                         Pipeline(scale=(0.2, 1.0), jitter=(0.6, 0.6, 0.6, 0.2), solarize_p=0.2)],  # swav.yaml
                        Pipeline(scale=(0.08, 0.5), jitter=STRONG, blur_p=0.1, solarize_p=0.1)),  # 6 x 18px
}

# Offline linear evaluation: optimizer.lr of scripts/linear/imagenet-100/<file> (SGD, batch 256 on one GPU,
# weight decay 0, 100 epochs, scheduler "step" with lr_decay_steps [60, 80]).
SOLO_LINEAR_LR = {"barlow_twins": 0.1, "byol": 0.3, "deepclusterv2": 0.15, "dino": 0.3, "mocov2plus": 3.0,
                  "mocov3": 0.3, "nnclr": 0.3, "ressl": 3.0, "simclr": 1.0, "simsiam": 30.0, "swav": 0.15,
                  "vibcreg": 0.3, "vicreg": 0.3}
# (optimizer.lr, optimizer.weight_decay) of scripts/linear/imagenet/<file> (batch 256 on one GPU, the same schedule).
SOLO_LINEAR_IMAGENET1K = {"barlow_twins": (0.3, 1e-5), "byol": (0.1, 0.0), "mocov2plus": (3.0, 0.0)}


@functools.cache
def _recipes(method):
    spec = importlib.util.spec_from_file_location(f"recipes_{method}", ROOT / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPES


def load_recipes(method):
    path = ROOT / f"{method}.py"
    if not path.exists():
        pytest.skip(f"{method}.py does not exist yet")
    return _recipes(method)


def resolved(method, family):
    """The values a run with --dataset of this family starts from (common.cli.resolve, no flags given)."""
    return {**cli.GENERIC_DEFAULTS, **load_recipes(method)[family]}


@functools.cache
def fidelity_rows():
    """Rows of the departures table in docs/fidelity.md: dicts with methods, fields, families, ours."""
    text = FIDELITY.read_text()
    section = text.split("\n## Departures", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 5 or set(cells[0]) <= set("-: ") or cells[0] == "method":
            continue
        method, fact, _, ours, _ = cells
        families = [ours_name for ours_name, solo_name in FAMILIES.items() if f"({solo_name})" in fact]
        rows.append(dict(methods=[m.strip(" `") for m in method.split(",")], fields=re.findall(r"`(\w+)`", fact),
                         families=families or list(FAMILIES), ours=ours.replace("`", ""), line=line))
    return rows


def listed(method, family, field):
    return [r for r in fidelity_rows() if method in r["methods"] and field in r["fields"] and family in r["families"]]


def shown(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


CASES = [(method, family) for method in SOLO for family in FAMILIES
         if family != "imagenet1k" or SOLO[method]["imagenet1k"] is not None]  # imagenet1k: 4 methods


def solo_facts(method, family):
    if SOLO[method][family] is None:
        pytest.skip(f"solo-learn has no {FAMILIES[family]} config for {method}")
    return SOLO[method][family]


@pytest.mark.parametrize("method,family", CASES)
def test_every_recipe_field_has_its_solo_learn_fact(method, family):
    recipe = load_recipes(method)[family]  # first: a missing script skips before a missing config
    missing = set(recipe) - set(solo_facts(method, family))
    assert not missing, f"{method} {family}: write solo-learn's value of {sorted(missing)} into SOLO"


@pytest.mark.parametrize("method,family", CASES)
def test_recipe_reproduces_solo_learn_or_lists_the_departure(method, family):
    ours = resolved(method, family)
    problems = []
    for field, solo in solo_facts(method, family).items():
        if ours.get(field) == solo:
            continue
        rows = listed(method, family, field)
        if not rows:
            problems.append(f"{field}: ours {ours.get(field)!r}, solo-learn {solo!r}, and docs/fidelity.md "
                            f"has no row for {method} `{field}` ({FAMILIES[family]})")
        elif not any(shown(ours.get(field)) in r["ours"] for r in rows):
            problems.append(f"{field}: docs/fidelity.md's row says ours is {rows[0]['ours']!r}, "
                            f"the recipe has {ours.get(field)!r}")
    assert not problems, f"{method} {family}:\n" + "\n".join(problems)


def test_imagenet1k_recipes_are_exactly_solo_learns_imagenet_configs():
    """A script has an imagenet1k recipe iff solo-learn has scripts/pretrain/imagenet/<file> for it; --dataset
    imagenet gives it, and the imagenet (ImageNet-100) recipe to every other method."""
    for method in SOLO:
        if (ROOT / f"{method}.py").exists():
            recipes = _recipes(method)
            assert ("imagenet1k" in recipes) == (SOLO[method]["imagenet1k"] is not None), method
            assert cli.recipe_family("imagenet", recipes) == ("imagenet1k" if "imagenet1k" in recipes else "imagenet")
            assert cli.recipe_family("imagenet100", recipes) == "imagenet"


def test_every_listed_departure_is_real():
    """A row naming a recipe field whose value now matches solo-learn is stale: delete it."""
    assert fidelity_rows(), "docs/fidelity.md has no departures table"
    stale = []
    for row in fidelity_rows():
        for method in row["methods"]:
            if method not in SOLO or not (ROOT / f"{method}.py").exists():
                continue
            for family in row["families"]:
                if SOLO[method][family] is None:  # no solo-learn config of this family to compare with
                    continue
                solo, ours = SOLO[method][family], resolved(method, family)
                for field in row["fields"]:
                    if field in solo and ours.get(field) == solo[field]:
                        stale.append(f"{method} {field} ({FAMILIES[family]}): {row['line']}")
    assert not stale, "rows that are no departure:\n" + "\n".join(stale)


def comparable(pipeline):
    """A pipeline's facts; jitter strengths mean nothing when jitter never fires, and inversion is no preset's."""
    fields = {k: v for k, v in vars(pipeline).items() if k != "invert_p"}
    if pipeline.jitter_p == 0:
        fields.pop("jitter")
    return fields


@pytest.mark.parametrize("preset,size", list(PRESET_FILES))
def test_preset_matches_solo_learns_augmentation_file(preset, size):
    large, small = augment._preset(preset, size)
    expected_large, expected_small = PRESET_FILES[(preset, size)]
    assert [comparable(p) for p in large] == [comparable(p) for p in expected_large]
    if expected_small is not None:
        assert comparable(small) == comparable(expected_small)


def test_every_preset_is_checked_at_both_sizes():
    no_file = {("multicrop", 224)}  # solo-learn has no SwAV multicrop config at ImageNet size (docs/fidelity.md)
    assert {(p, s) for p in augment.PRESETS for s in (32, 224)} == set(PRESET_FILES) | no_file


def test_shared_optimizer_and_normalisation_facts():
    # LARS (solo/utils/lars.py via the yamls' optimizer.kwargs): eta 0.02, momentum 0.9; SGD momentum 0.9.
    build = inspect.signature(optim.build_optimizer).parameters
    assert build["eta"].default == 0.02 and build["momentum"].default == 0.9
    # solo/data/pretrain_dataloader.py MEANS_N_STD (pretraining); ImageNet's from timm.
    assert augment.NORMALIZATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert augment.NORMALIZATION["cifar100"] == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert augment.NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_linear_eval_defaults_match_solo_learns_linear_configs():
    spec = importlib.util.spec_from_file_location("recipes_eval_linear", ROOT / "eval" / "linear.py")
    linear = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(linear)
    assert linear.LINEAR_LR == SOLO_LINEAR_LR and linear.DEFAULT_LINEAR_LR == 0.1
    args = linear.build_parser().parse_args(["--ckpt", __file__])  # any existing file parses
    assert (args.batch_size, args.epochs) == (256, 100)
    for method in SOLO:
        for dataset in ("imagenet100", "imagenet", "cifar10"):
            imagenet1k = dataset == "imagenet" and method in SOLO_LINEAR_IMAGENET1K
            expected = SOLO_LINEAR_IMAGENET1K[method] if imagenet1k else (SOLO_LINEAR_LR.get(method, 0.1), 0.0)
            assert linear.linear_recipe(method, dataset) == expected, (method, dataset)
    assert [linear.step_lr(1.0, e, 100) for e in (59, 60, 79, 80)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
