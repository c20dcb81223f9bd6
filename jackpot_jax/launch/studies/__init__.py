"""Research studies, one launcher mode each, over the same frozen weights.

``overlap`` compares a found jackpot with other pruning criteria; ``search_cost``,
``restriction``, ``sweep`` and ``stability`` run several searches side by side
(:mod:`jackpot_jax.launch.studies.common`).
"""
