"""Text that needs no download, as an in-memory dataset of token windows.

``python_source`` is a byte-level corpus of real text, the Python standard library's own
top-level modules (:func:`python_source_files`), split into train / validation / test by
file and cut into windows of ``context + 1`` bytes (:func:`load_python_source`): the
"images" are ``[context]`` token windows, the labels the ``[context]`` next tokens, and
``num_classes`` is the vocabulary, 256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jackpot_jax.data import holdout
from jackpot_jax.data.sources import VALIDATION_SEED, ArrayDataset

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
