"""Prototypes of a faster exact k-th smallest value for the short-restriction mask update.

A k-th value search by bisection over the 32 bits of the sortable uint32 keys is 32
sequential counting passes, each a full read of the keys. Run per layer, one mask
update over L layers is 32 L dependent reductions (1696 for ResNet-50); the library
now runs one such search for all layers at once (``sparsity.kth_smallest_keys``).
The prototypes return exactly the same key (checked against numpy and the library):

  * ``kth_multiprobe``: every pass counts ``probes`` thresholds at once and shrinks the
    candidate interval (probes + 1)-fold: 8 passes with 15 probes instead of 32;
    ``probes=1`` is plain bisection.
  * ``guess=t_prev``: a first pass of exponentially spaced probes around a guess (the
    previous step's threshold) brackets the answer; ~4 more passes finish it.
  * ``bracket`` / :func:`sample_brackets`: a first pass at the two sample quantiles
    around k / n of a fixed strided sample; bisection then only resolves the bits
    inside the bracket (~16 passes instead of 32 on search-like scores).
  * ``kth_all_layers``: the same searches for every layer in ONE loop, over the keys of
    all layers laid out in fixed-size chunks (8 / ~5 / 18 / 32 iterations for the
    whole model instead of 32 per layer): what should matter on a GPU, where each
    iteration costs a kernel launch and a loop-condition round trip.
  * ``update_masks_fast``: the rate-'all' update on top of these.

Measured on XLA:CPU (jax 0.10): a reduction that counts several thresholds at once
compiles to a scalar loop ~60x slower than a one-threshold count, so the multi-probe
variants lose there; per-layer bisection from a sample bracket wins (1.3-1.6x). The
GPU numbers come from ``gpu_check.sh``.

    python -m benchmarks.kth_value_prototypes --check
    python -m benchmarks.kth_value_prototypes --profile --models=vgg19_cifar,resnet50
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax import sparsity

MAX_KEY = 0xFFFFFFFF
CHUNK = 1 << 14
# Exponentially spaced offsets around a guess: 4 bits apart, both sides, and the guess.
_WARM_OFFSETS = (
    tuple(-(1 << b) for b in range(30, -1, -4)) + (0,) + tuple(1 << b for b in range(2, 31, 4))
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# Reference and baselines.
# ----------------------------------------------------------------------------
def sortable_key_np(x: np.ndarray) -> np.ndarray:
    """numpy twin of ``sparsity.sortable_key``."""
    x = np.where(x == 0, np.float32(0), np.asarray(x, np.float32)).astype(np.float32)
    bits = x.view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def kth_numpy(keys: np.ndarray, k: int) -> int:
    """The exact answer: the k-th smallest (1-based)."""
    return int(np.partition(np.asarray(keys).ravel(), k - 1)[k - 1])


def kth_sort(keys: jax.Array, k: int) -> jax.Array:
    """Baseline: a full sort (XLA sort; a radix sort on GPU)."""
    return jnp.sort(keys)[k - 1]


# ----------------------------------------------------------------------------
# Multi-probe interval search (one layer).
# ----------------------------------------------------------------------------
def _offsets(width: jax.Array, probes: int) -> jax.Array:
    """``probes`` nondecreasing offsets in [0, width] splitting it (probes+1)-fold.

    uint32 throughout without overflow: step * probes < 2**32 for any width.
    """
    step = (width // jnp.uint32(probes + 1) + jnp.uint32(1))[..., None]
    j = jnp.arange(1, probes + 1, dtype=jnp.uint32)
    return jnp.minimum(step * j - jnp.uint32(1), width[..., None])


def _narrow(lo, hi, t, counts, k):
    """Keep the invariant #{< lo} < k <= #{<= hi} given counts #{<= t_j} (t sorted)."""
    enough = counts >= k[..., None]
    found = jnp.any(enough, axis=-1)
    j = jnp.argmax(enough, axis=-1)
    t_j = jnp.take_along_axis(t, j[..., None], axis=-1)[..., 0]
    t_before = jnp.take_along_axis(t, jnp.maximum(j - 1, 0)[..., None], axis=-1)[..., 0]
    new_hi = jnp.where(found, t_j, hi)
    new_lo = jnp.where(found, jnp.where(j > 0, t_before + jnp.uint32(1), lo), t[..., -1] + 1)
    return new_lo, new_hi


def _warm_thresholds(guess: jax.Array) -> jax.Array:
    """Saturating guess + offsets, sorted (the first, bracketing pass)."""
    out = []
    for d in _WARM_OFFSETS:
        if d < 0:
            out.append(jnp.where(guess >= jnp.uint32(-d), guess - jnp.uint32(-d), jnp.uint32(0)))
        else:
            out.append(
                jnp.where(
                    guess <= jnp.uint32(MAX_KEY - d), guess + jnp.uint32(d), jnp.uint32(MAX_KEY)
                )
            )
    return jnp.stack(out, axis=-1)


def _sample_guess(keys: jax.Array, k: Any, samples: int = 4096) -> jax.Array:
    """The matching quantile of a fixed strided sample (k may be traced)."""
    n = keys.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(samples, n)).astype(np.int64))
    pos = jnp.round(jnp.asarray(k, jnp.float32) * (idx.size / n)).astype(jnp.int32) - 1
    return jnp.sort(keys[idx])[jnp.clip(pos, 0, idx.size - 1)]


def kth_multiprobe(
    keys: jax.Array,
    k: Any,
    probes: int = 15,
    guess: jax.Array | None = None,
    sample_guess: bool = False,
    bracket: jax.Array | None = None,
    return_passes: bool = False,
):
    """Exact k-th smallest (1-based) of 1-D uint32 keys, optionally from a guessed key.

    ``bracket`` [2]: a first pass at a - 1 and b (see :func:`sample_brackets`).
    k may be traced; the loop runs until the interval is a single key.
    """
    k_arr = jnp.asarray(k, jnp.int32)

    def count_le(t):
        if t.shape[-1] <= 2:  # plain 1-D reductions (fast on XLA:CPU)
            return jnp.stack([jnp.sum(keys <= t[j], dtype=jnp.int32) for j in range(t.shape[-1])])
        return jnp.sum(keys[:, None] <= t[None, :], axis=0, dtype=jnp.int32)

    lo, hi, passes = jnp.uint32(0), jnp.uint32(MAX_KEY), jnp.int32(0)
    if sample_guess:
        guess = _sample_guess(keys, k)
    if guess is not None:
        t = _warm_thresholds(jnp.asarray(guess, jnp.uint32))
        lo, hi = _narrow(lo, hi, t, count_le(t), k_arr)
        passes += 1
    if bracket is not None:
        a, b = bracket[0], bracket[1]
        t = jnp.stack([jnp.where(a > 0, a - jnp.uint32(1), a), jnp.maximum(a, b)])
        lo, hi = _narrow(lo, hi, t, count_le(t), k_arr)
        passes += 1

    def body(c):
        lo, hi, passes = c
        t = lo + _offsets(hi - lo, probes)
        lo, hi = _narrow(lo, hi, t, count_le(t), k_arr)
        return lo, hi, passes + 1

    lo, hi, passes = jax.lax.while_loop(lambda c: c[1] > c[0], body, (lo, hi, passes))
    return (lo, passes) if return_passes else lo


# ----------------------------------------------------------------------------
# All layers at once, over fixed-size chunks.
# ----------------------------------------------------------------------------
def chunk_layout(sizes: Sequence[int], chunk: int = CHUNK) -> np.ndarray:
    """The layer of every chunk when each layer is cut into chunks of ``chunk`` (padded)."""
    return np.concatenate(
        [np.full(max(1, math.ceil(n / chunk)), i, np.int32) for i, n in enumerate(sizes)]
    )


def to_chunks(keys: Sequence[jax.Array], chunk: int = CHUNK) -> jax.Array:
    """Concatenate 1-D key arrays into [num_chunks, chunk], padding each with MAX_KEY."""
    parts = []
    for x in keys:
        pad = max(1, math.ceil(x.size / chunk)) * chunk - x.size
        parts.append(jnp.pad(x.ravel(), (0, pad), constant_values=jnp.uint32(MAX_KEY)))
    return jnp.concatenate(parts).reshape(-1, chunk)


def sample_brackets(
    keys: Sequence[jax.Array], ks: Sequence[int], samples: int = 16384, margin: float = 4.0
) -> jax.Array:
    """Per layer a likely bracket [a, b] of the k-th key, from a fixed strided sample.

    ``margin`` standard errors of the sample quantile either side; a = 0 / b = MAX_KEY
    where the bracket runs off the sample. Only a guess: the search checks it.
    """
    out = []
    for x, k in zip(keys, ks):
        n = x.size
        idx = np.unique(np.linspace(0, n - 1, min(samples, n)).astype(np.int64))
        m = idx.size
        q = k / n * m - 1
        d = margin * math.sqrt(max(q, 1.0) * (1 - min(k / n, 1 - 1 / m)))
        s = jnp.sort(x.ravel()[idx])
        lo_i, hi_i = math.floor(q - d), math.ceil(q + d)
        a = s[lo_i] if lo_i >= 0 else jnp.uint32(0)
        b = s[hi_i] if hi_i < m else jnp.uint32(MAX_KEY)
        out.append(jnp.stack([a, b]))
    return jnp.stack(out)


def kth_all_layers(
    chunks: jax.Array,
    layer_of_chunk: np.ndarray,
    ks: jax.Array,
    probes: int = 15,
    guess: jax.Array | None = None,
    bracket: jax.Array | None = None,
):
    """Exact k-th smallest key of every layer; returns (keys [L], passes).

    ``probes`` thresholds per pass (1: plain bisection, every layer in the same loop).
    ``guess`` [L]: a first pass of exponentially spaced probes around it (warm start).
    ``bracket`` [L, 2]: a first pass at a - 1 and b (e.g. from :func:`sample_brackets`).
    Either only saves passes: a wrong guess or bracket still gives the exact answer.
    Padding keys are MAX_KEY: they only count at a threshold of MAX_KEY, where the
    layer's own keys already reach k, so the answer is unchanged.
    """
    num_layers = ks.shape[0]
    seg = jnp.asarray(layer_of_chunk)

    def count_le(t):  # t [L, P] -> [L, P]
        if t.shape[-1] <= 2:  # one plain row reduction per threshold (fast on XLA:CPU)
            cols = [
                jnp.sum(chunks <= t[seg, j][:, None], axis=1, dtype=jnp.int32)
                for j in range(t.shape[-1])
            ]
            per_chunk = jnp.stack(cols, axis=-1)
        else:  # all thresholds in one read of the keys
            per_chunk = jnp.sum(chunks[:, :, None] <= t[seg][:, None, :], axis=1, dtype=jnp.int32)
        return jax.ops.segment_sum(per_chunk, seg, num_layers, indices_are_sorted=True)

    lo = jnp.zeros(num_layers, jnp.uint32)
    hi = jnp.full(num_layers, MAX_KEY, jnp.uint32)
    passes = jnp.int32(0)
    if guess is not None:
        t = _warm_thresholds(guess)
        lo, hi = _narrow(lo, hi, t, count_le(t), ks)
        passes += 1
    if bracket is not None:
        a, b = bracket[:, 0], bracket[:, 1]
        t = jnp.stack([jnp.where(a > 0, a - jnp.uint32(1), a), jnp.maximum(a, b)], axis=-1)
        lo, hi = _narrow(lo, hi, t, count_le(t), ks)
        passes += 1

    def body(c):
        lo, hi, passes = c
        t = lo[:, None] + _offsets(hi - lo, probes)
        lo, hi = _narrow(lo, hi, t, count_le(t), ks)
        return lo, hi, passes + 1

    lo, hi, passes = jax.lax.while_loop(lambda c: jnp.any(c[1] > c[0]), body, (lo, hi, passes))
    return lo, passes


def update_masks_fast(
    scores: Mapping[str, jax.Array],
    masks: Mapping[str, jax.Array],
    counts: Mapping[str, int],
    guess: jax.Array | None = None,
    probes: int = 15,
    sample_bracket: bool = False,
    per_layer: bool = False,
):
    """``sparsity.update_masks(scores, masks, counts, rate=None)`` on ``kth_all_layers``.

    With ``per_layer`` one :func:`kth_multiprobe` loop per layer instead (no chunking).
    Returns (new masks, changes per layer, thresholds [L] to pass as next step's guess).
    Layers with k == 0 are left alone, as in the library.
    """
    paths = [p for p in sorted(masks) if counts[p] > 0]
    keys = {p: sparsity.sortable_key(scores[p].ravel()) for p in paths}
    layout = chunk_layout([keys[p].size for p in paths])
    ks = jnp.asarray([counts[p] for p in paths], jnp.int32)
    bracket = None
    if sample_bracket:
        bracket = sample_brackets([keys[p] for p in paths], [counts[p] for p in paths])
    if per_layer:
        thresholds = jnp.stack(
            [
                kth_multiprobe(
                    keys[p],
                    counts[p],
                    probes,
                    guess=None if guess is None else guess[i],
                    bracket=None if bracket is None else bracket[i],
                )
                for i, p in enumerate(paths)
            ]
        )
    else:
        thresholds, _ = kth_all_layers(
            to_chunks([keys[p] for p in paths]), layout, ks, probes, guess, bracket
        )
    new = dict(masks)
    for i, p in enumerate(paths):
        above = keys[p] > thresholds[i]
        at_or_below = jnp.sum(~above, dtype=jnp.int32)
        new[p] = jnp.where(at_or_below == counts[p], above, masks[p].ravel()).reshape(
            masks[p].shape
        )
    changes = {p: jnp.sum(new[p] != masks[p], dtype=jnp.int32) for p in masks}
    return new, changes, thresholds


# ----------------------------------------------------------------------------
# Correctness.
# ----------------------------------------------------------------------------
def _test_arrays(rng: np.random.Generator) -> list[np.ndarray]:
    """Float32 score vectors with ties, signs, zeros and tiny / huge sizes."""
    n = 5000
    tied = np.where(rng.random(n) < 0.9, 0.99, 1.0).astype(np.float32)
    return [
        rng.normal(size=n).astype(np.float32),
        tied,
        tied + rng.normal(0, 1e-4, n).astype(np.float32) * (rng.random(n) < 0.5),
        np.concatenate([np.zeros(100), -np.zeros(100), rng.normal(size=300)]).astype(np.float32),
        np.full(257, 3.0, np.float32),
        np.array([1.5], np.float32),
        (rng.standard_cauchy(20000) * 1e30).astype(np.float32),
        rng.integers(-3, 4, 70000).astype(np.float32),
    ]


_jit_library = jax.jit(sparsity.kth_smallest_key)
_jit_sort = jax.jit(kth_sort)
_jit_multiprobe = jax.jit(
    kth_multiprobe, static_argnames=('probes', 'sample_guess', 'return_passes')
)


def check(seed: int = 0) -> dict[str, Any]:
    """Every prototype against numpy; update_masks_fast against the library."""
    rng = np.random.default_rng(seed)
    arrays = _test_arrays(rng)
    cases = 0
    for x in arrays:
        keys_np = sortable_key_np(x)
        keys = sparsity.sortable_key(jnp.asarray(x))
        assert np.array_equal(np.asarray(keys), keys_np), 'sortable_key twin differs'
        n = x.size
        ks = sorted({1, n, max(1, n // 2), max(1, int(0.9 * n)), int(rng.integers(1, n + 1))})
        for k in ks:
            want = kth_numpy(keys_np, k)
            k = jnp.int32(k)  # traced: one compile per size
            got = {
                'library': _jit_library(keys, k),
                'sort': _jit_sort(keys, k),
                'multiprobe15': _jit_multiprobe(keys, k),
                'multiprobe3': _jit_multiprobe(keys, k, probes=3),
                'sample_guess': _jit_multiprobe(keys, k, sample_guess=True),
                'exact_guess': _jit_multiprobe(keys, k, guess=jnp.uint32(want)),
                'far_guess': _jit_multiprobe(keys, k, guess=jnp.uint32(rng.integers(0, MAX_KEY))),
                'bisect_bracket': _jit_multiprobe(
                    keys, k, probes=1, bracket=sample_brackets([keys], [int(k)])[0]
                ),
                'bisect_wrong_bracket': _jit_multiprobe(
                    keys,
                    k,
                    probes=1,
                    bracket=jnp.sort(jnp.asarray(rng.integers(0, MAX_KEY, 2), jnp.uint32)),
                ),
            }
            for name, value in got.items():
                assert int(value) == want, (name, n, k, int(value), want)
            cases += 1
    # All layers at once, including a layer of exactly one chunk and ties across chunks.
    sizes = [5000, 1, CHUNK, CHUNK + 3, 257, 70000]
    layers = [
        arrays[0],
        arrays[5],
        rng.normal(size=CHUNK).astype(np.float32),
        np.where(rng.random(CHUNK + 3) < 0.5, 0.99, 1.0).astype(np.float32),
        arrays[4],
        arrays[7],
    ]
    assert [a.size for a in layers] == sizes
    keys_np = [sortable_key_np(a) for a in layers]
    ks = [int(rng.integers(1, n + 1)) for n in sizes]
    want = [kth_numpy(kn, k) for kn, k in zip(keys_np, ks)]
    chunks = to_chunks([jnp.asarray(kn) for kn in keys_np])
    good = sample_brackets([jnp.asarray(kn) for kn in keys_np], ks)
    wrong = jnp.asarray(rng.integers(0, MAX_KEY, (len(sizes), 2)), jnp.uint32)
    variants = {
        'probes15': {},
        'bisect': {'probes': 1},
        'probes3': {'probes': 3},
        'warm_exact': {'guess': jnp.asarray(want, jnp.uint32)},
        'warm_zero': {'guess': jnp.zeros(len(sizes), jnp.uint32)},
        'bracket': {'probes': 1, 'bracket': good},
        'bracket_wrong': {'probes': 1, 'bracket': wrong},
        'bracket_wrong_p15': {'bracket': jnp.sort(wrong, axis=1)},
    }
    for name, kw in variants.items():
        got, _ = kth_all_layers(chunks, chunk_layout(sizes), jnp.asarray(ks, jnp.int32), **kw)
        assert [int(g) for g in got] == want, (name, list(map(int, got)), want)
    # The full rate-'all' update against the library, over several simulated steps.
    shapes = {
        'a/kernel': (3, 3, 16, 32),
        'b/kernel': (3, 3, 32, 64),
        'c/kernel': (64, 10),
        'd/kernel': (1, 1, 8, 8),
    }
    kernels = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
    counts = {p: int(0.9 * math.prod(s)) for p, s in shapes.items()}
    counts['d/kernel'] = 0
    masks = sparsity.magnitude_masks(kernels, counts)
    scores = sparsity.init_scores(masks)
    guess = None
    for step in range(5):
        scores = {
            p: s
            + jnp.asarray(rng.normal(0, 3e-3, s.shape) * (rng.random(s.shape) < 0.7), jnp.float32)
            for p, s in scores.items()
        }
        want_masks, want_changes = sparsity.update_masks(scores, masks, counts, rate=None)
        got_masks, got_changes, guess = update_masks_fast(scores, masks, counts, guess)
        others = [
            update_masks_fast(scores, masks, counts, probes=1, sample_bracket=True),
            update_masks_fast(scores, masks, counts, probes=1, sample_bracket=True, per_layer=True),
        ]
        for p in masks:
            assert np.array_equal(np.asarray(got_masks[p]), np.asarray(want_masks[p])), (step, p)
            assert int(got_changes[p]) == int(want_changes[p])
            for other_masks, other_changes, _ in others:
                assert np.array_equal(np.asarray(other_masks[p]), np.asarray(want_masks[p]))
                assert int(other_changes[p]) == int(want_changes[p])
        masks = want_masks
    return {
        'kth_cases': cases,
        'all_layer_variants': len(variants),
        'update_steps': 5,
        'passed': True,
    }


# ----------------------------------------------------------------------------
# Profiling.
# ----------------------------------------------------------------------------
def _time(fns: Mapping[str, Any], reps: int) -> dict[str, float]:
    """Median ms per call, the functions interleaved (each compiled first)."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    samples = {name: [] for name in fns}
    names = list(fns)
    for i in range(reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def _scores_like_search(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, ...]:
    """Scores after some steps (1.0 / 0.99 init, drifted) and after one more step."""
    s = np.where(np.arange(n) < n - k, 1.0, 0.99)[rng.permutation(n)]
    s = (s + rng.normal(0, 2e-3, n)).astype(np.float32)
    s_next = (s * (1 - 0.1 * 5e-4) + rng.normal(0, 2e-4, n)).astype(np.float32)
    return s, s_next


def profile_layer_sizes(sizes: Sequence[int], reps: int, sparsity_level: float) -> list[dict]:
    """Per layer size: library bisection vs sort vs multi-probe (cold, sample, warm)."""
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        k = max(1, int(sparsity_level * n))
        prev, cur = _scores_like_search(rng, n, k)
        keys = sparsity.sortable_key(jnp.asarray(cur))
        warm = jnp.uint32(kth_numpy(sortable_key_np(prev), k))
        fns = {
            'library_bisect': jax.jit(lambda x: sparsity.kth_smallest_key(x, k)),
            'sort': jax.jit(lambda x: kth_sort(x, k)),
            'multiprobe15': jax.jit(lambda x: kth_multiprobe(x, k)),
            'multiprobe15_sample': jax.jit(lambda x: kth_multiprobe(x, k, sample_guess=True)),
            'multiprobe15_warm': jax.jit(lambda x, g: kth_multiprobe(x, k, guess=g)),
            'one_count_pass': jax.jit(lambda x: jnp.sum(x <= jnp.uint32(1 << 31), dtype=jnp.int32)),
        }
        calls = {name: functools.partial(fn, keys) for name, fn in fns.items()}
        calls['multiprobe15_warm'] = functools.partial(fns['multiprobe15_warm'], keys, warm)
        ms = _time(calls, reps)
        passes = {
            'cold': int(kth_multiprobe(keys, k, return_passes=True)[1]),
            'sample': int(kth_multiprobe(keys, k, sample_guess=True, return_passes=True)[1]),
            'warm': int(kth_multiprobe(keys, k, guess=warm, return_passes=True)[1]),
        }
        row = {
            'size': n,
            'k': k,
            'ms': ms,
            'multiprobe_passes': passes,
            'library_ns_per_element': 1e6 * ms['library_bisect'] / n,
        }
        rows.append(row)
        log(f'  n={n:>9,}: ' + ', '.join(f'{a} {b:.3f}' for a, b in ms.items()))
    return rows


def model_layer_sizes(name: str) -> dict[str, int]:
    """Prunable kernel sizes of a registered model (shapes only; nothing is computed)."""
    from benchmarks import search_step
    from jackpot_jax import models

    size = search_step.MODEL_DEFAULTS.get(name, search_step.IMAGENET_DEFAULTS)
    model = models.get_model(name, size[2])
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size[0], size[0], 3)), train=False)
    )
    params = shapes['params']
    flat = sparsity.flatten(params)
    return {p: math.prod(flat[p].shape) for p in sparsity.prunable_paths(params)}


def profile_model(name: str, reps: int, sparsity_level: float) -> dict[str, Any]:
    """The whole rate-'all' mask update of a model: library vs ``update_masks_fast``."""
    sizes = model_layer_sizes(name)
    rng = np.random.default_rng(1)
    counts = {p: int(sparsity_level * n) for p, n in sizes.items()}
    prev, cur, masks = {}, {}, {}
    for p, n in sizes.items():
        a, b = _scores_like_search(rng, n, counts[p])
        prev[p], cur[p] = jnp.asarray(a), jnp.asarray(b)
        masks[p] = ~sparsity.select_smallest(sparsity.sortable_key(prev[p]), counts[p])
    _, _, warm = jax.jit(functools.partial(update_masks_fast, counts=counts))(prev, masks)
    variants = {
        'batched_bisect': {'probes': 1},
        'batched_bisect_sample_bracket': {'probes': 1, 'sample_bracket': True},
        'per_layer_bisect_sample_bracket': {'probes': 1, 'sample_bracket': True, 'per_layer': True},
        'batched_probes15': {'probes': 15},
        'batched_probes15_warm': {'probes': 15, 'guess': warm},
    }
    library = jax.jit(functools.partial(sparsity.update_masks, counts=counts, rate=None))
    want = library(cur, masks)[0]
    calls = {'library_update_masks': lambda: library(cur, masks)}
    for vname, kw in variants.items():
        guess = kw.pop('guess', None)
        fn = jax.jit(lambda s, m, g, kw=kw: update_masks_fast(s, m, counts, guess=g, **kw))
        got = fn(cur, masks, guess)[0]
        assert all(np.array_equal(np.asarray(got[p]), np.asarray(want[p])) for p in want), vname
        calls[vname] = functools.partial(fn, cur, masks, guess)
    # Passes each variant needs on these scores (one pass = one read of all keys).
    paths = sorted(sizes)
    keys = [sparsity.sortable_key(cur[p]) for p in paths]
    chunks, layout = to_chunks(keys), chunk_layout([sizes[p] for p in paths])
    ks = jnp.asarray([counts[p] for p in paths], jnp.int32)
    passes = {
        'library_update_masks': 32 * len(paths),
        'batched_bisect': int(kth_all_layers(chunks, layout, ks, 1)[1]),
        'batched_bisect_sample_bracket': int(
            kth_all_layers(
                chunks, layout, ks, 1, bracket=sample_brackets(keys, [counts[p] for p in paths])
            )[1]
        ),
        'per_layer_bisect_sample_bracket': sum(
            int(kth_multiprobe(x, counts[p], 1, bracket=b, return_passes=True)[1])
            for x, p, b in zip(keys, paths, sample_brackets(keys, [counts[p] for p in paths]))
        ),
        'batched_probes15': int(kth_all_layers(chunks, layout, ks, 15)[1]),
        'batched_probes15_warm': int(kth_all_layers(chunks, layout, ks, 15, guess=warm)[1]),
    }
    ms = _time(calls, reps)
    log(f'  {name}: ' + ', '.join(f'{a} {b:.2f} ms' for a, b in ms.items()))
    return {
        'model': name,
        'layers': len(sizes),
        'weights': sum(sizes.values()),
        'largest_layer': max(sizes.values()),
        'ms': ms,
        'identical_masks': True,
        'loop_iterations': passes,
        'speedup': {v: ms['library_update_masks'] / ms[v] for v in variants},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--check', action='store_true', help='correctness against numpy / library')
    p.add_argument('--profile', action='store_true', help='time per layer size and per model')
    p.add_argument(
        '--sizes',
        default='1728,36864,147456,589824,2359296',
        help='layer sizes to profile (VGG-19 / ResNet-50 range)',
    )
    p.add_argument('--models', default='vgg19_cifar,resnet50')
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--sparsity', type=float, default=0.9)
    args = p.parse_args(argv)
    out: dict[str, Any] = {
        'benchmark': 'kth_value_prototypes',
        'jax': jax.__version__,
        'platform': jax.devices()[0].platform,
    }
    if args.check or not args.profile:
        out['check'] = check()
        log(f'check: {out["check"]}')
    if args.profile:
        sizes = [int(s) for s in args.sizes.split(',') if s]
        out['layer_sizes'] = profile_layer_sizes(sizes, args.reps, args.sparsity)
        out['models'] = [
            profile_model(m, args.reps, args.sparsity) for m in args.models.split(',') if m
        ]
    print(json.dumps(out, indent=2))
    return out


if __name__ == '__main__':
    main()
