"""Mask planning: which kernels a search prunes, how many weights each loses, and the
first masks and scores, from explicit arguments (no config).

A :class:`MaskPlan` is made once per search by :func:`plan_masks`; the N:M pattern is
parsed there into a typed :class:`~jackpot_jax.core.structured.NByM` (or None for
unstructured masks), and every mask rule below dispatches on it: unstructured rules
from :mod:`jackpot_jax.core.sparsity`, N:M ones from :mod:`jackpot_jax.core.structured`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax.core import sparsity as sparsity_lib, structured
from jackpot_jax.core.structured import NByM

Pattern = str | Sequence[int] | None


def prunable_kernels(
    params: Mapping,
    include: str = sparsity_lib.DEFAULT_INCLUDE,
    exclude: str | None = sparsity_lib.DEFAULT_EXCLUDE,
) -> dict[str, jax.Array]:
    """The kernels a search prunes, keyed by their '/'-joined parameter path."""
    flat = sparsity_lib.flatten(params)
    return {p: flat[p] for p in sparsity_lib.prunable_paths(params, include, exclude)}


def plan_counts(
    kernels: Mapping[str, jax.Array],
    sparsity: float,
    allocation: str = 'global_magnitude',
    pattern: Pattern = None,
) -> dict[str, int]:
    """Per-layer pruned counts: the allocation's, or (M - N) / M of every eligible layer
    under an N:M ``pattern`` (which then fixes the sparsity)."""
    nm = structured.parse_pattern(pattern)
    if nm:
        return structured.nm_counts({p: np.shape(w) for p, w in kernels.items()}, *nm)
    return sparsity_lib.pruned_counts(jax.device_get(dict(kernels)), sparsity, allocation)


def _magnitude_masks(
    kernels: Mapping[str, jax.Array], counts: Mapping[str, int], pattern: Pattern = None
) -> dict[str, jax.Array]:
    """The smallest-|w| weights pruned at the given counts (within groups under N:M)."""
    nm = structured.parse_pattern(pattern)
    if nm:
        return structured.magnitude_masks(kernels, counts, *nm)
    return sparsity_lib.magnitude_masks(kernels, counts)


def _random_masks(
    rng: jax.Array,
    kernels: Mapping[str, jax.Array],
    counts: Mapping[str, int],
    pattern: Pattern = None,
) -> dict[str, jax.Array]:
    """Uniformly random masks at the given counts (N:M ones under a pattern)."""
    nm = structured.parse_pattern(pattern)
    if nm:
        return structured.random_masks(rng, kernels, counts, *nm)
    return sparsity_lib.random_masks(rng, kernels, counts)


def _masks_from_scores(
    scores: Mapping[str, jax.Array],
    counts: Mapping[str, int],
    pattern: Pattern = None,
    mask_update: str = 'short_restriction',
) -> dict[str, jax.Array]:
    """The masks the update rule picks from fresh scores (within groups under N:M)."""
    nm = structured.parse_pattern(pattern)
    if nm:
        return structured.masks_from_scores(scores, counts, *nm, mode=mask_update)
    return sparsity_lib.masks_from_scores(scores, counts, mask_update)


def _jitted(fn: Callable, counts: Mapping[str, int], **options: Any) -> Callable:
    """``fn`` jitted with these counts and options: one compilation per model and plan,
    however many times it is planned."""
    return _jitted_on_items(fn, tuple((p, int(c)) for p, c in counts.items()), **options)


@functools.lru_cache(maxsize=64)
def _jitted_on_items(
    fn: Callable, counts: tuple[tuple[str, int], ...], **options: Any
) -> Callable:
    return jax.jit(functools.partial(fn, counts=dict(counts), **options))


def initial_masks_and_scores(
    kernels: Mapping[str, jax.Array],
    counts: Mapping[str, int],
    score_init: str = 'magnitude',
    *,
    pattern: Pattern = None,
    mask_update: str = 'short_restriction',
    pruned_score: float = 0.99,
    rng: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The first masks and scores of a search.

    'magnitude' (the paper): the magnitude masks, scored 1 where kept and
    ``pruned_score`` where pruned. 'kaiming' (edge-popup) and 'random' (U(0, 1)) draw the
    scores from ``rng`` and start from the masks the update rule picks from them. The
    per-layer counts are the same in all three.
    """
    nm = structured.parse_pattern(pattern)
    if score_init == 'magnitude':
        masks = _jitted(_magnitude_masks, counts, pattern=nm)(kernels)
        return masks, sparsity_lib.init_scores(masks, pruned_score)
    draw = {'kaiming': sparsity_lib.kaiming_scores, 'random': sparsity_lib.uniform_scores}
    if score_init not in draw:
        raise ValueError(
            f'unknown score_init {score_init!r}; choose one of {sparsity_lib.SCORE_INITS}'
        )
    scores = jax.jit(draw[score_init])(jax.random.key(0) if rng is None else rng, kernels)
    pick = _jitted(_masks_from_scores, counts, pattern=nm, mask_update=mask_update)
    return pick(scores), scores


def mask_report(
    params: Mapping, masks: Mapping[str, Any], pattern: Pattern = None
) -> dict[str, Any]:
    """``sparsity.sparsity_report``, plus the N:M check under a pattern."""
    report = sparsity_lib.sparsity_report(params, masks)
    nm = structured.parse_pattern(pattern)
    if nm:
        report.update(structured.pattern_report(masks, *nm))
    return report


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """What a search prunes: the kernel paths, their pruned counts and the pattern."""

    paths: tuple[str, ...]
    counts: dict[str, int]
    pattern: NByM | None

    def kernels(self, params: Mapping) -> dict[str, jax.Array]:
        flat = sparsity_lib.flatten(params)
        return {p: flat[p] for p in self.paths}

    def magnitude_masks(self, params: Mapping) -> dict[str, jax.Array]:
        fn = _jitted(_magnitude_masks, self.counts, pattern=self.pattern)
        return fn(self.kernels(params))

    def random_masks(self, params: Mapping, rng: jax.Array) -> dict[str, jax.Array]:
        fn = _jitted(_random_masks, self.counts, pattern=self.pattern)
        return fn(rng, self.kernels(params))

    def initial_masks_and_scores(
        self,
        params: Mapping,
        score_init: str = 'magnitude',
        *,
        mask_update: str = 'short_restriction',
        pruned_score: float = 0.99,
        rng: jax.Array | None = None,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        return initial_masks_and_scores(
            self.kernels(params),
            self.counts,
            score_init,
            pattern=self.pattern,
            mask_update=mask_update,
            pruned_score=pruned_score,
            rng=rng,
        )

    def report(self, params: Mapping, masks: Mapping[str, Any]) -> dict[str, Any]:
        return mask_report(params, masks, self.pattern)

    def checked_masks(self, masks: Mapping[str, Any], params: Mapping) -> dict[str, jax.Array]:
        """Given masks (e.g. another criterion's) as bool arrays, checked against the plan:
        one per prunable kernel, of its shape, pruning its count. The result holds copies:
        the search's step consumes (donates) its state, never the caller's arrays."""
        if not isinstance(masks, Mapping):
            raise ValueError(
                f'initial_masks must be a dict {{path: bool array}} (e.g. another jackpot\'s '
                f'.masks), got a {type(masks).__name__}; key each mask by its kernel\'s path, '
                "such as 'hidden/kernel'"
            )
        kernels = self.kernels(params)
        if set(masks) != set(kernels):
            raise ValueError(
                f'initial_masks cover {sorted(masks)}, but the search prunes {sorted(kernels)}; '
                'give one mask per prunable kernel'
            )
        out = {}
        for path, mask in masks.items():
            mask = jnp.array(mask, bool)  # a copy, even of a bool jax.Array
            pruned = int(mask.size - jnp.sum(mask))
            if mask.shape != kernels[path].shape or pruned != self.counts[path]:
                raise ValueError(
                    f'initial_masks[{path!r}] has shape {mask.shape} and prunes {pruned} weights; '
                    f'the search needs shape {kernels[path].shape} pruning {self.counts[path]} '
                    '(its per-layer count): build the masks at these counts'
                )
            out[path] = mask
        return out

    def checked_scores(
        self,
        scores: Mapping[str, Any],
        params: Mapping,
        masks: Mapping[str, Any] | None = None,
        mask_update: str = 'short_restriction',
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Given first scores (e.g. :func:`sparsity.ranked_scores`), ``(masks, scores)``
        checked against the plan: the masks are those the update rule picks from the
        scores, and ``masks`` given (checked already) must be those, or the first update
        would change them before any gradient. The scores are float32 copies."""
        kernels = self.kernels(params)
        if not isinstance(scores, Mapping) or set(scores) != set(kernels):
            got = sorted(scores) if isinstance(scores, Mapping) else type(scores).__name__
            raise ValueError(
                f'initial_scores cover {got}, but the search prunes {sorted(kernels)}; give '
                'one float array per prunable kernel, keyed by its path'
            )
        out = {}
        for path, value in scores.items():
            out[path] = jnp.array(value, jnp.float32)
            if out[path].shape != kernels[path].shape:
                raise ValueError(
                    f'initial_scores[{path!r}] has shape {out[path].shape}; the kernel has '
                    f'{kernels[path].shape}'
                )
        picked = _jitted(_masks_from_scores, self.counts, pattern=self.pattern,
                         mask_update=mask_update)(out)  # fmt: skip
        if masks is not None:
            moved = sorted(p for p in picked if not bool(jnp.array_equal(picked[p], masks[p])))
            if moved:
                raise ValueError(
                    f'initial_scores pick other masks than initial_masks in {moved[:3]}: every '
                    'kept weight must outscore every pruned one of its layer (of its group '
                    'under N:M); build them with ranked_scores(initial_masks, criterion) or '
                    'scaled_scores'
                )
        return picked, out


def plan_masks(
    params: Mapping,
    sparsity: float,
    allocation: str = 'global_magnitude',
    pattern: Pattern = None,
    include: str = sparsity_lib.DEFAULT_INCLUDE,
    exclude: str | None = sparsity_lib.DEFAULT_EXCLUDE,
    *,
    model_name: str = 'the model',
) -> MaskPlan:
    """Plans a search's masks over ``params``; an N:M pattern that prunes nothing raises."""
    nm = structured.parse_pattern(pattern)
    kernels = prunable_kernels(params, include, exclude)
    counts = plan_counts(kernels, sparsity, allocation, nm)
    if nm and not any(counts.values()):
        channels = {p: int(w.shape[-2]) for p, w in kernels.items() if w.ndim >= 2}
        raise ValueError(
            f'search.pattern {str(nm)!r} prunes nothing on {model_name}: no prunable layer '
            f'has input channels divisible by {nm.m} (input channels: {channels}); pick an M '
            "that divides some of them, or search.pattern=''"
        )
    return MaskPlan(tuple(kernels), counts, nm)
