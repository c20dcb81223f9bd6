"""Models of the user's own, named by import path: ``model.name='package.module:Factory'``.

The factory is any callable that returns a Linen module: the module class itself, or a
function. Its keyword arguments come from the config's ``model.*`` fields;
``num_classes`` (the dataset's) is passed when the factory takes it. The launcher calls
the module as ``model(images, train=...)``, so its ``__call__`` must take ``train``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from jackpot_jax.core import adapters

_IMPORT_PATH = re.compile(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*')
# Fields of the base config's model group that a user's factory may ignore.
BASE_MODEL_FIELDS = ('width',)


def is_import_path(name: str) -> bool:
    """True for names like 'package.module:Factory' (the built-in models have no ':')."""
    return ':' in name


def load_factory(path: str) -> Callable[..., Any]:
    """The object named by 'package.module:Attribute' (dots after ':' walk attributes)."""
    if not _IMPORT_PATH.fullmatch(path):
        raise ValueError(
            f"model.name {path!r} is not an import path; write it as 'package.module:Factory'"
        )
    module_name, attribute = path.split(':')
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f'model.name {path!r}: cannot import {module_name!r} ({e}); install the package or '
            'put its folder on PYTHONPATH'
        ) from None
    for part in attribute.split('.'):
        if not hasattr(obj, part):
            raise ValueError(
                f'model.name {path!r}: {module_name!r} has no attribute {attribute!r}; '
                f"check the name after ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f'model.name {path!r} is a {type(obj).__name__}, not a factory; name a Linen '
            'module class or a function that returns one'
        )
    return obj


def _accepted(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword names a factory takes, and whether it takes **kwargs."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_model(path: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The Linen module that ``path``'s factory returns for these ``model.*`` fields."""
    factory = load_factory(path)
    names, any_keyword = _accepted(factory)
    if any_keyword or 'num_classes' in names:
        kwargs = {'num_classes': num_classes, **kwargs}
    for key in [k for k in kwargs if not any_keyword and k not in names]:
        if key in BASE_MODEL_FIELDS:
            del kwargs[key]  # a base-config default the factory has no use for
        else:
            raise ValueError(
                f'model.name {path!r} takes no keyword {key!r} (config field model.{key}); '
                f'its keywords are {sorted(names)}'
            )
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f'model.name {path!r} returned a {type(model).__module__}.{type(model).__name__}, '
            'not a flax.linen.Module; the launcher needs a Linen module (for an nnx.Module, use '
            'jackpot_jax.find_jackpot)'
        )
    try:
        adapters.check_call_kwargs(model.__call__, {'train': True})
    except ValueError:
        signature = inspect.signature(model.__call__)
        raise ValueError(
            f'model.name {path!r}: {type(model).__name__}.__call__{signature} takes no keyword '
            "'train'; the launcher calls model(images, train=...): add a 'train: bool = False' "
            'argument (or search with jackpot_jax.find_jackpot and train_kwargs)'
        ) from None
    return model
