"""The notebooks in colabs/ execute top to bottom, each in its own Jupyter kernel.

Every notebook's first code cell is tagged ``parameters`` and sets ``TINY = False`` and
the budgets; :func:`run_notebook` inserts a cell after it that sets ``TINY = True`` and a
temporary ``WORKDIR`` (papermill's convention, without papermill), then runs the notebook
with nbclient in a kernel of this test's own Python (the venv's), started at the repository
root. ``convert_resnet50.ipynb`` uses PyTorch, which must not share a process with
TensorFlow, so its test is ``tests/torch/test_colab_convert.py`` (the torch test process).
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from jupyter_core.utils import run_sync  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, 'colabs')
KERNEL_NAME = 'jackpot-ci'
CELL_TIMEOUT_S = 600
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLABS, '*.ipynb')))


def parameters_index(nb) -> int:
    """Index of the cell tagged 'parameters' (it must be the first code cell)."""
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == 'code']
    tagged = [i for i in code if 'parameters' in cell_tags(nb.cells[i])]
    assert tagged == code[:1], 'the first code cell, and only it, must be tagged "parameters"'
    return tagged[0]


def cell_tags(cell) -> list[str]:
    return list(cell.get('metadata', {}).get('tags', []))


def _kernel_manager(folder: str) -> AsyncKernelManager:
    """A kernel of this very interpreter, from a kernel spec in ``folder``; its connection
    file and IPython profile live there too (nothing is written to the user's Jupyter dirs)."""
    spec_dir = os.path.join(folder, KERNEL_NAME)
    os.makedirs(spec_dir, exist_ok=True)
    spec = {
        'argv': [
            sys.executable,
            '-m',
            'ipykernel_launcher',
            '-f',
            '{connection_file}',
            '--HistoryManager.enabled=False',
        ],
        'display_name': 'jackpot_jax tests',
        'language': 'python',
        'env': {'IPYTHONDIR': os.path.join(folder, 'ipython')},
    }
    with open(os.path.join(spec_dir, 'kernel.json'), 'w') as f:
        json.dump(spec, f)
    specs = KernelSpecManager(kernel_dirs=[folder], ensure_native_kernel=False)
    return AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=specs,
        connection_file=os.path.join(folder, 'connection.json'),
    )


def run_notebook(name: str, tmp_path, **parameters):
    """Executes colabs/NAME with TINY = True (+ ``parameters``); returns the executed notebook.

    The kernel starts in the repository root; ``WORKDIR`` defaults to ``tmp_path/workdir``.
    A failing cell raises ``nbclient.exceptions.CellExecutionError`` with its traceback.
    """
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    values = {'TINY': True, 'WORKDIR': str(tmp_path / 'workdir'), **parameters}
    source = '\n'.join(f'{key} = {value!r}' for key, value in values.items())
    source += (
        '\n\nimport os as _os, sys as _sys  # the tests run in the venv, at the repository root'
        f'\nassert _os.path.realpath(_sys.executable) == {os.path.realpath(sys.executable)!r}, '
        '_sys.executable'
        f'\nassert _os.getcwd() == {REPO!r}, _os.getcwd()'
    )
    injected = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
    nb.cells.insert(parameters_index(nb) + 1, injected)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(str(tmp_path / 'kernels')),
        timeout=CELL_TIMEOUT_S,
        startup_timeout=180,
        resources={'metadata': {'path': REPO}},
    )
    try:
        client.execute()
    finally:  # nbclient shuts down only the kernels it made itself
        run_sync(client.km.shutdown_kernel)(now=True)
    return nb


def outputs(nb, kind: str) -> list:
    """Every output's data of a MIME type ('text/plain', 'image/png', ...) or stream text."""
    found = []
    for cell in nb.cells:
        for out in cell.get('outputs', []):
            if kind == 'stream' and out.output_type == 'stream':
                found.append(out.text)
            elif kind in out.get('data', {}):
                found.append(out.data[kind])
    return found


def text(nb) -> str:
    return '\n'.join(
        outputs(nb, 'stream') + outputs(nb, 'text/plain') + outputs(nb, 'text/markdown')
    )


# ----------------------------------------------------------------------------
# The saved notebooks: clean and parameterised (fast).
# ----------------------------------------------------------------------------
def test_every_notebook_is_tested():
    assert NOTEBOOKS == [
        'convert_resnet50.ipynb',
        'imagenet_search_tpu_gpu.ipynb',
        'quickstart.ipynb',
        'studies.ipynb',
        'your_model.ipynb',
    ]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_saved_clean_and_parameterised(name):
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == 'markdown' and nb.cells[0].source.startswith('# ')
    for cell in nb.cells:
        if cell.cell_type == 'code':
            assert cell.outputs == [] and cell.execution_count is None, 'save without outputs'
    params = nb.cells[parameters_index(nb)].source
    assert 'TINY = False' in params and "WORKDIR = ''" in params
    installs = [c.source for c in nb.cells if '!pip install' in c.source]
    assert len(installs) == 1 and "if 'google.colab' in sys.modules" in installs[0]
    assert 'requirements' not in installs[0]  # the package itself is pip-installed


# ----------------------------------------------------------------------------
# Execution (TINY budgets; the torch notebook runs in tests/torch).
# ----------------------------------------------------------------------------
def test_quickstart(tmp_path):
    nb = run_notebook('quickstart.ipynb', tmp_path)
    shown = text(nb)
    assert '**lottery jackpot at 90%, no weight trained**' in shown
    assert 'sparsity over prunable weights: 90.00%' in shown
    assert len(outputs(nb, 'image/png')) == 3  # layer sparsity, accuracy curves, mask changes
    workdir = tmp_path / 'workdir'
    for name in ('summary.json', 'metrics.jsonl', 'search_accuracy.png', 'mask_changes.png'):
        assert (workdir / name).is_file(), name


def test_studies(tmp_path):
    nb = run_notebook(
        'studies.ipynb', tmp_path, INITS='magnitude,kaiming', VARIANTS='constant,poly4'
    )
    shown = text(nb)
    for criterion in ('magnitude', 'random', 'snip', 'grasp', 'synflow'):
        assert criterion in shown
    assert 'shared kept by chance' in shown
    assert "speed-up: kaiming's epochs" in shown and 'flip-backs' in shown
    assert len(outputs(nb, 'image/png')) == 3
    workdir = tmp_path / 'workdir'
    for name in ('overlap', 'search_cost', 'restriction'):
        assert (workdir / f'{name}.png').is_file() and (workdir / f'{name}.json').is_file()


def test_your_model(tmp_path):
    nb = run_notebook('your_model.ipynb', tmp_path)
    shown = text(nb)
    assert 'sparsity over prunable weights: 90.00%' in shown
    assert '**lottery jackpot at 90%, no weight trained**' in shown
    assert 'dense (pre-trained, all weights)' in shown and 'epoch 2:' in shown
    assert 'chosen epoch: epoch ' in shown and 'validation_top1' in shown
    masks = np.load(tmp_path / 'workdir' / 'jackpot_masks.npz')
    assert sorted(masks.files) == ['conv1/kernel', 'conv2/kernel', 'dense/kernel']
    kept = sum(int(masks[p].sum()) for p in masks.files)
    total = sum(masks[p].size for p in masks.files)
    assert kept == total // 10  # floor(10 % of the prunable weights)


def test_imagenet_search(tmp_path):
    pytest.importorskip('tensorflow_datasets')
    nb = run_notebook('imagenet_search_tpu_gpu.ipynb', tmp_path)
    shown = text(nb)
    assert 'configs/imagenet_search.py:90,tiny' in shown
    assert 'sparsity over prunable weights: 90.00%' in shown
    assert len(outputs(nb, 'image/png')) >= 1
    workdir = tmp_path / 'workdir'
    for name in ('pretrained', 'jackpot', 'checkpoints'):
        assert (workdir / name).is_dir(), name
