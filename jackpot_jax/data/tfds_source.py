"""Any prepared tfds dataset as a data source: the three the reference uses (CIFAR-10/100,
ImageNet) and any tfds image-classification dataset ('tfds:NAME'), whose classes,
channels, size and splits come from its info. Imports TensorFlow: never beside torch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jackpot_jax.data import input_pipeline, tfds_specs
from jackpot_jax.data.image_preprocessing import ImageTransform

# Decoded images of at most this many pixels (height x width) are cached in memory.
CACHE_MAX_PIXELS = 64 * 64


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared tfds dataset seen through the launcher's data-source interface."""

    name: str
    data_dir: str | None = None
    validation_fraction: float = 0.0
    threads: int = 0  # cores the input pipeline may use; 0 = every core

    def __post_init__(self):
        if self.validation_fraction:  # the range and size checks, before any training
            input_pipeline.train_and_held_out_splits(self.name, self.data_dir, self.validation_fraction)

    @property
    def has_validation(self) -> bool:
        return self.validation_fraction > 0

    @functools.cached_property
    def info(self) -> input_pipeline.DatasetInfo:
        return input_pipeline.dataset_info(self.name, self.data_dir)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.info.image_shape

    def steps_per_epoch(self, batch_size: int) -> int:
        return input_pipeline.steps_per_epoch(
            self.name, batch_size, self.data_dir, validation_fraction=self.validation_fraction
        )

    def train_epoch(
        self, batch_size: int, seed: int, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return input_pipeline.train_iterator(
            self.name,
            batch_size=batch_size,
            data_dir=self.data_dir,
            seed=seed,
            epoch=epoch,
            start_step=start_step,
            threads=self.threads,
            validation_fraction=self.validation_fraction,
        )

    def eval_batches(
        self, batch_size: int, split: str = 'test'
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return input_pipeline.eval_iterator(
            self.name,
            batch_size=batch_size,
            data_dir=self.data_dir,
            threads=self.threads,
            split=split,
            validation_fraction=self.validation_fraction,
        )


def _image_classification_features(
    builder_name: str, data_dir: str | None
) -> tuple[Any, Any, Any]:
    """The builder and its 'image' and 'label' features; ValueError for any other dataset."""
    try:
        builder = tfds.builder(builder_name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except  (tfds raises its own types)
        raise ValueError(
            f"data.name 'tfds:{builder_name}': tensorflow_datasets has no dataset "
            f'{builder_name!r} ({type(e).__name__}); use a name from the tfds catalog, e.g. '
            "'tfds:mnist'"
        ) from None
    features = builder.info.features
    names = dict(features.items()) if hasattr(features, 'items') else {}
    image, label = names.get('image'), names.get('label')
    if not isinstance(image, tfds.features.Image) or not isinstance(
        label, tfds.features.ClassLabel
    ):
        kinds = {k: type(v).__name__ for k, v in names.items()}
        raise ValueError(
            f"data.name 'tfds:{builder_name}' is not an image-classification dataset: "
            f"it needs an 'image' (Image) and a 'label' (ClassLabel) feature, it has {kinds}; "
            'pick a tfds dataset with both'
        )
    return builder, image, label


def _pick_eval_split(builder: Any, eval_split: str) -> str:
    """``eval_split``, else 'test', else 'validation' (the first the dataset has)."""
    splits = list(builder.info.splits or {})
    if eval_split:
        if splits and eval_split not in splits:
            raise ValueError(
                f'data.eval_split {eval_split!r} is not a split of {builder.name}; '
                f'it has {splits}'
            )
        return eval_split
    if not splits:  # no prepared metadata (e.g. tfds's mock data): assume the usual name
        return 'test'
    for name in ('test', 'validation'):
        if name in splits:
            return name
    raise ValueError(
        f"{builder.name} has no 'test' or 'validation' split ({splits}); set data.eval_split"
    )


def open_dataset(
    name: str,
    data_dir: str | None = None,
    validation_fraction: float = 0.0,
    threads: int = 0,
    *,
    image_size: int = 0,
    resize: int = 0,
    random_flip: bool = False,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    eval_split: str = '',
) -> TfdsSource:
    """A source for any prepared tfds image-classification dataset, ``name`` = 'tfds:NAME'.

    Classes, channels, image size and splits come from the dataset's info; the
    preprocessing is :class:`ImageTransform`. ``image_size`` 0 keeps the dataset's own
    (fixed) size. ``mean``/``std`` hold one value or one per channel.
    """
    builder_name = name.partition(':')[2]
    builder, image, label = _image_classification_features(builder_name, data_dir)
    height, width, channels = (tuple(image.shape) + (None, None, None))[:3]
    channels = channels or 3
    if image_size:
        size = (image_size, image_size)
    elif height and width:
        size = (height, width)
    else:
        raise ValueError(
            f'data.image_size is 0 but {name} has images of varying size; set '
            '--config.data.image_size=N (and data.resize to crop rather than squash)'
        )
    if resize and resize < max(size):
        raise ValueError(
            f'data.resize={resize} is smaller than data.image_size={max(size)}; the crop '
            'must fit inside the resized image: raise data.resize or set it to 0'
        )
    for field, values in (('mean', mean), ('std', std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f'data.{field} has {len(values)} values; {name} has {channels} channel(s): '
                f'give one value{"" if channels == 1 else f" or {channels}"}'
            )
    if not all(v > 0 for v in std):
        raise ValueError(f'data.std must be positive, got {tuple(std)}')
    fixed = bool(height and width)
    tfds_specs.OPEN_SPECS[name] = tfds_specs.Spec(
        train_split='train',
        eval_split=_pick_eval_split(builder, eval_split),
        num_classes=int(label.num_classes),
        image_shape=(*size, channels),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        cache=fixed and height * width <= CACHE_MAX_PIXELS,
        shuffle_buffer=10_000,
        raw_bytes=False,
        builder=builder_name,
        transform=ImageTransform(
            size, channels, resize, random_flip, tuple(mean), tuple(std), (height, width)
        ),
    )
    return TfdsSource(name, data_dir, validation_fraction, threads)
