"""The package's structure: no import cycle, the layers, config files free of JAX, small
orchestration modules, and a README that names every module."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'jackpot_jax'
# The launcher's layers (every other module is the library underneath).
ORCHESTRATION = (
    'api',
    'engine',
    'launcher',
    'main',
    'run_context',
    'search_run',
    'weight_training',
    'config',
    'config_checks',
    'mask_plan',
    'studies.common',
    'studies.overlap',
    'studies.search_cost',
    'studies.restriction',
    'studies.sweep',
    'studies.stability',
)
MAX_ORCHESTRATION_LINES = 400


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    root = os.path.join(REPO, PACKAGE)
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith('.py'):
                rel = os.path.relpath(os.path.join(folder, name), REPO)[: -len('.py')]
                dotted = rel.replace(os.sep, '.').removesuffix('.__init__')
                out[dotted] = os.path.join(folder, name)
    return out


def _imports(path: str, modules: set[str]) -> set[str]:
    """The package modules a file imports, at any depth (function-level imports too)."""
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f'{node.module}.{a.name}' for a in node.names]
            if not any(n in modules for n in names):  # names from a module, not modules
                names = [node.module]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(path, set(modules)) - {m} for m, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_the_package_has_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_layers_import_downwards_only():
    graph = _graph()
    prefix = PACKAGE + '.'
    # The math layer imports nothing above it.
    assert graph[prefix + 'sparsity'] == set()
    assert graph[prefix + 'structured'] <= {prefix + 'sparsity'}
    assert graph[prefix + 'mask_plan'] <= {prefix + 'sparsity', prefix + 'structured'}
    # Only the command line imports the launcher; nothing imports the command line.
    importers = {m for m, deps in graph.items() if prefix + 'launcher' in deps}
    assert importers == {prefix + 'main'}
    assert not any(prefix + 'main' in deps for deps in graph.values())
    # The converter depends on the library, never on the launcher's run layer.
    run_layer = {prefix + m for m in ('launcher', 'run_context', 'search_run', 'weight_training')}
    assert not graph[prefix + 'convert'] & run_layer
    # The base config imports only the pure-Python settings (config files load without JAX).
    assert graph[prefix + 'config'] <= {prefix + 'settings'}
    assert graph[prefix + 'settings'] <= {prefix + 'selection'}
    assert graph[prefix + 'selection'] == set()
    # The library (api, engine and below) never imports the launcher's layers.
    launcher_layer = {
        prefix + m
        for m in ('config', 'config_checks', 'paper_configs', 'launcher', 'main', 'run_context',
                  'search_run', 'weight_training')
    } | {m for m in graph if m.startswith(prefix + 'studies')}
    library = ('api', 'engine', 'evaluation', 'persistence', 'batch_checks', 'search', 'settings')
    for name in library:
        assert not graph[prefix + name] & launcher_layer, f'{name} imports the launcher layer'
    assert graph[prefix + 'paper_configs'] == {prefix + 'config'}


def test_config_files_load_without_jax():
    """Every file in configs/ needs only ml_collections and the base config."""
    code = (
        'import glob, importlib.util, sys\n'
        "for path in sorted(glob.glob('configs/*.py')):\n"
        "    spec = importlib.util.spec_from_file_location('cfg', path)\n"
        '    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n'
        "heavy = [m for m in ('jax', 'flax', 'optax', 'tensorflow', 'orbax') if m in sys.modules]\n"
        "assert not heavy, f'loading configs/ imported {heavy}'\n"
        "assert 'ml_collections' in sys.modules\n"
    )
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_orchestration_modules_stay_small():
    modules = _modules()
    for name in ORCHESTRATION:
        with open(modules[f'{PACKAGE}.{name}']) as f:
            lines = len(f.readlines())
        assert lines <= MAX_ORCHESTRATION_LINES, (
            f'{name}.py has {lines} lines; split it (one concern per module)'
        )


def test_readme_architecture_names_every_module():
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    section = readme.split('## Architecture', 1)[1].split('\n## ', 1)[0]
    named = set(re.findall(r'`(jackpot_jax/[\w/]+\.py)`', section))
    files = {
        os.path.relpath(path, REPO)
        for path in _modules().values()
        if not path.endswith('__init__.py')
    }
    assert files - named == set(), 'modules missing from the README Architecture section'
    assert named - files == set(), 'README Architecture names modules that do not exist'
