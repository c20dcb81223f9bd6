"""Shape checks of pytrees: every missing, unexpected or wrong-shaped leaf, one line each.

Used where weights enter a run (checkpoints, conversion), so a mismatch is named leaf
by leaf instead of surfacing as a shape error deep inside a jitted step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jackpot_jax.core import sparsity


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Flat ``{path: shape}`` of a pytree of arrays (or shape/dtype structs)."""
    return {p: tuple(np.shape(x)) for p, x in sparsity.flatten(tree).items()}


def tree_mismatches(
    want: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], label: str = ''
) -> list[str]:
    """Every missing, unexpected or wrong-shaped leaf, one line each."""
    problems = [f'missing {label}{p} {s}' for p, s in want.items() if p not in got]
    problems += [f'unexpected {label}{p} {s}' for p, s in got.items() if p not in want]
    problems += [
        f'{label}{p}: expected shape {s}, got {got[p]}'
        for p, s in want.items()
        if p in got and got[p] != s
    ]
    return problems


def check_tree_matches(expected: Any, actual: Any, what: str) -> None:
    """Raises ValueError listing every missing, unexpected or wrong-shaped leaf."""
    problems = tree_mismatches(leaf_shapes(expected), leaf_shapes(actual))
    if problems:
        raise ValueError(f'{what} do not fit the configured model:\n  ' + '\n  '.join(problems))


def kernels_at(params: Mapping, paths: Sequence[str]) -> dict[str, Any]:
    """The leaves of ``params`` at the '/'-joined ``paths``; raises naming any missing."""
    flat = sparsity.flatten(params)
    missing = [p for p in paths if p not in flat]
    if missing:
        raise ValueError(f'the params have no kernels {missing}; they have {sorted(flat)}')
    return {p: flat[p] for p in paths}


def with_kernels(params: Mapping, kernels: Mapping[str, Any]) -> dict:
    """``params`` with the leaves at the paths of ``kernels`` replaced."""
    flat = sparsity.flatten(params)
    flat.update(kernels)
    return sparsity.unflatten(flat)
