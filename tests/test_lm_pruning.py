"""Mode 'lm_pruning' on the tiny language model: every method at every sparsity, the same
per-layer counts everywhere, each jackpot's epoch chosen on validation perplexity; resumable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_gpt import _tiny_config  # tests/ is on the path
from test_text_data import write_corpus

from configs import smollm2
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
            origin = row['methods'][start]
            if j['chosen_epoch'] == 0:  # no epoch beat the start masks on validation
                assert origin['validation_perplexity'] <= best
                chosen = origin
            else:
                chosen = j['history'][j['chosen_epoch'] - 1]
                assert chosen['validation_perplexity'] == pytest.approx(best, rel=1e-6)
                assert best < origin['validation_perplexity']
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


@pytest.mark.parametrize('text', ['ranked', 'ranked:0', 'ranked:x', 'scaled:1', 'wide'])
def test_bad_start_scores_name_the_value(text):
    with pytest.raises(ValueError, match=f"start_scores={text!r}"):
        config_checks.start_scores_list(f'flat,{text}')
    assert config_checks.start_scores('ranked:0.02') == ('ranked', 0.02)
    with pytest.raises(ValueError, match='names one twice'):
        config_checks.start_scores_list('scaled,flat,scaled')


@pytest.mark.parametrize(
    'text, fix', [('0.5,1.5', '1.5'), ('0.5,x', "'x'"), ('3:2', '3:2'), ('0.5,0.50', 'twice')]
)
def test_bad_sparsities_name_the_value(text, fix):
    with pytest.raises(ValueError, match=fix):
        config_checks.lm_pruning_sparsities(text)


@pytest.fixture(scope='module')
def llama_study(tmp_path_factory):
    """``configs/smollm2.py:lm_pruning`` on a tiny random LLaMA (GGUF) and a small
    documentation folder: the real model's study, in miniature."""
    from test_llama import TINY, random_params, write_gguf
    from test_prose import write_docs

    root = tmp_path_factory.mktemp('llama_study')
    write_gguf(root / 'tiny.gguf', TINY, random_params(TINY))
    config = smollm2.get_config('lm_pruning')
    config.pretrained = str(root / 'tiny.gguf')
    config.data.data_dir = write_docs(root, n=120)
    config.data.cache_dir = str(root / 'cache')
    config.data.context = 16
    config.data.max_eval_tokens = 96
    config.data.eval_batch_size = 8  # over the 8 test devices
    config.search.batch_size = 8
    config.lm_pruning.calibration_batches = 1
    config.lm_pruning.start_scores = 'ranked:0.02,scaled'
    config.steps_per_epoch = 2
    config.search.epochs = 2
    workdir = str(root / 'run')
    return config, workdir, modes.MODES['lm_pruning'](resolved(config), workdir)


def test_the_llama_study_runs_every_method_on_the_documentation(llama_study):
    config, workdir, result = llama_study
    assert result['model'] == 'llama' and result['data'] == 'python_docs'
    assert [r['sparsity'] for r in result['rows']] == ['0.5', '2:4']
    for row in result['rows']:
        assert set(row['methods']) == set(lm_pruning.METHODS) - {'dense'}
        for name, method in row['methods'].items():
            assert method['pruned'] == row['counts'], (row['sparsity'], name)
        mask_only, update = (row['methods'][m] for m in ('sparsegpt_mask', 'sparsegpt_update'))
        assert mask_only['test_perplexity'] != update['test_perplexity']  # weights updated
        for start in lm_pruning.STARTS:  # each start searched with both first scores
            j = row['methods'][f'jackpot_{start}']
            candidates = j['candidates']
            assert set(candidates) == {'ranked:0.02', 'scaled'}
            best = min(candidates, key=lambda c: candidates[c]['validation_perplexity'])
            origin = row['methods'][start]
            assert len({c['workdir'] for c in candidates.values()}) == 2
            if origin['validation_perplexity'] <= candidates[best]['validation_perplexity']:
                assert j['chosen_epoch'] == 0 and j['test_perplexity'] == origin['test_perplexity']
                continue
            assert j['start_scores'] == best and j['workdir'] == candidates[best]['workdir']
            assert j['test_perplexity'] == candidates[best]['test_perplexity']
    table = lm_pruning.format_table(result)
    assert 'SparseGPT with update' in table and table.count('| 2:4 |') == 3


def test_the_documentation_parts_are_disjoint_windows_of_the_models_tokens(llama_study):
    from jackpot_jax.launch import run_context

    config, _, _ = llama_study
    source = run_context.Setup(resolved(config)).source
    windows = source.manifest['windows']
    assert windows['validation'] == windows['test'] == 6  # capped at 96 tokens
    assert source.calibration_images.shape[1:] == source.train_images.shape[1:] == (16,)
    np.testing.assert_array_equal(source.train_images[:, 1:], source.train_labels[:, :-1])
    assert source.num_classes == 300
    config.data.validation_fraction = 0.2
    wider = run_context.Setup(resolved(config)).source
    assert wider.manifest['part_tokens']['test'] == source.manifest['part_tokens']['test']
    tokens = wider.manifest['part_tokens']
    assert tokens['validation'] > source.manifest['part_tokens']['validation']
