"""Helpers shared by the paper's config files under ``configs/`` (the ``tiny`` modifier,
the reference search settings, argument parsing).

Everything here only overrides fields of ``jackpot_jax.launch.config.get_config()``.
"""

from __future__ import annotations

import ml_collections

from jackpot_jax.launch import config as config_lib

MODIFIERS = ('tune', 'tiny')
TINY_BATCH = 8  # a multiple of the device count of the tests (8 simulated CPUs).
TINY_STEPS = 2


def split_args(arg: str, usage: str) -> tuple[list[str], set[str]]:
    """'a,b,tiny' -> (['a', 'b'], {'tiny'}); modifiers may come in any order, at the end."""
    parts = [p.strip() for p in arg.split(',') if p.strip()]
    modifiers = set()
    while parts and parts[-1] in MODIFIERS:
        modifiers.add(parts.pop())
    if any(p in MODIFIERS for p in parts):
        raise ValueError(f'config argument {arg!r}: modifiers go last; usage: {usage}')
    return parts, modifiers


def to_int(value: str, what: str, usage: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'{what} must be an integer, got {value!r}; usage: {usage}') from None


# The paper's CIFAR models by short name; other registered names pass through.
CIFAR_MODELS = {'vgg19': 'vgg19_cifar', 'resnet32': 'resnet32'}
CIFAR_DATASETS = ('cifar10', 'cifar100')


def base(mode: str, dataset: str, model: str, eval_batch_size: int) -> ml_collections.ConfigDict:
    config = config_lib.get_config()
    config.mode = mode
    config.protocol = 'paper'  # the published rows: the authors' protocol, no validation split
    config.data.name = dataset
    config.data.eval_batch_size = eval_batch_size
    # The model's own defaults; float32 unless --config.model.dtype=bfloat16.
    config.model = ml_collections.ConfigDict({'name': model, 'dtype': 'float32'})
    return config


def cifar_base(mode: str, model: str, dataset: str) -> ml_collections.ConfigDict:
    """CIFAR data and model, with the dense pre-training recipe of cifar_pretrain.py."""
    if dataset not in CIFAR_DATASETS:
        raise ValueError(f'dataset {dataset!r} is not one of {CIFAR_DATASETS}')
    config = base(mode, dataset, CIFAR_MODELS.get(model, model), eval_batch_size=1024)
    set_sgd(config.pretrain, 200, 128, 0.1, 5e-4)
    return config


def imagenet_base(mode: str, model: str = 'resnet50') -> ml_collections.ConfigDict:
    """ImageNet data and model; the pretrain fields are a fallback recipe (the paper
    searches torchvision's weights: ``python -m jackpot_jax.io.convert_cli torchvision``)."""
    config = base(mode, 'imagenet2012', model, eval_batch_size=512)
    set_sgd(config.pretrain, 90, 256, 0.1, 1e-4)
    config.checkpoint.every_steps = 1000  # an epoch is ~5000 steps of 256
    return config


def set_sgd(group: ml_collections.ConfigDict, epochs, batch_size, lr, weight_decay) -> None:
    """SGD, momentum 0.9, per-epoch cosine (the only schedule), no label smoothing."""
    group.epochs = epochs
    group.batch_size = batch_size
    group.learning_rate = lr
    group.weight_decay = weight_decay
    group.momentum = 0.9
    group.label_smoothing = 0.0


def set_reference_search(
    config: ml_collections.ConfigDict, sparsity_percent: int, epochs: int, weight_decay: float
) -> None:
    """docs/method.md §3-4: the authors' search settings, spelled out."""
    s = config.search
    s.sparsity = sparsity_percent / 100
    set_sgd(s, epochs, 256, 0.1, weight_decay)
    s.allocation = 'global_magnitude'
    s.pruned_score = 0.99
    s.mask_update = 'short_restriction'
    s.rate_schedule = 'constant'
    s.bn_mode = 'train'
    set_reference_tune(config, epochs=0)  # the 'tune' modifier (or tune.epochs) turns it on


def set_reference_tune(config: ml_collections.ConfigDict, epochs: int = 10) -> None:
    """The '+T' rows: weight tuning under the fixed mask (lr 0.01, wd 0, cosine, batch 256)."""
    set_sgd(config.tune, epochs, 256, 0.01, 0.0)


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The 'tiny' modifier: 1 epoch of 2 steps of 8 examples per phase, same model.

    Evaluation still covers the whole test split (there is no cap on eval steps).
    """
    config.steps_per_epoch = TINY_STEPS
    config.data.eval_batch_size = TINY_BATCH
    for group in ('pretrain', 'search', 'tune'):
        config[group].batch_size = TINY_BATCH
        if group != 'tune' or config.tune.epochs:
            config[group].epochs = 1
    config.checkpoint.every_steps = 0
    return config


def finish(config: ml_collections.ConfigDict, modifiers: set[str]) -> ml_collections.ConfigDict:
    """Applies the modifiers ('tune' before 'tiny'); the launcher validates the result."""
    if 'tune' in modifiers:
        set_reference_tune(config)
    if 'tiny' in modifiers:
        shrink(config)
    return config
