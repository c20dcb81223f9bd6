"""A small library search that can be interrupted mid-epoch: its model and data, for the
tests of a resumed search."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

STEPS = 6  # per epoch
INTERRUPT_AT = (1, 3)  # (epoch, step): an interrupted run stops here, after the save at step 8


class Mlp(nn.Module):
    """A classifier with BatchNorm, so the search has statistics to checkpoint."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(32)(x)))
        return nn.Dense(4, name='head')(x)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype(np.float32)
    return x, x[:, :4].argmax(-1).astype(np.int32)


class Interrupted(Exception):
    pass


def batches(interrupt: bool = False, at: tuple[int, int] = INTERRUPT_AT):
    """An ``epoch -> batches`` callable; with ``interrupt``, raises at ``(epoch, step)``."""
    x, y = data()

    def epoch_batches(epoch):
        for i in range(STEPS):
            if interrupt and (epoch, i) == at:
                raise Interrupted
            yield x[16 * i : 16 * i + 16], y[16 * i : 16 * i + 16]

    return epoch_batches


def model_and_variables():
    model = Mlp()
    return model, model.init(jax.random.key(0), data()[0][:2])


def validation_batches():
    x, y = data()
    return [(x[:32], y[:32])]
