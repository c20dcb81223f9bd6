"""The settings of one jackpot search, typed and frozen, and the protocols that fill them.

:class:`SearchSettings` is what the search engine (:mod:`jackpot_jax.engine.loop`) runs on:
the library builds it from :func:`~jackpot_jax.engine.api.find_jackpot`'s arguments, the
launcher from ``config.search``. Options left at None are filled by the *protocol*
(:meth:`SearchSettings.resolved`), in one place for both:

* ``'stable'`` (default): the masks are frozen for the last quarter of the epochs, the
  statistics are re-estimated over 50 training batches under every evaluated mask, and
  the jackpot's epoch is chosen on the validation split: the latest epoch within one
  standard error of the best (:mod:`jackpot_jax.core.selection`);
* ``'paper'``: the authors' search: none of these, the last epoch's jackpot.

The one rule for "stable protocol, no validation data": the jackpot of the last epoch is
kept, and the report says so; asking for a choice on validation explicitly
(``selection_rule`` other than 'last') without validation data is an error.

Pure Python (and numpy): importing this module imports no JAX (config files use its
tables).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from jackpot_jax.core import selection

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
# Optimizers of the scores (momentum is SGD's; Adam's betas stay at optax's defaults).
OPTIMIZERS = ('sgd', 'adam', 'adamw')
BN_MODES = ('train', 'frozen')
# Metrics where lower is better; any other metric is higher-is-better.
LOWER_IS_BETTER = re.compile(r'(^|_)(loss|perplexity|error|nll)$')
# Metrics that are fractions of examples (top-k accuracy), whose standard error is
# binomial; the rules know no standard error of any other metric (selection.py).
FRACTION_OF_EXAMPLES = re.compile(r'(^|_)(top\d+|accuracy)$')


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """Every option of a search (one vocabulary with ``config.search``).

    ``sparsity`` is the fraction of prunable weights removed. The score optimizer is
    ``optimizer`` at ``learning_rate`` under a per-epoch cosine, with ``weight_decay`` added
    to the gradient and (SGD) ``momentum``. ``selection_metric`` is the evaluation metric
    the epoch is chosen by on validation (``top1`` by default; names such as
    ``loss`` or ``perplexity`` are lower-is-better).
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
    prune_include: str = r'(^|/)kernel$'
    prune_exclude: str = r'^((fc|classifier)(_\d+)?|heads|conv_proj)/'
    dense_output_layer: bool = True
    bn_mode: str = 'train'
    label_smoothing: float = 0.0
    protocol: str = 'stable'
    mask_freeze_fraction: float | None = None
    reestimation_steps: int | None = None
    swap_margin: float | None = None
    selection_rule: str | None = None
    selection_metric: str = 'top1'

    @property
    def lower_is_better(self) -> bool:
        return bool(LOWER_IS_BETTER.search(self.selection_metric))

    @property
    def selection_metric_is_fraction(self) -> bool:
        return bool(FRACTION_OF_EXAMPLES.search(self.selection_metric))

    def resolved(self, has_validation: bool) -> SearchSettings:
        """A copy with the options left at None set by the protocol, checked."""
        _check_choice('protocol', self.protocol, tuple(PROTOCOLS))
        defaults = PROTOCOLS[self.protocol]
        filled = {
            name: defaults[name]
            for name in ('mask_freeze_fraction', 'reestimation_steps', 'swap_margin')
            if getattr(self, name) is None
        }
        if self.selection_rule is None:
            filled['selection_rule'] = defaults['selection_rule'] if has_validation else 'last'
        settings = dataclasses.replace(self, **filled)
        settings.check(has_validation)
        return settings

    def check(self, has_validation: bool = True) -> None:
        """Raises ValueError naming the first bad option and its fix."""
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(
                f'sparsity must be a number in [0, 1) (the fraction of weights removed), got '
                f'{self.sparsity!r}'
            )
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f'sparsity must be in [0, 1), got {self.sparsity!r}; it is the fraction of '
                'prunable weights removed (0.9 keeps 10%)'
            )
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ValueError(f'epochs must be an integer >= 1, got {self.epochs!r}')
        if not (_is_number(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(
                f'learning_rate must be a finite number > 0, got {self.learning_rate!r}'
            )
        if not (_is_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f'weight_decay must be a finite number >= 0, got {self.weight_decay!r}'
            )
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f'momentum must be in [0, 1) (0 = none), got {self.momentum!r}')
        if not (_is_number(self.pruned_score) and 0 <= self.pruned_score < 1):
            raise ValueError(
                f'pruned_score must be in [0, 1) so magnitude-kept weights (score 1.0) rank '
                f'first, got {self.pruned_score!r}'
            )
        if not (_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise ValueError(f'label_smoothing must be in [0, 1), got {self.label_smoothing!r}')
        _check_choice('optimizer', self.optimizer, OPTIMIZERS)
        _check_choice('bn_mode', self.bn_mode, BN_MODES)
        for name in ('prune_include', 'prune_exclude'):
            check_regex(name, getattr(self, name))
        if self.mask_freeze_fraction is not None and not (
            _is_number(self.mask_freeze_fraction) and 0 <= self.mask_freeze_fraction < 1
        ):
            raise ValueError(
                'mask_freeze_fraction must be in [0, 1) (the fraction of the epochs with the '
                f'masks frozen), got {self.mask_freeze_fraction!r}'
            )
        if self.reestimation_steps is not None and not (
            _is_int(self.reestimation_steps) and self.reestimation_steps >= 0
        ):
            raise ValueError(
                'reestimation_steps must be >= 0 (an integer; 0: keep the running '
                f'statistics), got {self.reestimation_steps!r}'
            )
        if self.swap_margin is not None:
            if not (_is_number(self.swap_margin) and self.swap_margin >= 0):
                raise ValueError(
                    f'swap_margin must be >= 0 (0 = no margin), got {self.swap_margin!r}'
                )
            if self.swap_margin and self.mask_update != 'short_restriction':
                raise ValueError(
                    f'swap_margin={self.swap_margin!r} applies to the short restriction only, but '
                    f'mask_update is {self.mask_update!r}; set swap_margin=0, or choose the '
                    'short restriction'
                )
        if self.selection_rule is not None:
            _check_choice('selection_rule', self.selection_rule, selection.SELECTION_RULES)
            if self.selection_rule != 'last' and not has_validation:
                raise ValueError(
                    f'selection_rule={self.selection_rule!r} chooses on validation data, but '
                    'there is none: pass validation_batches= (held-out training examples, never '
                    'the test set; launcher: data.validation_fraction > 0), or '
                    "selection_rule='last'"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(choices)}')


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
