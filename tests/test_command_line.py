"""The command line: its help, and config files named ``configs/NAME.py`` from any folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jackpot_jax import main
from jackpot_jax.launch import modes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What pip writes as the ``jackpot-jax`` console script: the launcher is not __main__.
CONSOLE_SCRIPT = 'import sys\nfrom jackpot_jax.main import run\nsys.exit(run())\n'


@pytest.mark.parametrize(
    'how, flag', [('module', '--helpshort'), ('module', '--help'), ('console_script', '--help')]
)
def test_help_lists_the_launchers_flags_modes_and_config_files(tmp_path, how, flag):
    script = tmp_path / 'jackpot-jax'
    script.write_text(CONSOLE_SCRIPT)
    command = [sys.executable] + (['-m', 'jackpot_jax.main'] if how == 'module' else [str(script)])
    env = {**os.environ, 'PYTHONPATH': REPO}
    done = subprocess.run(
        [*command, flag], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    for name in ('--config', '--workdir', '--mode', '--[no]traceback', '--helpfull'):
        assert name in text
    for mode in modes.MODES:
        assert f'\n  {mode} ' in text
    assert 'configs/cifar_search.py:MODEL,DATASET,SPARSITY,EPOCHS' in text
    # The launcher's flags only: none of absl's or the libraries'.
    assert '--verbosity' not in text and '--logtostderr' not in text
    assert len(text.splitlines()) < 100


def test_config_files_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = os.path.join(REPO, 'configs', 'cifar_search.py')
    assert main.packaged_configs_dir() == os.path.join(REPO, 'configs')  # a clone
    assert main.resolve_config_argument('configs/cifar_search.py:vgg19,cifar10,90,30') == (
        packaged + ':vgg19,cifar10,90,30'
    )
    assert main.resolve_config_argument('configs/cifar_search.py') == packaged
    assert main.resolve_config_argument('jackpot_jax/launch/config.py') == main.DEFAULT_CONFIG
    assert main.resolve_config_argument('configs/missing.py') == 'configs/missing.py'
    assert main._with_config(['x', '--config', 'configs/vit_digits.py', '--workdir=w']) == [
        'x', '--config', os.path.join(REPO, 'configs', 'vit_digits.py'), '--workdir=w'
    ]  # fmt: skip
    assert main._with_config(['x', '--workdir=w']) == [
        'x', f'--config={main.DEFAULT_CONFIG}', '--workdir=w'
    ]  # fmt: skip
    # A file of that name under the working directory comes first.
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'cifar_search.py').write_text('')
    assert main.resolve_config_argument('configs/cifar_search.py:x') == 'configs/cifar_search.py:x'
