"""Checkpoints written before config fields, state fields and record keys were renamed
still resume, to the same result as an uninterrupted search under the new names.

The fixtures in ``tests/legacy/`` are interrupted searches (mid-epoch 2, after the save
at step 8) written by ``tests/legacy/make_checkpoints.py`` under the old names."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np

import jackpot_jax
import legacy_search as ls  # tests/legacy_search.py
from jackpot_jax import search_run
from tiny_model import tiny_config  # tests/tiny_model.py

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'legacy')


def _launcher_config():
    return tiny_config(**{
        'mode': 'search', 'pretrain.epochs': 1, 'search.epochs': 2, 'steps_per_epoch': 6,
        'checkpoint.every_steps': 2, 'search.reestimation_steps': 3,
        'search.selection_rule': 'best', 'search.rate_schedule': 'constant',
        'search.compare_statistics': True,
    })  # fmt: skip


def _equal_trees(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_a_launcher_checkpoint_from_before_the_renames_resumes(tmp_path):
    resumed_dir, whole_dir = tmp_path / 'resumed', tmp_path / 'whole'
    shutil.copytree(os.path.join(LEGACY, 'launcher'), resumed_dir)
    shutil.copytree(os.path.join(LEGACY, 'launcher', 'pretrained'), whole_dir / 'pretrained')
    resumed = search_run.run_search(_launcher_config(), str(resumed_dir))
    whole = search_run.run_search(_launcher_config(), str(whole_dir))
    for field in ('scores', 'masks', 'ever_flipped', 'statistics'):
        _equal_trees(getattr(resumed['state'], field), getattr(whole['state'], field))
    assert resumed['history'] == whole['history']  # epoch 1's record came from the fixture
    assert {'train_loss', 'train_top1', 'test_top1_reestimated'} <= set(resumed['history'][0])
    assert resumed['jackpot_epoch'] == whole['jackpot_epoch']


def _library_search(**kwargs):
    model, variables = ls.model_and_variables()
    return jackpot_jax.find_jackpot(
        model, variables, ls.batches(), steps_per_epoch=ls.STEPS,
        validation_batches=ls.validation_batches(), sparsity=0.8, epochs=3,
        checkpoint_every=2, progress=False, reestimation_steps=3,
        selection_rule='best', rate_schedule='constant', **kwargs,
    )  # fmt: skip


def test_a_library_checkpoint_from_before_the_renames_resumes(tmp_path):
    shutil.copytree(os.path.join(LEGACY, 'library'), tmp_path / 'resumed')
    resumed = _library_search(workdir=str(tmp_path / 'resumed'))
    whole = _library_search()
    for field in ('masks', 'scores', 'statistics'):
        _equal_trees(getattr(resumed, field), getattr(whole, field))
    assert resumed.report['epochs'] == whole.report['epochs']
    assert resumed.report['chosen_epoch'] == whole.report['chosen_epoch']
