"""Writes the interrupted searches in tests/legacy/ (run once, from the repository root:
``python tests/legacy/make_checkpoints.py``); the fields and records they hold carry the
names in use when they were written."""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)

LAUNCHER = f"""
import sys
sys.path.insert(0, {TESTS!r})
import jax
jax.config.update('jax_num_cpu_devices', 8)  # as the tests run (tests/conftest.py)
import pytest
from jackpot_jax import search_run, weight_training
from tiny_model import fault_at_step, tiny_config

config = tiny_config(**{{
    'mode': 'search', 'pretrain.epochs': 1, 'search.epochs': 2, 'steps_per_epoch': 6,
    'checkpoint.every_steps': 2, 'search.bn_recalibration_steps': 3,
    'search.final_jackpot': 'best', 'search.rate_schedule': 'all',
    'search.compare_bn_statistics': True,
}})
weight_training.run_pretrain(config, sys.argv[1])

class Interrupted(Exception):
    pass

def interrupt(state, metrics):
    raise Interrupted

with pytest.MonkeyPatch.context() as patch:
    fault_at_step(patch, 10, interrupt)  # mid-epoch 2, after the save at step 8
    try:
        search_run.run_search(config, sys.argv[1])
    except Interrupted:
        pass
"""

LIBRARY = f"""
import sys
sys.path.insert(0, {TESTS!r})
import jackpot_jax
import legacy_search as ls

model, variables = ls.model_and_variables()
try:
    jackpot_jax.find_jackpot(
        model, variables, ls.batches(interrupt=True), steps_per_epoch=ls.STEPS,
        validation_batches=ls.validation_batches(), sparsity=0.8, epochs=3,
        workdir=sys.argv[1], checkpoint_every=2, progress=False,
        bn_recalibration_steps=3, final_jackpot='best', rate_schedule='all',
    )
except ls.Interrupted:
    pass
"""

for name, script in (('launcher', LAUNCHER), ('library', LIBRARY)):
    workdir = os.path.join(HERE, name)
    shutil.rmtree(workdir, ignore_errors=True)
    subprocess.run([sys.executable, '-c', script, workdir], check=True)
    shutil.rmtree(os.path.join(workdir, 'tensorboard'))
    if os.path.exists(os.path.join(workdir, '.lock')):
        os.remove(os.path.join(workdir, '.lock'))
