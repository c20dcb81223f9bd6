"""Which epoch's jackpot a search keeps, and which epochs' jackpots it must hold until then.

:func:`choose` applies ``settings.selection_rule`` (a rule of
:mod:`jackpot_jax.core.selection`) to the epoch records on the selection split, among the
epochs whose jackpot the search's store still holds (:mod:`jackpot_jax.engine.store`).
:func:`candidates` are the epochs the rule may still keep: the others have a later epoch
at least as good (every rule prefers the later one then); their jackpots may go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from absl import logging

from jackpot_jax.core import selection
from jackpot_jax.core.settings import SearchSettings


def signed(record: Mapping[str, Any], split: str, s: SearchSettings) -> float:
    """The record's selection metric on ``split``, negated when lower is better."""
    value = record[f'{split}_{s.selection_metric}']
    return -value if s.lower_is_better else value


def candidates(history: list, split: str, s: SearchSettings) -> set[int]:
    """The epochs the rule may still keep: the last, and (unless the rule is 'last') every
    epoch no later epoch is at least as good as (every rule prefers the later one then)."""
    if s.selection_rule == 'last' or split is None:
        return {history[-1]['epoch']} if history else set()
    best_later, out = -float('inf'), set()
    for record in reversed(history):
        value = signed(record, split, s)
        if value > best_later:
            out.add(record['epoch'])
        best_later = max(best_later, value)
    return out


def choose(
    history: list, s: SearchSettings, split: str | None, available: set[int]
) -> tuple[int, str]:
    """``(epoch, how it was chosen in words)`` among the epochs ``available``."""
    last = history[-1]
    if s.selection_rule == 'last':
        return last['epoch'], f"epoch {last['epoch']} (the last epoch)"
    kwargs = dict(
        metric=f'{split}_{s.selection_metric}',
        higher_is_better=not s.lower_is_better,
        rule=s.selection_rule,
        num_examples=last.get(f'{split}_examples') if s.selection_metric_is_fraction else None,
    )
    chosen = selection.choose_epoch(history, available=available, **kwargs)
    unrestricted = selection.choose_epoch(history, **kwargs)
    if chosen.epoch != unrestricted.epoch:
        logging.warning(
            'the checkpoint of epoch %d (the %s choice on %s) is gone; keeping epoch %d, '
            'the choice among those still saved',
            unrestricted.epoch,
            s.selection_rule,
            split,
            chosen.epoch,
        )
    return chosen.epoch, chosen.describe()
