"""Former names stay readable for one release: on the command line, in config files and in
the library's keywords, each with a one-line deprecation message (checkpoints written
under them: tests/test_legacy_checkpoints.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jackpot_jax
from jackpot_jax import config_checks, renames
from jackpot_jax.metrics import read_jsonl
from tiny_model import tiny_config  # tests/tiny_model.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(REPO, 'tests', 'legacy')


def test_the_command_line_takes_former_names_and_resumes_a_former_checkpoint(tmp_path):
    workdir = tmp_path / 'w'
    shutil.copytree(os.path.join(LEGACY, 'launcher'), workdir)
    flags = [
        '--mode=search', '--config.model.width=8', '--config.steps_per_epoch=6',
        '--config.search.epochs=2', '--config.checkpoint.every_steps=2',
        '--config.pretrain.epochs=1', '--config.search.bn_recalibration_steps=3',
        '--config.search.final_jackpot=best', '--config.search.rate_schedule=all',
        '--config.search.compare_bn_statistics=true',
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, '-m', 'jackpot_jax.main', f'--workdir={workdir}', *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for former, current in (
        ('search.bn_recalibration_steps', 'search.reestimation_steps'),
        ('search.final_jackpot', 'search.selection_rule'),
        ('search.compare_bn_statistics', 'search.compare_statistics'),
        ('search.rate_schedule=all', 'search.rate_schedule=constant'),
    ):
        message = f'--config.{former} is now --config.{current}; the former name goes in'
        assert done.stderr.count(message) == 1, (message, done.stderr[-3000:])
    assert 'resuming the search from step 8' in done.stderr
    searched = [r for r in read_jsonl(str(workdir / 'metrics.jsonl')) if r['mode'] == 'search']
    assert [r['epoch'] for r in searched] == [1, 2]
    assert {'train_loss', 'train_top1', 'test_top1_reestimated'} <= set(searched[-1])
    assert os.path.isdir(workdir / 'jackpot')


def test_a_config_file_setting_former_fields_is_upgraded_with_a_warning(caplog):
    config = tiny_config()
    with config.search.unlocked():  # what a config file written for an older version does
        config.search.bn_recalibration_steps = 7
        config.search.final_jackpot = 'best_validation'
    config.overlap.bn_steps = 2
    config.stability.variants = 'paper,paper+recalibration'
    config_checks.validate(config)
    assert config.search.reestimation_steps == 7 and config.search.selection_rule == 'best'
    assert config.overlap.reestimation_steps == 2
    assert config.stability.variants == 'paper,paper+reestimation'
    assert 'bn_recalibration_steps' not in config.search and 'bn_steps' not in config.overlap
    warned = ' '.join(r.getMessage() for r in caplog.records)
    for former in ('search.bn_recalibration_steps', 'overlap.bn_steps', 'stability.variants'):
        assert f'config.{former}' in warned


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4, name='head')(nn.relu(nn.Dense(16)(x)))


def test_the_library_takes_former_keywords_and_values_with_a_future_warning():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    batches = [(x[:16], x[:16, :4].argmax(-1)), (x[16:], x[16:, :4].argmax(-1))]
    model = _Mlp()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    common = dict(sparsity=0.5, epochs=2, progress=False, validation_batches=batches[:1])
    with pytest.warns(FutureWarning) as warned:
        former = jackpot_jax.find_jackpot(
            model, variables, batches, bn_recalibration_steps=0, final_jackpot='best_validation',
            rate_schedule='all', **common,
        )  # fmt: skip
    messages = [str(w.message) for w in warned]
    assert 'bn_recalibration_steps= is now reestimation_steps=' in messages[0]
    assert any("rate_schedule='all' is now rate_schedule='constant'" in m for m in messages)
    current = jackpot_jax.find_jackpot(
        model, variables, batches, reestimation_steps=0, selection_rule='best',
        rate_schedule='constant', **common,
    )  # fmt: skip
    for path, mask in current.masks.items():
        np.testing.assert_array_equal(former.masks[path], mask)
    with pytest.raises(ValueError, match='selection_rule= is given twice'):
        renames.upgrade_options({'selection_rule': 'best', 'final_jackpot': 'last'}, warn=False)


def test_a_current_checkpoint_meta_comes_back_unchanged():
    meta = {
        'history': [{'mode': 'search', 'epoch': 1, 'step': 6, 'train_loss': 1.0,
                     'validation_top1': 0.5, 'test_top1_reestimated': 0.4, 'mask_changes': 3}],
        'settings': {'reestimation_steps': 3, 'rate_schedule': 'constant'},
        'config': {'search/reestimation_steps': 3, 'search/rate_schedule': 'poly4'},
    }  # fmt: skip
    assert renames.upgrade_checkpoint_meta(meta) == meta


def test_a_jackpot_report_answers_former_keys_with_a_future_warning():
    report = renames.Report(chosen_epoch=3, epochs=[renames.Report(train_loss=0.5)])
    with pytest.warns(FutureWarning, match=r"\['kept_epoch'\] is now \['chosen_epoch'\]"):
        assert report['kept_epoch'] == 3
    with pytest.warns(FutureWarning):
        assert report['epochs'][0]['loss'] == 0.5
    with pytest.raises(KeyError):
        report['top1']  # pylint: disable=pointless-statement


def test_a_study_variant_folder_under_its_former_name_is_taken_over(tmp_path):
    from jackpot_jax.studies import common  # pylint: disable=g-import-not-at-top

    (tmp_path / 'restriction' / 'all' / 'checkpoints').mkdir(parents=True)
    folder = common.variant_folder(str(tmp_path), 'restriction', 'constant')
    assert folder == str(tmp_path / 'restriction' / 'constant')
    assert os.path.isdir(os.path.join(folder, 'checkpoints'))
    assert not os.path.exists(tmp_path / 'restriction' / 'all')
    assert common.variant_folder(str(tmp_path), 'stability', 'paper') == str(
        tmp_path / 'stability' / 'paper'
    )
