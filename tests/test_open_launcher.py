"""The open launcher: a user's model by import path, any tfds image-classification dataset
('tfds:NAME', on tfds mock data), and the one-line errors for bad names."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

from jackpot_jax.data import catalog
from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import config as config_lib, modes, search_mode, weight_training
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import zoo

tfds = pytest.importorskip('tensorflow_datasets')

from tensorflow_datasets.testing import test_utils as tfds_test_utils  # noqa: E402
from test_paper_configs import ThreadConfinedMockFs  # noqa: E402  (tests/ is on the path)

from jackpot_jax.data import input_pipeline

MOCK_EXAMPLES = 12


@pytest.fixture
def mock_dir(tmp_path):
    """An empty data_dir that only tfds's mock serves (12 random examples per split)."""
    input_pipeline.clear_cache()
    with (
        mock.patch.object(tfds_test_utils, 'MockFs', ThreadConfinedMockFs),
        tfds.testing.mock_data(num_examples=MOCK_EXAMPLES),
    ):
        yield str(tmp_path / 'tfds')
    input_pipeline.clear_cache()


# ----------------------------------------------------------------------------
# 'tfds:NAME' data sources.
# ----------------------------------------------------------------------------
def test_fixed_size_grey_dataset_keeps_its_size_and_normalises(mock_dir):
    source = catalog.load_source('tfds:mnist', mock_dir, {'mean': '0.25', 'std': '0.5'})
    assert (source.num_classes, source.image_shape) == (10, (28, 28, 1))
    assert source.steps_per_epoch(4) == MOCK_EXAMPLES // 4
    images, labels = next(iter(source.train_epoch(4, seed=0, epoch=0)))
    assert images.shape == (4, 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(labels) <= set(range(10))
    # uint8 pixels p -> (p / 255 - 0.25) / 0.5: within [-0.5, 1.5], and the mock's random
    # pixels reach both ends of the range.
    assert images.min() >= -0.5 - 1e-6 and images.max() <= 1.5 + 1e-6
    assert images.min() < 0 < images.max()
    batches = list(source.eval_batches(5))
    assert sum(int(valid.sum()) for _, _, valid in batches) == MOCK_EXAMPLES


def test_varying_size_colour_dataset_is_resized_and_cropped(mock_dir):
    options = {'image_size': 12, 'resize': 16, 'random_flip': True, 'mean': '0.5,0.4,0.3'}
    source = catalog.load_source('tfds:oxford_flowers102', mock_dir, options)
    assert (source.num_classes, source.image_shape) == (102, (12, 12, 3))
    images, _ = next(iter(source.train_epoch(4, seed=0, epoch=0)))
    assert images.shape == (4, 12, 12, 3)
    eval_images, _, _ = next(iter(source.eval_batches(4)))
    assert eval_images.shape == (4, 12, 12, 3)
    again, _, _ = next(iter(source.eval_batches(4)))  # centre crops: the same every time
    np.testing.assert_array_equal(eval_images, again)


def test_colour_dataset_of_fixed_size_resized_to_image_size(mock_dir):
    source = catalog.load_source('tfds:svhn_cropped', mock_dir, {'image_size': 16})
    assert (source.num_classes, source.image_shape) == (10, (16, 16, 3))
    images, _ = next(iter(source.train_epoch(4, seed=0, epoch=0)))
    assert images.shape == (4, 16, 16, 3)


@pytest.mark.parametrize(
    'name, options, message',
    [
        ('tfds:imdb_reviews', {}, "not an image-classification dataset: it needs an 'image'"),
        ('tfds:no_such_dataset', {}, "tensorflow_datasets has no dataset 'no_such_dataset'"),
        ('tfds:oxford_flowers102', {}, 'images of varying size; set --config.data.image_size'),
        ('tfds:mnist', {'mean': '0.1,0.2'}, 'data.mean has 2 values; tfds:mnist has 1 channel'),
        ('tfds:mnist', {'image_size': 16, 'resize': 8}, 'data.resize=8 is smaller'),
        ('tfds:mnist', {'std': 'wide'}, "data.std='wide' must be comma-separated numbers"),
    ],
)
def test_bad_tfds_names_and_options_say_what_to_fix(mock_dir, name, options, message):
    with pytest.raises(ValueError, match=message):
        catalog.load_source(name, mock_dir, options)


# ----------------------------------------------------------------------------
# User models by import path.
# ----------------------------------------------------------------------------
def test_user_model_gets_num_classes_and_its_model_fields():
    model = zoo.get_model('user_model:TinyNet', 7, width=64, features=3)
    assert (model.num_classes, model.features) == (7, 3)  # 'width' is a base default: dropped


@pytest.mark.parametrize(
    'name, message',
    [
        ('no_such_package.models:Net', "cannot import 'no_such_package.models'"),
        ('user_model:Missing', "'user_model' has no attribute 'Missing'"),
        ('user_model:NOT_A_MODULE', 'is a str, not a factory'),
        ('user_model:make_nothing', 'returned a builtins.dict, not a flax.linen.Module'),
        ('user_model:make_deterministic_net', "takes no keyword 'train'.*add a 'train: bool"),
        ('user_model:', 'is not an import path'),
    ],
)
def test_bad_model_names_say_what_to_fix(name, message):
    with pytest.raises(ValueError, match=message):
        zoo.get_model(name, 10, width=64)


def test_user_model_field_it_does_not_take_is_named():
    with pytest.raises(ValueError, match=r"takes no keyword 'depth' \(config field model.depth\)"):
        zoo.get_model('user_model:TinyNet', 10, depth=3)


def test_config_accepts_open_names_and_rejects_unknown_plain_ones():
    config = config_lib.get_config()
    config.model.name = 'user_model:TinyNet'
    config.data.name = 'tfds:mnist'
    modes.validate(config)
    config.data.name = 'mnist'
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*tfds:NAME"):
        modes.validate(config)


def test_user_model_on_a_tfds_dataset_through_the_launcher(mock_dir, tmp_path):
    """pretrain -> search with model.name='user_model:TinyNet' (no BatchNorm) on
    data.name='tfds:fashion_mnist', resized to 16x16."""
    config = config_lib.get_config()
    config.model.name = 'user_model:TinyNet'
    config.data.name = 'tfds:fashion_mnist'
    config.data.data_dir = mock_dir
    config.data.image_size = 16
    config.data.eval_batch_size = 8
    config.pretrain.epochs = config.search.epochs = 1
    config.pretrain.batch_size = config.search.batch_size = 8
    modes.validate(config)
    workdir = str(tmp_path / 'run')
    weight_training.run_pretrain(resolved(config), workdir)
    found = search_mode.run_search(resolved(config), workdir)

    params, statistics, meta = checkpoint.load_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))
    assert statistics == {} and meta['model']['name'] == 'user_model:TinyNet'
    assert params['conv']['kernel'].shape == (3, 3, 1, 8)  # grey 16x16 input, 8 features
    _, masks, jackpot_stats, _ = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    assert set(masks) == {'conv/kernel', 'conv2/kernel'} and jackpot_stats == {}  # fc excluded
    pruned = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
    assert pruned == sum(found['counts'].values()) == 648 - 64  # keeps floor(10 % of 648)
    records = read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))
    assert [r['mode'] for r in records if 'test_top1' in r] == ['pretrain', 'search']
