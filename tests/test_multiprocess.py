"""Multi-host for real: two JAX processes on localhost (gloo) x 2 CPU devices each.

The search runs through the launcher (``python -m jackpot_jax.main`` with
``--config.distributed.*``), each process feeding its share of every global batch
of the digits data. It must end with the masks of one process x 4 devices, and its
checkpoints must restore (and resume) in one process.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py

from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import config as config_lib, search_mode
from jackpot_jax.launch.config_checks import resolved

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
LAUNCH_TIMEOUT_S = 150
RTOL, ATOL = 1e-5, 1e-6
# The search: 4 steps of global batch 16, a checkpoint every 2 steps.
SEARCH = {
    'protocol': 'paper',  # the layouts are compared, not the protocols: the lighter one
    'model.width': 4,
    'steps_per_epoch': 4,
    'search.epochs': 1,
    'search.batch_size': 16,
    'search.sparsity': 0.8,
    'search.learning_rate': 0.5,
    'data.eval_batch_size': 360,  # the whole test split
    'checkpoint.every_steps': 2,
}


def _config(**overrides):
    config = config_lib.get_config()
    for key, value in {**SEARCH, **overrides}.items():
        *groups, field = key.split('.')
        node = config
        for g in groups:
            node = node[g]
        node[field] = value
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _start(workdir: str, flags: list[str], logdir: str) -> list[tuple[subprocess.Popen, str]]:
    """Starts the launcher in NUM_PROCESSES processes, each logging to a file in ``logdir``."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env['XLA_FLAGS'] = (
        env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}'
    )
    env.pop('JAX_NUM_CPU_DEVICES', None)
    started = []
    for i in range(NUM_PROCESSES):
        cmd = [
            sys.executable, '-m', 'jackpot_jax.main', f'--workdir={workdir}',
            '--config.distributed.initialize=True',
            f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            f'--config.distributed.num_processes={NUM_PROCESSES}',
            f'--config.distributed.process_id={i}',
            '--config.distributed.cpu_collectives=gloo',
            *flags,
        ]  # fmt: skip
        log = os.path.join(logdir, f'process{i}.log')
        with open(log, 'w') as f:
            started.append(
                (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), log)
            )
    return started


def _finish(started: list[tuple[subprocess.Popen, str]], deadline: float) -> list[str]:
    """Waits for the processes; returns their logs. On the first failure, or at the
    deadline, kills them all and fails with every process's log."""
    procs = [p for p, _ in started]
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for _, path in started:
        with open(path) as f:
            logs.append(f.read())
    codes = [p.returncode for p in procs]
    if codes != [0] * NUM_PROCESSES:
        report = '\n'.join(
            f'----- process {i} (exit {c}) -----\n{log[-6000:]}'
            for i, (c, log) in enumerate(zip(codes, logs))
        )
        what = 'timed out' if time.monotonic() >= deadline else 'failed'
        pytest.fail(f'the {NUM_PROCESSES}-process launch {what} (-9: killed):\n{report}')
    return logs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The 2-process search (launcher) and, meanwhile, the 1-process x 4-device reference."""
    root = tmp_path_factory.mktemp('multiprocess')
    weights = str(root / 'weights')
    tiny_model.save_weights(weights, width=SEARCH['model.width'])

    flags = [f'--config.{k}={v}' for k, v in SEARCH.items()]
    flags += ['--mode=search', f'--config.pretrained={weights}']
    two = str(root / 'two_processes')
    started = _start(two, flags, str(root))
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        one = search_mode.run_search(resolved(_config(pretrained=weights, num_devices=4)), str(root / 'one'))
    finally:
        logs = _finish(started, deadline)
    return {'weights': weights, 'two': two, 'logs': logs, 'one': one}


def test_two_processes_find_the_masks_of_one_process(runs):
    _, masks, statistics, meta = checkpoint.read_jackpot_bundle(
        os.path.join(runs['two'], workdir_lib.JACKPOT_DIR)
    )
    reference = jax.device_get(runs['one']['state'])
    assert meta['counts'] == runs['one']['counts']
    jax.tree.map(np.testing.assert_array_equal, masks, reference.masks)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
        statistics,
        reference.statistics,
    )
    # Scores and optimizer state: the 2-process checkpoint at the last step.
    ckpts = checkpoint.SearchCheckpoints(os.path.join(runs['two'], workdir_lib.CHECKPOINTS_DIR))
    assert ckpts.steps() == [2, 4]
    state, _ = ckpts.restore(4, like=runs['one']['state'])
    ckpts.close()
    for name in ('scores', 'opt_state', 'statistics'):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
            jax.device_get(getattr(state, name)),
            getattr(reference, name),
        )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.masks), reference.masks)
    # Process 0 alone logged and wrote the metrics: one record for the one epoch.
    records = read_jsonl(os.path.join(runs['two'], workdir_lib.METRICS_FILE))
    assert [r['epoch'] for r in records] == [1]
    assert records[0]['test_top1'] == pytest.approx(runs['one']['jackpot_top1'])
    assert 'process 0 of 2; 2 local and 4 global devices' in runs['logs'][0]
    assert 'search epoch 1/1' in runs['logs'][0]
    assert 'search epoch 1/1' not in runs['logs'][1]


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    workdir = str(tmp_path / 'resumed')
    shutil.copytree(runs['two'], workdir)
    shutil.rmtree(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR, '4'))
    shutil.rmtree(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    resumed = search_mode.run_search(resolved(_config(pretrained=runs['weights'])), workdir)  # all 8 devices
    _, masks, _, _ = checkpoint.read_jackpot_bundle(os.path.join(runs['two'], workdir_lib.JACKPOT_DIR))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed['state'].masks), masks)
    assert int(jax.device_get(resumed['state'].step)) == 4
    assert resumed['jackpot_top1'] == pytest.approx(runs['one']['jackpot_top1'])
