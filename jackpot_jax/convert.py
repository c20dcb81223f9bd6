"""Weight conversion between PyTorch state dicts and jackpot_jax, and its command line.

The core works on plain mappings of names -> numpy arrays and never imports torch;
reading and writing ``.pth``/``.safetensors`` files lives in :mod:`jackpot_jax.torch_io`.

Two families of PyTorch names are supported, each with one explicit name table
(:mod:`jackpot_jax.name_tables`):
  * ``torchvision``: ResNet-18/34/50/101/152, VGG-11/13/16/19 with batch norm, and the
    Vision Transformers ViT-B/16, ViT-B/32 and ViT-L/16 (any other torchvision
    ``VisionTransformer`` through :func:`jackpot_jax.name_tables.vit_arch`);
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

Command line (weights land in ``OUT/pretrained``, jackpots in ``OUT/jackpot``, the
launcher's workdir layout)::

    python -m jackpot_jax.convert torchvision --arch resnet50 --input FILE|cache --output OUT
    python -m jackpot_jax.convert official --arch resnet32 --input FILE \\
        [--jackpot FILE --sparsity 0.9] --output OUT
    python -m jackpot_jax.convert to-torch --arch resnet32 --weights OUT/pretrained \\
        [--jackpot OUT/jackpot] --format torchvision|official [--masked] --output FILE \\
        [--overwrite]

An OUT that already holds weights, a jackpot or checkpoints, and a to-torch FILE that
exists, are refused unless ``--overwrite`` is given. Errors in the input end in one
line; ``--traceback`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax import errors, models, sparsity
from jackpot_jax.name_tables import (
    ARCHS,
    ATTENTION,
    BN,
    CONV,
    CONV_BIAS,
    CONV_FC,
    FAMILIES,
    LAYER_NORM,
    LINEAR,
    TENSOR,
    Arch,
    Layer,
    get_arch,
)
from jackpot_jax.trees import leaf_shapes, tree_mismatches
from jackpot_jax.workdir import CHECKPOINTS_DIR, JACKPOT_DIR, PRETRAINED_DIR, TUNED_DIR

TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')
# What a workdir holds that belongs to its weights: convert refuses to write over it
# unless told to (--overwrite).
WORKDIR_CONTENTS = (PRETRAINED_DIR, JACKPOT_DIR, CHECKPOINTS_DIR, TUNED_DIR)
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
    model = models.get_model(model_name, num_classes, **dict(model_kwargs))
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
def _kernel_to_flax(kind: str, weight: np.ndarray) -> np.ndarray:
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


def _raise_problems(problems: Sequence[str], what: str) -> None:
    if problems:
        raise ConversionError(
            f'{len(problems)} problem(s) with {what}:\n  ' + '\n  '.join(problems)
        )


def _key_problems(
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


def _non_finite_problems(state_dict: Mapping[str, Any]) -> list[str]:
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


def _bn_counters(arch: Arch) -> set[str]:
    return {f'{l.torch}.num_batches_tracked' for l in arch.table if l.kind == BN}


def edge_popup_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Numpy twin of :func:`sparsity.edge_popup_mask`: keep the top n - k of |s|.

    Ties at the threshold keep the lower flat index. O(n) with a partition, so a
    ResNet-50 converts in a second instead of the jit kernel's O(32 n) passes.
    """
    keys = np.abs(np.asarray(scores, np.float32)).ravel()
    keep = keys.size - k
    if k == 0:
        return np.ones(np.shape(scores), bool)
    if keep == 0:
        return np.zeros(np.shape(scores), bool)
    thr = np.partition(keys, k)[k]  # the keep-th largest.
    kept = keys > thr
    equal = keys == thr
    kept |= equal & (np.cumsum(equal) <= keep - np.count_nonzero(kept))
    return kept.reshape(np.shape(scores))


# ----------------------------------------------------------------------------
# PyTorch -> Flax.
# ----------------------------------------------------------------------------
def _convert_checked(state_dict: Mapping[str, np.ndarray], arch: Arch) -> tuple[dict, dict]:
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
                params[f'{f}/{q}/kernel'] = _kernel_to_flax(LINEAR, weight)
                params[f'{f}/{q}/bias'] = bias
            continue
        if layer.kind == TENSOR:
            params[f] = np.asarray(state_dict[t], np.float32)
            continue
        params[f'{f}/kernel'] = _kernel_to_flax(layer.kind, state_dict[f'{t}.weight'])
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
    problems = _key_problems(state_dict, expected, _bn_counters(arch), arch)
    problems += _non_finite_problems(state_dict)
    _raise_problems(problems, f'{what} for {arch.family} {arch.name}')
    params, stats = _convert_checked(state_dict, arch)
    return Weights(params, stats, num_classes)


def _split_mask_keys(
    state_dict: Mapping[str, np.ndarray], arch: Arch
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(weights, ``.mask`` by torch layer, ``.b_mask`` by torch layer) of official convs."""
    convs = {l.torch for l in arch.table if l.kind in (CONV, CONV_FC)}
    weights, scores, bmasks = {}, {}, {}
    for key, value in state_dict.items():
        layer, _, leaf = key.rpartition('.')
        if layer in convs and leaf == 'mask':
            scores[layer] = value
        elif layer in convs and leaf == 'b_mask':
            bmasks[layer] = value
        else:
            weights[key] = value
    return weights, scores, bmasks


def official_weights_to_flax(
    state_dict: Mapping[str, np.ndarray], arch: str, *, what: str = 'the checkpoint'
) -> Weights:
    """Official pre-trained (or jackpot) state dict -> dense weights (``.mask``/``.b_mask`` ignored)."""
    spec = get_arch(arch, 'official')
    weights, _, _ = _split_mask_keys(strip_module_prefix(state_dict), spec)
    return torch_to_flax(weights, spec, what=what)


def official_jackpot_to_flax(
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    *,
    sparsity_level: float | None = None,
    allocation: str = 'global_magnitude',
    frozen_params: Mapping | None = None,
    what: str = 'the jackpot',
) -> Jackpot:
    """An official jackpot state dict -> scores, masks, batch statistics and counts.

    2023 format (``.b_mask`` present): masks are the stored binary masks. 2021 format
    (scores only): ``sparsity_level`` is required; counts come from ``allocation`` over
    the convs of ``frozen_params`` (default: the jackpot's own weights) and each mask
    keeps the top n - k of |scores| (the edge-popup rule). The classifier is never
    pruned: its ``.mask``/``.b_mask``, if present, must be all ones (b_mask) and are dropped.
    """
    spec = get_arch(arch, 'official')
    state_dict = strip_module_prefix(state_dict)
    weights_sd, scores_sd, bmasks_sd = _split_mask_keys(state_dict, spec)
    num_classes = infer_num_classes(weights_sd, spec)
    expected = expected_torch_shapes(spec, num_classes)
    problems = _key_problems(weights_sd, expected, _bn_counters(spec), spec)
    scores_named = {f'{layer}.mask': value for layer, value in scores_sd.items()}
    problems += _non_finite_problems({**weights_sd, **scores_named})

    prunable = [l for l in spec.table if l.kind == CONV]
    fmt = '2023' if any(l.torch in bmasks_sd for l in prunable) else '2021'
    for layer in prunable:
        shape = expected[f'{layer.torch}.weight']
        for name, found in (('mask', scores_sd), ('b_mask', bmasks_sd if fmt == '2023' else None)):
            if found is None:
                continue
            if layer.torch not in found:
                problems.append(f'missing {layer.torch}.{name} {list(shape)}')
            elif tuple(np.shape(found[layer.torch])) != shape:
                problems.append(
                    f'{layer.torch}.{name}: expected shape {list(shape)}, '
                    f'got {list(np.shape(found[layer.torch]))}'
                )
    for layer, value in bmasks_sd.items():
        values = np.asarray(value)
        if not np.all((values == 0) | (values == 1)):
            problems.append(f'{layer}.b_mask: holds values other than 0 and 1')
        elif layer == spec.classifier and not np.all(values == 1):
            problems.append(
                f'{layer}.b_mask: the classifier is never pruned, but its mask has zeros'
            )
    if fmt == '2021' and sparsity_level is None:
        problems.append(
            'no .b_mask keys (2021 format): the masks must be derived from the scores, '
            'so pass the sparsity the jackpot was searched at (--sparsity)'
        )
    _raise_problems(problems, f'{what} for official {spec.name}')

    params, stats = _convert_checked(weights_sd, spec)
    flat = sparsity.flatten(frozen_params if frozen_params is not None else params)
    scores, masks = {}, {}
    for layer in prunable:
        path = f'{layer.flax}/kernel'
        scores[path] = _kernel_to_flax(CONV, scores_sd[layer.torch])
        if fmt == '2023':
            masks[path] = _kernel_to_flax(CONV, bmasks_sd[layer.torch]) == 1
    if fmt == '2023':
        counts = {p: int(m.size - np.count_nonzero(m)) for p, m in masks.items()}
    else:
        kernels = {p: np.asarray(flat[p]) for p in scores}
        counts = sparsity.pruned_counts(kernels, sparsity_level, allocation)
        masks = {p: edge_popup_mask(s, counts[p]) for p, s in scores.items()}
    return Jackpot(params, stats, scores, masks, counts, fmt, num_classes)


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
    _raise_problems(problems, f'the flax variables for {spec.family} {spec.name}')

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


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
def weights_meta(arch: Arch, num_classes: int, source: str) -> dict[str, Any]:
    """The meta the launcher checks: model name, classes, and where the weights came from."""
    return {'model': {'name': arch.model}, 'num_classes': num_classes, 'source': source}


def _checkpoint():
    from jackpot_jax import checkpoint  # orbax only when a checkpoint is touched.

    return checkpoint


def _torch_io():
    from jackpot_jax import torch_io

    return torch_io


def _weight_mismatches(a: Mapping, b: Mapping) -> list[str]:
    fa, fb = sparsity.flatten(a), sparsity.flatten(b)
    return [
        f'{p}: max |difference| {float(np.max(np.abs(np.asarray(fa[p]) - np.asarray(fb[p])))):.3g}'
        for p in sorted(fa)
        if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))
    ]


def check_output_free(output: str, overwrite: bool) -> None:
    """Raises UserError if ``output`` holds weights, a jackpot or checkpoints, unless ``overwrite``.

    With ``overwrite`` the converted weights (and jackpot) replace those there; other
    folders stay, and the launcher refuses to mix them with the new weights (fingerprints).
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise errors.UserError(f'--output {output} is a file; pass a folder (a workdir)')
    present = [n for n in WORKDIR_CONTENTS if os.path.exists(os.path.join(output, n))]
    if present and not overwrite:
        raise errors.UserError(
            f'--output {output} already holds {", ".join(present)}; converting into it would '
            'replace its weights and orphan the rest: pass another --output, or --overwrite '
            'to replace them'
        )
    if present:
        print(f'note: replacing the converted parts of {output}; it also holds {present}')


def run_torchvision(arch_name: str, input_spec: str, output: str, overwrite: bool = False) -> str:
    """torchvision file / cache -> ``output/pretrained``; returns the weights path.

    Refuses an ``output`` that holds weights, a jackpot or checkpoints unless ``overwrite``.
    """
    arch = get_arch(arch_name, 'torchvision')
    check_output_free(output, overwrite)
    path = _torch_io().resolve_input(input_spec, arch_name)
    converted = torch_to_flax(_torch_io().load_state_dict(path), arch, what=path)
    target = os.path.join(output, PRETRAINED_DIR)
    source = f'torchvision {arch_name} state dict {os.path.abspath(path)}'
    _checkpoint().save_weights(
        target,
        converted.params,
        converted.statistics,
        weights_meta(arch, converted.num_classes, source),
    )
    return target


def run_official(
    arch_name: str,
    input_path: str,
    output: str,
    jackpot_path: str | None = None,
    sparsity_level: float | None = None,
    allocation: str = 'global_magnitude',
    overwrite: bool = False,
) -> dict[str, str]:
    """Official pre-trained (+ jackpot) files -> ``output/pretrained`` (+ ``output/jackpot``).

    Refuses an ``output`` that holds weights, a jackpot or checkpoints unless ``overwrite``.
    """
    arch = get_arch(arch_name, 'official')
    check_output_free(output, overwrite)
    io = _torch_io()
    path = io.resolve_input(input_path, None)
    dense = official_weights_to_flax(io.load_state_dict(path), arch_name, what=path)
    written = {}
    jackpot = None
    if jackpot_path is not None:
        jpath = io.resolve_input(jackpot_path, None)
        jackpot = official_jackpot_to_flax(
            io.load_state_dict(jpath),
            arch_name,
            sparsity_level=sparsity_level,
            allocation=allocation,
            frozen_params=dense.params,
            what=jpath,
        )
        mismatches = _weight_mismatches(dense.params, jackpot.params)
        if mismatches:
            raise ConversionError(
                f'the jackpot {jpath} was searched on other weights than {path} '
                f'({len(mismatches)} differing params; the 2023 CIFAR script searched a fresh '
                'random model). To keep the jackpot with its own weights, pass the jackpot '
                'file as --input too.\n  ' + '\n  '.join(mismatches)
            )
    source = f'official {arch_name} checkpoint {os.path.abspath(path)}'
    written['weights'] = os.path.join(output, PRETRAINED_DIR)
    ckpt = _checkpoint()
    ckpt.save_weights(
        written['weights'],
        dense.params,
        dense.statistics,
        weights_meta(arch, dense.num_classes, source),
    )
    if jackpot is not None:
        removed = sum(jackpot.counts.values())
        total = sum(int(np.size(m)) for m in jackpot.masks.values())
        meta = {
            **weights_meta(
                arch,
                jackpot.num_classes,
                f'official {jackpot.format} jackpot {os.path.abspath(jpath)}',
            ),
            'format': jackpot.format,
            'counts': jackpot.counts,
            'sparsity': removed / total,
            'weights_fingerprint': ckpt.weights_fingerprint(dense.params),
        }
        if jackpot.format == '2021':
            meta.update({'requested_sparsity': sparsity_level, 'allocation': allocation})
        written['jackpot'] = os.path.join(output, JACKPOT_DIR)
        ckpt.save_jackpot(
            written['jackpot'], jackpot.scores, jackpot.masks, jackpot.statistics, meta
        )
    return written


def _checkpoint_dir(path: str, child: str) -> str:
    """``path`` itself, or ``path/child`` when given a workdir."""
    nested = os.path.join(path, child)
    return nested if os.path.isdir(nested) else path


def run_to_torch(
    arch_name: str,
    weights: str,
    output: str,
    family: str = 'torchvision',
    jackpot: str | None = None,
    masked: bool = False,
    mask_format: str | None = None,
    overwrite: bool = False,
) -> str:
    """jackpot_jax weights (+ jackpot) -> a torch state dict file (.pth/.pt/.safetensors).

    Refuses an ``output`` that exists unless ``overwrite``; the file is replaced only once
    its successor is complete.
    """
    arch = get_arch(arch_name, family)
    if not output.endswith(TORCH_SUFFIXES):
        raise errors.UserError(
            f'--output {output}: the file name must end in {", ".join(TORCH_SUFFIXES)} '
            '(.safetensors writes a safetensors file, the others torch.save)'
        )
    if os.path.isdir(output):
        raise errors.UserError(f'--output {output} is a folder; pass a file name')
    if os.path.exists(output) and not overwrite:
        raise errors.UserError(
            f'--output {output} already exists; pass another --output, or --overwrite to '
            'replace it'
        )
    if mask_format is None:
        mask_format = '2023' if family == 'official' and jackpot is not None else 'none'
    if jackpot is not None and family == 'torchvision' and not masked:
        raise ValueError(
            'a torchvision state dict has no place for masks: pass --masked to write W * B'
        )
    ckpt = _checkpoint()
    params, statistics, meta = ckpt.load_weights(_checkpoint_dir(weights, PRETRAINED_DIR))
    saved = meta.get('model', {}).get('name')
    if saved != arch.model:
        raise ValueError(f'the weights at {weights} are for model {saved!r}, not {arch.model!r}')
    scores = masks = None
    if jackpot is not None:
        scores, masks, statistics, _ = ckpt.load_jackpot(_checkpoint_dir(jackpot, JACKPOT_DIR))
        if scores is None and mask_format != 'none':
            # A jackpot saved without scores: 1.0 kept / 0.0 pruned ranks to the same masks.
            print('note: the jackpot has no scores; writing the binary masks as .mask scores')
            scores = {p: np.asarray(m, np.float32) for p, m in masks.items()}
    state = flax_to_torch(
        params,
        statistics,
        arch,
        masks=masks,
        scores=scores,
        masked=masked,
        mask_format=mask_format,
    )
    _torch_io().save_state_dict(state, output, wrap=family == 'official')
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m jackpot_jax.convert', description=__doc__.split('\n')[0]
    )
    sub = parser.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--traceback', action='store_true', help=errors.TRACEBACK_HELP)
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument(
        '--overwrite',
        action='store_true',
        help='write into an OUTPUT that already holds weights, a jackpot or checkpoints',
    )
    tv = sub.add_parser(
        'torchvision', help='torchvision weights -> OUTPUT/pretrained', parents=[common, overwrite]
    )
    tv.add_argument('--arch', required=True, choices=sorted(ARCHS['torchvision']))
    tv.add_argument(
        '--input',
        required=True,
        help="a .pth/.pt/.safetensors file, or 'cache' for $TORCH_HOME/hub/checkpoints",
    )
    tv.add_argument('--output', required=True, help='a workdir; weights go to OUTPUT/pretrained')
    off = sub.add_parser(
        'official',
        help='official checkpoints (+ jackpot) -> OUTPUT/{pretrained,jackpot}',
        parents=[common, overwrite],
    )
    off.add_argument('--arch', required=True, choices=sorted(ARCHS['official']))
    off.add_argument('--input', required=True, help='pre-trained {"state_dict": ...} file')
    off.add_argument('--jackpot', help='a found jackpot (2021 or 2023 format)')
    off.add_argument('--sparsity', type=float, help='sparsity of a 2021 jackpot (no b_mask)')
    off.add_argument('--allocation', default='global_magnitude', choices=sparsity.ALLOCATIONS)
    off.add_argument('--output', required=True, help='a workdir for the launcher')
    out = sub.add_parser(
        'to-torch', help='jackpot_jax weights (+ jackpot) -> a torch state dict', parents=[common]
    )
    out.add_argument('--arch', required=True)
    out.add_argument('--weights', required=True, help='weights checkpoint (or a workdir)')
    out.add_argument('--jackpot', help='jackpot checkpoint (or a workdir)')
    out.add_argument('--format', default='torchvision', choices=FAMILIES)
    out.add_argument('--masked', action='store_true', help='write W * B')
    out.add_argument(
        '--mask_format', choices=MASK_FORMATS, help='official only; default 2023 with a jackpot'
    )
    out.add_argument('--output', required=True, help='.pth, .pt or .safetensors file')
    out.add_argument('--overwrite', action='store_true', help='replace an existing OUTPUT file')
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == 'torchvision':
        print(f'wrote {run_torchvision(args.arch, args.input, args.output, args.overwrite)}')
    elif args.command == 'official':
        written = run_official(
            args.arch,
            args.input,
            args.output,
            args.jackpot,
            args.sparsity,
            args.allocation,
            args.overwrite,
        )
        for what, path in written.items():
            print(f'wrote {what}: {path}')
    else:
        path = run_to_torch(
            args.arch,
            args.weights,
            args.output,
            args.format,
            args.jackpot,
            args.masked,
            args.mask_format,
            args.overwrite,
        )
        print(f'wrote {path}')


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (a user error prints one line)."""
    args = _parser().parse_args(argv)
    return errors.report_user_errors(_run, args, traceback=args.traceback)


if __name__ == '__main__':
    sys.exit(main())
