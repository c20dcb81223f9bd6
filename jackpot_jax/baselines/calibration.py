"""What one-shot criteria see of the calibration data: the input of every ``nn.Dense``,
``nn.Conv`` and zoo :class:`~jackpot_jax.models.conv.Conv` layer of a forward pass,
reduced per kernel path.

A Flax method interceptor (``nn.intercept_methods``) sees every such call and reduces its
input, keyed by the module's scope path + '/kernel', which is the kernel's parameter
path. No model change and no ``sow`` calls are needed; a layer called twice adds both
reductions. Wanda keeps the squared input per feature, SparseGPT the Gram matrix X^T X.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jackpot_jax.models import conv

Array = jax.Array
# The layers whose input is a kernel's input: Flax's and the zoo's convolution.
LAYERS = (nn.Dense, nn.Conv, conv.Conv)
# A layer's input (..., features) -> the statistic kept of it.
Reduce = Callable[[Array], Array]


def square_sums(x: Array) -> Array:
    """Per input feature, the sum of squares over every position: ``[features]``."""
    return jnp.sum(jnp.square(x), axis=tuple(range(x.ndim - 1)))


def gram(x: Array) -> Array:
    """X^T X over every position of ``x`` (..., features): ``[features, features]``."""
    rows = x.reshape(-1, x.shape[-1])
    return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)


def layer_inputs(
    model: nn.Module,
    variables: Mapping,
    inputs: Any,
    reduce: Reduce,
    paths: Collection[str] | None = None,
) -> dict[str, Array]:
    """Kernel path -> ``reduce`` of that layer's input in one eval-mode forward
    (``train=False``), for the layers at ``paths`` (all Dense/Conv layers if None).
    Traceable; a conv's input feature is its input channel (every spatial position)."""
    out: dict[str, Array] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__' and isinstance(module, LAYERS):
            path = '/'.join(module.scope.path) + '/kernel'
            if paths is None or path in paths:
                value = reduce(jnp.asarray(args[0]).astype(jnp.float32))
                out[path] = out[path] + value if path in out else value
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, inputs, train=False)
    return out


def call_order(model: nn.Module, variables: Mapping, inputs: Any) -> list[str]:
    """The Dense/Conv kernel paths in the order the forward first calls them (shapes only:
    nothing is computed)."""
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == '__call__' and isinstance(module, LAYERS):
            path = '/'.join(module.scope.path) + '/kernel'
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    def forward(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False)

    jax.eval_shape(forward, variables, inputs)
    return order
