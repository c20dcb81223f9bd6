"""The package's structure: sub-packages by role that import downwards only, no import
cycle, config files free of JAX, small modules, and an architecture page that names every
module."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'jackpot_jax'
# The sub-packages, bottom to top, and the packages each may import. A package never
# imports one above it; the command line (jackpot_jax.main) sits on top of everything.
LAYERS = {
    'core': set(),
    'models': {'core'},
    'baselines': {'core', 'models'},
    'io': {'core', 'models'},
    'data': {'core', 'io'},
    'engine': {'core', 'models', 'data', 'io'},
    'launch': {'core', 'models', 'baselines', 'data', 'io', 'engine'},
}
MAX_PACKAGE_MODULES = 12
MAX_MODULE_LINES = 450
# The method's math and the conversion name tables may be longer than a module of logic.
LONG_MODULES = {'core.sparsity', 'io.name_tables'}


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


def _package(module: str) -> str:
    """'jackpot_jax.core.step' -> 'core'; a top-level module -> its own name."""
    return module.split('.')[1] if module.count('.') >= 1 else module


def test_every_module_lives_in_a_package_of_its_role():
    modules = {m for m, path in _modules().items() if not path.endswith('__init__.py')}
    top = {m for m in modules if m.count('.') == 1}  # jackpot_jax.X
    assert top == {f'{PACKAGE}.main'}, f'modules outside the sub-packages: {sorted(top)}'
    assert {_package(m) for m in modules if m != f'{PACKAGE}.main'} == set(LAYERS)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """'a imports b' for every import of a package the layers do not allow."""
    return sorted(
        f'{m} imports {d}'
        for m, deps in graph.items()
        for d in deps
        if _package(m) in LAYERS
        and _package(d) != _package(m)
        and _package(d) not in LAYERS[_package(m)]
    )


def test_the_layer_rule_catches_an_upward_import():
    step, loop, main = f'{PACKAGE}.core.step', f'{PACKAGE}.engine.loop', f'{PACKAGE}.main'
    assert _upward({step: {loop}, loop: {step}}) == [f'{step} imports {loop}']
    assert _upward({loop: {step}, main: {loop}}) == []


def test_packages_import_downwards_only():
    upward = _upward(_graph())
    assert not upward, 'imports against the layers: ' + '; '.join(upward)


def test_pure_modules_stay_pure():
    graph = _graph()
    prefix = PACKAGE + '.'
    # The names of the choices import nothing; the math only them; N:M masks only the math.
    choices, sparsity = prefix + 'core.choices', prefix + 'core.sparsity'
    assert graph[choices] == set()
    assert graph[sparsity] <= {choices}
    assert graph[prefix + 'core.structured'] <= {sparsity, choices}
    assert graph[prefix + 'core.mask_plan'] <= {sparsity, prefix + 'core.structured', choices}
    # The base config imports only the pure-Python settings (config files load without JAX),
    # and the settings check every choice by its name.
    assert graph[prefix + 'launch.config'] <= {prefix + 'core.settings'}
    assert graph[prefix + 'core.settings'] <= {prefix + 'core.selection', choices}
    assert graph[prefix + 'core.selection'] == set()
    assert graph[prefix + 'launch.paper_configs'] == {prefix + 'launch.config'}
    # Nothing imports the command line.
    assert not any(prefix + 'main' in deps for deps in graph.values())


def test_packages_stay_small_enough_to_read():
    counts: dict[str, int] = {}
    for module in _modules():
        if module.count('.') >= 2 and not module.endswith('__init__'):
            package = module.rsplit('.', 1)[0]
            counts[package] = counts.get(package, 0) + 1
    big = {p: n for p, n in counts.items() if n > MAX_PACKAGE_MODULES}
    assert not big, f'packages over {MAX_PACKAGE_MODULES} modules (split by role): {big}'


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


def test_modules_stay_small():
    too_long = {}
    for module, path in _modules().items():
        with open(path) as f:
            lines = len(f.readlines())
        if lines > MAX_MODULE_LINES and module.removeprefix(PACKAGE + '.') not in LONG_MODULES:
            too_long[module] = lines
    assert not too_long, f'modules over {MAX_MODULE_LINES} lines (one concern each): {too_long}'


def test_the_architecture_page_names_every_module():
    with open(os.path.join(REPO, 'docs', 'architecture.md')) as f:
        page = f.read()
    named = set(re.findall(r'`(jackpot_jax/[\w/]+\.py)`', page))
    files = {
        os.path.relpath(path, REPO)
        for path in _modules().values()
        if not path.endswith('__init__.py')
    }
    assert files - named == set(), 'modules missing from docs/architecture.md'
    assert named - files == set(), 'docs/architecture.md names modules that do not exist'
