"""The converter's mistakes in the input: one line naming the file and the fix; no silent overwrite.

Run with the other torch tests, in their own process: ``python -m pytest -q tests/torch``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from test_convert import cli, official_model

from jackpot_jax.io import checkpoint, workdir as workdir_lib


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


def test_to_torch_replaces_an_existing_file_only_when_told(tmp_path, capsys):
    torch.save({'state_dict': official_model('resnet32').state_dict()}, tmp_path / 'in.pth')
    convert_in = ('official', '--arch', 'resnet32', '--input', tmp_path / 'in.pth')
    assert cli(*convert_in, '--output', tmp_path) == 0
    out = tmp_path / 'mine.pth'
    out.write_bytes(b'a file of the user')
    to_torch = ('to-torch', '--arch', 'resnet32', '--format', 'official', '--weights', tmp_path)
    capsys.readouterr()

    assert cli(*to_torch, '--output', out) == 1
    (line,) = _stderr_lines(capsys)
    assert line == (
        f'error: --output {out} already exists; pass another --output, or --overwrite to '
        'replace it'
    )
    assert out.read_bytes() == b'a file of the user'

    assert cli(*to_torch, '--output', out, '--overwrite') == 0
    assert 'conv1.weight' in torch.load(out, weights_only=True)['state_dict']
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('mine')) == ['mine.pth']


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    state = official_model('resnet32').state_dict()
    state['conv1.weight'][0, 0, 0, :2] = float('nan')
    state['bn1.running_var'][3] = float('inf')
    torch.save({'state_dict': state}, tmp_path / 'diverged.pth')
    out = tmp_path / 'run'
    path = tmp_path / 'diverged.pth'
    assert cli('official', '--arch', 'resnet32', '--input', path, '--output', out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: 2 problem(s) with {path} for official resnet32')
    assert 'conv1.weight: 2 of 864 values are NaN or infinite' in err
    assert 'bn1.running_var: 1 of 32 values are NaN or infinite' in err
    assert 'convert a checkpoint saved before the training diverged' in err
    assert not out.exists()
