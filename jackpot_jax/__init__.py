"""jackpot_jax: lottery jackpots in pre-trained Flax models.

A jackpot is a sparse sub-network of a frozen pre-trained model, found by learning one
score per prunable weight; no weight is ever trained. One call searches one::

    import jackpot_jax
    jackpot = jackpot_jax.find_jackpot(model, variables, batches, sparsity=0.9, epochs=5)
    jackpot.masks, jackpot.params, jackpot.statistics, jackpot.report

``model`` is a Linen module (with its ``variables``), an NNX module (``variables=None``)
or a forward function (:mod:`jackpot_jax.adapters`). For a loop of your own, the pieces
underneath are exported too: :func:`prunable_kernels`, :func:`plan_counts` (per-layer
counts), :func:`initial_masks_and_scores`, :func:`masked_params`, :func:`update_masks`,
:func:`init_search_state` and :func:`make_search_step` (any optax optimizer for the
scores). The launcher (``jackpot-jax``, ``python -m jackpot_jax.main``) runs on the same step.
"""

from jackpot_jax.adapters import Forward, linen_forward, split_nnx
from jackpot_jax.api import (
    Jackpot,
    evaluate,
    find_jackpot,
    initial_masks_and_scores,
    plan_counts,
    prunable_kernels,
)
from jackpot_jax.search import (
    SearchState,
    init_search_state,
    make_search_step,
    search_step,
    sgd_optimizer,
)
from jackpot_jax.sparsity import masked_params, sparsity_report, update_masks

__all__ = [
    'Forward',
    'Jackpot',
    'SearchState',
    'evaluate',
    'find_jackpot',
    'init_search_state',
    'initial_masks_and_scores',
    'linen_forward',
    'make_search_step',
    'masked_params',
    'plan_counts',
    'prunable_kernels',
    'search_step',
    'sgd_optimizer',
    'sparsity_report',
    'split_nnx',
    'update_masks',
]
