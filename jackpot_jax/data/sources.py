"""In-memory datasets that need no download: scikit-learn digits and Fashion-MNIST IDX files.

Images come out as float32 NHWC arrays normalised with the training split's mean
and std; labels as int32. Evaluation batches are padded and carry a validity
mask, so every test example counts exactly once. A validation split can be carved
from the training images (:func:`split_validation`): it is the split any choice
(an epoch, a setting) may look at; the test split is only reported.

Text corpora are in :mod:`jackpot_jax.data.text`; every dataset by name in
:mod:`jackpot_jax.data.catalog`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from collections.abc import Iterator

import jax
import numpy as np

from jackpot_jax.data import holdout

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
EVAL_SPLITS = ('validation', 'test')
# Which training images become the validation split depends on this seed only (not on
# config.seed), so every run over the same data validates on the same images.
VALIDATION_SEED = 20_231_201
_FASHION_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A train/test split held in memory."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    # Carved from the training images by split_validation; empty when there is none.
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    @property
    def has_validation(self) -> bool:
        return self.validation_labels is not None and len(self.validation_labels) > 0

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.train_images.shape[1:]

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(len(self.train_images), batch_size)

    def train_epoch(
        self, batch_size: int, seed: int, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This process's share of each global training batch."""
        for batch in train_batches(
            self.train_images, self.train_labels, batch_size, seed, epoch, start_step
        ):
            yield _process_share(batch)

    def eval_batches(
        self, batch_size: int, split: str = 'test'
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This process's share of each padded global batch of the 'test' or 'validation' split."""
        if split == 'validation' and not self.has_validation:
            raise ValueError('no validation split; set data.validation_fraction > 0')
        if split not in EVAL_SPLITS:
            raise ValueError(f'unknown eval split {split!r}; choose one of {EVAL_SPLITS}')
        images, labels = (
            (self.test_images, self.test_labels)
            if split == 'test'
            else (self.validation_images, self.validation_labels)
        )
        for batch in eval_batches(images, labels, batch_size):
            yield _process_share(batch)


def split_validation(dataset: ArrayDataset, fraction: float) -> ArrayDataset:
    """Moves ``fraction`` of the training images into a validation split.

    Disjoint from the remaining training images and deterministic: the same images
    for every run over the same data (see VALIDATION_SEED). ``fraction == 0`` returns
    the dataset unchanged.
    """
    n = len(dataset.train_labels)
    count = holdout.validation_count(fraction, n)
    if count == 0:
        return dataset
    order = np.random.default_rng(VALIDATION_SEED).permutation(n)
    held, kept = np.sort(order[:count]), np.sort(order[count:])
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[kept],
        train_labels=dataset.train_labels[kept],
        validation_images=dataset.train_images[held],
        validation_labels=dataset.train_labels[held],
    )


def _process_share(batch: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The slice of a global batch that this process feeds to its devices."""
    count, index = jax.process_count(), jax.process_index()
    size = len(batch[0])
    if size % count:
        raise ValueError(f'batch size {size} does not divide over {count} processes')
    share = size // count
    return tuple(a[index * share : (index + 1) * share] for a in batch)


def _normalised(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(), train.std()
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, split stratified and reproducibly."""
    from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = (digits.images / 16.0)[..., None]
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    train_x, test_x = _normalised(train_x, test_x)
    return ArrayDataset(train_x, train_y.astype(np.int32), test_x, test_y.astype(np.int32), 10)


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped): the MNIST family's array format."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(
            f'{path} is not a complete gzip file ({type(e).__name__}: {e}); it may be truncated '
            'or not compressed at all: download or copy it again'
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise ValueError(f'{path} is truncated: header says {shape}, found {body.size} bytes')
    return body.reshape(shape)


def check_split(
    images: np.ndarray, labels: np.ndarray, num_classes: int, images_path: str, labels_path: str
) -> None:
    """Raises ValueError, naming the file, unless the images and labels fit together."""
    if images.ndim != 3:
        raise ValueError(f'{images_path} holds an array of shape {images.shape}, not N images')
    if labels.ndim != 1:
        raise ValueError(f'{labels_path} holds an array of shape {labels.shape}, not N labels')
    if len(images) != len(labels):
        raise ValueError(
            f'the image and label counts differ: {len(images)} images in {images_path}, '
            f'{len(labels)} labels in {labels_path}; the files must come from the same split'
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f'{labels_path}: {int(bad.sum())} labels lie outside the {num_classes} classes '
            f'0..{num_classes - 1} (e.g. {int(labels[bad][0])} at index {int(np.argmax(bad))}); '
            'check that the file is a label file of this dataset'
        )


def load_fashion_mnist(data_dir: str | None = None) -> ArrayDataset:
    """Fashion-MNIST (60k/10k real 28x28 images) from local IDX files."""
    data_dir = data_dir or FASHION_MNIST_DIR
    paths = {k: os.path.join(data_dir, v) for k, v in _FASHION_FILES.items()}
    missing = [p for p in paths.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files not found: {missing}. Install them with '
            "'apt-get install -y dataset-fashion-mnist' (Debian) or set config.data.data_dir "
            'to a folder holding the four *-idx?-ubyte.gz files.'
        )
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ('train', 'test'):
        check_split(
            arrays[f'{split}_images'],
            arrays[f'{split}_labels'],
            10,
            paths[f'{split}_images'],
            paths[f'{split}_labels'],
        )
    train_x, test_x = _normalised(
        arrays['train_images'][..., None] / 255.0, arrays['test_images'][..., None] / 255.0
    )
    return ArrayDataset(
        train_x,
        arrays['train_labels'].astype(np.int32),
        test_x,
        arrays['test_labels'].astype(np.int32),
        10,
    )


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped in training)."""
    if batch_size > num_examples:
        raise ValueError(
            f'batch_size={batch_size} exceeds the {num_examples} training examples; '
            'lower the batch size'
        )
    return num_examples // batch_size


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled full batches; the order depends only on (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    for i in range(start_step, steps_per_epoch(len(images), batch_size)):
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield images[idx], labels[idx]


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches in order; the last is zero-padded to full size, with a validity mask."""
    for start in range(0, len(images), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        valid = np.ones(batch_size, bool)
        if len(x) < batch_size:
            valid[len(x) :] = False
            pad = batch_size - len(x)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
        yield x, y, valid
