"""Any Flax model as the pure forward function the search differentiates.

A *forward* is ``forward(params, statistics, images, *, train, rng) -> (logits, statistics)``:

* ``params``: the nested dict of parameters (the search masks some of its kernels);
* ``statistics``: everything else the model carries from call to call (BatchNorm running
  averages, NNX RNG counters). Train mode returns it updated; the search never
  differentiates it;
* ``train``: True in the search's train mode (dropout on, BatchNorm statistics updated);
* ``rng``: a PRNG key for the model's random streams (dropout) in train mode, or None.

:func:`linen_forward` wraps a Linen module, :func:`split_nnx` an NNX module. Models
name their train-mode switch differently (``train=True``, ``training=True``,
``deterministic=False``, or none); :func:`train_mode_kwargs` reads it from the
signature, and ``train_kwargs`` / ``eval_kwargs`` say it explicitly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

Forward = Callable[..., tuple[jax.Array, Any]]

# Train-mode keywords recognised in a model's signature, in order of preference, with their
# train-mode value (eval mode is the negation).
TRAIN_KEYWORDS = (
    ('train', True),
    ('training', True),
    ('is_training', True),
    ('deterministic', False),
)


def _describe(fn: Callable) -> str:
    owner = getattr(fn, '__self__', None)
    name = getattr(fn, '__qualname__', type(fn).__name__)
    return f'{type(owner).__name__}.__call__' if owner is not None else name


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and the like: nothing to read
        return None


def train_mode_kwargs(fn: Callable) -> dict[str, bool]:
    """The train-mode keyword of ``fn``'s signature (``{'train': True}``, ``{'deterministic':
    False}``, ...), or ``{}`` when it takes none of :data:`TRAIN_KEYWORDS`."""
    signature = _signature(fn)
    if signature is None:
        return {}
    for name, value in TRAIN_KEYWORDS:
        if name in signature.parameters:
            return {name: value}
    return {}


def eval_mode_kwargs(train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``train_kwargs`` with every bool negated: ``{'deterministic': False}`` -> ``True``."""
    return {k: (not v) if isinstance(v, bool) else v for k, v in train_kwargs.items()}


def check_call_kwargs(fn: Callable, kwargs: Mapping[str, Any], what: str = 'train_kwargs') -> None:
    """Raises a one-line ValueError when ``fn`` cannot take the keywords ``kwargs``."""
    signature = _signature(fn)
    if signature is None or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    ):
        return
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown:
        raise ValueError(
            f'{_describe(fn)}{signature} takes no keyword {unknown[0]!r} '
            f'({what}={dict(kwargs)!r}); '
            f'set {what} to its own train/eval-mode keywords, e.g. '
            "{'deterministic': False}, or {} if it has none"
        )


def _mode_kwargs(
    fn: Callable, train_kwargs: Mapping | None, eval_kwargs: Mapping | None
) -> tuple[dict, dict]:
    train_kwargs = train_mode_kwargs(fn) if train_kwargs is None else dict(train_kwargs)
    eval_kwargs = eval_mode_kwargs(train_kwargs) if eval_kwargs is None else dict(eval_kwargs)
    check_call_kwargs(fn, train_kwargs, 'train_kwargs')
    check_call_kwargs(fn, eval_kwargs, 'eval_kwargs')
    return train_kwargs, eval_kwargs


def linen_forward(
    module: nn.Module,
    collections: str | Sequence[str] = 'batch_stats',
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    rng_streams: Sequence[str] = ('dropout',),
) -> Forward:
    """The forward of a Linen module.

    ``collections`` names the variable collections besides 'params' that train mode
    updates. One name (the launcher's ``'batch_stats'``): ``statistics`` is that
    collection's tree. A sequence: ``statistics`` is a dict of collections (``()`` for a
    model with none). In train mode, ``rng`` is split over ``rng_streams``.
    """
    train_kwargs, eval_kwargs = _mode_kwargs(module.__call__, train_kwargs, eval_kwargs)
    single = isinstance(collections, str)
    names = [collections] if single else list(collections)

    def forward(params, statistics, images, *, train: bool, rng: jax.Array | None = None):
        variables = {'params': params, **({collections: statistics} if single else statistics)}
        if not train:
            return module.apply(variables, images, **eval_kwargs), statistics
        extra = {}
        if rng is not None:
            extra['rngs'] = dict(zip(rng_streams, jax.random.split(rng, len(rng_streams))))
        if not names:
            return module.apply(variables, images, **train_kwargs, **extra), statistics
        logits, updates = module.apply(variables, images, **train_kwargs, mutable=names, **extra)
        if single:
            return logits, updates.get(collections, statistics)
        return logits, {name: updates.get(name, statistics.get(name)) for name in names}

    return forward


# ----------------------------------------------------------------------------
# NNX: nnx.split gives the graph definition and the state; the forward merges them back.
# ----------------------------------------------------------------------------
def _string_keys(tree: Any) -> Any:
    """Nested dicts with every key as a string (NNX lists key their items by int)."""
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _keys_like(tree: Any, like: Any) -> Any:
    """``tree`` (string keys) with the keys of ``like`` (the original ones) put back."""
    if isinstance(like, Mapping):
        return {k: _keys_like(tree[str(k)], v) for k, v in like.items()}
    return tree


@dataclasses.dataclass(frozen=True)
class NnxSplit:
    """An NNX module split for the search: ``forward``, ``params`` and ``statistics``
    (string-keyed nested dicts) and :meth:`merge` to build a module back."""

    graphdef: Any
    params: dict
    statistics: dict
    forward: Forward
    _param_state: Any
    _other_state: Any

    def merge(self, params: Mapping, statistics: Mapping | None = None) -> Any:
        """A new NNX module with these params (e.g. masked ones) and statistics."""
        from flax import nnx  # pylint: disable=g-import-not-at-top

        p, o = _states(self._param_state, self._other_state, params, statistics or self.statistics)
        return nnx.merge(self.graphdef, p, o)


def _states(param_state, other_state, params, statistics):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    p = jax.tree.map(lambda x: x, param_state)  # a fresh copy: replace_by_pure_dict mutates
    o = jax.tree.map(lambda x: x, other_state)
    nnx.replace_by_pure_dict(p, _keys_like(params, nnx.to_pure_dict(param_state)))
    nnx.replace_by_pure_dict(o, _keys_like(statistics, nnx.to_pure_dict(other_state)))
    return p, o


def split_nnx(
    model: Any,
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> NnxSplit:
    """Splits an NNX module into a pure forward over (params, statistics).

    Train mode is ``module.train()`` (dropout on, BatchNorm updating), eval mode
    ``module.eval()``, plus any call keywords. The module's own RNG streams
    (``nnx.Rngs``) live in ``statistics`` and advance every train-mode call, so the
    forward ignores ``rng``.
    """
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if not isinstance(model, nnx.Module):
        raise TypeError(f'{type(model).__name__} is not a flax.nnx.Module')
    graphdef, param_state, other_state = nnx.split(model, nnx.Param, ...)
    call = type(model).__call__
    train_kwargs = {} if train_kwargs is None else dict(train_kwargs)
    eval_kwargs = eval_mode_kwargs(train_kwargs) if eval_kwargs is None else dict(eval_kwargs)
    check_call_kwargs(call, train_kwargs, 'train_kwargs')
    check_call_kwargs(call, eval_kwargs, 'eval_kwargs')

    def forward(params, statistics, images, *, train: bool, rng: jax.Array | None = None):
        del rng  # NNX modules carry their own RNG state
        p, o = _states(param_state, other_state, params, statistics)
        module = nnx.merge(graphdef, p, o)
        if train:
            module.train()
        else:
            module.eval()
        logits = module(images, **(train_kwargs if train else eval_kwargs))
        if not train:
            return logits, statistics
        _, _, updated = nnx.split(module, nnx.Param, ...)
        return logits, _string_keys(nnx.to_pure_dict(updated))

    return NnxSplit(
        graphdef,
        _string_keys(nnx.to_pure_dict(param_state)),
        _string_keys(nnx.to_pure_dict(other_state)),
        forward,
        param_state,
        other_state,
    )


def as_forward(
    model: Any,
    variables: Mapping | None = None,
    *,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Forward, Any, Any, NnxSplit | None]:
    """``(forward, params, statistics, nnx_split)`` of a Linen module (or its ``apply``) with
    its variables, an NNX module, or a forward function with ``{'params', ...}`` variables."""
    from flax import nnx  # pylint: disable=g-import-not-at-top

    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError(
                'an NNX module holds its own variables; call find_jackpot(model, None, batches)'
            )
        split = split_nnx(model, train_kwargs=train_kwargs, eval_kwargs=eval_kwargs)
        return split.forward, split.params, split.statistics, split
    owner = getattr(model, '__self__', None)
    if isinstance(owner, nn.Module) and getattr(model, '__name__', '') == 'apply':
        model = owner  # model.apply: the module itself
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(
            f'model is a {type(model).__name__}; pass a flax.linen.Module with its variables, '
            'a flax.nnx.Module, or a forward(params, statistics, images, *, train, rng)'
        )
    if not isinstance(variables, Mapping) or 'params' not in variables:
        raise ValueError(
            "variables must be a mapping with 'params' (what model.init returns), got "
            f'{type(variables).__name__}'
        )
    statistics = {k: v for k, v in variables.items() if k != 'params'}
    if isinstance(model, nn.Module):
        forward = linen_forward(
            model, tuple(statistics), train_kwargs=train_kwargs, eval_kwargs=eval_kwargs
        )
    else:
        forward = model
    return forward, variables['params'], statistics, None
