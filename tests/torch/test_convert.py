"""Parity and format tests of jackpot_jax.io.convert against PyTorch.

Run in their own process (torch must never share one with tensorflow):
``python -m pytest -q tests/torch``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F
import torchvision

from jackpot_jax.core import sparsity
from jackpot_jax.io import (
    checkpoint,
    convert,
    convert_cli,
    name_tables,
    official_releases,
    torch_io,
    workdir as workdir_lib,
)
from jackpot_jax.models import zoo

jax.config.update('jax_default_matmul_precision', 'highest')

TOL = 1e-4  # max |torch - flax| <= TOL * max(1, max |torch|), per compared tensor.


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
def assert_close(ref, out, what: str = '') -> None:
    ref, out = np.asarray(ref), np.asarray(out)
    assert ref.shape == out.shape, f'{what}: shapes {ref.shape} vs {out.shape}'
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ref - out)))
    assert err <= TOL * scale, f'{what}: max |diff| {err:.3g} at scale {scale:.3g}'


def nhwc(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def randomise_bn(model: tnn.Module, x: torch.Tensor, seed: int) -> None:
    """Running statistics calibrated on ``x`` then perturbed; random BN affine params."""
    bns = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch gives its own statistics.
    model.train()
    with torch.no_grad():
        model(x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            bn.running_var.mul_(torch.rand(c, generator=g) * 1.5 + 0.5)
            bn.running_mean.add_(torch.randn(c, generator=g) * 0.2 * bn.running_var.sqrt())
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
            bn.momentum = 0.1
    model.eval()


def state_numpy(model: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_forward(model: tnn.Module, x: np.ndarray, names=()) -> tuple[np.ndarray, dict]:
    modules = dict(model.named_modules())
    acts = {}
    hooks = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: acts.__setitem__(n, o.detach().clone().numpy())
        )
        for n in names
    ]
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    for h in hooks:
        h.remove()
    return logits, acts


def flax_forward(
    name: str, num_classes: int, params, stats, x: np.ndarray
) -> tuple[np.ndarray, dict]:
    model = zoo.get_model(name, num_classes)
    logits, state = model.apply(
        {'params': params, 'batch_stats': stats},
        nhwc(x),
        train=False,
        capture_intermediates=True,
        mutable=['intermediates'],
    )
    inter = state['intermediates']

    def get(path):
        value = inter[path]
        return np.asarray(value[0] if isinstance(value, tuple) else value['__call__'][0])

    return np.asarray(logits), get


def compare(arch_name, num_classes, params, stats, torch_model, x, stages) -> None:
    """Logits and every named stage's activations (torch name -> flax name '.'->'_')."""
    ref, acts = torch_forward(torch_model, x, stages)
    out, get = flax_forward(arch_name, num_classes, params, stats, x)
    for stage in stages:
        assert_close(nhwc(acts[stage]), get(stage.replace('.', '_')), stage)
    assert_close(ref, out, 'logits')


def inputs(shape, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def resnet_stages(model: tnn.Module) -> list[str]:
    blocks = [n for n, _ in model.named_modules() if n.count('.') == 1 and n.startswith('layer')]
    return ['bn1', *blocks, 'fc']


def tv_vgg_stages(model: tnn.Module) -> list[str]:
    bns = [n for n, m in model.named_modules() if isinstance(m, tnn.BatchNorm2d)]
    return [*bns, 'avgpool', 'classifier.0', 'classifier.3', 'classifier.6']


def tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def without_counters(state) -> dict:
    return {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}


def assert_state_equal(a, b) -> None:
    a, b = without_counters(a), without_counters(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def assert_tree_equal(a, b) -> None:
    fa, fb = sparsity.flatten(a), sparsity.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


def torch_names(arch: str, family: str) -> dict[str, str]:
    """Flax kernel path -> torch module name, from the converter's table."""
    return {f'{l.flax}/kernel': l.torch for l in convert.get_arch(arch, family).table}


def cli(*args) -> int:
    return convert_cli.main([str(a) for a in args])


# ----------------------------------------------------------------------------
# The authors' module layout (the state-dict names of their released models).
# ----------------------------------------------------------------------------
class OfficialConv(tnn.Conv2d):
    """Conv with the official jackpot slots: ``mask`` (scores) and, in 2023, ``b_mask``."""

    def __init__(self, *args, jackpot: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if jackpot:
            self.mask = tnn.Parameter(torch.ones_like(self.weight))
        if jackpot == '2023':
            self.b_mask = tnn.Parameter(torch.ones_like(self.weight), requires_grad=False)

    def forward(self, x):
        w = self.weight * self.b_mask if hasattr(self, 'b_mask') else self.weight
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class OfficialBasicBlock(tnn.Module):
    def __init__(self, conv, cin, cout, stride):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + shortcut)


class OfficialResNet32(tnn.Module):
    """2x-wide CIFAR ResNet-32, option-A shortcuts, 1x1-conv classifier ``fc``."""

    def __init__(self, num_classes=10, jackpot=None):
        super().__init__()
        conv = functools.partial(OfficialConv, jackpot=jackpot)
        self.conv1 = conv(3, 32, 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(32)
        cin = 32
        for stage, width in enumerate((32, 64, 128)):
            blocks = []
            for index in range(5):
                blocks.append(OfficialBasicBlock(conv, cin, width, 2 if stage and not index else 1))
                cin = width
            setattr(self, f'layer{stage + 1}', tnn.Sequential(*blocks))
        self.fc = conv(128, num_classes, 1, bias=True)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1)).flatten(1)


VGG19 = [
    64,
    64,
    'M',
    128,
    128,
    'M',
    256,
    256,
    256,
    256,
    'M',
    512,
    512,
    512,
    512,
    'M',
    512,
    512,
    512,
    512,
    'M',
]


class OfficialVGG19(tnn.Module):
    """CIFAR VGG-19-BN: flat ``features`` sequence, 1x1-conv ``classifier``."""

    def __init__(self, num_classes=10, jackpot=None):
        super().__init__()
        conv = functools.partial(OfficialConv, jackpot=jackpot)
        layers, cin = [], 3
        for item in VGG19:
            if item == 'M':
                layers.append(tnn.MaxPool2d(2, 2))
            else:
                layers += [conv(cin, item, 3, 1, 1, bias=False), tnn.BatchNorm2d(item), tnn.ReLU()]
                cin = item
        layers.append(tnn.AvgPool2d(1, 1))
        self.features = tnn.Sequential(*layers)
        self.classifier = conv(512, num_classes, 1, bias=True)

    def forward(self, x):
        return self.classifier(self.features(x)).flatten(1)


class OfficialBottleneck(tnn.Module):
    def __init__(self, conv, cin, planes, stride):
        super().__init__()
        self.conv1 = conv(cin, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = conv(planes, 4 * planes, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(4 * planes)
        self.downsample = tnn.Sequential()
        if stride != 1 or cin != 4 * planes:
            self.downsample = tnn.Sequential(
                conv(cin, 4 * planes, 1, stride, bias=False), tnn.BatchNorm2d(4 * planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class OfficialResNet50(tnn.Module):
    """The authors' ResNet-50: torchvision names, ``fc`` a 1x1 conv (global pool, any size)."""

    def __init__(self, num_classes=1000, jackpot=None):
        super().__init__()
        conv = functools.partial(OfficialConv, jackpot=jackpot)
        self.conv1 = conv(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        cin = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            layers = []
            for index in range(blocks):
                layers.append(
                    OfficialBottleneck(conv, cin, planes, 2 if stage and not index else 1)
                )
                cin = 4 * planes
            setattr(self, f'layer{stage + 1}', tnn.Sequential(*layers))
        self.fc = conv(2048, num_classes, 1, bias=True)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1)).flatten(1)


OFFICIAL = {
    'resnet32': (OfficialResNet32, 10, 32),
    'vgg19_cifar': (OfficialVGG19, 10, 32),
    'resnet50': (OfficialResNet50, 1000, 64),
}


def official_model(arch: str, seed: int = 0, jackpot=None, num_classes=None) -> tnn.Module:
    cls, classes, size = OFFICIAL[arch]
    torch.manual_seed(seed)
    model = cls(num_classes or classes, jackpot=jackpot)
    randomise_bn(model, torch.from_numpy(inputs((4, 3, size, size), seed=seed + 100)), seed)
    return model


def official_convs(model: tnn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, tnn.Conv2d)]


def make_jackpot_state(dense: dict, convs: list[str], classifier: str, fmt: str, seed: int) -> dict:
    """A found-jackpot state dict: dense weights, searched BN stats, scores (+ b_masks)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.from_numpy(v.copy()) for k, v in dense.items()}
    for key in state:
        if key.endswith('running_var'):
            state[key] = state[key] * (torch.rand(state[key].shape, generator=g) * 0.4 + 0.8)
        elif key.endswith('running_mean'):
            state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=g)
    for name in convs:
        weight = state[f'{name}.weight']
        if name == classifier:
            state[f'{name}.mask'] = torch.ones_like(weight)
            if fmt == '2023':
                state[f'{name}.b_mask'] = torch.ones_like(weight)
            continue
        state[f'{name}.mask'] = torch.rand(weight.shape, generator=g)
        if fmt == '2023':
            n = weight.numel()
            keep = torch.randperm(n, generator=g)[: n - int(0.9 * n)]
            b_mask = torch.zeros(n)
            b_mask[keep] = 1.0
            state[f'{name}.b_mask'] = b_mask.reshape(weight.shape)
    return state


# ----------------------------------------------------------------------------
# Name tables and small pieces.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('arch', sorted(name_tables.ARCHS['torchvision']))
def test_torchvision_table_matches_torchvision_keys(arch):
    with torch.device('meta'):
        model = torchvision.models.get_model(arch, weights=None)
    want = {k: tuple(v.shape) for k, v in without_counters(model.state_dict()).items()}
    assert convert.expected_torch_shapes(convert.get_arch(arch, 'torchvision'), 1000) == want


@pytest.mark.parametrize('arch', sorted(OFFICIAL))
def test_official_table_matches_official_modules(arch):
    cls, classes, _ = OFFICIAL[arch]
    with torch.device('meta'):
        model = cls(classes)
    want = {k: tuple(v.shape) for k, v in without_counters(model.state_dict()).items()}
    assert convert.expected_torch_shapes(convert.get_arch(arch, 'official'), classes) == want


@pytest.mark.parametrize('size', [1, 2, 3, 5, 7, 9, 14, 20])
def test_adaptive_avg_pool_matches_torch(size):
    x = inputs((2, 4, size, size + 3))
    ref = tnn.AdaptiveAvgPool2d(7)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        nhwc(ref), np.asarray(zoo.adaptive_avg_pool(nhwc(x), (7, 7))), rtol=1e-6, atol=1e-6
    )


def test_numpy_edge_popup_matches_sparsity():
    rng = np.random.RandomState(0)
    reference = jax.jit(sparsity.edge_popup_mask, static_argnums=1)
    for trial in range(12):
        scores = rng.randint(-3, 4, size=(2, 9)).astype(np.float32)  # many ties.
        if trial % 3 == 0:
            scores = rng.randn(2, 9).astype(np.float32)
        n, k = 9, trial + 1
        ours = official_releases.edge_popup_mask(scores, k)
        np.testing.assert_array_equal(ours, np.asarray(reference(scores, k)))
        assert ours.sum() == 2 * n - k


# ----------------------------------------------------------------------------
# torchvision parity: logits and every stage.
# ----------------------------------------------------------------------------
TORCHVISION_CASES = [
    ('resnet18', 64, 10),
    ('resnet34', 64, 1000),
    ('resnet50', 64, 1000),
    ('resnet101', 64, 1000),
    ('resnet152', 64, 1000),
    ('vgg11_bn', 224, 1000),  # 224 -> exact 7x7 pooling.
    ('vgg13_bn', 64, 1000),  # 2x2 -> 7x7: overlapping adaptive bins.
    ('vgg16_bn', 64, 10),
    ('vgg19_bn', 32, 1000),  # 1x1 -> 7x7: replicated bins.
]


@pytest.mark.parametrize('arch, size, num_classes', TORCHVISION_CASES)
def test_torchvision_parity(arch, size, num_classes):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    randomise_bn(model, torch.from_numpy(inputs((2, 3, size, size), seed=1)), seed=2)
    state = state_numpy(model)
    converted = convert.torch_to_flax(state, arch)
    assert converted.num_classes == num_classes
    stages = resnet_stages(model) if arch.startswith('resnet') else tv_vgg_stages(model)
    compare(
        arch,
        num_classes,
        converted.params,
        converted.statistics,
        model,
        inputs((1, 3, size, size)),
        stages,
    )
    # Back to torchvision names: exact, and loadable with strict=True.
    back = convert.flax_to_torch(converted.params, converted.statistics, arch)
    assert_state_equal(back, state)
    model.load_state_dict(tensors(back), strict=True)


# ----------------------------------------------------------------------------
# torchvision files, cache and command line.
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def resnet18():
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None)
    randomise_bn(model, torch.from_numpy(inputs((2, 3, 64, 64), seed=4)), seed=5)
    return model


def test_torchvision_cli_pth_safetensors_and_back(tmp_path, resnet18):
    state = state_numpy(resnet18)
    pth, st = tmp_path / 'r18.pth', tmp_path / 'r18.safetensors'
    torch.save(resnet18.state_dict(), pth)
    torch_io.save_state_dict(state, str(st))
    assert cli('torchvision', '--arch', 'resnet18', '--input', pth, '--output', tmp_path / 'a') == 0
    assert cli('torchvision', '--arch', 'resnet18', '--input', st, '--output', tmp_path / 'b') == 0
    params, stats, meta = checkpoint.load_weights(str(tmp_path / 'a' / workdir_lib.PRETRAINED_DIR))
    params_b, stats_b, _ = checkpoint.load_weights(str(tmp_path / 'b' / workdir_lib.PRETRAINED_DIR))
    assert meta['model'] == {'name': 'resnet18'} and meta['num_classes'] == 1000
    assert str(pth) in meta['source']
    assert_tree_equal(params, params_b)
    assert_tree_equal(stats, stats_b)
    for suffix in ('pth', 'safetensors'):
        out = tmp_path / f'back.{suffix}'
        assert (
            cli(
                'to-torch',
                '--arch',
                'resnet18',
                '--weights',
                tmp_path / 'a',
                '--format',
                'torchvision',
                '--output',
                out,
            )
            == 0
        )
        fresh = torchvision.models.resnet18(weights=None)
        fresh.load_state_dict(tensors(torch_io.load_state_dict(str(out))), strict=True)
        assert_state_equal(state_numpy(fresh), state)


def test_torchvision_masked_export(tmp_path, resnet18):
    torch.save({'state_dict': resnet18.state_dict()}, tmp_path / 'r18.pt')
    assert (
        cli(
            'torchvision',
            '--arch',
            'resnet18',
            '--input',
            tmp_path / 'r18.pt',
            '--output',
            tmp_path,
        )
        == 0
    )
    params, stats, _ = checkpoint.load_weights(str(tmp_path / workdir_lib.PRETRAINED_DIR))
    flat = sparsity.flatten(params)
    kernels = {p: flat[p] for p in sparsity.prunable_paths(params)}
    assert 'fc/kernel' not in kernels and len(kernels) == 20
    counts = sparsity.pruned_counts(kernels, 0.8)
    rng = np.random.RandomState(6)  # random masks with exact counts (numpy: fast).
    masks = {p: rng.permutation(w.size).reshape(w.shape) >= counts[p] for p, w in kernels.items()}
    scores = {p: rng.rand(*w.shape).astype(np.float32) for p, w in kernels.items()}
    searched = jax.tree.map(lambda v: v * 1.1, stats)
    checkpoint.save_jackpot(
        str(tmp_path / workdir_lib.JACKPOT_DIR), scores, masks, searched, {'counts': counts}
    )
    out = tmp_path / 'masked.pth'
    # A torchvision state dict has no mask slots: unmasked export of a jackpot is refused.
    assert (
        cli(
            'to-torch',
            '--arch',
            'resnet18',
            '--weights',
            tmp_path,
            '--jackpot',
            tmp_path,
            '--output',
            out,
        )
        == 1
    )
    assert (
        cli(
            'to-torch',
            '--arch',
            'resnet18',
            '--weights',
            tmp_path,
            '--jackpot',
            tmp_path,
            '--masked',
            '--output',
            out,
        )
        == 0
    )
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model.eval()
    for path, mask in masks.items():
        torch_name = torch_names('resnet18', 'torchvision')[path]
        weight = model.get_parameter(f'{torch_name}.weight').detach().numpy()
        expected = convert._kernel_to_torch(name_tables.CONV, np.asarray(flat[path]) * np.asarray(mask))
        np.testing.assert_array_equal(weight, expected, err_msg=path)
        assert int((weight == 0).sum()) >= counts[path]
    x = inputs((1, 3, 64, 64))
    ref, _ = torch_forward(model, x)
    out_flax, _ = flax_forward('resnet18', 1000, sparsity.masked_params(params, masks), searched, x)
    assert_close(ref, out_flax, 'masked logits')


def test_torchvision_cache_lookup(tmp_path, monkeypatch, resnet18):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))

    def no_download(*args, **kwargs):
        raise AssertionError('must never download')

    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    with pytest.raises(FileNotFoundError, match='no cached torchvision weights for resnet18'):
        torch_io.find_torchvision_cache('resnet18')
    assert (
        cli('torchvision', '--arch', 'resnet18', '--input', 'cache', '--output', tmp_path / 'x')
        == 1
    )
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    torch.save(resnet18.state_dict(), cache / 'resnet18-f37072fd.pth')
    torch.save(resnet18.state_dict(), cache / 'resnet34-b627a593.pth')
    assert torch_io.find_torchvision_cache('resnet18') == str(cache / 'resnet18-f37072fd.pth')
    assert (
        cli('torchvision', '--arch', 'resnet18', '--input', 'cache', '--output', tmp_path / 'x')
        == 0
    )
    _, _, meta = checkpoint.load_weights(str(tmp_path / 'x' / workdir_lib.PRETRAINED_DIR))
    assert 'resnet18-f37072fd.pth' in meta['source']


# ----------------------------------------------------------------------------
# Official formats.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    'arch, prefix', [('resnet32', ''), ('vgg19_cifar', 'module.'), ('resnet50', 'module.')]
)
def test_official_pretrained_parity(tmp_path, arch, prefix):
    model = official_model(arch)
    _, num_classes, size = OFFICIAL[arch]
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({'state_dict': state, 'epoch': 160, 'best_acc': 93.5}, tmp_path / 'pre.pth')
    assert (
        cli('official', '--arch', arch, '--input', tmp_path / 'pre.pth', '--output', tmp_path) == 0
    )
    params, stats, meta = checkpoint.load_weights(str(tmp_path / workdir_lib.PRETRAINED_DIR))
    assert meta['model'] == {'name': arch} and meta['num_classes'] == num_classes
    assert 'official' in meta['source'] and 'pre.pth' in meta['source']
    if arch == 'resnet32':
        stages = resnet_stages(model)[:-1]  # fc is a 1x1 conv here; the logits are compared.
    elif arch == 'vgg19_cifar':
        stages = [n for n, m in model.named_modules() if isinstance(m, tnn.BatchNorm2d)]
    else:
        stages = ['layer1.0', 'layer2.0', 'layer3.5', 'layer4.2']
    compare(arch, num_classes, params, stats, model, inputs((1, 3, size, size)), stages)
    # Out again in official names: exact; ResNet-50 also as a torchvision model.
    out = tmp_path / 'back.pth'
    assert (
        cli(
            'to-torch',
            '--arch',
            arch,
            '--weights',
            tmp_path,
            '--format',
            'official',
            '--output',
            out,
        )
        == 0
    )
    back = torch.load(out, weights_only=True)['state_dict']
    assert_state_equal(back, model.state_dict())
    if arch == 'resnet50':
        out = tmp_path / 'tv.pth'
        assert cli('to-torch', '--arch', arch, '--weights', tmp_path, '--output', out) == 0
        tv = torchvision.models.resnet50(weights=None)
        tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
        x = inputs((1, 3, 64, 64))
        assert_close(
            torch_forward(model, x)[0], torch_forward(tv.eval(), x)[0], 'torchvision resnet50'
        )


def test_official_jackpot_2023_roundtrip(tmp_path):
    dense = official_model('resnet32', seed=7)
    torch.save({'state_dict': dense.state_dict()}, tmp_path / 'pre.pth')
    convs = official_convs(dense)
    assert len(convs) == 32
    state = make_jackpot_state(state_numpy(dense), convs, 'fc', '2023', seed=8)
    jackpot_model = OfficialResNet32(jackpot='2023')
    jackpot_model.load_state_dict(state, strict=True)  # the assumed official layout.
    jackpot_model.eval()
    torch.save(
        {'state_dict': {f'module.{k}': v for k, v in state.items()}, 'cfg': [0.9] * 31 + [0]},
        tmp_path / 'jackpot.pth',
    )
    assert (
        cli(
            'official',
            '--arch',
            'resnet32',
            '--input',
            tmp_path / 'pre.pth',
            '--jackpot',
            tmp_path / 'jackpot.pth',
            '--output',
            tmp_path / 'w',
        )
        == 0
    )
    params, pre_stats, _ = checkpoint.load_weights(str(tmp_path / 'w' / workdir_lib.PRETRAINED_DIR))
    scores, masks, stats, meta = checkpoint.read_jackpot_bundle(str(tmp_path / 'w' / workdir_lib.JACKPOT_DIR))
    assert meta['format'] == '2023' and meta['model'] == {'name': 'resnet32'}
    assert len(masks) == 31 and 'fc/kernel' not in masks
    paths = {v: k for k, v in torch_names('resnet32', 'official').items()}
    for name in convs[:-1]:
        path = paths[name]
        np.testing.assert_array_equal(
            np.asarray(scores[path]), state[f'{name}.mask'].numpy().transpose(2, 3, 1, 0)
        )
        np.testing.assert_array_equal(
            np.asarray(masks[path]), state[f'{name}.b_mask'].numpy().transpose(2, 3, 1, 0) == 1
        )
        assert masks[path].dtype == bool and scores[path].dtype == np.float32
        assert meta['counts'][path] == int((state[f'{name}.b_mask'] == 0).sum())
    # Searched statistics go with the jackpot, the pre-trained ones with the weights.
    np.testing.assert_array_equal(np.asarray(stats['bn1']['var']), state['bn1.running_var'].numpy())
    np.testing.assert_array_equal(
        np.asarray(pre_stats['bn1']['var']), dense.bn1.running_var.numpy()
    )
    x = inputs((2, 3, 32, 32))
    ref, _ = torch_forward(jackpot_model, x)
    out, _ = flax_forward('resnet32', 10, sparsity.masked_params(params, masks), stats, x)
    assert_close(ref, out, 'jackpot logits')

    # Out in the 2023 format (unmasked weights + mask + b_mask): the original, exactly.
    out_file = tmp_path / 'out.pth'
    assert (
        cli(
            'to-torch',
            '--arch',
            'resnet32',
            '--weights',
            tmp_path / 'w',
            '--jackpot',
            tmp_path / 'w',
            '--format',
            'official',
            '--output',
            out_file,
        )
        == 0
    )
    exported = torch.load(out_file, weights_only=True)['state_dict']
    OfficialResNet32(jackpot='2023').load_state_dict(exported, strict=True)
    assert_state_equal(exported, state)
    # ... and back in: identical scores, masks, weights and statistics.
    assert (
        cli(
            'official',
            '--arch',
            'resnet32',
            '--input',
            out_file,
            '--jackpot',
            out_file,
            '--output',
            tmp_path / 'w2',
        )
        == 0
    )
    params2, _, _ = checkpoint.load_weights(str(tmp_path / 'w2' / workdir_lib.PRETRAINED_DIR))
    scores2, masks2, stats2, _ = checkpoint.read_jackpot_bundle(str(tmp_path / 'w2' / workdir_lib.JACKPOT_DIR))
    for a, b in ((params, params2), (stats, stats2)):
        assert_tree_equal(a, b)
    for a, b in ((scores, scores2), (masks, masks2)):
        assert_tree_equal(sparsity.unflatten(a), sparsity.unflatten(b))
    # Masked, no mask slots: a dense official model computing the same logits.
    masked_file = tmp_path / 'masked.safetensors'
    assert (
        cli(
            'to-torch',
            '--arch',
            'resnet32',
            '--weights',
            tmp_path / 'w',
            '--jackpot',
            tmp_path / 'w',
            '--format',
            'official',
            '--masked',
            '--mask_format',
            'none',
            '--output',
            masked_file,
        )
        == 0
    )
    plain = OfficialResNet32()
    plain.load_state_dict(tensors(torch_io.load_state_dict(str(masked_file))), strict=True)
    assert_close(ref, torch_forward(plain.eval(), x)[0], 'masked export logits')


def _global_magnitude_counts(weights: list[torch.Tensor], sparsity_level: float) -> list[int]:
    """The authors' 'l1' rule, written independently in torch (exact keep count)."""
    flat = torch.cat([w.abs().flatten() for w in weights])
    keep = flat.numel() * round((1 - sparsity_level) * 100) // 100
    thr = torch.topk(flat, keep).values[-1]
    return [int((w.abs() < thr).sum()) for w in weights]


def test_official_jackpot_2021_edge_popup(tmp_path):
    dense = official_model('vgg19_cifar', seed=11)
    convs = official_convs(dense)
    state = make_jackpot_state(state_numpy(dense), convs, 'classifier', '2021', seed=12)
    OfficialVGG19(jackpot='2021').load_state_dict(state, strict=True)
    torch.save({'state_dict': dense.state_dict()}, tmp_path / 'pre.pth')
    torch.save({'state_dict': state}, tmp_path / 'jackpot.pth')
    common = (
        'official',
        '--arch',
        'vgg19_cifar',
        '--input',
        tmp_path / 'pre.pth',
        '--jackpot',
        tmp_path / 'jackpot.pth',
        '--output',
        tmp_path / 'w',
    )
    assert cli(*common) == 1  # 2021 format: the sparsity is required.
    assert cli(*common, '--sparsity', 0.9) == 0
    params, _, _ = checkpoint.load_weights(str(tmp_path / 'w' / workdir_lib.PRETRAINED_DIR))
    scores, masks, stats, meta = checkpoint.read_jackpot_bundle(str(tmp_path / 'w' / workdir_lib.JACKPOT_DIR))
    assert meta['format'] == '2021' and meta['requested_sparsity'] == 0.9
    prunable = convs[:-1]
    counts = _global_magnitude_counts([state[f'{n}.weight'] for n in prunable], 0.9)
    masked = OfficialVGG19()
    masked_state = dict(state_numpy(dense))
    masked_state.update({k: v.numpy() for k, v in state.items() if 'running' in k})
    for name, k in zip(prunable, counts):
        path = f"{name.replace('.', '_')}/kernel"
        assert torch_names('vgg19_cifar', 'official')[path] == name
        assert meta['counts'][path] == k
        s = state[f'{name}.mask'].flatten()
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[torch.topk(s.abs(), s.numel() - k).indices] = True
        keep = keep.reshape(state[f'{name}.mask'].shape)
        np.testing.assert_array_equal(np.asarray(masks[path]), keep.numpy().transpose(2, 3, 1, 0))
        masked_state[f'{name}.weight'] = (state[f'{name}.weight'] * keep).numpy()
    masked.load_state_dict(tensors(masked_state), strict=True)
    x = inputs((2, 3, 32, 32))
    ref, _ = torch_forward(masked.eval(), x)
    out, _ = flax_forward('vgg19_cifar', 10, sparsity.masked_params(params, masks), stats, x)
    assert_close(ref, out, '2021 jackpot logits')
    # 2021 export: scores only, into the 2021 module layout.
    out_file = tmp_path / 'out.pth'
    assert (
        cli(
            'to-torch',
            '--arch',
            'vgg19_cifar',
            '--weights',
            tmp_path / 'w',
            '--jackpot',
            tmp_path / 'w',
            '--format',
            'official',
            '--mask_format',
            '2021',
            '--output',
            out_file,
        )
        == 0
    )
    exported = torch.load(out_file, weights_only=True)['state_dict']
    OfficialVGG19(jackpot='2021').load_state_dict(exported, strict=True)
    assert_state_equal(exported, state)


def test_launcher_accepts_converted_workdir(tmp_path):
    """The launcher's workdir names, meta check, shape check and jackpot fingerprint."""
    from jackpot_jax.core import trees
    from jackpot_jax.io import workdir as workdir_lib

    assert (workdir_lib.PRETRAINED_DIR, workdir_lib.JACKPOT_DIR) == (
        workdir_lib.PRETRAINED_DIR,
        workdir_lib.JACKPOT_DIR,
    )
    dense = official_model('resnet32', seed=13)
    state = make_jackpot_state(state_numpy(dense), official_convs(dense), 'fc', '2023', seed=14)
    torch.save({'state_dict': dense.state_dict()}, tmp_path / 'pre.pth')
    torch.save({'state_dict': state}, tmp_path / 'jackpot.pth')
    assert (
        cli(
            'official',
            '--arch',
            'resnet32',
            '--input',
            tmp_path / 'pre.pth',
            '--jackpot',
            tmp_path / 'jackpot.pth',
            '--output',
            tmp_path,
        )
        == 0
    )
    params, stats, meta = checkpoint.load_weights(str(tmp_path / workdir_lib.PRETRAINED_DIR))
    assert meta['model']['name'] == 'resnet32'
    model = zoo.get_model(meta['model']['name'], meta['num_classes'])
    expected = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), np.zeros((1, 32, 32, 3))
    )
    trees.check_tree_matches(expected['params'], params, 'params')
    trees.check_tree_matches(expected['batch_stats'], stats, 'batch stats')
    _, masks, jackpot_stats, jackpot_meta = checkpoint.read_jackpot_bundle(
        str(tmp_path / workdir_lib.JACKPOT_DIR)
    )
    trees.check_tree_matches(expected['batch_stats'], jackpot_stats, 'jackpot batch stats')
    assert jackpot_meta['weights_fingerprint'] == checkpoint.weights_fingerprint(params)
    assert sorted(masks) == sorted(sparsity.prunable_paths(params))
    # A jackpot the search saved without scores exports its masks as the .mask scores.
    checkpoint.save_jackpot(str(tmp_path / 'no_scores'), None, masks, jackpot_stats, {})
    out = tmp_path / 'no_scores.pth'
    assert (
        cli(
            'to-torch',
            '--arch',
            'resnet32',
            '--weights',
            tmp_path,
            '--jackpot',
            tmp_path / 'no_scores',
            '--format',
            'official',
            '--output',
            out,
        )
        == 0
    )
    exported = torch.load(out, weights_only=True)['state_dict']
    OfficialResNet32(jackpot='2023').load_state_dict(exported, strict=True)
    for name in official_convs(dense):
        assert torch.equal(exported[f'{name}.mask'], exported[f'{name}.b_mask'])
        assert torch.equal(exported[f'{name}.b_mask'], state[f'{name}.b_mask'])


def test_command_line_imports_no_tensorflow():
    code = (
        'import sys, jackpot_jax.io.convert_cli, jackpot_jax.io.torch_io, jackpot_jax.io.checkpoint; '
        'jackpot_jax.io.convert_cli._parser(); assert "tensorflow" not in sys.modules, "tensorflow"'
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, '-c', code], check=True, cwd=root)
    result = subprocess.run(
        [sys.executable, '-m', 'jackpot_jax.io.convert_cli', 'to-torch', '--help'],
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert '--mask_format' in result.stdout


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------
def test_unknown_arch_and_missing_file(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown torchvision architecture 'resnet999'.*resnet18"):
        convert.get_arch('resnet999', 'torchvision')
    with pytest.raises(ValueError, match="unknown official architecture 'resnet18'"):
        convert.get_arch('resnet18', 'official')
    with pytest.raises(SystemExit):
        cli('torchvision', '--arch', 'resnet999', '--input', 'x.pth', '--output', tmp_path)
    assert (
        cli('to-torch', '--arch', 'resnet32', '--weights', tmp_path, '--output', tmp_path / 'o.pth')
        == 1
    )
    assert 'unknown torchvision architecture' in capsys.readouterr().err
    assert (
        cli(
            'official', '--arch', 'resnet32', '--input', tmp_path / 'nope.pth', '--output', tmp_path
        )
        == 1
    )
    assert 'no such file' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        torch_io.load_state_dict(str(tmp_path / 'nope.pth'))


def test_wrong_keys_are_all_listed(resnet18):
    state = state_numpy(resnet18)
    del state['layer1.0.conv1.weight'], state['bn1.running_var']
    state['extra.weight'] = np.zeros(3, np.float32)
    state['layer2.0.conv2.weight'] = np.zeros((128, 128, 1, 1), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.torch_to_flax(state, 'resnet18')
    message = str(err.value)
    assert '4 problem(s)' in message
    for part in (
        'missing layer1.0.conv1.weight [64, 64, 3, 3]',
        'missing bn1.running_var [64]',
        'unexpected extra.weight [3]',
        'layer2.0.conv2.weight: expected shape [128, 128, 3, 3], got [128, 128, 1, 1]',
    ):
        assert part in message


def test_bad_file_layout_is_refused(tmp_path, resnet18):
    torch.save({'model': resnet18.state_dict()}, tmp_path / 'odd.pth')
    with pytest.raises(ValueError, match='neither a state dict'):
        torch_io.load_state_dict(str(tmp_path / 'odd.pth'))


def test_bad_jackpots_are_refused(tmp_path):
    dense = official_model('resnet32', seed=21)
    dense_state = state_numpy(dense)
    state = make_jackpot_state(dense_state, official_convs(dense), 'fc', '2023', seed=22)
    del state['layer1.0.conv1.mask'], state['layer2.1.conv2.b_mask']
    state['layer3.0.conv1.b_mask'] = state['layer3.0.conv1.b_mask'] * 0.5
    state['fc.b_mask'] = torch.zeros_like(state['fc.b_mask'])
    state['conv1.mask'] = state['conv1.mask'][:1]
    with pytest.raises(convert.ConversionError) as err:
        official_releases.official_jackpot_to_flax({k: v.numpy() for k, v in state.items()}, 'resnet32')
    message = str(err.value)
    assert '5 problem(s)' in message
    for part in (
        'missing layer1.0.conv1.mask',
        'missing layer2.1.conv2.b_mask',
        'layer3.0.conv1.b_mask: holds values other than 0 and 1',
        'fc.b_mask: the classifier is never pruned',
        'conv1.mask: expected shape [32, 3, 3, 3]',
    ):
        assert part in message
    # A jackpot searched on other weights than the pre-trained file is refused.
    other = make_jackpot_state(dense_state, official_convs(dense), 'fc', '2023', seed=23)
    other['conv1.weight'] = other['conv1.weight'] + 1.0
    torch.save({'state_dict': dense.state_dict()}, tmp_path / 'pre.pth')
    torch.save({'state_dict': other}, tmp_path / 'jackpot.pth')
    with pytest.raises(convert.ConversionError, match='searched on other weights'):
        convert_cli.run_official(
            'resnet32',
            str(tmp_path / 'pre.pth'),
            str(tmp_path / 'w'),
            str(tmp_path / 'jackpot.pth'),
        )
    assert not os.path.exists(tmp_path / 'w')


def test_to_torch_refuses_weights_of_another_model(tmp_path):
    dense = official_model('resnet32', seed=31)
    torch.save({'state_dict': dense.state_dict()}, tmp_path / 'pre.pth')
    assert (
        cli('official', '--arch', 'resnet32', '--input', tmp_path / 'pre.pth', '--output', tmp_path)
        == 0
    )
    with pytest.raises(ValueError, match="for model 'resnet32', not 'vgg19_cifar'"):
        convert_cli.run_to_torch('vgg19_cifar', str(tmp_path), str(tmp_path / 'o.pth'), 'official')
