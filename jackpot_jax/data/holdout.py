"""How many training examples a validation fraction holds out (every data source's rule)."""

from __future__ import annotations


def validation_count(fraction: float, num_train: int) -> int:
    """``round(fraction * num_train)`` examples (at least one when ``fraction > 0``).

    ValueError, naming the value and the fix, for a fraction outside [0, 1) or one that
    would leave no training example.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f'data.validation_fraction must be in [0, 1), got {fraction!r}; it is the share '
            'of the training images held out for choosing epochs and settings (e.g. 0.1)'
        )
    if fraction == 0.0:
        return 0
    count = max(1, round(fraction * num_train))
    if count >= num_train:
        raise ValueError(
            f'data.validation_fraction={fraction!r} leaves no training images out of '
            f'{num_train}; lower it'
        )
    return count
