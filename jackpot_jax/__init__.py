"""jackpot_jax: lottery jackpots in pre-trained Flax models.

A jackpot is a sparse sub-network of a frozen pre-trained model, found by learning one
score per prunable weight; no weight is ever trained. One call searches one::

    import jackpot_jax
    jackpot = jackpot_jax.find_jackpot(model, variables, batches, sparsity=0.9, epochs=5)
    jackpot.masks, jackpot.params, jackpot.statistics, jackpot.report

``model`` is a Linen module (with its ``variables``), an NNX module (``variables=None``)
or a forward function (:mod:`jackpot_jax.core.adapters`). For a loop of your own, the pieces
underneath are exported too: :func:`plan_masks` (which kernels, and how many weights
each loses: a :class:`MaskPlan`), :func:`initial_masks_and_scores`,
:func:`masked_params`, :func:`update_masks`, :func:`init_search_state` and
:func:`make_search_step` (any optax optimizer for the scores). The launcher (``jackpot-jax``, ``python -m jackpot_jax.main``) runs on the same step.
"""

import importlib
from typing import Any

# Exported name -> the module that defines it. Imported on first use, so that importing
# a submodule (e.g. ``jackpot_jax.launch.config`` from a config file) does not import JAX.
_EXPORTS = {
    'Forward': 'core.adapters',
    'linen_forward': 'core.adapters',
    'split_nnx': 'core.adapters',
    'Jackpot': 'engine.api',
    'evaluate': 'engine.evaluation',
    'evaluate_metrics': 'engine.evaluation',
    'find_jackpot': 'engine.api',
    'load_jackpot': 'engine.api',
    'reestimate_statistics': 'engine.evaluation',
    'SearchSettings': 'core.settings',
    'MaskPlan': 'core.mask_plan',
    'initial_masks_and_scores': 'core.mask_plan',
    'plan_counts': 'core.mask_plan',
    'plan_masks': 'core.mask_plan',
    'prunable_kernels': 'core.mask_plan',
    'MaskSchedule': 'core.step',
    'SearchState': 'core.step',
    'init_search_state': 'core.step',
    'make_search_step': 'core.step',
    'search_step': 'core.step',
    'sgd_optimizer': 'core.step',
    'masked_params': 'core.sparsity',
    'sparsity_report': 'core.sparsity',
    'ranked_scores': 'core.sparsity',
    'scaled_scores': 'core.sparsity',
    'update_masks': 'core.sparsity',
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
