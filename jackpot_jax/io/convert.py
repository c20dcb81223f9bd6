"""Weight conversion between PyTorch state dicts and jackpot_jax's Flax params.

The core works on plain mappings of names -> numpy arrays and never imports torch;
reading and writing ``.pth``/``.safetensors`` files lives in :mod:`jackpot_jax.io.torch_io`.

Two families of PyTorch names are supported, each with one explicit name table
(:mod:`jackpot_jax.io.name_tables`):
  * ``torchvision``: ResNet-18/34/50/101/152, VGG-11/13/16/19 with batch norm, and the
    Vision Transformers ViT-B/16, ViT-B/32 and ViT-L/16 (any other torchvision
    ``VisionTransformer`` through :func:`jackpot_jax.io.name_tables.vit_arch`);
  * ``official``: the lottery-jackpot authors' releases (ResNet-32 CIFAR, VGG-19 CIFAR,
    ResNet-50 ImageNet), whose classifier is a 1x1 conv, and their jackpots
    (2021: ``<conv>.mask`` scores; 2023: plus ``<conv>.b_mask`` binary masks).

Every conversion is strict: all missing, unexpected and wrong-shaped keys are listed
in one error. Layouts: conv OIHW <-> HWIO, Linear ``[out, in]`` <-> Dense ``[in, out]``,
BN ``weight``/``bias`` <-> ``scale``/``bias`` and ``running_mean``/``running_var`` <->
statistics (``batch_stats``) ``mean``/``var`` (``num_batches_tracked`` is dropped, and written as 0),
LayerNorm ``weight``/``bias`` <-> ``scale``/``bias``, attention ``in_proj_weight``
``[3D, D]`` (q, k, v stacked) <-> three Dense kernels ``query``/``key``/``value``, and
bare tensors (a ViT's class token and position embedding) unchanged.

The command line over these functions is :mod:`jackpot_jax.io.convert_cli`
(``jackpot-jax-convert``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.core import sparsity
from jackpot_jax.core.trees import leaf_shapes, tree_mismatches
from jackpot_jax.io.name_tables import (
    ATTENTION,
    BN,
    CONV,
    CONV_BIAS,
    CONV_FC,
    LAYER_NORM,
    LINEAR,
    TENSOR,
    Arch,
    Layer,
    get_arch,
)
from jackpot_jax.models import zoo

TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')
MASK_FORMATS = ('2023', '2021', 'none')

_KERNEL_KINDS = (CONV, CONV_BIAS, LINEAR, CONV_FC)
_QKV = ('query', 'key', 'value')  # flax Dense layers of an ATTENTION row, in torch's order.
_MODULE_PREFIX = 'module.'


class ConversionError(ValueError):
    """A state dict or checkpoint does not fit the architecture; lists every problem."""


@dataclasses.dataclass
class Weights:
    """Converted dense weights."""

    params: dict
    statistics: dict
    num_classes: int


@dataclasses.dataclass
class Jackpot:
    """A converted official jackpot: frozen weights, searched statistics, scores and masks."""

    params: dict
    statistics: dict
    scores: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    counts: dict[str, int]
    format: str
    num_classes: int


# ----------------------------------------------------------------------------
# Shapes: what the flax model expects, and the torch shapes that follow.
# ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _abstract_variables(
    model_name: str, num_classes: int, image_size: int, model_kwargs: tuple = ()
) -> tuple[dict, dict]:
    model = zoo.get_model(model_name, num_classes, **dict(model_kwargs))
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return leaf_shapes(variables['params']), leaf_shapes(variables.get('batch_stats', {}))


def _flax_leaves(layer: Layer) -> tuple[list[str], list[str]]:
    """(params leaves, statistics leaves) of one table row."""
    if layer.kind == BN:
        return [f'{layer.flax}/scale', f'{layer.flax}/bias'], [
            f'{layer.flax}/mean',
            f'{layer.flax}/var',
        ]
    if layer.kind == CONV:
        return [f'{layer.flax}/kernel'], []
    if layer.kind == LAYER_NORM:
        return [f'{layer.flax}/scale', f'{layer.flax}/bias'], []
    if layer.kind == ATTENTION:
        return [f'{layer.flax}/{q}/{leaf}' for q in _QKV for leaf in ('kernel', 'bias')], []
    if layer.kind == TENSOR:
        return [layer.flax], []
    return [f'{layer.flax}/kernel', f'{layer.flax}/bias'], []


def _check_table(arch: Arch, params: Mapping[str, tuple], stats: Mapping[str, tuple]) -> None:
    """The table must cover the flax model exactly (a bug here is ours, not the user's)."""
    want_params, want_stats = set(), set()
    for layer in arch.table:
        p, s = _flax_leaves(layer)
        want_params.update(p)
        want_stats.update(s)
    if want_params != set(params) or want_stats != set(stats):
        diff = sorted((want_params ^ set(params)) | (want_stats ^ set(stats)))
        raise RuntimeError(f'name table of {arch.name} does not match models.{arch.model}: {diff}')


def _torch_from_flax_shape(kind: str, flax_shape: tuple) -> tuple:
    if kind in (CONV, CONV_BIAS):
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if kind == LINEAR:
        return flax_shape[::-1]
    if kind == CONV_FC:
        return (*flax_shape[::-1], 1, 1)
    return flax_shape


def expected_torch_shapes(arch: Arch, num_classes: int) -> dict[str, tuple]:
    """Every torch state-dict key of ``arch`` (num_batches_tracked excluded) and its shape."""
    params, stats = _abstract_variables(arch.model, num_classes, arch.image_size, arch.model_kwargs)
    _check_table(arch, params, stats)
    shapes = {}
    for layer in arch.table:
        if layer.kind in (BN, LAYER_NORM):
            channels = params[f'{layer.flax}/scale']
            keys = ('weight', 'bias', 'running_mean', 'running_var')
            for key in keys if layer.kind == BN else keys[:2]:
                shapes[f'{layer.torch}.{key}'] = channels
            continue
        if layer.kind == ATTENTION:
            d_in, d_out = params[f'{layer.flax}/query/kernel']
            shapes[f'{layer.torch}.in_proj_weight'] = (3 * d_out, d_in)
            shapes[f'{layer.torch}.in_proj_bias'] = (3 * d_out,)
            continue
        if layer.kind == TENSOR:
            shapes[layer.torch] = params[layer.flax]
            continue
        kernel = params[f'{layer.flax}/kernel']
        shapes[f'{layer.torch}.weight'] = _torch_from_flax_shape(layer.kind, kernel)
        if layer.kind != CONV:
            shapes[f'{layer.torch}.bias'] = params[f'{layer.flax}/bias']
    return shapes


# ----------------------------------------------------------------------------
# Layout helpers.
# ----------------------------------------------------------------------------
def kernel_to_flax(kind: str, weight: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight, np.float32)
    if kind in (CONV, CONV_BIAS):
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
    if kind == CONV_FC:
        weight = weight.reshape(weight.shape[:2])
    return np.ascontiguousarray(weight.T)


def _kernel_to_torch(kind: str, kernel: np.ndarray) -> np.ndarray:
    kernel = np.asarray(kernel, np.float32)
    if kind in (CONV, CONV_BIAS):
        return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    if kind == CONV_FC:
        return np.ascontiguousarray(kernel.T[:, :, None, None])
    return np.ascontiguousarray(kernel.T)


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a DataParallel ``module.`` prefix when every key carries it."""
    keys = list(state_dict)
    if keys and all(k.startswith(_MODULE_PREFIX) for k in keys):
        return {k[len(_MODULE_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def infer_num_classes(state_dict: Mapping[str, Any], arch: Arch) -> int:
    """Classes from the classifier weight's first dim, or the arch default when absent."""
    weight = state_dict.get(f'{arch.classifier}.weight')
    if weight is None or np.ndim(weight) < 1:
        return arch.default_classes
    return int(np.shape(weight)[0])


def raise_problems(problems: Sequence[str], what: str) -> None:
    if problems:
        raise ConversionError(
            f'{len(problems)} problem(s) with {what}:\n  ' + '\n  '.join(problems)
        )


def key_problems(
    state_dict: Mapping[str, Any], expected: Mapping[str, tuple], optional: set[str], arch: Arch
) -> list[str]:
    problems = [f'missing {k} {list(s)}' for k, s in expected.items() if k not in state_dict]
    problems += [
        f'unexpected {k} {list(np.shape(v))}'
        for k, v in state_dict.items()
        if k not in expected and k not in optional
    ]
    classifier_weight = f'{arch.classifier}.weight'
    for key, shape in expected.items():
        if key not in state_dict:
            continue
        got = tuple(np.shape(state_dict[key]))
        ok = got == shape
        if key == classifier_weight and arch.family == 'official':
            ok = ok or got == shape[:2]  # a Linear-style [C, D] classifier is accepted too.
        if not ok:
            problems.append(f'{key}: expected shape {list(shape)}, got {list(got)}')
    for key in optional:
        if key in state_dict and np.size(state_dict[key]) != 1:
            problems.append(
                f'{key}: expected a scalar, got shape {list(np.shape(state_dict[key]))}'
            )
    return problems


def non_finite_problems(state_dict: Mapping[str, Any]) -> list[str]:
    """One line per floating tensor holding NaN or inf (a diverged training run's)."""
    problems = []
    for key, value in state_dict.items():
        values = np.asarray(value)
        if not np.issubdtype(values.dtype, np.floating):
            continue
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            problems.append(
                f'{key}: {bad} of {values.size} values are NaN or infinite; weights must be '
                'finite: convert a checkpoint saved before the training diverged'
            )
    return problems


def bn_counters(arch: Arch) -> set[str]:
    return {f'{l.torch}.num_batches_tracked' for l in arch.table if l.kind == BN}


# ----------------------------------------------------------------------------
# PyTorch -> Flax.
# ----------------------------------------------------------------------------
def convert_checked(state_dict: Mapping[str, np.ndarray], arch: Arch) -> tuple[dict, dict]:
    params, stats = {}, {}
    for layer in arch.table:
        t, f = layer.torch, layer.flax
        if layer.kind == BN:
            params[f'{f}/scale'] = np.asarray(state_dict[f'{t}.weight'], np.float32)
            params[f'{f}/bias'] = np.asarray(state_dict[f'{t}.bias'], np.float32)
            stats[f'{f}/mean'] = np.asarray(state_dict[f'{t}.running_mean'], np.float32)
            stats[f'{f}/var'] = np.asarray(state_dict[f'{t}.running_var'], np.float32)
            continue
        if layer.kind == LAYER_NORM:
            params[f'{f}/scale'] = np.asarray(state_dict[f'{t}.weight'], np.float32)
            params[f'{f}/bias'] = np.asarray(state_dict[f'{t}.bias'], np.float32)
            continue
        if layer.kind == ATTENTION:
            weights = np.split(np.asarray(state_dict[f'{t}.in_proj_weight'], np.float32), 3)
            biases = np.split(np.asarray(state_dict[f'{t}.in_proj_bias'], np.float32), 3)
            for q, weight, bias in zip(_QKV, weights, biases):
                params[f'{f}/{q}/kernel'] = kernel_to_flax(LINEAR, weight)
                params[f'{f}/{q}/bias'] = bias
            continue
        if layer.kind == TENSOR:
            params[f] = np.asarray(state_dict[t], np.float32)
            continue
        params[f'{f}/kernel'] = kernel_to_flax(layer.kind, state_dict[f'{t}.weight'])
        if layer.kind != CONV:
            params[f'{f}/bias'] = np.asarray(state_dict[f'{t}.bias'], np.float32)
    return sparsity.unflatten(params), sparsity.unflatten(stats)


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    arch: str | Arch,
    family: str = 'torchvision',
    *,
    what: str = 'the state dict',
) -> Weights:
    """A torch state dict (names -> arrays) -> flax params and statistics, strictly checked."""
    arch = arch if isinstance(arch, Arch) else get_arch(arch, family)
    state_dict = strip_module_prefix(state_dict)
    num_classes = infer_num_classes(state_dict, arch)
    expected = expected_torch_shapes(arch, num_classes)
    problems = key_problems(state_dict, expected, bn_counters(arch), arch)
    problems += non_finite_problems(state_dict)
    raise_problems(problems, f'{what} for {arch.family} {arch.name}')
    params, stats = convert_checked(state_dict, arch)
    return Weights(params, stats, num_classes)


# ----------------------------------------------------------------------------
# Flax -> PyTorch.
# ----------------------------------------------------------------------------
def flax_to_torch(
    params: Mapping,
    statistics: Mapping,
    arch: str | Arch,
    family: str = 'torchvision',
    *,
    masks: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    masked: bool = False,
    mask_format: str = 'none',
) -> dict[str, np.ndarray]:
    """Flax params + statistics (+ a jackpot) -> a torch-named state dict of numpy arrays.

    ``masked`` writes ``W * B`` for every masked kernel. ``mask_format`` '2023' adds
    ``<conv>.mask`` (scores) and ``<conv>.b_mask`` (0/1 float) for every official conv,
    the classifier included (ones where a layer has no mask), '2021' only ``.mask``;
    both need the official family. BN counters are written as 0.
    """
    spec = arch if isinstance(arch, Arch) else get_arch(arch, family)
    if mask_format not in MASK_FORMATS:
        raise ValueError(f'unknown mask format {mask_format!r}; choose one of {MASK_FORMATS}')
    if mask_format != 'none' and spec.family != 'official':
        raise ValueError(f'mask format {mask_format!r} exists only for the official family')
    if (masked or mask_format != 'none') and masks is None:
        raise ValueError('masked output and mask formats need masks (a jackpot)')
    if mask_format != 'none' and scores is None:
        raise ValueError(f'mask format {mask_format!r} needs the scores of a jackpot')
    flat = sparsity.flatten(params)
    stats = sparsity.flatten(statistics)
    kernel = flat.get(f'{spec.table[-1].flax}/kernel')
    num_classes = int(np.shape(kernel)[-1]) if kernel is not None else spec.default_classes
    want_params, want_stats = _abstract_variables(
        spec.model, num_classes, spec.image_size, spec.model_kwargs
    )
    _check_table(spec, want_params, want_stats)
    problems = tree_mismatches(want_params, leaf_shapes(params), 'param ')
    problems += tree_mismatches(want_stats, leaf_shapes(statistics), 'batch stat ')
    kernels = {f'{l.flax}/kernel' for l in spec.table if l.kind in _KERNEL_KINDS}
    kernels |= {f'{l.flax}/{q}/kernel' for l in spec.table if l.kind == ATTENTION for q in _QKV}
    for name, tree in (('mask', masks), ('score', scores)):
        for path in sorted(tree or {}):
            if path not in kernels:
                problems.append(f'{name} for {path}, which is no kernel of {spec.name}')
            elif tuple(np.shape(tree[path])) != want_params[path]:
                problems.append(
                    f'{name} {path}: expected shape {list(want_params[path])}, '
                    f'got {list(np.shape(tree[path]))}'
                )
    raise_problems(problems, f'the flax variables for {spec.family} {spec.name}')

    masks = {p: np.asarray(m).astype(bool) for p, m in (masks or {}).items()}
    scores = {p: np.asarray(s, np.float32) for p, s in (scores or {}).items()}
    out: dict[str, np.ndarray] = {}
    for layer in spec.table:
        t, f = layer.torch, layer.flax
        if layer.kind == BN:
            out[f'{t}.weight'] = np.asarray(flat[f'{f}/scale'], np.float32)
            out[f'{t}.bias'] = np.asarray(flat[f'{f}/bias'], np.float32)
            out[f'{t}.running_mean'] = np.asarray(stats[f'{f}/mean'], np.float32)
            out[f'{t}.running_var'] = np.asarray(stats[f'{f}/var'], np.float32)
            out[f'{t}.num_batches_tracked'] = np.array(0, np.int64)
            continue
        if layer.kind == LAYER_NORM:
            out[f'{t}.weight'] = np.asarray(flat[f'{f}/scale'], np.float32)
            out[f'{t}.bias'] = np.asarray(flat[f'{f}/bias'], np.float32)
            continue
        if layer.kind == ATTENTION:
            weights, biases = [], []
            for q in _QKV:
                w = np.asarray(flat[f'{f}/{q}/kernel'], np.float32)
                if masked and f'{f}/{q}/kernel' in masks:
                    w = w * masks[f'{f}/{q}/kernel']
                weights.append(_kernel_to_torch(LINEAR, w))
                biases.append(np.asarray(flat[f'{f}/{q}/bias'], np.float32))
            out[f'{t}.in_proj_weight'] = np.concatenate(weights)
            out[f'{t}.in_proj_bias'] = np.concatenate(biases)
            continue
        if layer.kind == TENSOR:
            out[t] = np.asarray(flat[f], np.float32)
            continue
        path = f'{f}/kernel'
        w = np.asarray(flat[path], np.float32)
        if masked and path in masks:
            w = w * masks[path]
        out[f'{t}.weight'] = _kernel_to_torch(layer.kind, w)
        if layer.kind != CONV:
            out[f'{t}.bias'] = np.asarray(flat[f'{f}/bias'], np.float32)
        if mask_format != 'none' and layer.kind in (CONV, CONV_FC):
            ones = np.ones(w.shape, np.float32)
            out[f'{t}.mask'] = _kernel_to_torch(layer.kind, scores.get(path, ones))
            if mask_format == '2023':
                mask = masks[path].astype(np.float32) if path in masks else ones
                out[f'{t}.b_mask'] = _kernel_to_torch(layer.kind, mask)
    return out
