"""A model of a user's own, loaded by the launcher by import path (tests/test_user_model.py).

``model.name='user_model:TinyNet'`` with tests/ on the Python path: a BatchNorm-free
conv net whose head is called ``fc``, like the built-in models' classifiers.
"""

from __future__ import annotations

import flax.linen as nn
import jax


class TinyNet(nn.Module):
    """conv -> relu -> mean pool -> dense; ``train`` is taken and ignored (no BN, no dropout).
    ``head`` names the classifier (``model.head='head'``: a name the prune rule's default
    exclusion does not know, so only tracing the model finds it)."""

    num_classes: int
    features: int = 8
    head: str = 'fc'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = nn.relu(nn.Conv(self.features, (3, 3), name='conv')(x))
        x = nn.relu(nn.Conv(self.features, (3, 3), name='conv2')(x))
        return nn.Dense(self.num_classes, name=self.head)(x.mean(axis=(1, 2)))


def make_deterministic_net(num_classes: int) -> nn.Module:
    """A factory (not a class) whose module takes ``deterministic`` instead of ``train``."""
    return DeterministicNet(num_classes)


class DeterministicNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        return nn.Dense(self.num_classes)(x.reshape(len(x), -1))


NOT_A_MODULE = 'a string'


def make_nothing(num_classes: int) -> dict:
    """A factory that returns something other than a Linen module."""
    return {'num_classes': num_classes}
