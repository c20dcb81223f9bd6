"""The settings of one jackpot search, typed and frozen, and the protocols that fill them.

:class:`SearchSettings` is what the search engine (:mod:`jackpot_jax.engine.loop`) runs on:
the library builds it from :func:`~jackpot_jax.engine.api.find_jackpot`'s arguments, the
launcher from ``config.search``. Options left at None (the one "unset" marker) are filled
by the *protocol* (:func:`fill_protocol`), in one place for both:

* ``'stable'`` (default): the masks are frozen for the last quarter of the epochs, the
  statistics are re-estimated over 50 training batches under every evaluated mask, and
  the jackpot's epoch is chosen on the validation split: the latest epoch within one
  standard error of the best (:mod:`jackpot_jax.core.selection`);
* ``'paper'``: the authors' search: none of these, the last epoch's jackpot.

The one rule for "stable protocol, no validation data": the jackpot of the last epoch is
kept, and the report says so; asking for a choice on validation explicitly
(``selection_rule`` other than 'last') without validation data is an error.

:meth:`SearchSettings.check` is the one check of every option, the names of the rules
included (:mod:`jackpot_jax.core.choices`). Pure Python (and numpy): importing this
module imports no JAX (config files use its tables).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from jackpot_jax.core import choices, selection
from jackpot_jax.core.choices import check_choice

# Values the protocol gives to the options left at None.
PROTOCOLS: dict[str, dict[str, Any]] = {
    'stable': {
        'validation_fraction': 0.1,  # of the launcher's training images
        'reestimation_steps': 50,
        'mask_freeze_fraction': 0.25,
        'swap_margin': 0.0,
        'selection_rule': selection.DEFAULT_RULE,
    },
    'paper': {
        'validation_fraction': 0.0,
        'reestimation_steps': 0,
        'mask_freeze_fraction': 0.0,
        'swap_margin': 0.0,
        'selection_rule': 'last',
    },
}
# Metrics that are fractions of examples (top-k accuracy), whose standard error is
# binomial; the rules know no standard error of any other metric (selection.py).
FRACTION_OF_EXAMPLES = re.compile(r'(^|_)(top\d+|accuracy)$')


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Every option of a search (one vocabulary with ``config.search``).

    ``sparsity`` is the fraction of prunable weights removed. The score optimizer is
    ``optimizer`` at ``learning_rate`` under a per-epoch cosine, with ``weight_decay`` added
    to the gradient and (SGD) ``momentum``. ``selection_metric`` is the evaluation metric
    the epoch is chosen by on validation (``top1`` by default); ``selection_mode``
    (``'min'`` or ``'max'``) says whether lower or higher is better. Left at None, the
    metric's name must tell (:func:`~jackpot_jax.core.selection.metric_direction`:
    ``loss``, ``perplexity``, ``mse`` ... are lower-is-better, ``top1``, ``accuracy`` ...
    higher); a name that does not is refused rather than guessed.
    """

    sparsity: float = 0.9
    epochs: int = 10
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    optimizer: str = 'sgd'
    pruned_score: float = 0.99
    score_init: str = 'magnitude'
    allocation: str = 'global_magnitude'
    pattern: str = ''
    mask_update: str = 'short_restriction'
    rate_schedule: str = 'constant'
    prune_include: str = choices.DEFAULT_INCLUDE
    prune_exclude: str = choices.DEFAULT_EXCLUDE
    dense_output_layer: bool = True
    bn_mode: str = 'train'
    label_smoothing: float = 0.0
    protocol: str = 'stable'
    mask_freeze_fraction: float | None = None
    reestimation_steps: int | None = None
    swap_margin: float | None = None
    selection_rule: str | None = None
    selection_metric: str = 'top1'
    selection_mode: str | None = None

    @property
    def lower_is_better(self) -> bool:
        """The selection metric's direction: stated, or read from its name."""
        mode = self.selection_mode or selection.metric_direction(self.selection_metric)
        return mode == 'min'

    @property
    def selection_metric_is_fraction(self) -> bool:
        return bool(FRACTION_OF_EXAMPLES.search(self.selection_metric))

    def resolved(self, has_validation: bool, prefix: str = '') -> SearchSettings:
        """A copy with the options left at None set by the protocol, checked (``prefix``:
        see :meth:`check`)."""
        filled = fill_protocol(self.protocol, dataclasses.asdict(self), has_validation)
        settings = dataclasses.replace(self, **filled)
        settings.check(has_validation, prefix)
        return settings

    def check(self, has_validation: bool = True, prefix: str = '') -> None:
        """Raises ValueError naming the first bad option (as ``prefix + name``) and its fix."""

        def name(field: str) -> str:
            return prefix + field

        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(
                f'{name("sparsity")} must be a number in [0, 1) (the fraction of weights '
                f'removed), got {self.sparsity!r}'
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f'{name("sparsity")} must be in [0, 1), got {self.sparsity!r}; it is the '
                'fraction of prunable weights removed (0.9 keeps 10%)'
            )
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ValueError(f'{name("epochs")} must be an integer >= 1, got {self.epochs!r}')
        for field, low, high, meaning in _RANGES:
            value = getattr(self, field)
            if value is None and field in _PROTOCOL_FIELDS:
                continue
            inside = _is_number(value) and value >= low and (high is None or value < high)
            if not inside or (field == 'learning_rate' and not value > 0):
                raise ValueError(f'{name(field)} must be {meaning}, got {value!r}')
        if self.reestimation_steps is not None and not (
            _is_int(self.reestimation_steps) and self.reestimation_steps >= 0
        ):
            raise ValueError(
                f'{name("reestimation_steps")} must be >= 0 (an integer; 0: keep the running '
                f'statistics), got {self.reestimation_steps!r}'
            )
        for field, names in _CHOICES:
            check_choice(name(field), getattr(self, field), names)
        if self.selection_rule is not None:
            check_choice(name('selection_rule'), self.selection_rule, selection.SELECTION_RULES)
        for field in ('prune_include', 'prune_exclude'):
            check_regex(name(field), getattr(self, field))
        if not isinstance(self.selection_metric, str) or not self.selection_metric:
            raise ValueError(
                f"{name('selection_metric')} must be a metric's name, such as 'top1' or "
                f"'loss', got {self.selection_metric!r}"
            )
        self._check_selection_mode(name)
        self._check_pattern(name)
        self._check_combinations(name, has_validation)

    def _check_selection_mode(self, name: Callable[[str], str]) -> None:
        """The selection metric's direction is stated or known from its name, never guessed
        (it decides which epoch is kept)."""
        if self.selection_mode is not None:
            check_choice(name('selection_mode'), self.selection_mode, selection.SELECTION_MODES)
            return
        if self.selection_rule in (None, 'last'):
            return
        if selection.metric_direction(self.selection_metric) is None:
            raise ValueError(
                f'{name("selection_metric")} {self.selection_metric!r}: its name does not say '
                f'whether lower or higher is better; state it: {name("selection_mode")}=\'min\' '
                f'(lower is better) or {name("selection_mode")}=\'max\''
            )

    def _check_pattern(self, name: Callable[[str], str]) -> None:
        """An N:M pattern removes (M - N) / M: the sparsity must say the same."""
        pattern = choices.parse_pattern(self.pattern, name('pattern'))
        if pattern and abs(self.sparsity - choices.pattern_sparsity(*pattern)) > 1e-9:
            n, m = pattern
            raise ValueError(
                f'{name("pattern")} {self.pattern!r} removes {m - n}/{m} of every eligible '
                f'layer, but {name("sparsity")} is {self.sparsity!r}; set '
                f'{name("sparsity")}={(m - n) / m!r}'
            )

    def _check_combinations(self, name: Callable[[str], str], has_validation: bool) -> None:
        """Options that are fine alone but not together."""
        if self.swap_margin and self.mask_update != 'short_restriction':
            raise ValueError(
                f'{name("swap_margin")}={self.swap_margin!r} applies to the short restriction '
                f'only, but {name("mask_update")} is {self.mask_update!r}; set '
                f'{name("swap_margin")}=0, or choose the short restriction'
            )
        if self.selection_rule not in (None, 'last') and not has_validation:
            raise ValueError(
                f'{name("selection_rule")}={self.selection_rule!r} chooses on validation data, '
                'but there is none: pass validation_batches= (held-out training examples, never '
                'the test set; launcher: data.validation_fraction > 0), or '
                "selection_rule='last'"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (field, lowest value, bound it stays below or None, the rule in words) of the numbers.
_RANGES = (
    ('learning_rate', 0.0, None, 'a finite number > 0'),
    ('weight_decay', 0.0, None, 'a finite number >= 0'),
    ('momentum', 0.0, 1.0, 'in [0, 1) (0 = none)'),
    ('pruned_score', 0.0, 1.0, 'in [0, 1) so magnitude-kept weights (score 1.0) rank first'),
    ('label_smoothing', 0.0, 1.0, 'in [0, 1)'),
    (
        'mask_freeze_fraction',
        0.0,
        1.0,
        'in [0, 1) (the fraction of the epochs with the masks frozen)',
    ),
    ('swap_margin', 0.0, None, '>= 0 (0 = no margin)'),
)
# Every option that names a rule, and the rules it may name.
_CHOICES = (
    ('optimizer', choices.OPTIMIZERS),
    ('bn_mode', choices.BN_MODES),
    ('allocation', choices.ALLOCATIONS),
    ('mask_update', choices.MASK_UPDATES),
    ('rate_schedule', choices.RATE_SCHEDULES),
    ('score_init', choices.SCORE_INITS),
)
# The options a protocol fills when they are left at None.
_PROTOCOL_FIELDS = frozenset(PROTOCOLS['stable'])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fill_protocol(protocol: str, values: Mapping[str, Any], has_validation: bool) -> dict[str, Any]:
    """The protocol's value of every field of ``values`` left at None (the one "unset"
    marker): the one place where a protocol fills a search's options, for the library
    and the launcher. Without validation data the jackpot kept is the last epoch's."""
    check_choice('protocol', protocol, tuple(PROTOCOLS))
    filled = {
        name: default
        for name, default in PROTOCOLS[protocol].items()
        if name in values and values[name] is None
    }
    if 'selection_rule' in filled and not has_validation:
        filled['selection_rule'] = 'last'
    return filled


def check_regex(name: str, pattern: Any) -> None:
    """A regular expression over parameter paths, or ValueError naming it and the fix."""
    if not isinstance(pattern, str):
        raise ValueError(f'{name} must be a regular expression (a str), got {pattern!r}')
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f'{name}={pattern!r} is not a valid regular expression ({e}); it is matched '
            "against parameter paths such as 'conv1/kernel'"
        ) from None
