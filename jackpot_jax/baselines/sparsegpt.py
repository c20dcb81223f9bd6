"""SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning of one linear layer.

For a Flax kernel W of shape (in, out) and calibration inputs X (n, in), the layer's
reconstruction error ||X W - X W'||^2 has the Hessian H = 2 X^T X / n over W's input
dims (:func:`accumulate_hessian`, or :func:`input_gram` for the plain sum: a scale of H
changes nothing below). :func:`sparsegpt_layer` then follows the paper:

  1. Dead inputs (diag(H) = 0, an input that is always 0) get diag 1 and their kernel
     rows set to 0; H is damped by ``percdamp * mean(diag(H))`` on its diagonal.
  2. U is the upper Cholesky factor of H^-1 (H^-1 = U^T U). Its row j carries the
     inverse Hessian of the inputs j..in-1 once the inputs before j are fixed, so one
     pass over the inputs in order applies every optimal-brain-surgeon update.
  3. The inputs (the paper's columns; the kernel's rows here) are processed in blocks
     of ``blocksize``. A block's mask is chosen from its current weights by the
     saliency w^2 / U_jj^2 (lowest pruned); then input by input, the pruned weights of
     input j are zeroed and their error err = (w_j - q_j) / U_jj is spread over the
     block's later inputs (w_r -= U_jr err); after the block, the block's errors reach
     all later inputs at once (W[rest] -= U[block, rest]^T Err, the lazy batch update).

Unstructured (``count=k``): the layer prunes exactly k weights. The paper prunes the
same fraction p of every block (over all outputs of the block's inputs together);
here p = k / (in * out) and the block of inputs [s, e) prunes
``floor(k * e / in) - floor(k * s / in)`` weights (:func:`block_counts`): a share
proportional to its number of inputs, and the shares telescope to exactly k. Within a
block the k_b lowest saliencies are pruned, ties: the lower flat kernel index first.

N:M (``pattern='2:4'``, the project's convention: N KEPT of every M): groups of M
consecutive inputs of each output, as in :mod:`jackpot_jax.core.structured`. As in the
paper, each group's mask is chosen when the pass reaches it (from the weights updated
by everything before), pruning its M - N lowest saliencies per output (ties: the lower
input first). ``blocksize`` must divide by M so that no group straddles two blocks.

Two baseline rows come from one solve, at the same per-layer counts as a jackpot:
``sparsegpt`` is the updated kernel (the returned ``updated_kernel``, already zero where
the mask prunes), and ``sparsegpt (mask only)`` is the returned mask applied to the
ORIGINAL frozen kernel (``kernel * mask``), which is the comparable row for a jackpot:
same frozen weights, only the choice of mask differs.

Everything is float32 and ``jax.jit``-compatible with static shapes: the full blocks
run in one ``lax.scan``, the inputs within a block in ``lax.fori_loop``; a last,
shorter block (in not a multiple of ``blocksize``) has its own trace.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jackpot_jax.baselines import calibration
from jackpot_jax.core import sparsity, structured
from jackpot_jax.core.errors import UserError

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# The Hessian of a layer's reconstruction error.
# ----------------------------------------------------------------------------
def _input_rows(inputs: Array, in_features: int | None = None) -> Array:
    x = jnp.asarray(inputs)
    if x.ndim < 1 or (in_features is not None and x.shape[-1] != in_features):
        expected = 'in' if in_features is None else in_features
        raise UserError(
            f'sparsegpt: layer inputs of shape {tuple(x.shape)} do not end in the kernel\'s '
            f'{expected} input features; pass the inputs of that Dense layer, shaped (..., in)'
        )
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def input_gram(inputs: Array) -> Array:
    """X^T X over every position of ``inputs`` (..., in): shape (in, in), float32.

    The full Gram matrix of a Dense layer's input features; its diagonal is what
    Wanda keeps (:func:`jackpot_jax.baselines.calibration.square_sums`). Traceable.
    """
    x = _input_rows(inputs)
    return jnp.matmul(x.T, x, precision=_HIGHEST)


def accumulate_hessian(
    inputs: Array, hessian: Array | None = None, positions: int = 0
) -> tuple[Array, int]:
    """Adds one calibration batch to the running H = (2 / n) sum_x x x^T of a Dense layer.

    ``inputs`` (..., in) are the layer's inputs in one batch, every leading position a
    sample x; ``hessian`` and ``positions`` are what the previous call returned (None and
    0 at first). Returns the new (H, n). Kept as a running mean, as the paper's code does,
    so the entries stay of order x^2 whatever the number of batches. Traceable.
    """
    if (hessian is None) != (positions == 0):
        given = 'None' if hessian is None else 'given'
        raise UserError(
            f'sparsegpt: positions={positions!r} with hessian={given}; pass both from the '
            'previous call, or neither for the first batch'
        )
    x = _input_rows(inputs, None if hessian is None else hessian.shape[-1])
    total = int(positions) + x.shape[0]
    if total == 0:
        raise UserError('sparsegpt: a calibration batch with no positions; pass some inputs')
    gram = jnp.matmul(x.T, x, precision=_HIGHEST) * (2.0 / total)
    if hessian is None:
        return gram, total
    if hessian.shape != gram.shape:
        raise UserError(
            f'sparsegpt: the running Hessian has shape {tuple(hessian.shape)} but these inputs '
            f'have {x.shape[-1]} features; keep one Hessian per layer'
        )
    return hessian * (positions / total) + gram, total


# ----------------------------------------------------------------------------
# The per-block pruned counts.
# ----------------------------------------------------------------------------
def block_counts(in_features: int, count: int, blocksize: int) -> list[int]:
    """Unstructured: the weights pruned in each block of ``blocksize`` inputs.

    The block of inputs [s, e) prunes ``floor(k e / in) - floor(k s / in)``, the share of
    its inputs in exact integer arithmetic; the counts sum to exactly k, and each is at
    most the block's ``(e - s) * out`` weights since k <= in * out.
    """
    ends = list(range(blocksize, in_features, blocksize)) + [in_features]
    starts = [0] + ends[:-1]
    return [count * e // in_features - count * s // in_features for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------
# The solve.
# ----------------------------------------------------------------------------
def _select_lowest(saliency: Array, k: Array) -> Array:
    """Keep-mask of a window: its ``k`` lowest saliencies pruned, ties: the lower flat index
    first (``sparsity.select_smallest``: 32 counting passes, cheaper than a sort on CPU)."""
    keys = sparsity.sortable_key(saliency.reshape(-1))
    return ~sparsity.select_smallest(keys, k).reshape(saliency.shape)


def _select_nm(n: int, m: int):
    def select(saliency: Array, k: Array) -> Array:
        """Keep-mask of one group of M inputs (rows) per output: its M - N lowest
        saliencies pruned, ties: the lower input first (as ``structured``'s masks)."""
        del k
        return structured.prune_smallest_in_groups(sparsity.sortable_key(saliency), n, m)

    return select


def _block(w1: Array, u1: Array, k: Array, window: int, select) -> tuple[Array, Array, Array]:
    """One block of inputs (rows of ``w1``): returns (pruned weights Q1, errors, mask).

    The mask of each ``window`` of consecutive inputs (the whole block, or one N:M group)
    is chosen when the pass reaches it; then every input j of the window is pruned and
    its scaled error spread over the block's later inputs through row j of ``u1``.
    """
    size, outs = w1.shape
    d = jnp.diagonal(u1)

    def per_input(j, carry):
        w1, err1, mask1 = carry
        wj, dj = w1[j], d[j]
        qj = jnp.where(mask1[j], wj, 0.0)
        ej = (wj - qj) / dj
        # u1 is upper triangular, so rows before j are untouched; row j becomes q_j.
        w1 = w1 - u1[j][:, None] * ej[None, :]
        return w1.at[j].set(qj), err1.at[j].set(ej), mask1

    def per_window(g, carry):
        w1, err1, mask1 = carry
        start = g * window
        wg = lax.dynamic_slice_in_dim(w1, start, window)
        dg = lax.dynamic_slice_in_dim(d, start, window)
        saliency = jnp.square(wg) / jnp.square(dg)[:, None]
        mask1 = lax.dynamic_update_slice_in_dim(mask1, select(saliency, k), start, 0)
        return lax.fori_loop(start, start + window, per_input, (w1, err1, mask1))

    carry = (w1, jnp.zeros_like(w1), jnp.ones((size, outs), bool))
    return lax.fori_loop(0, size // window, per_window, carry)


def _upper_inverse_factor(h: Array) -> Array:
    """U upper triangular with U^T U = h^-1 (h symmetric positive definite), without
    forming h^-1: with P the order reversal and P h P = L L^T, U = P L^-1 P. One Cholesky
    and one triangular inverse, where inverting h and factoring h^-1 again take two of
    each; U is the same (the factor with a positive diagonal is unique)."""
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    inverse = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    return jnp.triu(inverse[::-1, ::-1])


@functools.partial(jax.jit, static_argnames=('nm', 'blocksize'))
def _solve(
    kernel: Array,
    hessian: Array,
    percdamp: Array,
    counts: Array,
    *,
    nm: tuple[int, int] | None,
    blocksize: int,
) -> tuple[Array, Array, Array]:
    """(mask, updated kernel, all finite) of one layer; ``counts`` per block (unstructured)
    are traced, so layers of one shape share a compilation whatever their counts."""
    w = kernel.astype(jnp.float32)
    h = hessian.astype(jnp.float32)
    size, outs = w.shape
    diag = jnp.diagonal(h)
    dead = diag == 0
    index = jnp.arange(size)
    h = h.at[index, index].set(jnp.where(dead, 1.0, diag))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h.at[index, index].add(percdamp * jnp.mean(jnp.diagonal(h)))
    u = _upper_inverse_factor(h)

    window, select = (None, _select_lowest) if nm is None else (nm[1], _select_nm(*nm))
    k = counts.astype(jnp.int32)
    full, rest = divmod(size, blocksize)

    def per_block(w, b):
        start = b * blocksize
        w1 = lax.dynamic_slice_in_dim(w, start, blocksize)
        u1 = lax.dynamic_slice(u, (start, start), (blocksize, blocksize))
        q1, err1, mask1 = _block(w1, u1, k[b], window or blocksize, select)
        later = jnp.where(
            index >= start + blocksize, lax.dynamic_slice_in_dim(u, start, blocksize), 0
        )
        w = w - jnp.matmul(later.T, err1, precision=_HIGHEST)
        return w, (q1, mask1)

    w, (q, mask) = lax.scan(per_block, w, jnp.arange(full))
    q = q.reshape(full * blocksize, outs)
    mask = mask.reshape(full * blocksize, outs)
    if rest:
        start = full * blocksize
        q1, _, mask1 = _block(w[start:], u[start:, start:], k[full], window or rest, select)
        q = jnp.concatenate([q, q1])
        mask = jnp.concatenate([mask, mask1])
    finite = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(q))
    return mask, q, finite


def _check_int(name: str, value: object, low: int, high: int | None, fix: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bounds = f'{low} <= {name}' + ('' if high is None else f' <= {high}')
        raise UserError(
            f'sparsegpt: {name}={value!r} is out of range; need an integer {bounds}; {fix}'
        )
    return int(value)


def sparsegpt_layer(
    kernel: Array,
    hessian: Array,
    *,
    count: int | None = None,
    pattern: str | Sequence[int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Array, Array]:
    """SparseGPT on one Dense kernel (in, out): returns ``(mask, updated_kernel)``.

    ``hessian`` (in, in) comes from the layer's calibration inputs
    (:func:`accumulate_hessian`). Give either ``count`` (the layer prunes exactly that
    many weights, spread over the blocks by :func:`block_counts`) or an N:M ``pattern``
    ('2:4': N kept of every M consecutive inputs of each output). The mask is True where
    a weight is kept; ``updated_kernel`` is float32, zero where the mask prunes, with the
    kept weights corrected for the pruned ones. The mask-only baseline is
    ``kernel * mask`` on the original kernel. Shapes, ``count``, ``pattern`` and
    ``blocksize`` are static; the call is traceable. Called outside a trace, a non-finite
    solve (a damped Hessian not positive definite in float32) raises FloatingPointError.
    """
    shape = tuple(np.shape(kernel))
    if len(shape) != 2:
        raise UserError(
            f'sparsegpt: the kernel has shape {shape}; it needs a Dense kernel (in, out)'
        )
    size, outs = shape
    if tuple(np.shape(hessian)) != (size, size):
        raise UserError(
            f'sparsegpt: the Hessian has shape {tuple(np.shape(hessian))} but the kernel '
            f'{shape} needs ({size}, {size}): one entry per pair of its input features'
        )
    blocksize = _check_int('blocksize', blocksize, 1, None, 'the paper uses 128')
    if isinstance(percdamp, bool) or not (
        isinstance(percdamp, (int, float, np.floating)) and 0 <= percdamp < float('inf')
    ):
        raise UserError(f'sparsegpt: percdamp={percdamp!r} must be a finite float >= 0; e.g. 0.01')
    try:
        parsed = structured.parse_pattern(pattern)
    except ValueError:
        raise UserError(
            f'sparsegpt: pattern={pattern!r} is not N:M with integers 1 <= N < M (N kept of '
            "every M inputs); use e.g. '2:4'"
        ) from None
    if (count is None) == (parsed is None):
        raise UserError(
            f'sparsegpt: give exactly one of count= or pattern= (got count={count!r}, '
            f'pattern={pattern!r})'
        )
    blocksize = min(blocksize, size)
    counts, nm = [0] * -(-size // blocksize), None
    if count is not None:
        count = _check_int('count', count, 0, size * outs, f'a {shape} kernel has {size * outs}')
        counts = block_counts(size, count, blocksize)
    else:
        nm = (parsed.n, parsed.m)
        if size % nm[1]:
            raise UserError(
                f'sparsegpt: pattern {pattern!r} needs the inputs in groups of {nm[1]}, but the '
                f'kernel {shape} has {size} inputs; leave this layer dense or pick another M'
            )
        if blocksize % nm[1]:
            raise UserError(
                f'sparsegpt: blocksize={blocksize} does not divide by M={nm[1]} of pattern '
                f'{pattern!r}, so a group would straddle two blocks; use a multiple of {nm[1]}'
            )
    mask, updated, finite = _solve(
        jnp.asarray(kernel),
        jnp.asarray(hessian),
        jnp.float32(percdamp),
        jnp.asarray(counts, jnp.int32),
        nm=nm,
        blocksize=blocksize,
    )
    if not isinstance(finite, jax.core.Tracer) and not bool(finite):
        raise FloatingPointError(
            f'sparsegpt: the solve for the {shape} kernel is not finite: its damped Hessian is '
            f'not positive definite in float32 (or has inf/nan); raise percdamp={percdamp} '
            'or check the calibration inputs'
        )
    return mask, updated


# ----------------------------------------------------------------------------
# A whole model, block by block.
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('model', 'paths'))
def _grams(model, params, statistics, inputs, *, paths):
    variables = {'params': params, 'batch_stats': statistics}
    return calibration.layer_inputs(model, variables, inputs, calibration.gram, paths)


def prune_model(
    model: Any,
    params: Mapping,
    batches: Sequence[Any],
    *,
    counts: Mapping[str, int],
    pattern: str | Sequence[int] | None = None,
    statistics: Mapping | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[dict[str, Array], dict]:
    """SparseGPT over a whole model, as the paper runs it: block by block in forward order
    (a block = the kernels under one top-level module, e.g. ``layers_3``), each block's
    Hessians gathered from the calibration ``batches`` passed through the blocks before
    it already pruned and updated. ``counts`` (kernel path -> pruned count) name the
    kernels; with an N:M ``pattern`` each kernel is pruned N:M instead (kernels whose
    inputs do not divide by M stay dense, as in the mask plan). Returns ``(masks,
    updated_params)``; the mask-only row is the masks on the original ``params``.
    """
    statistics = {} if statistics is None else statistics
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not inputs:
        raise UserError('sparsegpt: no calibration batch; pass at least one batch of inputs')
    variables = {'params': params, 'batch_stats': statistics}
    order = [p for p in calibration.call_order(model, variables, inputs[0]) if p in counts]
    missing = sorted(set(counts) - set(order))
    if missing:
        raise UserError(
            f'sparsegpt: no nn.Dense call of the forward uses the kernels {missing}; prune '
            'Dense kernels only'
        )
    blocks: dict[str, list[str]] = {}
    for path in order:
        blocks.setdefault(path.split('/')[0], []).append(path)
    flat = sparsity.flatten(params)
    masks = {}
    for block_paths in blocks.values():
        current = sparsity.unflatten(flat)
        hessians = None
        for x in inputs:  # every kernel's Gram each pass: one compile serves every block
            g = _grams(model, current, statistics, x, paths=tuple(order))
            hessians = g if hessians is None else {p: hessians[p] + g[p] for p in block_paths}
        for path in block_paths:
            nm = structured.parse_pattern(pattern)
            dense = nm is not None and flat[path].shape[0] % nm.m
            if dense or (nm is None and not counts[path]):
                masks[path] = jnp.ones(flat[path].shape, bool)
                continue
            masks[path], flat[path] = sparsegpt_layer(
                flat[path], hessians[path],
                count=None if nm else int(counts[path]), pattern=pattern if nm else None,
                blocksize=blocksize, percdamp=percdamp,
            )  # fmt: skip
    return masks, sparsity.unflatten(flat)
