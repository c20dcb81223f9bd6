"""What every launcher mode shares: the run context (:class:`Setup`: mesh, data, model),
BatchNorm re-estimation, workdir paths, the mask plan of a config, and progress bars.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import auto as tqdm

from jackpot_jax.core import adapters, mask_plan, parallel, step, trees
from jackpot_jax.core.errors import UserError
from jackpot_jax.data import catalog
from jackpot_jax.engine import evaluation
from jackpot_jax.engine.metrics import to_python
from jackpot_jax.io import checkpoint
from jackpot_jax.io.workdir import (
    CHECKPOINTS_DIR,
    JACKPOT_DIR,
    MASKED_WEIGHTS_DIR,
    PRETRAINED_DIR,
    TUNED_DIR,
)
from jackpot_jax.launch import config as config_lib, config_checks
from jackpot_jax.models import zoo


def resolved(mode):
    """Runs a mode on the config with the fields left to config.protocol filled in."""

    @functools.wraps(mode)
    def run(config: ml_collections.ConfigDict, *args, **kwargs):
        return mode(config_checks.resolve_protocol(config), *args, **kwargs)

    return run


class Setup:
    """What every mode needs: the device mesh, the data source and the model."""

    def __init__(self, config: ml_collections.ConfigDict):
        config = config_checks.resolve_protocol(config)
        self.config = config
        if config.num_devices and jax.process_count() > 1:
            raise ValueError(
                f'num_devices={config.num_devices} with {jax.process_count()} processes would '
                'leave hosts without devices; use num_devices=0 (all) on multi-host runs'
            )
        self.mesh = parallel.make_mesh(config.num_devices or None, config.fsdp)
        self.source = catalog.load_source(
            config.data.name,
            config.data.data_dir or None,
            config.data,
            validation_fraction=config.data.validation_fraction,
            threads=config.data.threads,
        )
        kwargs = {k: v for k, v in config.model.items() if k not in ('name', 'dtype')}
        dtype = zoo.compute_dtype(config.model.get('dtype', 'float32'))
        self.model = zoo.get_model(
            config.model.name, self.source.num_classes, dtype=dtype, **kwargs
        )
        self.forward = _launcher_forward(self.model)

    def steps_per_epoch(self, batch_size: int) -> int:
        parallel.check_batch_size(batch_size, self.mesh)
        try:
            steps = self.source.steps_per_epoch(batch_size)
        except ValueError as e:
            fraction = self.config.data.validation_fraction
            if not fraction:
                raise
            raise ValueError(
                f'{e}, after data.validation_fraction={fraction!r} held out the validation '
                'split; lower one of them'
            ) from None
        return min(steps, self.config.steps_per_epoch) if self.config.steps_per_epoch else steps

    def train_epoch(self, batch_size: int, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        """Global training batches, sharded over the mesh (two in flight to the devices)."""
        batches = self.source.train_epoch(batch_size, self.config.seed, epoch, start_step)
        steps = self.steps_per_epoch(batch_size) - start_step
        yield from parallel.prefetch_to_mesh(itertools.islice(batches, steps), self.mesh)

    def evaluate(self, params: Any, statistics: Any, split: str = 'test') -> dict[str, float]:
        """Top-1 / top-5 accuracy (fractions) on 'test' or 'validation', each example once.

        With token labels ``[B, T]`` (a language model) the fractions count tokens, and the
        result also holds the mean per-token cross-entropy ``loss`` (nats) and
        ``perplexity`` = exp(loss).
        """
        batch_size = self.config.data.eval_batch_size
        parallel.check_batch_size(batch_size, self.mesh)
        totals = {'correct1': 0, 'correct5': 0, 'count': 0, 'loss_sum': 0.0}
        tokens = False
        for batch in self.source.eval_batches(batch_size, split):
            tokens = batch[1].ndim > 1
            counts = step.eval_step(
                params, statistics, *parallel.shard_batch(self.mesh, *batch), model=self.model
            )
            totals = {k: totals[k] + v for k, v in counts.items()}
        totals = to_python(totals)
        result = {
            'top1': totals['correct1'] / totals['count'],
            'top5': totals['correct5'] / totals['count'],
            'examples': totals['count'],
        }
        if tokens:
            result['loss'] = totals['loss_sum'] / totals['count']
            result['perplexity'] = math.exp(min(result['loss'], 700.0))  # no overflow
        return result

    def load_pretrained(self, workdir: str) -> tuple[dict, dict, str]:
        """:meth:`load_weights` of the config's pretrained weights (WORKDIR/pretrained)."""
        return self.load_weights(pretrained_path(self.config, workdir))

    def expected_variables(self) -> dict[str, Any]:
        """Shapes of the model's ``{'params': ..., 'batch_stats': ...}`` (no compute)."""
        sample = jnp.zeros((1, *self.source.image_shape), jnp.float32)
        init = functools.partial(self.model.init, train=False)
        return jax.eval_shape(init, jax.random.key(0), sample)

    def load_weights(self, path: str) -> tuple[dict, dict, str]:
        """Weights checked leaf by leaf against the model, placed on the mesh
        (:func:`parallel.shard_state`); and their fingerprint."""
        params, statistics, meta = checkpoint.load_weights(path)
        saved_model = meta.get('model', {}).get('name')
        if saved_model != self.config.model.name:
            raise ValueError(
                f'the weights at {path} are for model {saved_model!r}, but config.model.name is '
                f'{self.config.model.name!r}; point config.pretrained at matching weights or '
                'use another --workdir'
            )
        expected = self.expected_variables()
        trees.check_tree_matches(expected['params'], params, f'the params at {path}')
        trees.check_tree_matches(
            expected.get('batch_stats', {}), statistics, f'the batch statistics at {path}'
        )
        fingerprint = checkpoint.weights_fingerprint(params)
        # Replicated, or split over the mesh's 'fsdp' axis when config.fsdp > 1.
        params, statistics = parallel.shard_state((params, statistics), self.mesh)
        return params, statistics, fingerprint

    def load_jackpot(self, path: str) -> tuple[dict, dict, dict[str, Any]]:
        """``(masks, statistics, meta)`` of the jackpot at ``path`` (on the host), its
        masks and batch statistics checked against the model.

        Raises CheckpointError naming the path, what is missing or does not fit, and the
        fix, where the model would otherwise fail inside its first evaluation.
        """
        _, masks, statistics, meta = checkpoint.load_jackpot(path)
        expected = self.expected_variables()
        want_stats = trees.leaf_shapes(expected.get('batch_stats', {}))
        got_stats = trees.leaf_shapes(statistics)
        name = self.config.model.name
        fix = (
            'search it again (--mode=search into a new --workdir), or point config.jackpot at '
            'a complete jackpot of this model'
        )
        if want_stats and not got_stats:
            raise checkpoint.CheckpointError(
                f'the jackpot at {path} holds no batch statistics, but model {name!r} has '
                f'BatchNorm layers ({len(want_stats)} statistics, e.g. {next(iter(want_stats))}); '
                f'its statistics item was lost: {fix}'
            )
        problems = trees.tree_mismatches(want_stats, got_stats, 'batch statistics ')
        kernels = trees.leaf_shapes(expected['params'])
        for p, mask in sorted(masks.items()):
            if kernels.get(p) != tuple(np.shape(mask)):
                want = f'shape {kernels[p]}' if p in kernels else 'no such parameter'
                problems.append(f'mask {p} {tuple(np.shape(mask))}: the model has {want}')
        if problems:
            shown = problems[:10] + ([f'and {len(problems) - 10} more'] if problems[10:] else [])
            raise checkpoint.CheckpointError(
                f'the jackpot at {path} does not fit model {name!r} ('
                + '; '.join(shown)
                + f'): it was saved for another model or an item of it was damaged: {fix}'
            )
        return masks, statistics, meta


@functools.lru_cache(maxsize=None)
def _launcher_forward(model: Any) -> Any:
    """One forward per model (modules compare by their fields): jitted functions that take
    it as a static argument compile once per model, not once per run context."""
    return adapters.linen_forward(model, 'batch_stats')


def reestimate_statistics(
    setup: Setup, params: Any, statistics: Any, steps: int, batch_size: int
) -> Any:
    """BatchNorm running statistics updated over ``steps`` training batches; params unchanged.

    The model's own running-average update (Flax momentum 0.9 = PyTorch 0.1), as in
    the search's BatchNorm training mode, starting from ``statistics``; the batches are
    the first ``steps`` of the training stream (epoch 0 onwards), so it is deterministic.
    """
    batches = functools.partial(setup.train_epoch, batch_size)  # epoch -> its batches
    return evaluation.reestimate_statistics(setup.forward, params, statistics, batches, steps)


def print_main(*args) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(*args)


def pretrained_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.pretrained or os.path.join(workdir, PRETRAINED_DIR)


def jackpot_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The jackpot folder; config.jackpot 'none' (no jackpot) is never a folder name."""
    if config_lib.is_no_jackpot(config.jackpot):
        raise ValueError(
            f'config.jackpot={config.jackpot!r} means no jackpot, but mode {config.mode!r} needs '
            "one: set config.jackpot to a jackpot folder ('' = WORKDIR/jackpot)"
        )
    return config.jackpot or os.path.join(workdir, JACKPOT_DIR)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def has_search_checkpoints(workdir: str) -> bool:
    """Whether ``WORKDIR/checkpoints`` holds a complete search checkpoint (a step folder)."""
    folder = os.path.join(workdir, CHECKPOINTS_DIR)
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_search_outputs(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses, before a search starts, to write its jackpot outside its workdir, or over a
    jackpot (or tuned weights, with tune.epochs) of an earlier search it would not resume.

    A search in a workdir with search checkpoints resumes them, and its jackpot replaces
    the one they made. ``config.overwrite`` allows both. Raises UserError naming the path
    and the fix.
    """
    if config.overwrite:
        return
    path = jackpot_path(config, workdir)
    own = os.path.join(workdir, JACKPOT_DIR)
    if not _same_path(path, own):
        there = ', replacing the jackpot there' if os.path.exists(path) else ''
        raise UserError(
            f'config.jackpot={config.jackpot!r} lies outside --workdir={workdir}, and a search '
            f'writes its jackpot in its own workdir ({own}): leave config.jackpot empty, or '
            f'pass --config.overwrite=true to write it to {path}{there}'
        )
    if has_search_checkpoints(workdir):
        return
    outputs = [own] + ([os.path.join(workdir, TUNED_DIR)] if config.tune.epochs else [])
    present = [p for p in outputs if os.path.exists(p)]
    if present:
        raise UserError(
            f'{" and ".join(present)} already exist{"s" if len(present) == 1 else ""}, and '
            f'{os.path.join(workdir, CHECKPOINTS_DIR)} holds no search to resume, so a new '
            'search would replace them: search into another --workdir, or pass '
            '--config.overwrite=true to replace them'
        )


def check_pretrain_output(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses, before any training, to replace pre-trained weights (``config.overwrite``
    allows it), naming what the workdir made from them."""
    path = pretrained_path(config, workdir)
    if config.overwrite or not os.path.exists(path):
        return
    made = [
        os.path.join(workdir, name)
        for name in (JACKPOT_DIR, CHECKPOINTS_DIR, TUNED_DIR, MASKED_WEIGHTS_DIR)
        if os.path.exists(os.path.join(workdir, name))
    ]
    orphaned = (
        f'; {", ".join(made)} {"was" if len(made) == 1 else "were"} made from them and '
        'would be orphaned'
        if made
        else ''
    )
    raise UserError(
        f'{path} already holds pre-trained weights{orphaned}: pretrain into another --workdir '
        '(or --config.pretrained=NEW_FOLDER), or pass --config.overwrite=true to replace them'
    )


def check_new_output(config: ml_collections.ConfigDict, path: str, what: str) -> None:
    """Refuses to replace ``what`` at ``path`` unless ``config.overwrite``."""
    if os.path.exists(path) and not config.overwrite:
        raise UserError(
            f'{path} already holds {what}: move it elsewhere first, or pass '
            '--config.overwrite=true to replace it'
        )


def check_jackpot_weights(
    config: ml_collections.ConfigDict, workdir: str, jackpot_meta: Mapping, fingerprint: str
) -> None:
    """Raises ValueError unless the jackpot was found in the weights of this fingerprint."""
    if jackpot_meta.get('weights_fingerprint') not in (None, fingerprint):
        raise ValueError(
            f'the jackpot at {jackpot_path(config, workdir)} was found in other weights than '
            f'{pretrained_path(config, workdir)} (weights fingerprint '
            f"{jackpot_meta['weights_fingerprint'][:12]} != {fingerprint[:12]}); point "
            'config.pretrained at the original weights, or config.jackpot at a jackpot of these'
        )


def progress(steps: int, batch_size: int, desc: str, initial: int = 0):
    """A progress bar counted in steps, showing throughput in images per second."""
    return tqdm.tqdm(
        total=steps,
        initial=initial,
        desc=desc,
        unit='img',
        unit_scale=batch_size,
        leave=False,
        disable=jax.process_index() != 0,
    )


def epoch_learning_rate(cfg: ml_collections.ConfigDict, epoch: int) -> float:
    """The learning rate of an epoch under the per-epoch cosine."""
    return float(step.epoch_cosine(cfg.learning_rate, cfg.epochs, 1)(epoch))


def plan_masks(config: ml_collections.ConfigDict, params: Mapping) -> mask_plan.MaskPlan:
    """The mask plan of ``config.search`` (sparsity, allocation, pattern, include/exclude)."""
    s = config.search
    return mask_plan.plan_masks(
        params,
        s.sparsity,
        s.allocation,
        s.pattern,
        s.prune_include,
        s.prune_exclude,
        model_name=f'model {config.model.name!r}',
    )


def score_init_key(config: ml_collections.ConfigDict) -> jax.Array:
    """The key of drawn score inits ('kaiming', 'random'): ``jax.random.key(seed + 2)``."""
    return jax.random.key(config.seed + 2)
