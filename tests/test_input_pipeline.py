"""Tests for the tfds input pipelines: mocked tfds reads, and the genuine cifar10 builder
run on synthetic files in the official binary layout. Needs TensorFlow; never torch."""

from __future__ import annotations

import collections
import os
from unittest import mock

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from jackpot_jax.data import image_preprocessing as pre, input_pipeline as ip, tfds_source

MOCK_N = 7
CIFAR_MEAN = np.array(pre.CIFAR_MEAN, np.float32)
CIFAR_STD = np.array(pre.CIFAR_STD, np.float32)
IMAGENET_MEAN = np.array(pre.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.array(pre.IMAGENET_STD, np.float32)


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Cached CIFAR datasets must not leak between tests (mocks differ)."""
    ip.clear_cache()
    yield
    ip.clear_cache()


@pytest.fixture
def mock_dir(tmp_path):
    """A data_dir with nothing in it: only the tfds mock can serve it."""
    with tfds.testing.mock_data(num_examples=MOCK_N):
        yield str(tmp_path)


def _batches(iterator):
    return [tuple(np.asarray(a) for a in batch) for batch in iterator]


# --------------------------------------------------------------------------
# Preprocessing functions, on known images.
# --------------------------------------------------------------------------


def test_white_cifar_image_normalises_to_one_minus_mean_over_std():
    white = tf.fill([32, 32, 3], tf.constant(255, tf.uint8))
    out = pre.preprocess_cifar_eval(white).numpy()
    np.testing.assert_allclose(
        out, np.broadcast_to((1 - CIFAR_MEAN) / CIFAR_STD, out.shape), rtol=1e-6
    )


def test_cifar_train_crop_keeps_centre_and_pads_with_black():
    white = tf.fill([32, 32, 3], tf.constant(255, tf.uint8))
    white_n, black_n = (1 - CIFAR_MEAN) / CIFAR_STD, -CIFAR_MEAN / CIFAR_STD
    saw_padding = False
    for i in range(20):
        out = pre.preprocess_cifar_train(white, tf.constant([3, i], tf.int64)).numpy()
        assert out.shape == (32, 32, 3) and out.dtype == np.float32
        # The crop offset is within +-4 pixels, so the central 24x24 is always image.
        np.testing.assert_allclose(
            out[4:28, 4:28], np.broadcast_to(white_n, (24, 24, 3)), rtol=1e-6
        )
        is_white = np.isclose(out, white_n).all(-1)
        is_black = np.isclose(out, black_n).all(-1)
        assert (is_white | is_black).all()
        saw_padding |= bool(is_black.any())
    assert saw_padding


def test_cifar_train_augmentation_is_a_function_of_the_seed():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    a = pre.preprocess_cifar_train(image, tf.constant([1, 2], tf.int64)).numpy()
    b = pre.preprocess_cifar_train(image, tf.constant([1, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    others = [
        pre.preprocess_cifar_train(image, tf.constant([1, s], tf.int64)).numpy() for s in range(3, 8)
    ]
    assert any(not np.array_equal(a, o) for o in others)


def test_random_resized_crop_window_is_valid_and_falls_back_to_centre():
    for i in range(30):
        top, left, h, w = (
            int(v) for v in pre.random_resized_crop_window(100, 200, tf.constant([0, i], tf.int64))
        )
        assert 0 < h and 0 <= top and top + h <= 100
        assert 0 < w and 0 <= left and left + w <= 200
        assert 0.08 * 0.9 <= h * w / 20000 <= 1.0
        assert 0.7 <= w / h <= 1.43
    # Too thin for any draw: torchvision's centre crop at the nearest allowed aspect.
    tall = [int(v) for v in pre.random_resized_crop_window(1000, 10, tf.constant([0, 1], tf.int64))]
    assert tall == [(1000 - 13) // 2, 0, 13, 10]
    wide = [int(v) for v in pre.random_resized_crop_window(10, 1000, tf.constant([0, 1], tf.int64))]
    assert wide == [0, (1000 - 13) // 2, 10, 13]


def test_imagenet_eval_resizes_shorter_side_then_centre_crops():
    assert tuple(pre.resize_shorter_side(tf.zeros([300, 500, 3])).shape) == (256, 426, 3)
    assert tuple(pre.resize_shorter_side(tf.zeros([500, 300, 3])).shape) == (426, 256, 3)
    ramp = tf.reshape(tf.range(426, dtype=tf.float32), [1, 426, 1]) * tf.ones([256, 1, 3])
    crop = pre.center_crop(ramp).numpy()
    assert crop.shape == (224, 224, 3) and crop[0, 0, 0] == 101  # round((426 - 224) / 2)
    white = tf.io.encode_png(tf.fill([37, 90, 3], tf.constant(255, tf.uint8)))
    out = pre.preprocess_imagenet_eval(white).numpy()
    expected = (1 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out, np.broadcast_to(expected, (224, 224, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('encode', [tf.io.encode_png, tf.io.encode_jpeg])
def test_imagenet_train_output_from_png_and_jpeg(encode):
    white = encode(tf.fill([64, 48, 3], tf.constant(255, tf.uint8)))
    out = pre.preprocess_imagenet_train(white, tf.constant([5, 6], tf.int64)).numpy()
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    expected = (1 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=0.03)


# --------------------------------------------------------------------------
# The whole pipeline through tfds.testing.mock_data.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name, shape, classes',
    [
        ('cifar10', (32, 32, 3), 10),
        ('cifar100', (32, 32, 3), 100),
        ('imagenet2012', (224, 224, 3), 1000),
    ],
)
def test_mocked_pipeline_shapes_coverage_and_determinism(mock_dir, name, shape, classes):
    info = ip.dataset_info(name, data_dir=mock_dir)
    assert info == ip.DatasetInfo(name, classes, shape, MOCK_N, MOCK_N)
    assert ip.steps_per_epoch(name, 2, data_dir=mock_dir, process_count=1) == MOCK_N // 2

    # Train: full batches of batch_size // process_count, deterministic per (seed, epoch).
    kwargs = dict(batch_size=4, data_dir=mock_dir, seed=3, process_index=1, process_count=2)
    epoch0 = _batches(ip.train_iterator(name, epoch=0, **kwargs))
    assert len(epoch0) == MOCK_N // 2
    for images, labels in epoch0:
        assert images.shape == (2,) + shape and images.dtype == np.float32
        assert labels.shape == (2,) and labels.dtype == np.int32
        assert ((labels >= 0) & (labels < classes)).all()
    again = _batches(ip.train_iterator(name, epoch=0, **kwargs))
    for (a, b), (c, d) in zip(epoch0, again, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    epoch1 = _batches(ip.train_iterator(name, epoch=1, **kwargs))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(epoch0, epoch1, strict=True))
    resumed = _batches(ip.train_iterator(name, epoch=0, start_step=1, **kwargs))
    assert len(resumed) == len(epoch0) - 1
    for (a, b), (c, d) in zip(epoch0[1:], resumed, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)

    # Eval: every example once, the last batch zero-padded and marked invalid.
    batches = _batches(
        ip.eval_iterator(name, batch_size=3, data_dir=mock_dir, process_index=0, process_count=1)
    )
    assert (
        len(batches) == -(-MOCK_N // 3) == ip.num_eval_batches(name, 3, mock_dir, process_count=1)
    )
    for images, labels, valid in batches:
        assert images.shape == (3,) + shape and images.dtype == np.float32
        assert labels.dtype == np.int32 and valid.dtype == bool
    valid = np.concatenate([b[2] for b in batches])
    assert valid.sum() == MOCK_N and valid[:MOCK_N].all()
    last_images, last_labels, last_valid = batches[-1]
    assert (
        not last_valid[-1]
        and (last_images[~last_valid] == 0).all()
        and (last_labels[~last_valid] == 0).all()
    )


def test_mocked_eval_images_are_normalised_uint8(mock_dir):
    """Undoing the normalisation gives integer pixel values: nothing else touched them."""
    images, _, valid = next(
        ip.eval_iterator(
            'cifar10', batch_size=4, data_dir=mock_dir, process_count=1, process_index=0
        )
    )
    pixels = (images[valid] * CIFAR_STD + CIFAR_MEAN) * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    half = next(
        ip.eval_iterator(
            'cifar10',
            batch_size=4,
            data_dir=mock_dir,
            process_count=1,
            process_index=0,
            dtype=np.float16,
        )
    )
    assert half[0].dtype == np.float16


def test_batch_must_divide_among_processes(mock_dir):
    with pytest.raises(ValueError, match='multiple of process_count=2'):
        ip.train_iterator(
            'cifar10', batch_size=5, data_dir=mock_dir, process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match='multiple of process_count=4'):
        ip.eval_iterator(
            'cifar10', batch_size=6, data_dir=mock_dir, process_index=0, process_count=4
        )
    with pytest.raises(ValueError, match='process_index'):
        ip.train_iterator(
            'cifar10', batch_size=4, data_dir=mock_dir, process_index=2, process_count=2
        )


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'.*cifar10.*cifar100.*imagenet2012"
    ):
        ip.train_iterator('mnist', batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match='unknown dataset'):
        ip.dataset_info('svhn')


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_missing_prepared_data_says_where_and_how(tmp_path, name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError('the pipeline tried to download')

    for method in ('download', 'download_and_extract', 'download_and_prepare'):
        target = (
            tfds.download.DownloadManager
            if method != 'download_and_prepare'
            else tfds.core.DatasetBuilder
        )
        monkeypatch.setattr(target, method, no_download)
    with pytest.raises(ip.DatasetNotPreparedError) as err:
        ip.train_iterator(
            name, batch_size=2, data_dir=str(tmp_path), process_index=0, process_count=1
        )
    message = str(err.value)
    assert (
        str(tmp_path) in message
        and f'tfds build {name}' in message
        and 'never downloads' in message
    )
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(ip.DatasetNotPreparedError):
        ip.eval_iterator(
            name, batch_size=2, data_dir=str(tmp_path), process_index=0, process_count=1
        )
    with pytest.raises(ip.DatasetNotPreparedError):
        ip.dataset_info(name, data_dir=str(tmp_path))


# --------------------------------------------------------------------------
# The genuine tfds cifar10 builder on synthetic files in the official layout.
# --------------------------------------------------------------------------

PER_FILE = 10
TRAIN_FILES = [f'data_batch_{i}.bin' for i in range(1, 6)]
LABEL_NAMES = [
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
]


def _write_cifar10_binaries(root) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes cifar-10-batches-bin/ as the official archive extracts; returns the records
    per file as (labels, HWC images). Pixel [0, 0, 0] holds a unique record number."""
    folder = os.path.join(root, 'cifar-10-batches-bin')
    os.makedirs(folder)
    rng = np.random.default_rng(1234)
    records = {}
    for k, filename in enumerate(TRAIN_FILES + ['test_batch.bin']):
        labels = rng.integers(0, 10, PER_FILE).astype(np.uint8)
        chw = rng.integers(0, 256, (PER_FILE, 3, 32, 32)).astype(np.uint8)
        chw[:, 0, 0, 0] = np.arange(PER_FILE) + PER_FILE * k  # unique (red, top-left)
        with open(os.path.join(folder, filename), 'wb') as f:
            for label, image in zip(labels, chw, strict=True):
                f.write(bytes([int(label)]) + image.tobytes())
        records[filename] = (labels.astype(np.int32), chw.transpose(0, 2, 3, 1))
    with open(os.path.join(folder, 'batches.meta.txt'), 'w') as f:
        f.write('\n'.join(LABEL_NAMES) + '\n\n')
    return records


@pytest.fixture(scope='module')
def genuine_cifar10(tmp_path_factory):
    """(data_dir, train records, test records) after the real builder prepared the files."""
    extracted = tmp_path_factory.mktemp('extracted')
    records = _write_cifar10_binaries(str(extracted))
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    with mock.patch.object(
        tfds.download.DownloadManager, 'download_and_extract', return_value=str(extracted)
    ) as download:
        tfds.builder('cifar10', data_dir=data_dir).download_and_prepare()
    assert download.called
    train = tuple(np.concatenate([records[f][i] for f in TRAIN_FILES]) for i in range(2))
    return data_dir, train, records['test_batch.bin']


def _to_pixels(images: np.ndarray) -> np.ndarray:
    """Undoes the CIFAR normalisation (exactly, up to float rounding)."""
    pixels = (images * CIFAR_STD + CIFAR_MEAN) * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)
    return np.round(pixels).astype(np.int32)


def _source_of_augmented(image: np.ndarray, label: int, train) -> int:
    """The record this augmented image was cut from: some pad-4 crop, maybe flipped."""
    labels, sources = train
    pixels = _to_pixels(image)
    for index in np.flatnonzero(labels == label):
        padded = np.pad(sources[index].astype(np.int32), ((4, 4), (4, 4), (0, 0)))
        for flip in (False, True):
            candidate = padded[:, ::-1] if flip else padded
            for dy in range(9):
                for dx in range(9):
                    if np.array_equal(candidate[dy : dy + 32, dx : dx + 32], pixels):
                        return int(index)
    raise AssertionError('an augmented image matches no source record')


def test_genuine_builder_info(genuine_cifar10):
    data_dir, _, _ = genuine_cifar10
    info = ip.dataset_info('cifar10', data_dir=data_dir)
    assert info == ip.DatasetInfo('cifar10', 10, (32, 32, 3), 5 * PER_FILE, PER_FILE)
    assert ip.steps_per_epoch('cifar10', 8, data_dir=data_dir, process_count=2) == 25 // 4
    assert ip.steps_per_epoch('cifar10', 9, data_dir=data_dir, process_count=3) == 16 // 3


@pytest.mark.parametrize('process_count', [1, 3])
def test_genuine_eval_round_trips_every_record_once(genuine_cifar10, process_count):
    data_dir, _, (labels, images) = genuine_cifar10
    per_process = 2
    got_images, got_labels, counts = [], [], []
    for index in range(process_count):
        batches = _batches(
            ip.eval_iterator(
                'cifar10',
                batch_size=per_process * process_count,
                data_dir=data_dir,
                process_index=index,
                process_count=process_count,
            )
        )
        counts.append(len(batches))
        for x, y, valid in batches:
            assert x.shape == (per_process, 32, 32, 3)
            got_images.append(_to_pixels(x[valid]))
            got_labels.append(y[valid])
            assert (x[~valid] == 0).all()
    assert len(set(counts)) == 1  # every process runs the same number of eval steps
    got_images, got_labels = np.concatenate(got_images), np.concatenate(got_labels)
    assert len(got_labels) == PER_FILE
    # Pixel [0, 0, 0] numbers the records: each once, with its label and pixels (CHW -> HWC).
    order = np.argsort(got_images[:, 0, 0, 0])
    np.testing.assert_array_equal(
        got_images[order], images.astype(np.int32)[np.argsort(images[:, 0, 0, 0])]
    )
    np.testing.assert_array_equal(got_labels[order], labels[np.argsort(images[:, 0, 0, 0])])


def test_genuine_train_epoch_covers_records_once_per_process_split(genuine_cifar10):
    data_dir, train, _ = genuine_cifar10
    seen = []
    for index in range(2):
        batches = _batches(
            ip.train_iterator(
                'cifar10',
                batch_size=10,
                data_dir=data_dir,
                seed=7,
                epoch=2,
                process_index=index,
                process_count=2,
            )
        )
        assert (
            len(batches)
            == ip.steps_per_epoch('cifar10', 10, data_dir=data_dir, process_count=2)
            == 5
        )
        for images, labels in batches:
            assert images.shape == (5, 32, 32, 3) and labels.dtype == np.int32
            seen.extend(
                _source_of_augmented(im, int(lab), train)
                for im, lab in zip(images, labels, strict=True)
            )
    # The two processes' slices are disjoint and together hold the 50 records once each.
    assert collections.Counter(seen) == collections.Counter(range(5 * PER_FILE))


def test_genuine_train_order_depends_on_seed_and_epoch_only(genuine_cifar10):
    data_dir, _, _ = genuine_cifar10
    kwargs = dict(batch_size=10, data_dir=data_dir, process_index=0, process_count=1)
    first = _batches(ip.train_iterator('cifar10', seed=1, epoch=4, **kwargs))
    ip.clear_cache()  # as a fresh process resuming at epoch 4 would
    again = _batches(ip.train_iterator('cifar10', seed=1, epoch=4, **kwargs))
    cached = _batches(ip.train_iterator('cifar10', seed=1, epoch=4, **kwargs))
    for other in (again, cached):
        for (a, b), (c, d) in zip(first, other, strict=True):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
    next_epoch = _batches(ip.train_iterator('cifar10', seed=1, epoch=5, **kwargs))
    other_seed = _batches(ip.train_iterator('cifar10', seed=2, epoch=4, **kwargs))
    first_labels = np.concatenate([b[1] for b in first])
    assert not np.array_equal(first_labels, np.concatenate([b[1] for b in next_epoch]))
    assert not np.array_equal(first_labels, np.concatenate([b[1] for b in other_seed]))


@pytest.mark.parametrize('process_count', [1, 2])
def test_genuine_validation_split_is_disjoint_from_training_and_deterministic(
    genuine_cifar10, process_count
):
    """0.2 of the 50 records: 10 held out, read once each, never in a training batch."""
    data_dir, train, _ = genuine_cifar10
    kwargs = dict(data_dir=data_dir, process_count=process_count, validation_fraction=0.2)
    assert ip.steps_per_epoch('cifar10', 4, **kwargs) == 40 // 4
    held, trained = [], []
    for index in range(process_count):
        for seed in (0, 1):
            for images, labels in _batches(
                ip.train_iterator('cifar10', batch_size=4, seed=seed, process_index=index, **kwargs)
            ):
                trained.extend(
                    _source_of_augmented(im, int(lab), train)
                    for im, lab in zip(images, labels, strict=True)
                )
        for images, labels, valid in _batches(
            ip.eval_iterator(
                'cifar10', batch_size=2 * process_count, process_index=index, split='validation',
                **kwargs,
            )
        ):
            held.extend(
                _source_of_augmented(im, int(lab), train)  # unaugmented: offset 4, no flip
                for im, lab in zip(images[valid], labels[valid], strict=True)
            )
    assert len(held) == len(set(held)) == 10
    assert set(trained) == set(range(5 * PER_FILE)) - set(held)
    # The same records on every call (here: after the in-memory cache is dropped).
    ip.clear_cache()
    again = [
        int(x[0, 0, 0])
        for index in range(process_count)
        for images, _, valid in _batches(
            ip.eval_iterator(
                'cifar10', batch_size=2 * process_count, process_index=index, split='validation',
                **kwargs,
            )
        )
        for x in _to_pixels(images[valid])
    ]
    assert sorted(again) == sorted(int(train[1][i][0, 0, 0]) for i in held)


def test_validation_fraction_that_leaves_no_training_example_is_refused(genuine_cifar10):
    data_dir, _, _ = genuine_cifar10
    with pytest.raises(ValueError, match='validation_fraction=0.99 leaves no training'):
        tfds_source.TfdsSource('cifar10', data_dir, validation_fraction=0.99)
    with pytest.raises(ValueError, match=r'must be in \[0, 1\), got 1.5'):
        tfds_source.TfdsSource('cifar10', data_dir, validation_fraction=1.5)
    with pytest.raises(ValueError, match='no validation split; set data.validation_fraction'):
        list(ip.eval_iterator('cifar10', batch_size=2, data_dir=data_dir, split='validation'))


# --------------------------------------------------------------------------
# The fast ImageNet training path against the reference order of operations.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('size', [(375, 500), (120, 90)])  # crops shrink / crops grow
def test_fast_imagenet_train_matches_crop_resize_flip_reference(size):
    """Flip before resize and plain bilinear on pure upscales give the pixels of the
    reference order (crop, antialiased resize, flip) up to float rounding."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*size, 3), np.uint8)
    jpeg = tf.io.encode_jpeg(pixels, quality=90)
    for i in range(6):
        seed = tf.constant([4, i], tf.int64)
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        window = pre.random_resized_crop_window(size[0], size[1], crop_seed)
        crop = tf.image.decode_and_crop_jpeg(jpeg, tf.stack(window), channels=3)
        resized = tf.image.resize(crop, [224, 224], 'bilinear', antialias=True)
        want = tf.image.stateless_random_flip_left_right(resized, seed=flip_seed).numpy()
        got = pre.augment_imagenet_train(jpeg, seed).numpy()
        np.testing.assert_allclose(got, want, atol=0.02)
        np.testing.assert_allclose(
            pre.preprocess_imagenet_train(jpeg, seed).numpy(),
            pre.normalize(want, pre.IMAGENET_MEAN, pre.IMAGENET_STD).numpy(),
            atol=1e-3,
        )


def test_pipeline_threads_option(mock_dir):
    options = ip.pipeline_options(2)
    assert options.deterministic and options.threading.private_threadpool_size == 2
    assert options.threading.max_intra_op_parallelism == 1
    with pytest.raises(ValueError, match='threads=-1'):
        ip.pipeline_options(-1)
    kwargs = dict(batch_size=2, data_dir=mock_dir, seed=1, process_index=0, process_count=1)
    one = _batches(ip.train_iterator('imagenet2012', threads=1, **kwargs))
    every = _batches(ip.train_iterator('imagenet2012', **kwargs))
    for (a, b), (c, d) in zip(one, every, strict=True):  # the cores used change nothing
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
