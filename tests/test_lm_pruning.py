"""Mode 'lm_pruning' on the tiny language model: every method at every sparsity, the same
per-layer counts everywhere, each jackpot's epoch chosen on validation perplexity; resumable."""

from __future__ import annotations

import json
import os

import pytest
from test_gpt import _tiny_config  # tests/ is on the path
from test_text_data import write_corpus

from jackpot_jax.launch import config_checks, modes, weight_training
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.launch.studies import lm_pruning


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp('lm_pruning')
    text_dir = str(root / 'text')
    write_corpus(text_dir, sizes=(900,) * 12)
    config = _tiny_config(text_dir)
    config.mode = 'lm_pruning'
    config.search.epochs = 2
    config.lm_pruning.calibration_batches = 2
    workdir = str(root / 'run')
    os.makedirs(workdir)
    weight_training.run_pretrain(resolved(config), workdir)
    return config, workdir, modes.MODES['lm_pruning'](resolved(config), workdir)


def test_every_method_at_every_sparsity_prunes_the_same_counts(study):
    _, workdir, result = study
    assert [r['sparsity'] for r in result['rows']] == ['0.5', '0.7', '2:4']
    assert result['dense']['test_perplexity'] > 1.0
    for row in result['rows']:
        assert set(row['methods']) == set(lm_pruning.METHODS) - {'dense'}
        assert row['pruned'] > 0
        for name, method in row['methods'].items():
            assert method['pruned'] == row['counts'], (row['sparsity'], name)
            assert method['test_perplexity'] > 1.0
    half, _, nm = result['rows']
    assert half['pruned'] == nm['pruned'] == half['prunable'] // 2
    with open(os.path.join(workdir, 'lm_pruning.json')) as f:
        assert json.load(f)['rows'][2]['pattern'] == '2:4'
    assert os.path.getsize(os.path.join(workdir, 'lm_pruning.png')) > 0
    table = lm_pruning.format_table(result)
    assert table.count('| 2:4 |') == 3 and 'jackpot from Wanda' in table


def test_the_chosen_epoch_is_the_lowest_validation_perplexity_never_test(study):
    _, _, result = study
    assert result['selection_metric'] == 'validation_perplexity'
    for row in result['rows']:
        for start in lm_pruning.STARTS:
            j = row['methods'][f'jackpot_{start}']
            assert j['selection_metric'] == 'validation_perplexity'
            assert j['epochs'] == len(j['history']) == 2 and j['steps'] == j['history'][-1]['step']
            best = min(r['validation_perplexity'] for r in j['history'])
            chosen = j['history'][j['chosen_epoch'] - 1]
            assert chosen['validation_perplexity'] == pytest.approx(best, rel=1e-6)
            assert j['validation_perplexity'] == chosen['validation_perplexity']
            assert j['test_perplexity'] == chosen['test_perplexity']
            assert 0.0 <= j['overlap_wanda']['shared_kept_fraction'] <= 1.0
            assert j['search_seconds'] > 0


def test_rerun_resumes_every_search(study, capsys):
    config, workdir, result = study
    again = modes.MODES['lm_pruning'](resolved(config), workdir)
    for old, new in zip(result['rows'], again['rows']):
        for name in lm_pruning.METHODS[1:]:
            assert new['methods'][name]['test_perplexity'] == pytest.approx(
                old['methods'][name]['test_perplexity']
            )
    assert '| sparsity |' in capsys.readouterr().out


@pytest.mark.parametrize(
    'text, fix', [('0.5,1.5', '1.5'), ('0.5,x', "'x'"), ('3:2', '3:2'), ('0.5,0.50', 'twice')]
)
def test_bad_sparsities_name_the_value(text, fix):
    with pytest.raises(ValueError, match=fix):
        config_checks.lm_pruning_sparsities(text)
