"""Which epoch's jackpot a search keeps: rules over per-epoch records, with a standard error.

Vocabulary used here (and by the search loops that call it):
  * record: one mapping per search epoch, with its 1-based ``'epoch'`` and what was
    measured after it (``'validation_top1'``, ``'test_top1'``, ``'mask_changes'``, ...);
  * metric: the record key a rule reads, measured on ``num_examples`` examples held out
    of training. Choose on the validation split, never on the test split;
  * candidates: the epochs a rule may return: those in ``available`` (whose checkpoint
    still exists; all of them when ``available`` is None), and always the last epoch;
  * best: the candidate with the best value, the latest on ties;
  * standard error (SE): the uncertainty of the best value, in the metric's units;
  * final-mask epochs: the last epoch that changed the masks and every later one. A
    record's ``'mask_changes'`` counts the changes made during the epoch, before it was
    evaluated, so these epochs were all evaluated with the masks the search ends with.

Rules (``SELECTION_RULES``):
  * ``'best'``: the best candidate, the latest on ties;
  * ``'one_standard_error'`` (``DEFAULT_RULE``): the latest candidate whose value is
    within one SE of the best;
  * ``'best_frozen'``: the best final-mask candidate, the latest on ties; the last epoch
    alone when the masks changed in it (then ``'best_frozen'`` is ``'last'``);
  * ``'last'``: the last epoch.

The standard error, the first that applies:
  1. ``standard_error=``, in the metric's units;
  2. the best record's ``'<metric>_stderr'`` field;
  3. ``num_examples=``, for a metric in [0, 1] that is a fraction of examples (top-1
     accuracy, error rate): the binomial SE sqrt(p (1 - p) / n) at the best value p, and
     never below one example, 1 / n. At p = 1 the formula gives 0, yet one example is the
     finest step such a figure can take;
  4. otherwise 0: the binomial SE does not apply to a loss or a perplexity, and without an
     SE every rule that uses one keeps the best, the latest on ties, as ``'best'`` does.

Values closer than ``TOLERANCE`` (relative, at least 1e-6 absolute) count as equal, so
that float32 and float64 figures of the same count tie.

Why ``'one_standard_error'`` is the default: on a 144-image validation split one image is
0.69 points, and the SE of a 97.9 % accuracy there is 1.2 points, so the best epoch is
often ahead of a later one by one image that says nothing about the network. The later
epoch has then searched longer, at a lower learning rate, and usually with the masks
frozen; among the epochs the validation split cannot tell apart the rule keeps it. An
earlier epoch that is ahead by many SEs is still kept (``'best_frozen'`` and ``'last'``
would drop it), and on a large split (6,000 images: SE about 0.4 points) the rule
mostly keeps the best epoch itself. The comparison is in docs/selection.md.

API (stable; pure Python and numpy):
  * ``choose_epoch(records, *, metric='validation_top1', higher_is_better=True,
    rule=DEFAULT_RULE, num_examples=None, available=None, standard_error=None)
    -> EpochChoice``;
  * ``EpochChoice``: ``epoch`` (the one to keep), ``rule``, ``metric``, ``value`` (its
    metric), ``best_value`` / ``best_epoch`` (the best candidate), ``standard_error``,
    ``gap_in_standard_errors`` (how far ``value`` is behind the best, in SEs; None when
    behind with an SE of 0), ``num_examples``, ``considered`` (the epochs the rule chose
    among), ``higher_is_better``, and ``describe()`` for one line;
  * ``binomial_standard_error(p, n)`` and ``final_mask_epochs(records)``, the two pieces;
  * ``metric_direction(name) -> 'min' | 'max' | None``: the direction of a metric known
    by its name (None: unknown; the caller must state it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SELECTION_RULES = ('best', 'one_standard_error', 'best_frozen', 'last')
DEFAULT_RULE = 'one_standard_error'
TOLERANCE = 1e-6
STDERR_SUFFIX = '_stderr'
SELECTION_MODES = ('min', 'max')
# The words of a metric's name ('_'-separated, lower case) that tell its direction; a name
# with words of neither (or of both) has a direction that must be stated.
LOWER_IS_BETTER_WORDS = frozenset(
    'loss nll perplexity ppl error err cross entropy xent crossentropy mse mae rmse wer cer '
    'ter distance regret'.split()
)
HIGHER_IS_BETTER_WORDS = frozenset(
    'accuracy acc top1 top5 f1 precision recall auc bleu rouge iou map reward'.split()
)


def metric_direction(name: str) -> str | None:
    """``'min'`` for a metric whose name says lower is better (``loss``, ``loss_total``,
    ``ppl``, ``cross_entropy``, ``wer``, ``mse``, ...), ``'max'`` for one where higher is
    (``top1``, ``accuracy``, ``f1``, ...), None when its name does not say."""
    words = set(name.lower().split('_'))
    lower, higher = bool(words & LOWER_IS_BETTER_WORDS), bool(words & HIGHER_IS_BETTER_WORDS)
    if lower == higher:
        return None
    return 'min' if lower else 'max'


_REASONS = {
    'best': 'the best',
    'one_standard_error': 'latest within one standard error of the best',
    'best_frozen': 'the best of the final-mask epochs',
    'last': 'the last',
}


@dataclasses.dataclass(frozen=True)
class EpochChoice:
    """The epoch a rule keeps, and where it stands against the best candidate."""

    epoch: int
    rule: str
    metric: str
    value: float
    best_value: float
    best_epoch: int
    standard_error: float
    gap_in_standard_errors: float | None
    num_examples: int | None = None
    considered: tuple[int, ...] = ()
    higher_is_better: bool = True

    def describe(self) -> str:
        """One line: 'epoch 9 (latest within one standard error of the best, 0.58 SE below
        epoch 7's 0.9792 on 144 validation examples; higher is better)': the metric's
        direction is always stated, since the choice depends on it."""
        reason = _REASONS[self.rule]
        if self.rule == 'best_frozen' and self.considered:
            first, last = self.considered[0], self.considered[-1]
            reason += f' {first}' if first == last else f' {first} to {last}'
        where = _where(self.metric, self.num_examples)
        direction = '; higher is better' if self.higher_is_better else '; lower is better'
        se = f', SE {self.standard_error:.4f}' if self.standard_error > 0 else ', no SE'
        if _equal(self.value, self.best_value):
            itself = ': the best itself' if self.rule != 'best' else ''
            ties = '' if self.epoch == self.best_epoch else f', tied with epoch {self.best_epoch}'
            return f'epoch {self.epoch} ({reason}{itself}, {self.value:.4f} {where}{ties}{se}{direction})'
        side = 'below' if self.higher_is_better else 'above'
        if self.gap_in_standard_errors is None:
            behind = f'{abs(self.best_value - self.value):.4f} {side}'
        else:
            behind = f'{self.gap_in_standard_errors:.2f} SE {side}'
        return (
            f"epoch {self.epoch} ({reason}, {behind} epoch {self.best_epoch}'s "
            f'{self.best_value:.4f} {where}{direction})'
        )


def binomial_standard_error(p: float, n: int) -> float:
    """SE of a fraction ``p`` of ``n`` examples: sqrt(p (1 - p) / n), at least 1 / n."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(
            f'num_examples={n!r}: pass the number of examples the metric was measured on, '
            'an integer >= 1 (or None when it is not a fraction of examples)'
        )
    if not 0.0 <= p <= 1.0:
        raise ValueError(f'p={p!r} is no fraction in [0, 1]')
    return max(math.sqrt(p * (1.0 - p) / n), 1.0 / n)


def final_mask_epochs(records: Sequence[Mapping]) -> tuple[int, ...]:
    """Epochs evaluated with the final masks: the last that changed them and all later ones.

    Only those epochs need a ``'mask_changes'`` count (an int, or per-layer counts).
    """
    ordered = _ordered(records)
    for i in range(len(ordered) - 1, -1, -1):
        record = ordered[i]
        if record.get('mask_changes') is None:
            raise ValueError(
                f"epoch {record['epoch']}'s record has no 'mask_changes' (keys: "
                f"{sorted(record)}); rule 'best_frozen' needs the mask changes of the last "
                "epoch that changed the masks and of every later one: record them, or "
                "choose with rule 'one_standard_error' or 'last'"
            )
        if _count(record['mask_changes'], record['epoch']) > 0:
            return tuple(r['epoch'] for r in ordered[i:])
    return tuple(r['epoch'] for r in ordered)


def choose_epoch(
    records: Sequence[Mapping],
    *,
    metric: str = 'validation_top1',
    higher_is_better: bool = True,
    rule: str = DEFAULT_RULE,
    num_examples: int | None = None,
    available: Iterable[int] | None = None,
    standard_error: float | None = None,
) -> EpochChoice:
    """The epoch to keep under ``rule`` (see the module docstring for the rules and SE).

    ``records`` are per-epoch mappings with ``'epoch'`` and ``metric`` (in any order);
    ``num_examples`` is the size of the split ``metric`` was measured on; ``available``
    restricts the candidates to epochs whose checkpoint exists (the last always is).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f'rule={rule!r} is unknown; choose one of {SELECTION_RULES}')
    ordered = _ordered(records)
    values = {}
    for record in ordered:
        if metric not in record or record[metric] is None:
            raise ValueError(
                f"epoch {record['epoch']}'s record has no {metric!r} (keys: "
                f'{sorted(record)}); measure it after every epoch, or pass the metric= '
                'the records have'
            )
        value = float(record[metric])
        if not math.isfinite(value):
            raise ValueError(
                f"epoch {record['epoch']}'s {metric} is {value}; drop the epochs whose "
                'metric is not finite before choosing'
            )
        values[record['epoch']] = value

    last_epoch = ordered[-1]['epoch']
    if available is None:
        candidates = [r['epoch'] for r in ordered]
    else:
        keep = {int(e) for e in available} | {last_epoch}
        candidates = [r['epoch'] for r in ordered if r['epoch'] in keep]

    sign = 1.0 if higher_is_better else -1.0
    best_epoch = _best(candidates, values, sign)
    best_value = values[best_epoch]
    best_record = next(r for r in ordered if r['epoch'] == best_epoch)
    se = _standard_error(best_record, best_value, metric, num_examples, standard_error, values)

    if rule == 'best':
        considered, epoch = tuple(candidates), best_epoch
    elif rule == 'last':
        considered, epoch = (last_epoch,), last_epoch
    elif rule == 'best_frozen':
        final = set(final_mask_epochs(ordered))
        considered = tuple(e for e in candidates if e in final)
        epoch = _best(considered, values, sign)
    else:  # one_standard_error
        considered = tuple(candidates)
        limit = se + _tolerance(best_value)
        epoch = max(e for e in candidates if sign * (best_value - values[e]) <= limit)

    gap = sign * (best_value - values[epoch])
    if _equal(values[epoch], best_value):
        gap_se = 0.0
    elif se > 0:
        gap_se = gap / se
    else:
        gap_se = None
    return EpochChoice(
        epoch=epoch,
        rule=rule,
        metric=metric,
        value=values[epoch],
        best_value=best_value,
        best_epoch=best_epoch,
        standard_error=se,
        gap_in_standard_errors=gap_se,
        num_examples=None if num_examples is None else int(num_examples),
        considered=considered,
        higher_is_better=higher_is_better,
    )


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
def _ordered(records: Sequence[Mapping]) -> list[Mapping]:
    """Records sorted by epoch; each must have an integer epoch, none twice."""
    records = list(records)
    if not records:
        raise ValueError(
            'records is empty: pass one record per search epoch (a mapping with '
            "'epoch' and the metric), e.g. the search's epoch records"
        )
    seen = set()
    for record in records:
        if not isinstance(record, Mapping) or 'epoch' not in record:
            raise ValueError(
                f"every record needs an 'epoch' key, got {record!r}; pass the per-epoch "
                'records, one mapping per epoch'
            )
        epoch = record['epoch']
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise ValueError(f"epoch {epoch!r} is no integer; records number epochs 1, 2, ...")
        if epoch in seen:
            raise ValueError(
                f'epoch {epoch} appears twice in records; pass one record per epoch (for a '
                'resumed run, the latest record of each epoch)'
            )
        seen.add(epoch)
    return sorted(records, key=lambda r: int(r['epoch']))


def _best(epochs: Sequence[int], values: Mapping[int, float], sign: float) -> int:
    """The epoch with the best value, the latest on ties."""
    top = max(sign * values[e] for e in epochs)
    return max(e for e in epochs if sign * values[e] >= top - _tolerance(top))


def _standard_error(
    best_record: Mapping,
    best_value: float,
    metric: str,
    num_examples: int | None,
    given: float | None,
    values: Mapping[int, float],
) -> float:
    if given is not None:
        se = float(given)
        if not (math.isfinite(se) and se >= 0):
            raise ValueError(f'standard_error={given!r}: pass a finite value >= 0')
        return se
    field = metric + STDERR_SUFFIX
    if best_record.get(field) is not None:
        se = float(best_record[field])
        if not (math.isfinite(se) and se >= 0):
            raise ValueError(
                f"epoch {best_record['epoch']}'s {field} is {se}; a standard error is "
                'finite and >= 0'
            )
        return se
    if num_examples is None:
        return 0.0
    outside = [(e, v) for e, v in values.items() if not 0.0 <= v <= 1.0]
    if outside:
        epoch, value = outside[0]
        raise ValueError(
            f"num_examples={num_examples!r} gives the binomial standard error of a fraction "
            f"of examples in [0, 1], but epoch {epoch}'s {metric} is {value}; pass "
            f"fractions (not percentages), or standard_error= / records' {field!r} for "
            'another metric'
        )
    return binomial_standard_error(best_value, num_examples)


def _count(changes, epoch: int) -> int:
    """A mask-change count: an int, or per-layer counts (a mapping or a sequence)."""
    if isinstance(changes, Mapping):
        changes = sum(changes.values())
    elif isinstance(changes, (list, tuple)):
        changes = sum(changes)
    try:
        return int(changes)
    except (TypeError, ValueError):
        raise ValueError(
            f"epoch {epoch}'s mask_changes is {changes!r}; pass a count per epoch"
        ) from None


def _tolerance(value: float) -> float:
    return TOLERANCE * max(1.0, abs(value))


def _equal(a: float, b: float) -> bool:
    return abs(a - b) <= _tolerance(max(abs(a), abs(b)))


def _where(metric: str, num_examples: int | None) -> str:
    split = metric.split('_')[0] if '_' in metric else metric
    if num_examples is None:
        return f'in {metric}'
    return f'on {num_examples} {split} examples'
