"""The byte-level text dataset 'python_source': files, the split by file, the windows."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jackpot_jax.data import catalog, text as text_data


def write_corpus(root, sizes=(300, 420, 150, 510, 260, 330, 90, 380, 440, 200, 610, 275), seed=0):
    """Files of random printable bytes (every window is then unique to its file), plus
    files the corpus must skip: a subfolder's module, a non-.py file, a _sysconfigdata."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    docs = {}
    for i, size in enumerate(sizes):
        text = bytes(rng.integers(32, 127, size, dtype=np.uint8))
        docs[f'mod_{i:02d}.py'] = text
        with open(os.path.join(root, f'mod_{i:02d}.py'), 'wb') as f:
            f.write(text)
    os.makedirs(os.path.join(root, 'package'))
    for name in ('package/inner.py', 'notes.txt', '_sysconfigdata__linux.py'):
        with open(os.path.join(root, name), 'w') as f:
            f.write('x = 1\n' * 50)
    return docs


@pytest.fixture
def corpus(tmp_path):
    root = str(tmp_path / 'text')
    return root, write_corpus(root)


def test_files_are_the_sorted_top_level_modules_only(corpus):
    root, docs = corpus
    assert text_data.python_source_files(root) == sorted(docs)


def test_the_default_folder_is_this_pythons_standard_library():
    names = text_data.python_source_files()
    assert 'os.py' in names and names == sorted(names)
    assert not any(n.startswith('_sysconfigdata') for n in names)


def test_split_is_by_file_disjoint_and_deterministic(corpus):
    root, docs = corpus
    splits = text_data.split_documents(sorted(docs), validation_fraction=0.2, test_fraction=0.1)
    assert [len(splits[s]) for s in ('train', 'validation', 'test')] == [9, 2, 1]
    assert sorted(sum(splits.values(), ())) == sorted(docs)
    assert splits == text_data.split_documents(sorted(docs), 0.2, 0.1)  # same files every time
    # The test files do not depend on the validation fraction; validation comes from train.
    none = text_data.split_documents(sorted(docs), 0.0, 0.1)
    assert none['test'] == splits['test'] and none['validation'] == ()
    assert set(none['train']) == set(splits['train']) | set(splits['validation'])
    # The input order of the names does not matter.
    assert text_data.split_documents(sorted(docs, reverse=True), 0.2, 0.1) == splits


def test_windows_are_shifted_by_one_and_stay_inside_a_document():
    docs = [bytes(range(10)), bytes(range(100, 103)), bytes(range(200, 221))]
    inputs, targets = text_data.token_windows(docs, context=4)
    assert inputs.dtype == np.int32 and inputs.shape == targets.shape == (2 + 0 + 5, 4)
    np.testing.assert_array_equal(inputs[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(targets[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(inputs[1], [4, 5, 6, 7])  # stride = context
    np.testing.assert_array_equal(targets[1], [5, 6, 7, 8])  # byte 9 fills no whole window
    np.testing.assert_array_equal(inputs[2], [200, 201, 202, 203])  # the 3-byte file: none
    np.testing.assert_array_equal(targets, np.asarray(inputs) + 1)  # never across files
    with pytest.raises(ValueError, match='data.context must be a positive integer, got 0'):
        text_data.token_windows(docs, 0)


def test_dataset_windows_come_from_their_split_files_only(corpus):
    root, docs = corpus
    ds = text_data.load_python_source(root, context=8, validation_fraction=0.2)
    m = ds.manifest
    assert (ds.num_classes, ds.image_shape) == (256, (8,))
    assert m['total_files'] == len(docs) and m['total_bytes'] == sum(map(len, docs.values()))
    for split, images, labels in (
        ('train', ds.train_images, ds.train_labels),
        ('validation', ds.validation_images, ds.validation_labels),
        ('test', ds.test_images, ds.test_labels),
    ):
        files = m['files'][split]
        assert m['bytes'][split] == sum(len(docs[f]) for f in files)
        assert len(images) == m['windows'][split] == sum((len(docs[f]) - 1) // 8 for f in files)
        np.testing.assert_array_equal(images[:, 1:], labels[:, :-1])
        for window, last in zip(images, labels[:, -1]):
            text = bytes(window.astype(np.uint8)) + bytes([last])
            owners = [name for name, doc in docs.items() if text in doc]
            assert owners and set(owners) <= set(files), split
    again = text_data.load_python_source(root, context=8, validation_fraction=0.2)
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    assert again.manifest['sha256'] == m['sha256']


def test_launcher_source_pads_token_labels_and_reads_data_context(corpus):
    root, _ = corpus
    source = catalog.load_source('python_source', root, {'context': 8}, validation_fraction=0.2)
    assert source.image_shape == (8,) and source.has_validation
    x, y = next(iter(source.train_epoch(4, seed=0, epoch=0)))
    assert x.shape == y.shape == (4, 8)
    batches = list(source.eval_batches(16, 'test'))
    assert sum(int(valid.sum()) for _, _, valid in batches) == len(source.test_labels)
    x, y, valid = batches[-1]
    assert x.shape == y.shape == (16, 8) and valid.shape == (16,)


def test_bad_folders_and_contexts_say_what_to_do(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match='does not exist; set --config.data.data_dir'):
        text_data.load_python_source(str(tmp_path / 'missing'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='no \\*.py files'):
        text_data.load_python_source(str(tmp_path / 'empty'))
    root, _ = corpus
    with pytest.raises(ValueError, match='hold no window of data.context \\+ 1 = 1001 bytes'):
        text_data.load_python_source(root, context=1000)
