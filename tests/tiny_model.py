"""Test-size helpers: :func:`tiny_config` (the base config at test size) and the tiny
model of the scale-out tests: small_cnn on 8x8x1 images, weights made in numpy.

Drawing the weights in numpy (He-normal kernels, identity BatchNorm) costs no XLA
compile, which the 2-core test machine would otherwise spend seconds on.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jackpot_jax.io import checkpoint
from jackpot_jax.launch import config as config_lib
from jackpot_jax.models import zoo

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def tiny_config(**fields: Any) -> ml_collections.ConfigDict:
    """The base config (digits demo) with small_cnn at width 8 and ``fields`` set, keyed
    by dotted name: ``tiny_config(**{'search.epochs': 2, 'steps_per_epoch': 6})``."""
    config = config_lib.get_config()
    config.model.width = 8
    for dotted, value in fields.items():
        group, _, field = dotted.rpartition('.')
        (config[group] if group else config)[field] = value
    return config


def variables(width: int = 4, seed: int = 0) -> dict[str, Any]:
    """numpy ``{'params', 'batch_stats'}`` shaped like ``small_cnn(width)``'s."""
    model = zoo.get_model('small_cnn', NUM_CLASSES, width=width)
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name == 'kernel':
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        fill = 1.0 if name in ('scale', 'var') else 0.0
        return np.full(leaf.shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def save_weights(path: str, width: int = 4, seed: int = 0) -> dict[str, Any]:
    """Writes :func:`variables` as a search's frozen weights; returns them."""
    v = variables(width, seed)
    meta = {'model': {'name': 'small_cnn', 'width': width}, 'num_classes': NUM_CLASSES}
    checkpoint.save_weights(path, v['params'], v['batch_stats'], meta)
    return v


def fault_at_step(monkeypatch, step: int, fault):
    """Makes every search step built from now on call ``fault(state, metrics)`` at the
    ``step``-th call (1-based) and return its result; ``fault`` may also raise."""
    from jackpot_jax.core import step as step_lib

    original = step_lib.make_search_step

    def make(**settings):
        step_fn = original(**settings)
        count = [0]

        def faulty(state, *batch):
            count[0] += 1
            if count[0] == step:
                return fault(*step_fn(state, *batch))
            return step_fn(state, *batch)

        return faulty

    monkeypatch.setattr(step_lib, 'make_search_step', make)
    return original


def config_plan(config: ml_collections.ConfigDict, params: Any) -> Any:
    """The mask plan of a config's search over ``params`` (the output layer not traced: a
    model whose classifier the name rule knows)."""
    from jackpot_jax.engine import loop
    from jackpot_jax.launch import config_checks

    settings = config_checks.search_settings(config_checks.resolved(config))
    return loop.plan(params, settings, model_name=f'model {config.model.name!r}')
