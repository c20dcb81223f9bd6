"""In-memory datasets: the IDX reader on files in the real format, batching, padding."""

import gzip
import os

import numpy as np
import pytest

from jackpot_jax.data import catalog, sources


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
        int(d).to_bytes(4, 'big') for d in array.shape
    )
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_files(folder, n_train=12, n_test=5, seed=0):
    """Small Fashion-MNIST look-alike in the real gzipped IDX layout."""
    rng = np.random.default_rng(seed)
    arrays = {
        'train_images': rng.integers(0, 256, (n_train, 28, 28)),
        'train_labels': rng.integers(0, 10, n_train),
        'test_images': rng.integers(0, 256, (n_test, 28, 28)),
        'test_labels': rng.integers(0, 10, n_test),
    }
    for key, name in sources._FASHION_FILES.items():
        _write_idx(os.path.join(folder, name), arrays[key])
    return arrays


def test_read_idx_round_trips_and_fashion_loader_normalises(tmp_path):
    arrays = make_fashion_files(tmp_path)
    np.testing.assert_array_equal(
        sources.read_idx(str(tmp_path / 'train-labels-idx1-ubyte.gz')), arrays['train_labels']
    )
    ds = sources.load_fashion_mnist(str(tmp_path))
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.train_images.dtype == np.float32
    assert ds.test_images.shape == (5, 28, 28, 1)
    assert abs(ds.train_images.mean()) < 1e-5 and abs(ds.train_images.std() - 1) < 1e-4
    raw = arrays['train_images'] / 255.0
    expected = (raw - raw.mean()) / raw.std()
    np.testing.assert_allclose(ds.train_images[..., 0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.test_labels, arrays['test_labels'])


def test_read_idx_rejects_truncated_and_non_idx_files(tmp_path):
    path = tmp_path / 'bad.gz'
    with gzip.open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, 'big') + b'abc')
    with pytest.raises(ValueError, match='truncated'):
        sources.read_idx(str(path))
    with gzip.open(path, 'wb') as f:
        f.write(b'\x1f\x00\x00\x00')
    with pytest.raises(ValueError, match='not an unsigned-byte IDX'):
        sources.read_idx(str(path))


def test_missing_fashion_files_name_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
        sources.load_fashion_mnist(str(tmp_path))


def test_digits_split_is_stratified_and_reproducible():
    a, b = sources.load_digits(), sources.load_digits()
    assert a.train_images.shape == (1437, 8, 8, 1) and a.test_images.shape == (360, 8, 8, 1)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert set(np.bincount(a.test_labels)) <= {35, 36, 37}


def test_train_batches_are_full_deterministic_and_reshuffled_per_epoch():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10, dtype=np.int32)
    epoch0 = [b for _, b in sources.train_batches(x, y, 3, seed=1, epoch=0)]
    assert [len(b) for b in epoch0] == [3, 3, 3]
    assert len(set(np.concatenate(epoch0))) == 9
    again = [b for _, b in sources.train_batches(x, y, 3, seed=1, epoch=0)]
    np.testing.assert_array_equal(np.concatenate(epoch0), np.concatenate(again))
    epoch1 = [b for _, b in sources.train_batches(x, y, 3, seed=1, epoch=1)]
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    resumed = [b for _, b in sources.train_batches(x, y, 3, seed=1, epoch=0, start_step=2)]
    np.testing.assert_array_equal(resumed[0], epoch0[2])
    with pytest.raises(ValueError, match='batch_size=11'):
        list(sources.train_batches(x, y, 11, seed=0, epoch=0))


def test_eval_batches_cover_each_example_once_with_a_padded_last_batch():
    x = np.arange(7, dtype=np.float32)[:, None]
    y = np.arange(7, dtype=np.int32)
    batches = list(sources.eval_batches(x, y, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4]
    valid = np.concatenate([b[2] for b in batches])
    np.testing.assert_array_equal(valid, [True] * 7 + [False])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches])[valid], y)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        catalog.load_dataset('mnist')
