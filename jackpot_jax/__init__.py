"""jackpot_jax: lottery jackpots in pre-trained Flax models.

A jackpot is a sparse sub-network of a frozen pre-trained model, found by learning one
score per prunable weight; no weight is ever trained. One call searches one::

    import jackpot_jax
    jackpot = jackpot_jax.find_jackpot(model, variables, batches, sparsity=0.9, epochs=5)
    jackpot.masks, jackpot.params, jackpot.statistics, jackpot.report

``model`` is a Linen module (with its ``variables``), an NNX module (``variables=None``)
or a forward function (:mod:`jackpot_jax.adapters`). For a loop of your own, the pieces
underneath are exported too: :func:`plan_masks` (which kernels, and how many weights
each loses: a :class:`MaskPlan`), :func:`initial_masks_and_scores`,
:func:`masked_params`, :func:`update_masks`, :func:`init_search_state` and
:func:`make_search_step` (any optax optimizer for the scores). The launcher (``jackpot-jax``, ``python -m jackpot_jax.main``) runs on the same step.
"""

import importlib
from typing import Any

# Exported name -> the module that defines it. Imported on first use, so that importing
# a submodule (e.g. ``jackpot_jax.config`` from a config file) does not import JAX.
_EXPORTS = {
    'Forward': 'adapters',
    'linen_forward': 'adapters',
    'split_nnx': 'adapters',
    'Jackpot': 'api',
    'evaluate': 'evaluation',
    'evaluate_metrics': 'evaluation',
    'find_jackpot': 'api',
    'load_jackpot': 'api',
    'reestimate_statistics': 'evaluation',
    'SearchSettings': 'settings',
    'MaskPlan': 'mask_plan',
    'initial_masks_and_scores': 'mask_plan',
    'plan_counts': 'mask_plan',
    'plan_masks': 'mask_plan',
    'prunable_kernels': 'mask_plan',
    'SearchState': 'search',
    'init_search_state': 'search',
    'make_search_step': 'search',
    'search_step': 'search',
    'sgd_optimizer': 'search',
    'masked_params': 'sparsity',
    'sparsity_report': 'sparsity',
    'update_masks': 'sparsity',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
