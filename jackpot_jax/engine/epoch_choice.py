"""Which epoch's jackpot a search keeps, and which epochs' jackpots it must hold until then.

:func:`chosen_epoch` applies ``settings.selection_rule`` (a rule of
:mod:`jackpot_jax.core.selection`) to the epoch records on the selection split, among the epochs
whose jackpot still exists: a checkpoint in a workdir, else an in-memory snapshot.
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


def drop_dominated(snapshots: dict, history: list, split: str, s: SearchSettings) -> None:
    """Forgets the snapshots of epochs the rule can no longer keep."""
    keep = candidates(history, split, s)
    for epoch in list(snapshots):
        if epoch not in keep:
            del snapshots[epoch]


def chosen_epoch(history, s, split, ckpts, snapshots, state, statistics_of):
    """``(record, masks, scores, statistics, choice)`` of the chosen epoch; ``statistics_of(
    state)`` gives a search state's jackpot statistics."""
    last = history[-1]
    if s.selection_rule == 'last':
        epoch, choice = last['epoch'], f"epoch {last['epoch']} (the last epoch)"
    else:
        available = (
            set(snapshots)
            if ckpts is None
            else {r['epoch'] for r in history if r['step'] in set(ckpts.steps())}
        )
        metric = f'{split}_{s.selection_metric}'
        rule = s.selection_rule
        kwargs = dict(
            metric=metric,
            higher_is_better=not s.lower_is_better,
            rule=rule,
            num_examples=(
                last.get(f'{split}_examples') if s.selection_metric_is_fraction else None
            ),
        )
        chosen = selection.choose_epoch(history, available=available, **kwargs)
        unrestricted = selection.choose_epoch(history, **kwargs)
        if chosen.epoch != unrestricted.epoch:
            logging.warning(
                'the checkpoint of epoch %d (the %s choice on %s) is gone; keeping epoch %d, '
                'the choice among those still saved',
                unrestricted.epoch,
                rule,
                split,
                chosen.epoch,
            )
        epoch, choice = chosen.epoch, chosen.describe()
    record = history[epoch - 1]
    if ckpts is None:
        return (record, *snapshots[epoch], choice)
    if epoch == last['epoch']:
        return record, state.masks, state.scores, statistics_of(state), choice
    restored, _ = ckpts.restore(record['step'], like=state)
    return record, restored.masks, restored.scores, statistics_of(restored), choice
