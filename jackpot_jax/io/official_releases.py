"""The lottery-jackpot authors' PyTorch releases (ResNet-32 CIFAR, VGG-19 CIFAR, ResNet-50
ImageNet) and their searched jackpots: ``<conv>.mask`` holds a conv's scores (2021 and
2023), ``<conv>.b_mask`` its binary mask (2023 only; a 2021 jackpot's mask is rebuilt
from its scores as that release did, the top ``n - k`` of |scores|)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jackpot_jax.core import sparsity
from jackpot_jax.io.convert import (
    Jackpot,
    Weights,
    bn_counters,
    convert_checked,
    expected_torch_shapes,
    infer_num_classes,
    kernel_to_flax,
    key_problems,
    non_finite_problems,
    raise_problems,
    strip_module_prefix,
    torch_to_flax,
)
from jackpot_jax.io.name_tables import CONV, CONV_FC, Arch, get_arch


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
    problems = key_problems(weights_sd, expected, bn_counters(spec), spec)
    scores_named = {f'{layer}.mask': value for layer, value in scores_sd.items()}
    problems += non_finite_problems({**weights_sd, **scores_named})

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
    raise_problems(problems, f'{what} for official {spec.name}')

    params, stats = convert_checked(weights_sd, spec)
    flat = sparsity.flatten(frozen_params if frozen_params is not None else params)
    scores, masks = {}, {}
    for layer in prunable:
        path = f'{layer.flax}/kernel'
        scores[path] = kernel_to_flax(CONV, scores_sd[layer.torch])
        if fmt == '2023':
            masks[path] = kernel_to_flax(CONV, bmasks_sd[layer.torch]) == 1
    if fmt == '2023':
        counts = {p: int(m.size - np.count_nonzero(m)) for p, m in masks.items()}
    else:
        kernels = {p: np.asarray(flat[p]) for p in scores}
        counts = sparsity.pruned_counts(kernels, sparsity_level, allocation)
        masks = {p: edge_popup_mask(s, counts[p]) for p, s in scores.items()}
    return Jackpot(params, stats, scores, masks, counts, fmt, num_classes)
