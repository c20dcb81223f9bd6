"""ViT conversion against torchvision's VisionTransformer: names, the q/k/v split, logits.

Run in their own process (torch must never share one with tensorflow):
``python -m pytest -q tests/torch``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from jackpot_jax.core import sparsity
from jackpot_jax.io import convert, name_tables
from jackpot_jax.models import zoo

jax.config.update('jax_default_matmul_precision', 'highest')

TOL = 1e-4  # max |torch - flax| <= TOL * max(1, max |torch|).
SMALL = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


def assert_close(ref, out, what: str) -> None:
    ref, out = np.asarray(ref), np.asarray(out)
    assert ref.shape == out.shape, f'{what}: shapes {ref.shape} vs {out.shape}'
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ref - out)))
    assert err <= TOL * scale, f'{what}: max |diff| {err:.3g} at scale {scale:.3g}'


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn: torchvision zero-initialises the head, biases and class
    token, which would let a wrong mapping of those pass unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith(('ln_1.weight', 'ln_2.weight', 'ln.weight')) else 0.0
            spread = 0.2 if p.ndim < 2 or 'token' in name or 'pos_embedding' in name else None
            if spread is None:
                spread = float(np.sqrt(1.0 / np.prod(p.shape[1:])))
            p.copy_(scale + spread * torch.randn(p.shape, generator=g))
    return model.eval()


def small_torch_vit(seed: int = 0, num_classes: int = 10) -> VisionTransformer:
    torch.manual_seed(seed)
    return randomised(VisionTransformer(num_classes=num_classes, **SMALL), seed)


def small_arch(num_classes: int = 10) -> name_tables.Arch:
    return name_tables.vit_arch(**SMALL, num_classes=num_classes, name='vit_small')


def state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def torch_forward(model: torch.nn.Module, x: np.ndarray, blocks: int) -> tuple[np.ndarray, dict]:
    acts = {}
    layers = model.encoder.layers
    hooks = [
        getattr(layers, f'encoder_layer_{i}').register_forward_hook(
            lambda m, i, o, n=i: acts.__setitem__(n, o.detach().numpy().copy())
        )
        for i in range(blocks)
    ]
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    for h in hooks:
        h.remove()
    return logits, acts


def flax_forward(arch: name_tables.Arch, num_classes: int, params, x: np.ndarray):
    model = zoo.get_model(arch.model, num_classes, **dict(arch.model_kwargs))
    logits, state = model.apply(
        {'params': params},
        x.transpose(0, 2, 3, 1),
        train=False,
        capture_intermediates=lambda mdl, _: (mdl.name or '').startswith('encoder_layer_'),
        mutable=['intermediates'],
    )
    layers = state['intermediates']['encoder']['layers']
    return np.asarray(logits), {
        int(name.rsplit('_', 1)[1]): np.asarray(v['__call__'][0]) for name, v in layers.items()
    }


# ----------------------------------------------------------------------------
# Name tables.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['vit_b_16', 'vit_b_32', 'vit_l_16'])
def test_vit_tables_match_torchvision_keys(arch):
    with torch.device('meta'):
        model = torchvision.models.get_model(arch, weights=None)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert convert.expected_torch_shapes(convert.get_arch(arch, 'torchvision'), 1000) == want


def test_vit_arch_table_matches_a_custom_torchvision_vit():
    with torch.device('meta'):
        model = VisionTransformer(num_classes=7, **SMALL)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert convert.expected_torch_shapes(small_arch(7), 7) == want


# ----------------------------------------------------------------------------
# The q/k/v split of in_proj, and the way back.
# ----------------------------------------------------------------------------
def test_in_proj_splits_into_query_key_value_kernels():
    model = small_torch_vit(seed=1)
    state = state_numpy(model)
    params = sparsity.flatten(convert.torch_to_flax(state, small_arch()).params)
    d = SMALL['hidden_dim']
    for i in range(SMALL['num_layers']):
        t = f'encoder.layers.encoder_layer_{i}.self_attention'
        f = f'encoder/layers/encoder_layer_{i}/self_attention'
        for j, name in enumerate(('query', 'key', 'value')):
            np.testing.assert_array_equal(
                params[f'{f}/{name}/kernel'], state[f'{t}.in_proj_weight'][j * d : (j + 1) * d].T
            )
            np.testing.assert_array_equal(
                params[f'{f}/{name}/bias'], state[f'{t}.in_proj_bias'][j * d : (j + 1) * d]
            )
        np.testing.assert_array_equal(
            params[f'{f}/out_proj/kernel'], state[f'{t}.out_proj.weight'].T
        )
    # The query kernel computes torch's q projection (the first third of in_proj).
    attention = model.encoder.layers.encoder_layer_0.self_attention
    x = np.random.RandomState(2).randn(5, d).astype(np.float32)
    with torch.no_grad():
        q_ref = torch.nn.functional.linear(
            torch.from_numpy(x), attention.in_proj_weight[:d], attention.in_proj_bias[:d]
        ).numpy()
    f = 'encoder/layers/encoder_layer_0/self_attention/query'
    np.testing.assert_allclose(
        x @ params[f'{f}/kernel'] + params[f'{f}/bias'], q_ref, rtol=1e-5, atol=1e-5
    )


def test_round_trip_is_exact_and_masked_export_runs_in_torch():
    model = small_torch_vit(seed=3)
    state = state_numpy(model)
    arch = small_arch()
    converted = convert.torch_to_flax(state, arch)
    back = convert.flax_to_torch(converted.params, converted.statistics, arch)
    assert sorted(back) == sorted(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)

    # A masked export (W * B over q, k, v, out_proj and MLP kernels) loads into torch and
    # gives the logits of the masked flax model.
    paths = sparsity.prunable_paths(converted.params)
    flat = sparsity.flatten(converted.params)
    rng = np.random.RandomState(4)
    masks = {p: rng.rand(*flat[p].shape) > 0.5 for p in paths}
    masked_state = convert.flax_to_torch(
        converted.params, {}, arch, masks=masks, masked=True
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in masked_state.items()})
    x = images(2, SMALL['image_size'], seed=5)
    ref, _ = torch_forward(model, x, 0)
    masked = sparsity.masked_params(converted.params, masks)
    out, _ = flax_forward(arch, 10, masked, x)
    assert_close(ref, out, 'masked logits')


def test_missing_and_misshaped_keys_are_all_listed():
    state = state_numpy(small_torch_vit())
    del state['encoder.layers.encoder_layer_1.self_attention.in_proj_bias']
    state['class_token'] = np.zeros((1, 1, 31), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.torch_to_flax(state, small_arch())
    message = str(err.value)
    assert 'missing encoder.layers.encoder_layer_1.self_attention.in_proj_bias [96]' in message
    assert 'class_token: expected shape [1, 1, 32], got [1, 1, 31]' in message


# ----------------------------------------------------------------------------
# Logit parity.
# ----------------------------------------------------------------------------
def test_small_vit_logits_and_blocks_match_torchvision():
    model = small_torch_vit(seed=6)
    converted = convert.torch_to_flax(state_numpy(model), small_arch())
    x = images(3, SMALL['image_size'], seed=7)
    ref, ref_blocks = torch_forward(model, x, SMALL['num_layers'])
    out, blocks = flax_forward(small_arch(), converted.num_classes, converted.params, x)
    for i in range(SMALL['num_layers']):
        assert_close(ref_blocks[i], blocks[i], f'encoder_layer_{i}')
    assert_close(ref, out, 'logits')
    assert converted.statistics == {}


def test_vit_b_16_logits_match_torchvision():
    """The full-size ViT-B/16 (86.6M parameters) on one 224x224 image."""
    torch.manual_seed(8)
    model = randomised(torchvision.models.vit_b_16(weights=None), seed=8)
    arch = convert.get_arch('vit_b_16', 'torchvision')
    converted = convert.torch_to_flax(state_numpy(model), arch)
    x = images(1, 224, seed=9)
    ref, _ = torch_forward(model, x, 0)
    out, _ = flax_forward(arch, 1000, converted.params, x)
    assert_close(ref, out, 'logits')
