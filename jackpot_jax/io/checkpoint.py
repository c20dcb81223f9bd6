"""Every orbax call of jackpot_jax lives here.

Three kinds of checkpoint, stored apart so the weights are written once:
  * weights (``WORKDIR/pretrained`` or anywhere): frozen params + batch statistics + meta;
  * search checkpoints (``WORKDIR/checkpoints/<step>``): scores, bit-packed masks
    (and flip history), optimizer state, batch statistics and meta (step, counts, config, weights
    fingerprint, metrics so far); the latest N and those of the epochs the selection rule
    may still choose are kept;
  * jackpots (``WORKDIR/jackpot``): bit-packed masks + batch statistics + meta
    (+ scores when asked), small enough to ship beside the original weights.
Orbax writes into a temporary folder and renames it when complete, so a crash
mid-save never leaves a checkpoint that looks whole. A weights or jackpot checkpoint
that already exists is replaced only once its successor is complete (see :func:`_save`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jackpot_jax.core import parallel, sparsity
from jackpot_jax.core.errors import UserError
from jackpot_jax.io import write_failures

_SEARCH_ITEMS = ('scores', 'masks', 'ever_flipped', 'opt_state', 'statistics')
# Items that may hold no array at all (a model without BatchNorm has no statistics, an
# optimizer without momentum no state): orbax refuses to write an empty tree, so they are
# left out on save and read back as empty.
_MAYBE_EMPTY = ('statistics', 'opt_state')


def _statistics(restored: Mapping[str, Any], default: Any = None) -> Any:
    """The statistics item of a restored checkpoint (empty when none was written)."""
    return restored.get('statistics', {} if default is None else default)


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree.leaves(tree))


# Siblings of a checkpoint PATH while it is replaced: PATH.new (being written), then
# PATH.old (the previous one, deleted once PATH.new has become PATH).
NEW_SUFFIX = '.new'
OLD_SUFFIX = '.old'


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says which one and what to do."""


# ----------------------------------------------------------------------------
# Masks on disk: 1 bit per weight.
# ----------------------------------------------------------------------------
def pack_masks(masks: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Flat bool masks -> (nested uint8 bit arrays, flat shapes)."""
    host = parallel.to_host(dict(masks))
    packed = {p: np.packbits(np.asarray(m, bool).ravel()) for p, m in host.items()}
    return sparsity.unflatten(packed), {p: list(np.shape(m)) for p, m in host.items()}


def unpack_masks(packed: Mapping, shapes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_masks`."""
    flat = sparsity.flatten(jax.device_get(dict(packed)))
    return {
        p: np.unpackbits(np.asarray(flat[p]), count=int(np.prod(s))).astype(bool).reshape(s)
        for p, s in shapes.items()
    }


def weights_fingerprint(params: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in sorted(sparsity.flatten(parallel.to_host(params)).items()):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f'{path}:{leaf.dtype}:{leaf.shape};'.encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# One-off composite checkpoints (weights, jackpots).
# ----------------------------------------------------------------------------
def _abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Shape/dtype/sharding targets for a restore (from arrays or saved metadata)."""

    def one(x):
        where = sharding or getattr(x, 'sharding', None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    return jax.tree.map(one, tree)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices(name)


def _save(path: str, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Writes a composite checkpoint at ``path``, replacing one that is there.

    It is written whole to ``path.new`` first; only then does the old one step aside
    (``path.old``, deleted right after), so a crash never leaves a half-written
    checkpoint in place of a good one.
    """
    path = os.path.abspath(path)
    new, old = path + NEW_SUFFIX, path + OLD_SUFFIX
    # Host copies: saving replicated device arrays compiles a slice per array.
    items = {
        name: ocp.args.StandardSave(parallel.to_host(dict(tree)))
        for name, tree in arrays.items()
        if name not in _MAYBE_EMPTY or _has_leaves(tree)
    }
    failed = False
    write_failures.quiet_start()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(
                new,
                force=True,  # a leftover of an interrupted save
                args=ocp.args.Composite(meta=ocp.args.JsonSave(dict(meta)), **items),
            )
    except Exception as e:  # orbax and tensorstore raise many types for a failed write
        reason = write_failures.reason(e)
        if reason is None:
            raise
        failed = True
        write_failures.remove_partial(new)
        write_failures.remove_partial(glob.escape(new) + write_failures.ORBAX_TMP + '*')
        kept = f'; the one already at {path} is untouched' if os.path.isdir(path) else ''
        raise CheckpointError(
            f'could not write the checkpoint {path}: {reason}; free space on that disk (or '
            f'fix its permissions), or write elsewhere, and rerun{kept}'
        ) from e
    finally:
        write_failures.quiet_end(failed)
    if jax.process_index() == 0:
        if os.path.isdir(old):
            shutil.rmtree(old)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    _sync_processes(f'jackpot_jax checkpoint saved: {path}')


def _restore(
    path: str,
    names: tuple[str, ...],
    what: str,
    sharding: jax.sharding.Sharding | None = None,
    optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Restores the named array items and ``meta`` onto ``sharding`` (default: one local device).

    Items in ``optional`` are restored when present. Restoring against a target built
    from the saved shapes makes checkpoints independent of the device layout that
    wrote them.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path) and os.path.isdir(path + OLD_SUFFIX):
        raise CheckpointError(
            f'no {what} checkpoint at {path}, but {path + OLD_SUFFIX} holds the one it was '
            f'replacing when a save was interrupted: rename that folder to {path} '
            f'(and delete {path + NEW_SUFFIX} if present), or write the {what} again'
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f'no {what} checkpoint at {path}; check the path, or create it first '
            "(mode 'pretrain' writes weights, mode 'search' writes a jackpot)"
        )
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handlers = {name: ocp.StandardCheckpointHandler() for name in names + optional}
    try:
        with ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(meta=ocp.JsonCheckpointHandler(), **handlers)
        ) as checkpointer:
            saved = checkpointer.metadata(path).item_metadata
            missing = [n for n in names if saved.get(n) is None]
            if missing:
                raise CheckpointError(f'the {what} checkpoint at {path} lacks items {missing}')
            present = names + tuple(n for n in optional if saved.get(n) is not None)
            items = {n: ocp.args.StandardRestore(_abstract(saved[n], sharding)) for n in present}
            return checkpointer.restore(
                path, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)
            )
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f'the {what} checkpoint at {path} is unreadable ({type(e).__name__}: {e}); it may '
            'be truncated or corrupted: restore it from a copy or write it again'
        ) from e


def save_weights(path: str, params: Mapping, statistics: Mapping, meta: Mapping[str, Any]) -> None:
    """Writes dense weights (the frozen starting point of a search)."""
    _save(path, {'params': params, 'statistics': statistics}, meta)


def load_weights(path: str) -> tuple[dict, dict, dict[str, Any]]:
    """Reads ``(params, statistics, meta)`` written by :func:`save_weights`."""
    restored = _restore(path, ('params',), 'weights', optional=_MAYBE_EMPTY)
    return restored['params'], _statistics(restored), restored['meta']


def save_jackpot(
    path: str,
    scores: Mapping | None,
    masks: Mapping,
    statistics: Mapping,
    meta: Mapping[str, Any],
) -> None:
    """Writes a found jackpot: bit-packed masks, batch statistics, meta (and scores if given)."""
    packed, shapes = pack_masks(masks)
    arrays = {'masks': packed, 'statistics': statistics}
    if scores is not None:
        arrays['scores'] = sparsity.unflatten(scores)
    _save(path, arrays, {**meta, 'mask_shapes': shapes})


def read_jackpot_bundle(path: str) -> tuple[dict | None, dict, dict, dict[str, Any]]:
    """Reads ``(scores or None, masks, statistics, meta)`` written by :func:`save_jackpot`
    (the library's :func:`jackpot_jax.load_jackpot` makes a ``Jackpot`` of them)."""
    restored = _restore(path, ('masks',), 'jackpot', optional=('scores', *_MAYBE_EMPTY))
    meta = restored['meta']
    scores = sparsity.flatten(restored['scores']) if 'scores' in restored else None
    masks = unpack_masks(restored['masks'], meta['mask_shapes'])
    return scores, masks, _statistics(restored), meta


# ----------------------------------------------------------------------------
# Search checkpoints: resumable, keep latest N + best.
# ----------------------------------------------------------------------------
class _PreserveSteps:
    """An orbax preservation policy: keeps the checkpoints at the steps in ``steps``, a set
    its owner updates as the search goes (orbax consults it after every save)."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        del context
        return [info.step in self.steps for info in checkpoints]


class SearchCheckpoints:
    """The search checkpoints of one workdir (``WORKDIR/checkpoints/<step>``).

    Keeps the latest ``keep`` checkpoints and those of the epochs the selection rule may
    still choose (given with each save). Which those are is worked out from the epoch
    records in the checkpoints themselves, so a resumed search keeps the same ones.
    Saves are asynchronous; every process of a multi-host run must call ``save``.
    """

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._candidates = _PreserveSteps()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), self._candidates]
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in _SEARCH_ITEMS}
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, cleanup_tmp_directories=True
            ),
            item_handlers={'meta': ocp.JsonCheckpointHandler(), **handlers},
        )
        # Saves run in the background; a failed one is raised, as one CheckpointError, by
        # the next save, wait or close.
        self._writing = False

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: Any, meta: Mapping[str, Any], preserve: Iterable[int] = ()) -> None:
        """Writes ``state`` (a SearchState) at its step, masks bit-packed, keeping from now
        on the checkpoints at the steps ``preserve`` beside the latest ``keep``."""
        step = int(parallel.to_host(state.step))
        packed, shapes = pack_masks(state.masks)
        items = {
            'scores': sparsity.unflatten(state.scores),
            'masks': packed,
            'ever_flipped': pack_masks(state.ever_flipped)[0],
            'opt_state': state.opt_state,
            'statistics': state.statistics,
        }
        args = {
            name: ocp.args.StandardSave(tree)
            for name, tree in items.items()
            if name not in _MAYBE_EMPTY or _has_leaves(tree)
        }
        meta = {**meta, 'step': step, 'mask_shapes': shapes}
        self._candidates.steps = set(preserve)
        if not self._writing:
            write_failures.quiet_start()
            self._writing = True
        # A failure raised here may be the save before's (orbax waits for it first).
        with self._write_failures_reported():
            self._manager.save(
                step,
                args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
            )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta saved at ``step``."""
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )['meta']
        except Exception as e:
            raise self._unreadable(step, e) from e
        return meta

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """The state saved at ``step``, placed like ``like`` (a fresh SearchState)."""
        meta = self.read_meta(step)
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        packed_like = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(((int(np.prod(s)) + 7) // 8,), np.uint8, sharding=host),
            meta['mask_shapes'],
            is_leaf=lambda x: isinstance(x, list),
        )
        targets = {
            'scores': _abstract(sparsity.unflatten(like.scores)),
            'masks': sparsity.unflatten(packed_like),
            'ever_flipped': sparsity.unflatten(packed_like),
            'opt_state': _abstract(like.opt_state),
            'statistics': _abstract(like.statistics),
        }
        args = {
            name: ocp.args.StandardRestore(t)
            for name, t in targets.items()
            if name not in _MAYBE_EMPTY or _has_leaves(t)
        }
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            other = self._other_structure(step, {name: targets[name] for name in args})
            if other:  # another search's state, not a damaged one: nothing to delete
                raise ValueError(
                    f'the search checkpoint {os.path.join(self.directory, str(step))} holds a '
                    f'search state of another structure ({other}): a search with other '
                    'settings (the optimizer, the model or the masks) wrote it; restore those '
                    'settings to resume, or use a new workdir'
                ) from None
            raise self._unreadable(step, e) from e

        def place(packed):
            masks = unpack_masks(packed, meta['mask_shapes'])
            return {p: jax.device_put(m, like.masks[p].sharding) for p, m in masks.items()}

        state = like.replace(
            scores=sparsity.flatten(restored['scores']),
            masks=place(restored['masks']),
            ever_flipped=place(restored['ever_flipped']),
            opt_state=restored.get('opt_state', like.opt_state),
            statistics=_statistics(restored, like.statistics),
            step=jax.device_put(np.int32(meta['step']), like.step.sharding),
        )
        return state, meta

    def _other_structure(self, step: int, targets: Mapping[str, Any]) -> str | None:
        """Which saved item has arrays of another number or shape than ``targets`` (this
        search's state), in words; None when they agree or the saved metadata cannot be
        read (then the checkpoint is damaged)."""
        try:
            saved = self._manager.item_metadata(step)
        except Exception:  # unreadable metadata: a damaged checkpoint
            return None
        for name, target in targets.items():
            if name not in saved or saved[name] is None:
                continue
            tree = getattr(saved[name], 'tree', saved[name])
            have = sorted(tuple(getattr(x, 'shape', None) or ()) for x in jax.tree.leaves(tree))
            want = sorted(tuple(x.shape) for x in jax.tree.leaves(target))
            if have != want:
                return f'{name}: {len(have)} arrays saved, {len(want)} in this search'
        return None

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        return CheckpointError(
            f'search checkpoint {os.path.join(self.directory, str(step))} is unreadable '
            f'({type(error).__name__}: {error}); it may be truncated or corrupted. Delete that '
            f'folder to resume from an earlier one {others or "(none left: start again)"}'
        )

    @contextlib.contextmanager
    def _write_failures_reported(self) -> Iterator[None]:
        """A failed write as one CheckpointError naming the folder; other errors as they are."""
        try:
            yield
        except Exception as e:  # orbax and tensorstore raise many types for a failed write
            reason = write_failures.reason(e)
            if reason is None:
                raise
            self._writes_done(failed=True)
            write_failures.remove_partial(os.path.join(glob.escape(self.directory), '*' + write_failures.ORBAX_TMP + '*'))
            latest = self.latest_step()
            resume = f'step {latest}' if latest is not None else 'none yet: it starts again'
            raise CheckpointError(
                f'could not write a search checkpoint in {self.directory}: {reason}; free '
                'space on that disk (or fix its permissions) and rerun: the search resumes '
                f'from its last complete checkpoint ({resume})'
            ) from e

    def _writes_done(self, failed: bool = False) -> None:
        if self._writing:
            self._writing = False
            write_failures.quiet_end(failed)

    def wait(self) -> None:
        try:
            with self._write_failures_reported():
                self._manager.wait_until_finished()
        finally:
            self._writes_done()

    def close(self) -> None:
        try:
            with self._write_failures_reported():
                self._manager.close()
        finally:
            self._writes_done()
