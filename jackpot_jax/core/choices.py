"""The names a search's options choose among, and the N:M pattern syntax: pure Python.

One table for the math that implements each choice (:mod:`jackpot_jax.core.sparsity`,
:mod:`jackpot_jax.core.structured`, :mod:`jackpot_jax.core.step`) and for
:class:`~jackpot_jax.core.settings.SearchSettings`, which checks every option against
it before any work starts. Pure Python and numpy: importing this module imports no JAX (config files and the
settings read it).
"""

from __future__ import annotations

import fractions
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

ALLOCATIONS = ('global_magnitude', 'uniform', 'erk')
RATE_SCHEDULES = ('constant', 'poly4', 'cosine')  # 'constant': rate 1 every step
MASK_UPDATES = ('short_restriction', 'edge_popup')
SCORE_INITS = ('magnitude', 'kaiming', 'random')  # 'random': U(0, 1) scores
# Optimizers of the scores (momentum is SGD's; Adam's betas stay at optax's defaults).
OPTIMIZERS = ('sgd', 'adam', 'adamw')
BN_MODES = ('train', 'frozen')  # 'frozen': the pre-trained running statistics, eval mode
DEFAULT_INCLUDE = r'(^|/)kernel$'
# Classifiers (incl. torchvision VGG's three and the ViT's ``heads``) and the ViT's patch
# embedding ``conv_proj``; the ViT's class token and position embedding are no kernels.
DEFAULT_EXCLUDE = r'^((fc|classifier)(_\d+)?|heads|conv_proj)/'

_PATTERN = re.compile(r'(\d+)\s*:\s*(\d+)')


class NByM(NamedTuple):
    """An N:M pattern: N weights kept in every group of M consecutive input channels."""

    n: int
    m: int

    def __str__(self) -> str:
        return f'{self.n}:{self.m}'


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises ValueError naming ``name``, the unknown ``value`` and the choices."""
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(choices)}')


def check_pattern(n: object, m: object) -> None:
    """Raises ValueError unless ``n`` and ``m`` are integers with 1 <= N < M."""
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 1 <= n < m):
        raise ValueError(f'N:M pattern must have integers 1 <= N < M, got {n!r}:{m!r}; e.g. 2:4')


def parse_pattern(pattern: str | Sequence[int] | None, name: str = 'search.pattern') -> NByM | None:
    """``'2:4'`` -> ``NByM(2, 4)``; ``''`` or None -> None (unstructured masks).

    Parsed values pass through, so a pattern can be parsed once and handed on.
    """
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        check_pattern(*pattern)
        return NByM(*pattern)
    text = pattern.strip()
    if not text:
        return None
    match = _PATTERN.fullmatch(text)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 1 <= n < m:
            return NByM(n, m)
    raise ValueError(
        f"{name} {pattern!r} is not N:M with 1 <= N < M; use e.g. '2:4', or '' for "
        'unstructured masks'
    )


def pattern_sparsity(n: int, m: int) -> fractions.Fraction:
    """The fraction of weights an N:M mask removes, exactly: (M - N) / M."""
    check_pattern(n, m)
    return fractions.Fraction(m - n, m)
