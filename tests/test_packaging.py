"""pyproject.toml and the requirements files name the same dependencies, its console
scripts point at real entry points, and an installed copy runs the config files."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name: str) -> set[str]:
    with open(os.path.join(REPO, name)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return {_normal(line) for line in lines if line}


def _normal(requirement: str) -> str:
    return re.sub(r'\s+', '', requirement).lower().replace('_', '-')


def _project() -> dict:
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)['project']


def test_pyproject_and_requirements_name_the_same_packages_and_ranges():
    project = _project()
    extras = project['optional-dependencies']
    runtime = {_normal(r) for r in project['dependencies']}
    tfds = {_normal(r) for r in extras['tfds']}
    test = {_normal(r) for r in extras['test']}
    llm = {_normal(r) for r in extras['llm']}
    assert runtime | tfds | llm | test == _requirements('requirements.txt')
    assert {_normal(r) for r in extras['torch']} == _requirements('requirements-torch.txt')
    assert not any(r.startswith(('tensorflow', 'torch')) for r in runtime)


def test_console_scripts_name_functions_that_exist():
    scripts = _project()['scripts']
    assert scripts == {
        'jackpot-jax': 'jackpot_jax.main:run',
        'jackpot-jax-convert': 'jackpot_jax.io.convert_cli:main',
    }
    for target in scripts.values():
        module, function = target.split(':')
        with open(os.path.join(REPO, *module.split('.')) + '.py') as f:
            tree = ast.parse(f.read())
        # Read, not imported: the converter imports torch, which must not meet TensorFlow.
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


# Runs the launcher from an installed copy on tfds's mock data; its wrapper borrows the
# thread-confined mock file system of the paper-config tests.
_LAUNCH = """
import sys
from unittest import mock

sys.path.insert(0, {tests!r})
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import test_utils
from test_paper_configs import ThreadConfinedMockFs

import jackpot_jax
from jackpot_jax import main

print('package at', jackpot_jax.__file__)
with (
    mock.patch.object(test_utils, 'MockFs', ThreadConfinedMockFs),
    tfds.testing.mock_data(num_examples=16),
):
    main.run()
"""


def test_installed_package_runs_a_paper_config_by_its_documented_name(tmp_path):
    """``pip install .`` ships configs/ as jackpot_jax/configs, and the launcher finds
    ``--config=configs/NAME.py:ARGS`` there when the working directory has no configs/."""
    pytest.importorskip('tensorflow_datasets')
    source, site, cwd = tmp_path / 'source', tmp_path / 'site', tmp_path / 'elsewhere'
    skip = shutil.ignore_patterns('__pycache__', '*.pyc')
    for name in ('jackpot_jax', 'configs'):
        shutil.copytree(os.path.join(REPO, name), source / name, ignore=skip)
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(os.path.join(REPO, name), source / name)
    subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index',
         '--no-build-isolation', '--target', str(site), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    shipped = {n for n in os.listdir(site / 'jackpot_jax' / 'configs') if n.endswith('.py')}
    assert shipped == {n for n in os.listdir(os.path.join(REPO, 'configs')) if n.endswith('.py')}

    cwd.mkdir()
    (tmp_path / 'launch.py').write_text(_LAUNCH.format(tests=os.path.join(REPO, 'tests')))
    env = {**os.environ, 'PYTHONPATH': str(site), 'TF_CPP_MIN_LOG_LEVEL': '2'}
    argv = [
        '--config=configs/cifar_pretrain.py:resnet32,cifar10,tiny',  # as the docs name it
        '--workdir=run',
        f'--config.data.data_dir={tmp_path / "tfds"}',
    ]
    done = subprocess.run(
        [sys.executable, str(tmp_path / 'launch.py'), *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'package at {site / "jackpot_jax" / "__init__.py"}' in done.stdout
    assert os.path.isdir(cwd / 'run' / 'pretrained')
    records = [json.loads(line) for line in open(cwd / 'run' / 'metrics.jsonl')]
    assert [r['mode'] for r in records] == ['pretrain', 'pretrain']  # one epoch, then test
