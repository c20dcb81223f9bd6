"""The output layer of a model, found from its traced computation instead of its names.

The classifier of a network searched for a jackpot stays dense. Recognising it by
parameter name (``fc``, ``classifier``, ``heads``) misses a classifier called ``head``,
``Dense_2`` or ``out``; :func:`output_kernel_paths` recognises it by structure: the
weights of the linear operation whose result is the model's output.

The model is traced once with :func:`jax.make_jaxpr` (no computation runs) and the
computation is walked backwards from its outputs. Going back along every path, the
first ``dot_general`` or ``conv_general_dilated`` met (the LAST one applied) whose weight
operand is a parameter ends the path, and that parameter's path is reported. The weight
operand must come from the parameter leaf through value-keeping layout operations only
(dtype casts, reshapes, transposes, broadcasts, slices, copies). Everything else
(BatchNorm, activations, pooling, ``log_softmax``, residual sums) is walked through to all
its inputs, and so are products of two activations (attention's ``q @ k`` and
``weights @ v``). Calls holding a computation of their own (``jit``, ``remat``,
``custom_jvp``/``custom_vjp`` functions, ``cond``, ``scan``, ``while``) are walked
inside, output by output, with the loops' carries followed round to a fixed point.

What comes back is the set of PARAMETER leaves acting as last weights, not necessarily
kernels: a tied output embedding (``logits = x @ embedding.T``, e.g. ``nn.Embed.attend``)
reports the embedding table, so callers intersect the result with their prunable
kernels. A path that reaches the inputs without such an operation (an output that is an
input passed through, or a skip connection around the head) reports nothing; a skip
connection from an earlier linear layer reports that layer too, as the last linear
operation on its path. Not recognised as weights: kernels recomputed by arithmetic
before use (weight normalisation, standardisation, a kernel times a mask inside the
model), which are walked through as activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from jax.extend import core as jcore

from jackpot_jax.core import sparsity

LINEAR = frozenset({'dot_general', 'conv_general_dilated', 'ragged_dot', 'ragged_dot_general'})
# Operations that only move, cast or select values: a kernel seen through them is a kernel.
LAYOUT = frozenset({
    'convert_element_type', 'reshape', 'transpose', 'broadcast_in_dim', 'squeeze',
    'expand_dims', 'copy', 'copy_p', 'rev', 'slice', 'dynamic_slice', 'reduce_precision',
    'sharding_constraint', 'mesh_cast', 'reshard', 'device_put', 'pvary',
    'optimization_barrier',
})


def output_kernel_paths(apply_fn: Callable[[Any], Any], params: Mapping) -> tuple[str, ...]:
    """Paths of the parameter leaves that are the last weights applied to the output.

    Args:
      apply_fn: the model in eval mode as a function of its params only, e.g.
        ``lambda p: model.apply({'params': p, **stats}, x, train=False)``; its output may
        be any pytree (every leaf is an output).
      params: the nested params (concrete or ``jax.ShapeDtypeStruct`` leaves).

    Returns:
      The sorted '/'-joined paths (as :func:`jackpot_jax.core.sparsity.flatten` keys them)
      of the params that are the weight operand of the last ``dot_general`` or
      ``conv_general_dilated`` on each path from an output back to the inputs; empty if
      there is none.
    """
    closed = jax.make_jaxpr(apply_fn)(params)
    keyed, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = ['/'.join(_key_name(k) for k in key_path) for key_path, _ in keyed]
    invars = closed.jaxpr.invars
    if len(paths) != len(invars):  # pragma: no cover - make_jaxpr keeps one invar per leaf
        raise ValueError(f'{len(invars)} traced inputs for {len(paths)} parameter leaves')
    param_of = dict(zip(invars, paths))
    found, _ = _walk(closed.jaxpr, closed.jaxpr.outvars, param_of)
    return tuple(sorted(found))


def _key_name(key: Any) -> str:
    for attribute in ('key', 'name', 'idx'):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _is_var(atom: Any) -> bool:
    return isinstance(atom, jcore.Var) and not isinstance(atom, jcore.Literal)


def _walk(jaxpr: Any, wanted: Iterable[Any], param_of: Mapping[Any, str]):
    """Walks ``jaxpr`` back from the vars ``wanted``.

    ``param_of`` maps this jaxpr's invars that carry a parameter (possibly re-laid-out)
    to its path. Returns the parameter paths found and the invars reached on paths
    without a parametrised linear operation (where the walk goes on outside).
    """
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    live = {v for v in wanted if _is_var(v)}
    found: set[str] = set()
    for eqn in reversed(jaxpr.eqns):
        outs = [v in live for v in eqn.outvars]
        if not any(outs):
            continue
        if eqn.primitive.name in LINEAR:
            operands = [v for v in eqn.invars[:2] if _is_var(v)]
            weights = [p for p in (_param(v, producer, param_of) for v in operands) if p]
            if weights:
                found.update(weights)
            else:
                live.update(operands)
            continue
        subs = _sub_jaxprs(eqn)
        if not subs:
            live.update(v for v in eqn.invars if _is_var(v))
            continue
        for sub, outer_ins, carries in subs:
            sub_param_of = {}
            for inner, outer in zip(sub.invars, outer_ins):
                path = _param(outer, producer, param_of) if _is_var(outer) else None
                if path:
                    sub_param_of[inner] = path
            sub_outs = {o for o, live_out in zip(sub.outvars, outs) if live_out}
            while True:  # loops: a carry reached at the top is wanted at the bottom
                sub_found, reached = _walk(sub, sub_outs, sub_param_of)
                more = {sub.outvars[o] for i, o in carries if sub.invars[i] in reached}
                if more <= sub_outs:
                    break
                sub_outs |= more
            found |= sub_found
            live.update(o for i, o in zip(sub.invars, outer_ins) if i in reached and _is_var(o))
    reached = {v for v in jaxpr.invars if v in live}
    return found, reached


def _param(var: Any, producer: Mapping[Any, Any], param_of: Mapping[Any, str]) -> str | None:
    """The path of the parameter that ``var`` is, through layout operations only."""
    while var not in param_of:
        eqn = producer.get(var)
        if eqn is None:
            return None
        index = eqn.outvars.index(var)
        if eqn.primitive.name in LAYOUT:
            var = eqn.invars[index if len(eqn.invars) == len(eqn.outvars) else 0]
        else:  # a call (e.g. a jitted transpose): follow it inside, back to its inputs
            subs = [s for s in _sub_jaxprs(eqn) if not s[2]]
            if len(subs) != 1:
                return None
            sub, outer_ins, _ = subs[0]
            inner = sub.outvars[index]
            sub_producer = {v: e for e in sub.eqns for v in e.outvars}
            while inner not in sub.invars:
                e = sub_producer.get(inner)
                if e is None or e.primitive.name not in LAYOUT:
                    return None
                i = e.outvars.index(inner)
                inner = e.invars[i if len(e.invars) == len(e.outvars) else 0]
            var = outer_ins[sub.invars.index(inner)]
        if not _is_var(var):
            return None
    return param_of[var]


def _sub_jaxprs(eqn: Any) -> list[tuple[Any, list[Any], list[tuple[int, int]]]]:
    """(jaxpr, the eqn's operands aligned with its invars, loop carries) per computation
    held in the eqn's params whose outputs are the eqn's outputs.

    The held computation's inputs are the eqn's LAST operands (``cond`` passes the branch
    index first, ``while`` the condition's constants); a computation with other outputs
    (``while``'s condition) does not produce the eqn's outputs and is skipped. Carries
    pair a loop body's input index with the output index fed back into it.
    """
    subs = []
    for value in eqn.params.values():
        for held in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(held, jcore.ClosedJaxpr):
                held = held.jaxpr
            if not isinstance(held, jcore.Jaxpr):
                continue
            n_in = len(held.invars)
            if len(held.outvars) != len(eqn.outvars) or n_in > len(eqn.invars):
                continue
            outer_ins = list(eqn.invars[len(eqn.invars) - n_in:])
            if eqn.primitive.name == 'scan':
                first = eqn.params['num_consts']
                carries = [(first + j, j) for j in range(eqn.params['num_carry'])]
            elif eqn.primitive.name == 'while':
                first = eqn.params['body_nconsts']
                carries = [(first + j, j) for j in range(len(eqn.outvars))]
            else:
                carries = []
            subs.append((held, outer_ins, carries))
    return subs


def output_kernels(
    forward: Callable[..., Any], params: Any, statistics: Any, inputs: Any, include: str
) -> tuple[str, ...]:
    """The kernels (paths matching ``include``) whose output is the model's output: its
    classifier, found by tracing the model on ``inputs``, whatever it is called."""
    paths = output_kernel_paths(
        lambda p: forward(p, statistics, inputs, train=False)[0], params
    )
    prunable = set(sparsity.prunable_paths(params, include, None))
    return tuple(p for p in paths if p in prunable)
