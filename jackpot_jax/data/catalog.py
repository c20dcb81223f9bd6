"""Every dataset by name: the in-memory ones (digits, Fashion-MNIST, text) and the tfds
ones (CIFAR-10/100, ImageNet, any ``tfds:NAME``), opened as one kind of source."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jackpot_jax.data import prose, sources, text

# Byte-level text (text.py), and prose tokenized by the model's tokenizer (prose.py).
TEXT_DATASETS = ('python_source', 'python_docs')
DATASETS = ('digits', 'fashion_mnist') + TEXT_DATASETS  # in memory, no TensorFlow needed
TFDS_DATASETS = ('cifar10', 'cifar100', 'imagenet2012')  # see input_pipeline.py
TFDS_PREFIX = 'tfds:'  # 'tfds:NAME': any tfds image-classification dataset
# The config's data.* fields for 'tfds:NAME' datasets (tfds_source.open_dataset's keywords).
TFDS_FIELDS = ('image_size', 'resize', 'random_flip', 'mean', 'std', 'eval_split')


def load_dataset(name: str, data_dir: str | None = None) -> sources.ArrayDataset:
    """The named in-memory dataset."""
    if name == 'digits':
        return sources.load_digits()
    if name == 'fashion_mnist':
        return sources.load_fashion_mnist(data_dir)
    if name == 'python_source':
        return text.load_python_source(data_dir)
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
        from jackpot_jax.data import tfds_source

        return tfds_source.open_dataset(
            name, data_dir, validation_fraction, threads, **tfds_options(options or {})
        )
    if name == 'python_docs':
        return _python_docs(data_dir, options or {}, validation_fraction)
    if name in TEXT_DATASETS:
        context = (options or {}).get('context', 0) or text.DEFAULT_CONTEXT
        return text.load_python_source(data_dir, context, validation_fraction=validation_fraction)
    if name in DATASETS:
        return sources.split_validation(load_dataset(name, data_dir), validation_fraction)
    if name in TFDS_DATASETS:
        from jackpot_jax.data import tfds_source

        return tfds_source.TfdsSource(name, data_dir, validation_fraction, threads)
    raise ValueError(f'unknown dataset {name!r}; choose one of {DATASETS + TFDS_DATASETS}')


def _python_docs(data_dir: str | None, options: Mapping, validation_fraction: float):
    """The documentation's prose in the tokens of ``options['tokenizer']`` (the model's)."""
    if not options.get('tokenizer'):
        raise ValueError(
            "data.name='python_docs' is tokenized by a language model's own tokenizer, but "
            'the model has none; use a LLaMA (--config=configs/smollm2.py) or '
            "data.name='python_source' (bytes)"
        )
    return prose.load_python_docs(
        options['tokenizer'], data_dir, options.get('context', 0),
        validation_fraction=validation_fraction,
        max_eval_tokens=options.get('max_eval_tokens', 0),
        cache_dir=options.get('cache_dir') or None,
    )  # fmt: skip


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
    """The keyword arguments of ``tfds_source.open_dataset`` from the ``data.*`` fields."""
    options = {key: data_config[key] for key in TFDS_FIELDS if key in data_config}
    for key in ('image_size', 'resize'):
        if key in options and (not isinstance(options[key], int) or options[key] < 0):
            raise ValueError(f'data.{key} must be an int >= 0, got {options[key]!r}')
    for key in ('mean', 'std'):
        if key in options:
            options[key] = _floats(key, options[key])
    return options
