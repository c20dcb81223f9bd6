"""How each tfds dataset is read and preprocessed: the reference's three (CIFAR-10/100 with
the CIFAR constants for both, ImageNet) and every 'tfds:NAME' dataset opened in this
process (:func:`jackpot_jax.data.tfds_source.open_dataset` registers its spec)."""

from __future__ import annotations

import dataclasses

from jackpot_jax.data.image_preprocessing import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_SIZE,
    IMAGENET_STD,
    ImageTransform,
    augment_cifar_train,
    augment_imagenet_train,
    preprocess_cifar_eval,
    preprocess_imagenet_eval,
)

DATASETS = ('cifar10', 'cifar100', 'imagenet2012')


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one dataset is read and preprocessed."""

    train_split: str
    eval_split: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cache: bool  # small enough to keep decoded in memory
    shuffle_buffer: int
    raw_bytes: bool  # read encoded images and decode in the pipeline (ImageNet)
    # Any other tfds image-classification dataset ('tfds:NAME'): its builder name and its
    # preprocessing; None for the three above.
    builder: str = ''
    transform: ImageTransform | None = None


SPECS = {
    'cifar10': Spec('train', 'test', 10, (32, 32, 3), CIFAR_MEAN, CIFAR_STD, True, 50_000, False),
    # The reference normalises CIFAR-100 with the CIFAR-10 constants as well.
    'cifar100': Spec(
        'train', 'test', 100, (32, 32, 3), CIFAR_MEAN, CIFAR_STD, True, 50_000, False
    ),
    'imagenet2012': Spec(
        'train',
        'validation',
        1000,
        (IMAGENET_SIZE, IMAGENET_SIZE, 3),
        IMAGENET_MEAN,
        IMAGENET_STD,
        False,
        10_000,
        True,
    ),
}


# 'tfds:NAME' datasets opened in this process, by that name
# (:func:`jackpot_jax.data.tfds_source.open_dataset`).
OPEN_SPECS: dict[str, Spec] = {}


def spec(name: str) -> Spec:
    if name in OPEN_SPECS:
        return OPEN_SPECS[name]
    if name not in SPECS:
        raise ValueError(f'unknown dataset {name!r}; choose one of {DATASETS}')
    return SPECS[name]


def train_fn(name: str):
    """Per-example augmentation (normalisation follows on whole batches)."""
    if spec(name).transform:
        return spec(name).transform.augment
    return augment_imagenet_train if name == 'imagenet2012' else augment_cifar_train


def eval_fn(name: str):
    if spec(name).transform:
        return spec(name).transform.eval
    return preprocess_imagenet_eval if name == 'imagenet2012' else preprocess_cifar_eval
