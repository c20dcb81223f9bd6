"""Config validation: every bad field is named with the fix."""

import importlib.util
import os

import ml_collections
import pytest

from jackpot_jax import config as config_lib
from jackpot_jax import launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    config = config_lib.get_config()
    for dotted, value in overrides.items():
        group, _, field = dotted.rpartition('__')
        (config[group] if group else config)[field] = value
    return config


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'search__sparsity': 1.2}, r'search.sparsity must be in \[0, 1\), got 1.2'),
        ({'search__sparsity': -0.1}, r'got -0.1'),
        ({'search__allocation': 'l2'}, "unknown allocation 'l2'"),
        ({'search__rate_schedule': 'linear'}, "unknown rate_schedule 'linear'"),
        ({'search__mask_update': 'x'}, "unknown mask_update 'x'"),
        ({'search__bn_mode': 'eval'}, "unknown bn_mode 'eval'"),
        ({'model__name': 'resnet9000'}, "unknown model 'resnet9000'"),
        ({'data__name': 'mnist'}, "unknown dataset 'mnist'"),
        ({'mode': 'train'}, "unknown mode 'train'"),
        ({'search__epochs': 0}, 'search.epochs must be positive, got 0'),
        ({'pretrain__batch_size': -1}, 'pretrain.batch_size must be positive'),
        ({'search__pruned_score': 1.0}, 'pruned_score must be in'),
        ({'search__label_smoothing': 1.0}, 'label_smoothing must be in'),
        ({'model__dtype': 'float16'}, "unknown model.dtype 'float16'; choose one of: float32, bf"),
        ({'mode': 'overlap', 'model__dtype': 'bfloat16'}, "mode 'overlap' cannot run in model"),
        ({'data__threads': -1}, 'data.threads must be >= 0, got -1'),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        launcher.validate(_config(**overrides))


def test_unknown_keys_are_named():
    config = config_lib.get_config()
    config.unlock()
    config.search.sparsty = 0.5
    with pytest.raises(ValueError, match="unknown config key 'search.sparsty'"):
        launcher.validate(config)


CONFIG_FILES = sorted(
    n for n in os.listdir(os.path.join(REPO, 'configs')) if n.endswith('.py') and not n.startswith('_')
)


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_file_is_valid(name):
    spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, 'configs', name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert isinstance(config, ml_collections.ConfigDict)
    launcher.validate(config)
