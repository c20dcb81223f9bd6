"""colabs/convert_resnet50.ipynb executes top to bottom (TINY: a random-init ResNet-18).

It lives here, in the torch test process, because the notebook uses PyTorch; the runner
is tests/test_colabs.py's, loaded by path (tests/ is not a package).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')


def _runner():
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'test_colabs.py'
    )
    spec = importlib.util.spec_from_file_location('jackpot_colab_runner', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_notebook(tmp_path):
    runner = _runner()
    nb = runner.run_notebook('convert_resnet50.ipynb', tmp_path)
    shown = runner.text(nb)
    assert 'max |torch - flax|' in shown and 'masked model: max |torch - flax|' in shown
    assert '<All keys matched successfully>' in shown  # load_state_dict(strict=True)
    assert 'sparsity over prunable weights: 90.00%' in shown
    assert 'TensorFlow was never imported.' in shown
    assert len(runner.outputs(nb, 'image/png')) == 1
    workdir = tmp_path / 'workdir'
    assert (workdir / 'pretrained').is_dir()
    assert (workdir / 'resnet18_magnitude_90%.pth').is_file()
