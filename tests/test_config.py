"""Config validation: every bad field is named with the fix."""

import importlib.util
import os

import ml_collections
import pytest

from jackpot_jax.launch import config as config_lib, modes

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
        ({'search__allocation': 'l2'}, "unknown search.allocation 'l2'"),
        ({'search__rate_schedule': 'linear'}, "unknown search.rate_schedule 'linear'"),
        ({'search__mask_update': 'x'}, "unknown search.mask_update 'x'"),
        ({'search__bn_mode': 'eval'}, "unknown search.bn_mode 'eval'"),
        ({'search__score_init': 'zeros'}, "unknown search.score_init 'zeros'"),
        ({'search__optimizer': 'adagrad'}, "unknown search.optimizer 'adagrad'"),
        ({'search__pattern': '2:4'}, r"search.pattern '2:4' removes 2/4 .* search.sparsity=0.5"),
        ({'model__name': 'resnet9000'}, "unknown model 'resnet9000'"),
        ({'data__name': 'mnist'}, "unknown dataset 'mnist'"),
        ({'mode': 'train'}, "unknown mode 'train'"),
        ({'search__epochs': 0}, 'search.epochs must be an integer >= 1, got 0'),
        ({'pretrain__batch_size': -1}, 'pretrain.batch_size must be positive'),
        ({'search__pruned_score': 1.0}, 'search.pruned_score must be in'),
        ({'search__label_smoothing': 1.0}, 'search.label_smoothing must be in'),
        ({'search__selection_metric': ''}, "search.selection_metric must be a metric's name"),
        ({'model__dtype': 'float16'}, "unknown model.dtype 'float16'; choose one of: float32, bf"),
        ({'mode': 'overlap', 'model__dtype': 'bfloat16'}, "mode 'overlap' cannot run in model"),
        ({'data__threads': -1}, 'data.threads must be >= 0, got -1'),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        modes.validate(_config(**overrides))


def test_unknown_keys_are_named():
    config = config_lib.get_config()
    config.unlock()
    config.search.sparsty = 0.5
    with pytest.raises(ValueError, match="unknown config key 'search.sparsty'"):
        modes.validate(config)


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
    modes.validate(config)


def _covered(entries, names):
    return {n for n in names if any(n == e or n.startswith(e + '.') for e in entries)}


def test_every_field_is_either_resumable_or_part_of_the_search_identity():
    """A new field of get_config() must be classified: may it change when a search resumes
    (config.RESUMABLE_FIELDS), or must it match (config.SEARCH_IDENTITY_FIELDS)?"""
    config = config_lib.get_config()
    names = set(config_lib.fields(config))
    resumable = _covered(config_lib.RESUMABLE_FIELDS, names)
    identity = _covered(config_lib.SEARCH_IDENTITY_FIELDS, names)
    unclassified = sorted(names - resumable - identity)
    assert not unclassified, (
        f'{unclassified}: add each to RESUMABLE_FIELDS or SEARCH_IDENTITY_FIELDS '
        '(jackpot_jax/launch/config.py)'
    )
    assert not resumable & identity, f'in both lists: {sorted(resumable & identity)}'
    for entries in (config_lib.RESUMABLE_FIELDS, config_lib.SEARCH_IDENTITY_FIELDS):
        assert len(set(entries)) == len(entries)
        stale = [e for e in entries if not _covered([e], names)]
        assert not stale, f'{stale} name no field of get_config()'
    assert config_lib.search_identity_fields(config) == tuple(sorted(identity))
    assert all(config_lib.is_resumable(n) for n in resumable)
    assert not any(config_lib.is_resumable(n) for n in identity)


def test_a_models_own_fields_are_part_of_the_search_identity():
    spec = importlib.util.spec_from_file_location(
        'cfg', os.path.join(REPO, 'configs', 'vit_digits.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    identity = config_lib.search_identity(module.get_config())
    assert identity['model.patch_size'] == 2 and identity['search.sparsity'] == 0.9
    assert 'data.data_dir' not in identity and 'tune.epochs' not in identity
