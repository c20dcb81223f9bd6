"""pyproject.toml and the requirements files name the same dependencies, and its console
scripts point at real entry points."""

from __future__ import annotations

import ast
import os
import re
import tomllib

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
    assert runtime | tfds | test == _requirements('requirements.txt')
    assert {_normal(r) for r in extras['torch']} == _requirements('requirements-torch.txt')
    assert not any(r.startswith(('tensorflow', 'torch')) for r in runtime)


def test_console_scripts_name_functions_that_exist():
    scripts = _project()['scripts']
    assert scripts == {
        'jackpot-jax': 'jackpot_jax.main:run',
        'jackpot-jax-convert': 'jackpot_jax.convert:main',
    }
    for target in scripts.values():
        module, function = target.split(':')
        with open(os.path.join(REPO, *module.split('.')) + '.py') as f:
            tree = ast.parse(f.read())
        # Read, not imported: the converter imports torch, which must not meet TensorFlow.
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
