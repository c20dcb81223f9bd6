"""In-memory datasets that need no download: scikit-learn digits and Fashion-MNIST IDX files.

Images come out as float32 NHWC arrays normalised with the training split's mean
and std; labels as int32. Evaluation batches are padded and carry a validity
mask, so every test example counts exactly once. A validation split can be carved
from the training images (:func:`split_validation`): it is the split any choice
(an epoch, a setting) may look at; the test split is only reported.

Text: ``python_source`` is a byte-level corpus of real text that needs no download, the
Python standard library's own top-level modules (:func:`python_source_files`), split
into train / validation / test by file and cut into windows of ``context + 1`` bytes
(:func:`load_python_source`): the "images" are ``[context]`` token windows, the labels
the ``[context]`` next tokens, and ``num_classes`` is the vocabulary, 256.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jackpot_jax import holdout

TEXT_DATASETS = ('python_source',)  # byte-level text, see load_python_source
DATASETS = ('digits', 'fashion_mnist') + TEXT_DATASETS  # in memory, no TensorFlow needed
TFDS_DATASETS = ('cifar10', 'cifar100', 'imagenet2012')  # see input_pipeline.py
TFDS_PREFIX = 'tfds:'  # 'tfds:NAME': any tfds image-classification dataset
# The config's data.* fields for 'tfds:NAME' datasets (input_pipeline.open_dataset's keywords).
TFDS_FIELDS = ('image_size', 'resize', 'random_flip', 'mean', 'std', 'eval_split')
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


def load_dataset(name: str, data_dir: str | None = None) -> ArrayDataset:
    """The named in-memory dataset."""
    if name == 'digits':
        return load_digits()
    if name == 'fashion_mnist':
        return load_fashion_mnist(data_dir)
    if name == 'python_source':
        return load_python_source(data_dir)
    raise ValueError(f'unknown dataset {name!r}; choose one of {DATASETS}')


def load_source(
    name: str,
    data_dir: str | None = None,
    options: Mapping | None = None,
    *,
    validation_fraction: float = 0.0,
    threads: int = 0,
):
    """A data source by name: in-memory (digits, Fashion-MNIST) or a prepared tfds dataset
    (whose input pipeline uses at most ``threads`` cores; 0 = every core).

    Every source has ``num_classes``, ``image_shape``, ``has_validation``,
    ``steps_per_epoch(batch)``, ``train_epoch(batch, seed, epoch, start_step)`` and
    ``eval_batches(batch, split)`` with split 'test' or 'validation'.
    'tfds:NAME' opens any tfds image-classification dataset, preprocessed as the
    config's ``data.*`` fields in ``options`` say (:func:`tfds_options`).
    """
    if is_tfds_name(name):
        from jackpot_jax import input_pipeline  # pylint: disable=g-import-not-at-top

        return input_pipeline.open_dataset(
            name, data_dir, validation_fraction, threads, **tfds_options(options or {})
        )
    if name in TEXT_DATASETS:
        context = (options or {}).get('context', 0) or DEFAULT_CONTEXT
        return load_python_source(data_dir, context, validation_fraction=validation_fraction)
    if name in DATASETS:
        return split_validation(load_dataset(name, data_dir), validation_fraction)
    if name in TFDS_DATASETS:
        from jackpot_jax import input_pipeline  # pylint: disable=g-import-not-at-top

        return input_pipeline.TfdsSource(name, data_dir, validation_fraction, threads)
    raise ValueError(f'unknown dataset {name!r}; choose one of {DATASETS + TFDS_DATASETS}')


def is_tfds_name(name: str) -> bool:
    """True for 'tfds:NAME': any tfds image-classification dataset."""
    return name.startswith(TFDS_PREFIX)


def _floats(field: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(',') if v.strip())
    except ValueError:
        raise ValueError(f'data.{field}={text!r} must be comma-separated numbers') from None
    if not values:
        raise ValueError(f'data.{field} is empty; give one value or one per channel')
    return values


def tfds_options(data_config: Mapping) -> dict[str, Any]:
    """The keyword arguments of ``input_pipeline.open_dataset`` from the ``data.*`` fields."""
    options = {key: data_config[key] for key in TFDS_FIELDS if key in data_config}
    for key in ('image_size', 'resize'):
        if key in options and (not isinstance(options[key], int) or options[key] < 0):
            raise ValueError(f'data.{key} must be an int >= 0, got {options[key]!r}')
    for key in ('mean', 'std'):
        if key in options:
            options[key] = _floats(key, options[key])
    return options


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


# ----------------------------------------------------------------------------
# Text: the Python standard library's own source, byte by byte.
# ----------------------------------------------------------------------------
VOCAB_SIZE = 256  # bytes
DEFAULT_CONTEXT = 128  # tokens per window when data.context is 0
TEXT_TEST_FRACTION = 0.1  # share of the files held out as the test split
# Modules whose text is written when Python is built, so it differs between machines.
_BUILD_SPECIFIC_PREFIXES = ('_sysconfigdata',)


def python_source_files(root: str | None = None) -> list[str]:
    """Sorted names of the ``*.py`` files directly in ``root`` (default: this Python's
    standard library, ``os.path.dirname(os.__file__)``), without the build-specific
    ``_sysconfigdata*`` modules: the same files on every machine with the same Python
    version. Subfolders (packages, tests, site-packages) are not read."""
    root = root or os.path.dirname(os.__file__)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f'text folder {root!r} does not exist; set --config.data.data_dir to a folder of '
            "*.py files, or '' for this Python's standard library"
        )
    names = sorted(
        name
        for name in os.listdir(root)
        if name.endswith('.py')
        and not name.startswith(_BUILD_SPECIFIC_PREFIXES)
        and os.path.isfile(os.path.join(root, name))
    )
    if not names:
        raise FileNotFoundError(
            f'no *.py files in {root!r}; set --config.data.data_dir to a folder of *.py '
            "files, or '' for this Python's standard library"
        )
    return names


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Documents (file name -> bytes) and which split each file belongs to."""

    root: str
    documents: Mapping[str, bytes]
    splits: Mapping[str, tuple[str, ...]]  # 'train' / 'validation' / 'test' -> file names

    def manifest(self) -> dict[str, Any]:
        """What the corpus is: its folder, files and bytes per split, and a digest of all."""
        digest = hashlib.sha256()
        for name in sorted(self.documents):
            digest.update(name.encode() + b'\0' + self.documents[name] + b'\0')
        return {
            'root': self.root,
            'files': {split: list(names) for split, names in self.splits.items()},
            'bytes': {
                split: sum(len(self.documents[n]) for n in names)
                for split, names in self.splits.items()
            },
            'total_files': len(self.documents),
            'total_bytes': sum(len(d) for d in self.documents.values()),
            'sha256': digest.hexdigest(),
        }


def split_documents(
    names: list[str], validation_fraction: float = 0.0, test_fraction: float = TEXT_TEST_FRACTION
) -> dict[str, tuple[str, ...]]:
    """Whole files to 'train', 'validation' and 'test' (each tuple sorted).

    The sorted names are shuffled by VALIDATION_SEED; the first ``round(test_fraction n)``
    files (at least one) are the test split, the next ``holdout.validation_count`` of the
    rest the validation split, the others the training split. So the test files do not
    depend on the validation fraction, and no window crosses from one split to another.
    """
    n = len(names)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction!r} (e.g. 0.1)')
    num_test = max(1, round(test_fraction * n))
    if num_test >= n:
        raise ValueError(
            f'{n} text files are too few for a test split of {test_fraction!r} and a '
            'training split; give a folder with more *.py files'
        )
    num_validation = holdout.validation_count(validation_fraction, n - num_test)
    order = [sorted(names)[i] for i in np.random.default_rng(VALIDATION_SEED).permutation(n)]
    return {
        'train': tuple(sorted(order[num_test + num_validation :])),
        'validation': tuple(sorted(order[num_test : num_test + num_validation])),
        'test': tuple(sorted(order[:num_test])),
    }


def read_python_source(
    root: str | None = None,
    validation_fraction: float = 0.0,
    test_fraction: float = TEXT_TEST_FRACTION,
) -> TextCorpus:
    """The files of :func:`python_source_files`, read as bytes and split by file."""
    root = root or os.path.dirname(os.__file__)
    names = python_source_files(root)
    documents = {}
    for name in names:
        with open(os.path.join(root, name), 'rb') as f:
            documents[name] = f.read()
    return TextCorpus(root, documents, split_documents(names, validation_fraction, test_fraction))


def token_windows(documents: list[bytes], context: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), int32 ``[N, context]`` each: targets are inputs shifted by one.

    Every document is cut into windows of ``context + 1`` bytes starting every ``context``
    bytes (consecutive windows share one byte, so every byte after a document's first is
    a target exactly once); the tail that fills no whole window is dropped, and no window
    spans two documents.
    """
    if not (isinstance(context, (int, np.integer)) and context >= 1):
        raise ValueError(f'data.context must be a positive integer, got {context!r} (e.g. 128)')
    offsets = np.arange(context + 1)
    windows = [np.zeros((0, context + 1), np.uint8)]
    for document in documents:
        tokens = np.frombuffer(document, np.uint8)
        count = (len(tokens) - 1) // context
        if count > 0:
            windows.append(tokens[np.arange(count)[:, None] * context + offsets])
    joined = np.concatenate(windows).astype(np.int32)
    return joined[:, :-1], joined[:, 1:]


@dataclasses.dataclass(frozen=True)
class TextDataset(ArrayDataset):
    """Token windows ``[N, context]`` as the "images", next tokens ``[N, context]`` as the
    labels; ``manifest`` says which files and bytes each split holds."""

    manifest: Mapping[str, Any] | None = None


def load_python_source(
    root: str | None = None,
    context: int = DEFAULT_CONTEXT,
    *,
    validation_fraction: float = 0.0,
    test_fraction: float = TEXT_TEST_FRACTION,
) -> TextDataset:
    """The ``python_source`` dataset: byte windows of the standard library's top-level
    modules (or of the ``*.py`` files in ``root``), split by file (:func:`split_documents`).

    Windows are in file order (sorted names) and document order; training batches are
    drawn from them shuffled, as every in-memory dataset's.
    """
    corpus = read_python_source(root, validation_fraction, test_fraction)
    arrays = {
        split: token_windows([corpus.documents[n] for n in names], context)
        for split, names in corpus.splits.items()
    }
    for split in ('train', 'test'):
        if not len(arrays[split][0]):
            raise ValueError(
                f'the {split} files of {corpus.root!r} hold no window of data.context + 1 = '
                f'{context + 1} bytes; lower data.context or give longer files'
            )
    manifest = corpus.manifest()
    manifest.update(
        context=int(context),
        windows={split: int(len(a[0])) for split, a in arrays.items()},
        tokens={split: int(a[1].size) for split, a in arrays.items()},
    )
    validation = arrays['validation'] if corpus.splits['validation'] else (None, None)
    return TextDataset(
        arrays['train'][0],
        arrays['train'][1],
        arrays['test'][0],
        arrays['test'][1],
        VOCAB_SIZE,
        *validation,
        manifest=manifest,
    )
