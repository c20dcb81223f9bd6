"""Fingerprints of what decides a search's result beyond its settings: the loss function,
the model, an optax optimizer and the first batches.

A resumed search (or a finished workdir called again) must match the one that wrote the
checkpoints in all of these, not only in the settings' names: another ``loss_fn``, another
model class over the same params, ``adam(5.0)`` for ``adam(1e-2)`` or other data would
otherwise continue (or return) another search's work. A callable is fingerprinted by its
code (bytecode, constants, names), its defaults and what its closure holds, recursively
(an optax transformation is a tuple of closures over its hyper-parameters); arrays by their
bytes. What holds an object of no known form cannot be fingerprinted: :func:`fingerprint`
returns None for it, and the caller must say that the search is the same one.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import types
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

# How deep a closure may nest before the object counts as of no known form.
MAX_DEPTH = 24


class Unfingerprintable(Exception):
    """An object of no known form inside what is fingerprinted."""


def fingerprint(obj: Any) -> str | None:
    """A sha256 hex digest of ``obj`` (a callable, a module, values, arrays) that is the
    same across processes for the same code and values; None if part of it has no known
    form (e.g. an object without a fingerprintable state)."""
    digest = hashlib.sha256()
    try:
        _feed(digest, obj, 0, set())
    except Unfingerprintable:
        return None
    return digest.hexdigest()


def named(obj: Any) -> str:
    """``'qualified.name (fingerprint[:12])'``, or ``'... (not fingerprintable)'``: the
    form stored in a search's identity, readable in the message of a refused resume."""
    label = _name(obj)
    digest = fingerprint(obj)
    return f'{label} ({digest[:12] if digest else "not fingerprintable"})'


def model_named(model: Any) -> str:
    """:func:`named` of a model: a Linen module by its class's code and its fields, a
    forward function by its code; any other object (an NNX module) by its class's code
    (its params are fingerprinted with the weights)."""
    if dataclasses.is_dataclass(model) or isinstance(
        model, (types.FunctionType, functools.partial, types.MethodType)
    ):
        return named(model)
    digest = hashlib.sha256()
    _feed_class(digest, type(model), 0, set())
    return f'{_name(model)} ({digest.hexdigest()[:12]})'


def batches_fingerprint(batches: Iterable[Any]) -> str:
    """A sha256 hex digest of the arrays of ``batches`` (their dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for batch in batches:
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            leaf = np.asarray(leaf)
            digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
            digest.update(np.ascontiguousarray(leaf).tobytes())
        digest.update(b'/')
    return digest.hexdigest()


def resume_fingerprints(
    loss_fn: Any, model: Any, first_batches: Iterable[Any], optimizer: Any = None
) -> dict[str, str]:
    """What a resumed library search must match beyond its settings: the loss function,
    the model, the first batches and an optax ``optimizer`` (None: a named one, which the
    settings hold)."""
    out = {
        'loss_fn': 'the default loss' if loss_fn is None else named(loss_fn),
        'model': model_named(model),
        'first_batches': batches_fingerprint(first_batches)[:16],
    }
    if optimizer is not None:
        out['optimizer'] = 'optax ' + named(optimizer)
    return out


def _name(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return f'partial({_name(obj.func)})'
    target = obj if isinstance(obj, (type, types.FunctionType, types.MethodType)) else type(obj)
    module = getattr(target, '__module__', None) or ''
    qualname = getattr(target, '__qualname__', None) or getattr(target, '__name__', '?')
    return f'{module}.{qualname}' if module else qualname


def _feed(digest: Any, obj: Any, depth: int, seen: set[int]) -> None:
    """Adds ``obj`` to ``digest``; raises :class:`Unfingerprintable` for an unknown form."""
    if depth > MAX_DEPTH:
        raise Unfingerprintable(type(obj).__name__)

    def put(tag: str, text: str = '') -> None:
        digest.update(f'<{tag}:{text}>'.encode())

    def feed(x: Any) -> None:
        _feed(digest, x, depth + 1, seen)

    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        put(type(obj).__name__, repr(obj))
        return
    if isinstance(obj, enum.Enum):
        put('enum', f'{_name(type(obj))}.{obj.name}')
        return
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        if isinstance(obj, jax.Array) and jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            obj = jax.random.key_data(obj)
        array = np.asarray(obj)
        put('array', f'{array.dtype}|{array.shape}')
        digest.update(np.ascontiguousarray(array).tobytes())
        return
    if isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
        put('named', _name(obj) if not isinstance(obj, types.ModuleType) else obj.__name__)
        return
    if isinstance(obj, np.dtype):
        put('dtype', str(obj))
        return
    if id(obj) in seen:  # a cycle (a recursive function): its name suffices
        put('seen', _name(obj))
        return
    seen = seen | {id(obj)}
    if isinstance(obj, types.CodeType):
        put('code', f'{obj.co_name}|{obj.co_argcount}|{obj.co_kwonlyargcount}')
        digest.update(obj.co_code)
        put('names', ','.join(obj.co_names))
        for const in obj.co_consts:
            feed(const)
        return
    if isinstance(obj, types.FunctionType):
        put('function', _name(obj))
        feed(obj.__code__)
        feed(obj.__defaults__)
        feed(obj.__kwdefaults__)
        for cell in obj.__closure__ or ():
            try:
                feed(cell.cell_contents)
            except ValueError:  # an empty cell
                put('empty')
        return
    if isinstance(obj, types.MethodType):
        put('method')
        feed(obj.__func__)
        feed(obj.__self__)
        return
    if isinstance(obj, functools.partial):
        put('partial')
        feed(obj.func)
        feed(obj.args)
        feed(obj.keywords)
        return
    if isinstance(obj, (list, tuple)):
        put(type(obj).__name__, str(len(obj)))
        for item in obj:
            feed(item)
        return
    if isinstance(obj, (set, frozenset)):
        put('set', str(len(obj)))
        for item in sorted(obj, key=repr):
            feed(item)
        return
    if isinstance(obj, Mapping):
        put('mapping', _name(type(obj)))
        for key in sorted(obj, key=repr):
            feed(key)
            feed(obj[key])
        return
    if dataclasses.is_dataclass(obj):  # e.g. a Flax Linen module: its class and fields
        put('dataclass', _name(type(obj)))
        _feed_class(digest, type(obj), depth, seen)
        for field in dataclasses.fields(obj):
            if field.name in ('parent', 'name'):
                continue
            put('field', field.name)
            feed(getattr(obj, field.name, None))
        return
    raise Unfingerprintable(type(obj).__name__)


def _feed_class(digest: Any, cls: type, depth: int, seen: set[int]) -> None:
    """The code of the functions a class (and its bases in its own package) defines."""
    root = cls.__module__.split('.')[0]
    for klass in cls.__mro__:
        if klass.__module__.split('.')[0] != root and klass is not cls:
            continue
        for attribute, value in sorted(vars(klass).items()):
            if isinstance(value, types.FunctionType):
                digest.update(f'<def:{klass.__qualname__}.{attribute}>'.encode())
                _feed(digest, value.__code__, depth + 1, seen)
