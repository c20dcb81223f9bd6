"""The converter's mistakes in the input: one line naming the file and the fix; no silent overwrite.

Run with the other torch tests, in their own process: ``python -m pytest -q tests/torch``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from jackpot_jax import checkpoint
from jackpot_jax import workdir as workdir_lib
from test_convert import cli, official_model


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _fingerprint(workdir) -> str:
    params, _, _ = checkpoint.load_weights(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))
    return checkpoint.weights_fingerprint(params)


def test_convert_overwrites_a_workdir_only_when_told(tmp_path, capsys):
    for seed in (1, 2):
        model = official_model('resnet32', seed=seed)
        torch.save({'state_dict': model.state_dict()}, tmp_path / f'{seed}.pth')
    out = tmp_path / 'run'
    convert_second = ('official', '--arch', 'resnet32', '--input', tmp_path / '2.pth')
    assert cli('official', '--arch', 'resnet32', '--input', tmp_path / '1.pth', '--output', out) == 0
    os.makedirs(out / workdir_lib.CHECKPOINTS_DIR)  # a search was started in it
    first = _fingerprint(out)
    capsys.readouterr()

    assert cli(*convert_second, '--output', out) == 1
    (line,) = _stderr_lines(capsys)
    assert f'--output {out} already holds pretrained, checkpoints' in line
    assert '--overwrite' in line
    assert _fingerprint(out) == first  # untouched

    assert cli(*convert_second, '--output', out, '--overwrite') == 0
    assert _fingerprint(out) != first
    assert sorted(os.listdir(out)) == [workdir_lib.CHECKPOINTS_DIR, workdir_lib.PRETRAINED_DIR]


def test_a_pickled_module_is_refused_with_how_to_save_a_state_dict(tmp_path, capsys):
    path = tmp_path / 'whole_module.pth'
    torch.save(official_model('resnet32'), path)
    assert cli('official', '--arch', 'resnet32', '--input', path, '--output', tmp_path / 'w') == 1
    (line,) = _stderr_lines(capsys)
    assert line.startswith(f'error: {path} holds pickled Python objects (')
    assert "torch.save(model.state_dict(), 'FILE.pth')" in line
    assert 'weights_only' not in line
    assert not os.path.exists(tmp_path / 'w')


def test_random_bytes_are_not_a_readable_torch_file(tmp_path, capsys):
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name, kind in (('noise.pth', 'PyTorch'), ('noise.safetensors', 'safetensors')):
        path = tmp_path / name
        path.write_bytes(noise)
        assert cli('torchvision', '--arch', 'resnet18', '--input', path, '--output', tmp_path) == 1
        (line,) = _stderr_lines(capsys)
        assert line.startswith(f'error: {path} is not a readable {kind} file (')
        assert 'copy it again' in line
