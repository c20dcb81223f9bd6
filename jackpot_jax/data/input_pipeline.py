"""tf.data input pipelines for CIFAR-10/100 and ImageNet read from a prepared tfds data_dir.

Preprocessing (the reference's torchvision transforms, docs/method.md §5) lives in
:mod:`jackpot_jax.data.image_preprocessing`.

Everything random is derived statelessly from (seed, epoch, process, position), so a
run resumed at an epoch boundary, or mid-epoch with `start_step`, sees exactly the
batches it would have seen. Nothing is ever downloaded: the datasets must already be
prepared in `data_dir` (`tfds build NAME --data_dir=DIR` on a machine with network).

Training reads this process's slice of the train split (`tfds.split_for_jax_process`);
evaluation gives every example of the eval split to exactly one process, pads the last
batch with zeros (valid=False) and makes all processes yield the same number of batches.
This module imports TensorFlow and must never import torch (the pair segfaults).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from jackpot_jax.data import holdout, tfds_specs as specs
from jackpot_jax.data.image_preprocessing import normalize

try:  # TF must not grab GPU memory that JAX needs; it only runs the input pipeline.
    tf.config.experimental.set_visible_devices([], 'GPU')
except RuntimeError:  # TF devices were already initialised by someone else.
    pass

class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not prepared in the data_dir (and is never downloaded here)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes and shapes of a dataset; `image_shape` is the model's input shape."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int  # size of the eval split ('validation' for ImageNet)


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------


def pipeline_options(threads: int = 0) -> tf.data.Options:
    """Deterministic order (resumes stay bit-identical); ``threads`` > 0 gives the pipeline
    a private pool of that many threads, each op single-threaded, so the input pipeline
    uses at most ``threads`` cores (0: tf.data's shared pool over every core)."""
    if threads < 0:
        raise ValueError(f'threads={threads} must be >= 0 (0 = every core)')
    options = tf.data.Options()
    options.deterministic = True
    if threads:
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
    return options

_BASE_CACHE: collections.OrderedDict[tuple, tf.data.Dataset] = collections.OrderedDict()
_BASE_CACHE_SIZE = 6


def clear_cache() -> None:
    """Drops the in-memory CIFAR datasets kept between calls (e.g. after data changed)."""
    _BASE_CACHE.clear()


def _builder_name(name: str) -> str:
    return specs.spec(name).builder or name


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Defaults to JAX's view of the processes; validates the pair."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'bad process_index={process_index} for process_count={process_count}')
    return int(process_index), int(process_count)


def _process_count(process_count: int | None) -> int:
    """The given process count, or JAX's."""
    return _processes(0 if process_count is not None else None, process_count)[1]


def _per_process_batch(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f'batch_size={batch_size} (global) must be a positive multiple of '
            f'process_count={process_count}'
        )
    return batch_size // process_count


def _seed_ints(*entropy: int, n: int = 2) -> list[int]:
    """Independent, well-mixed non-negative int31 seeds derived from the given ints."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(n, np.uint32)
    return [int(s) >> 1 for s in state]


def _not_prepared(name: str, data_dir: str | None, where: str) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f'{name} is not prepared in data_dir={data_dir!r} (looked in {where}); this pipeline '
        'never downloads. Prepare it on a machine with network access with '
        f'`tfds build {name} --data_dir=DIR` (ImageNet also needs its archives via '
        '--manual_dir) and copy DIR, or a prepared folder DIR/'
        f'{name}/<version>, here; then pass that DIR as data_dir.'
    )


def _load(
    name: str,
    split: Any,
    data_dir: str | None,
    *,
    shuffle_files: bool,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """tfds.load of (image, int32 label) pairs; images stay encoded for ImageNet."""
    spec = specs.spec(name)
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False, options=options)
    decoders = {'image': tfds.decode.SkipDecoding()} if spec.raw_bytes else None
    try:
        ds = tfds.load(
            _builder_name(name),
            split=split,
            data_dir=data_dir,
            download=False,
            shuffle_files=shuffle_files,
            read_config=read_config,
            decoders=decoders,
        )
    except Exception as e:  # pylint: disable=broad-except
        builder = tfds.builder(_builder_name(name), data_dir=data_dir)
        if not builder.is_prepared():
            raise _not_prepared(_builder_name(name), data_dir, str(builder.data_dir)) from e
        raise
    return ds.map(
        lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _base(
    name: str,
    split: Any,
    data_dir: str | None,
    *,
    shuffle_files: bool,
    shuffle_seed: int | None = None,
) -> tf.data.Dataset:
    """`_load`, kept decoded in memory across calls for the small datasets."""
    if not specs.spec(name).cache:
        return _load(name, split, data_dir, shuffle_files=shuffle_files, shuffle_seed=shuffle_seed)
    key = (name, repr(split), data_dir, shuffle_files, shuffle_seed)
    if key in _BASE_CACHE:
        _BASE_CACHE.move_to_end(key)
        return _BASE_CACHE[key]
    ds = _load(name, split, data_dir, shuffle_files=shuffle_files, shuffle_seed=shuffle_seed)
    ds = ds.cache()
    _BASE_CACHE[key] = ds
    while len(_BASE_CACHE) > _BASE_CACHE_SIZE:
        _BASE_CACHE.popitem(last=False)
    return ds


def _split_sizes(name: str, splits: Sequence[Any], data_dir: str | None) -> list[int]:
    """Examples in each (sub)split, from the prepared metadata when it is there, otherwise
    by counting the readable dataset (under tfds's mock; this also raises the
    not-prepared error)."""
    split_dict = tfds.builder(_builder_name(name), data_dir=data_dir).info.splits
    sizes = []
    for split in splits:
        if split_dict:
            try:
                sizes.append(int(split_dict[split].num_examples))
                continue
            except (KeyError, ValueError, TypeError):
                pass
        ds = _load(name, split, data_dir, shuffle_files=False)
        n = int(ds.cardinality().numpy())
        if n < 0:  # unknown cardinality: count
            n = int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())
        sizes.append(n)
    return sizes


def train_and_held_out_splits(name: str, data_dir: str | None, validation_fraction: float) -> tuple[str, str]:
    """(training split, validation split or '') as tfds split strings.

    The validation split is the last ``holdout.validation_count`` examples of the
    dataset's training split in the prepared files' order (tfds shuffles examples when it
    prepares them), the training split the others: disjoint, and the same on every run
    and every host.
    """
    train = specs.spec(name).train_split
    if not validation_fraction:
        return train, ''
    (n,) = _split_sizes(name, [train], data_dir)
    kept = n - holdout.validation_count(validation_fraction, n)
    return f'{train}[:{kept}]', f'{train}[{kept}:]'


def _eval_split_of(name: str, data_dir: str | None, split: str, validation_fraction: float) -> str:
    """The tfds split behind eval split 'test' or 'validation' (the one carved from train)."""
    if split == 'test':
        return specs.spec(name).eval_split
    if split != 'validation':
        raise ValueError(f"unknown eval split {split!r}; choose 'test' or 'validation'")
    held = train_and_held_out_splits(name, data_dir, validation_fraction)[1]
    if not held:
        raise ValueError(f'{name} has no validation split; set data.validation_fraction > 0')
    return held


def _train_split(split: str, process_index: int, process_count: int) -> Any:
    # drop_remainder: every process gets the same number of examples, hence of steps.
    return tfds.split_for_jax_process(
        split,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=True,
    )


def _eval_split(split: str, process_index: int, process_count: int) -> Any:
    # No drop_remainder: together the shards hold every eval example exactly once.
    return tfds.even_splits(split, n=process_count, drop_remainder=False)[
        process_index
    ]


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Classes, model input shape and split sizes, from the prepared tfds metadata."""
    spec = specs.spec(name)
    num_train, num_test = _split_sizes(name, [spec.train_split, spec.eval_split], data_dir)
    return DatasetInfo(
        name=name,
        num_classes=spec.num_classes,
        image_shape=spec.image_shape,
        num_train=num_train,
        num_test=num_test,
    )


def steps_per_epoch(
    name: str,
    batch_size: int,
    data_dir: str | None = None,
    process_count: int | None = None,
    validation_fraction: float = 0.0,
) -> int:
    """Full global batches per epoch: every process's train slice holds
    floor(num_train / process_count) examples and drops its last partial batch.
    ``num_train`` excludes the validation split held out by ``validation_fraction``."""
    specs.spec(name)
    process_count = _process_count(process_count)
    per_process = _per_process_batch(batch_size, process_count)
    train = train_and_held_out_splits(name, data_dir, validation_fraction)[0]
    (n,) = _split_sizes(name, [_train_split(train, 0, process_count)], data_dir)
    if per_process > n:
        raise ValueError(
            f'per-process batch {per_process} exceeds the {n} training examples each of the '
            f'{process_count} processes reads; lower batch_size'
        )
    return n // per_process


def num_eval_batches(
    name: str,
    batch_size: int,
    data_dir: str | None = None,
    process_count: int | None = None,
    split: str = 'test',
    validation_fraction: float = 0.0,
) -> int:
    """Batches `eval_iterator` yields on every process (the largest shard, rounded up)."""
    specs.spec(name)
    process_count = _process_count(process_count)
    per_process = _per_process_batch(batch_size, process_count)
    tfds_split = _eval_split_of(name, data_dir, split, validation_fraction)
    return _num_batches(name, tfds_split, per_process, data_dir, process_count)


def _num_batches(
    name: str, tfds_split: str, per_process: int, data_dir: str | None, process_count: int
) -> int:
    """Per-process batches that hold the largest process shard of ``tfds_split``."""
    shards = [_eval_split(tfds_split, i, process_count) for i in range(process_count)]
    largest = max(_split_sizes(name, shards, data_dir))
    return -(-largest // per_process)


def train_iterator(
    name: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    shuffle_buffer: int | None = None,
    dtype: Any = np.float32,
    threads: int = 0,
    validation_fraction: float = 0.0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of augmented training batches for this process.

    Yields (images NHWC `dtype`, labels int32) of batch_size // process_count examples,
    full batches only. The order and the augmentation depend only on (seed, epoch,
    process_index); `start_step` skips that many batches of the epoch (mid-epoch resume).
    `threads` > 0 caps the cores the pipeline uses (see `pipeline_options`).
    `validation_fraction` > 0 leaves out the validation split (see `_splits`).
    """
    spec = specs.spec(name)
    process_index, process_count = _processes(process_index, process_count)
    per_process = _per_process_batch(batch_size, process_count)
    if start_step < 0:
        raise ValueError(f'start_step={start_step} must be >= 0')
    buffer = spec.shuffle_buffer if shuffle_buffer is None else int(shuffle_buffer)
    split = _train_split(
        train_and_held_out_splits(name, data_dir, validation_fraction)[0], process_index, process_count
    )
    if spec.cache:
        # Kept in memory across epochs, so the file order must not depend on the epoch;
        # the full-size shuffle buffer reshuffles each epoch.
        files_seed = _seed_ints(seed, process_index, 0, n=1)[0]
    else:
        files_seed = _seed_ints(seed, epoch, process_index, 0, n=1)[0]
    ds = _base(name, split, data_dir, shuffle_files=True, shuffle_seed=files_seed)
    shuffle_seed, aug_seed = _seed_ints(seed, epoch, process_index, 1)
    if buffer > 1:
        ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate()  # the position seeds the example's augmentation
    if start_step:
        ds = ds.skip(start_step * per_process)
    augment = specs.train_fn(name)
    out_dtype = tf.as_dtype(np.dtype(dtype))

    def _augment(index, example):
        image, label = example
        return augment(image, tf.stack([tf.constant(aug_seed, tf.int64), index])), label

    def _normalize(images, labels):  # one op over the batch is cheaper than one per image
        return tf.cast(normalize(images, spec.mean, spec.std), out_dtype), labels

    ds = ds.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(per_process, drop_remainder=True)
    ds = ds.map(_normalize, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.with_options(pipeline_options(threads))))


def eval_iterator(
    name: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    dtype: Any = np.float32,
    threads: int = 0,
    split: str = 'test',
    validation_fraction: float = 0.0,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Eval split ``split`` once, in order: (images, labels int32, valid bool) per batch.

    'test' is the dataset's eval split; 'validation' the one ``validation_fraction``
    carves from the training split (eval preprocessing, no augmentation).

    Each example goes to exactly one process. Padding examples (zeros, label 0,
    valid=False) fill the last batch, and fully padded batches make every process yield
    `num_eval_batches` batches, so collectives across hosts stay in step.
    """
    spec = specs.spec(name)
    process_index, process_count = _processes(process_index, process_count)
    per_process = _per_process_batch(batch_size, process_count)
    tfds_split = _eval_split_of(name, data_dir, split, validation_fraction)
    num_batches = _num_batches(name, tfds_split, per_process, data_dir, process_count)
    shard = _eval_split(tfds_split, process_index, process_count)
    ds = _base(name, shard, data_dir, shuffle_files=False)
    preprocess = specs.eval_fn(name)
    out_dtype = tf.as_dtype(np.dtype(dtype))
    ds = ds.map(
        lambda image, label: (tf.cast(preprocess(image), out_dtype), label, tf.constant(True)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    padding = tf.data.Dataset.from_tensors(
        (tf.zeros(spec.image_shape, out_dtype), tf.constant(0, tf.int32), tf.constant(False))
    ).repeat()
    ds = ds.concatenate(padding).take(num_batches * per_process)
    ds = ds.batch(per_process, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.with_options(pipeline_options(threads))))
