"""What every launcher mode shares: the run context (:class:`Setup`: mesh, data, model,
weights and jackpots checked against the model, the one evaluation over a split), and
BatchNorm re-estimation. Every mode takes the config the launcher resolved at its entry
(:func:`jackpot_jax.launch.config_checks.resolved`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jackpot_jax.core import adapters, parallel, trees
from jackpot_jax.data import catalog
from jackpot_jax.engine import evaluation
from jackpot_jax.io import checkpoint, llama_weights, workdir as workdir_lib
from jackpot_jax.launch import config as config_lib, config_checks
from jackpot_jax.models import zoo


class Setup:
    """What every mode needs: the device mesh, the data source and the model."""

    def __init__(self, config: ml_collections.ConfigDict):
        config_checks.require_resolved(config)
        self.config = config
        if config.num_devices and jax.process_count() > 1:
            raise ValueError(
                f'num_devices={config.num_devices} with {jax.process_count()} processes would '
                'leave hosts without devices; use num_devices=0 (all) on multi-host runs'
            )
        self.mesh = parallel.make_mesh(config.num_devices or None, config.fsdp)
        options = config.data.to_dict()
        kwargs = {k: v for k, v in config.model.items() if k not in ('name', 'dtype')}
        if config.model.name == llama_weights.MODEL_NAME:  # the weights say what the model is
            weights = _llama_weights(config.pretrained)
            options['tokenizer'] = weights.tokenizer_path
            fields = dataclasses.asdict(weights.config)
            kwargs = {**{k: v for k, v in fields.items() if k != 'vocab_size'}, **kwargs}
        self.source = catalog.load_source(
            config.data.name,
            config.data.data_dir or None,
            options,
            validation_fraction=config.data.validation_fraction,
            threads=config.data.threads,
        )
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

    def split_metrics(self, params: Any, statistics: Any, split: str = 'test') -> dict[str, float]:
        """The metrics of :func:`jackpot_jax.engine.evaluation.evaluate_metrics` on 'test'
        or 'validation', each example once, the batches split over the mesh: top-1 / top-5
        (fractions), the mean cross-entropy ``loss`` and ``perplexity``; a language model's
        count tokens."""
        batch_size = self.config.data.eval_batch_size
        parallel.check_batch_size(batch_size, self.mesh)
        batches = self.source.eval_batches(batch_size, split)
        return evaluation.evaluate_metrics(
            self.forward, params, statistics, batches, mesh=self.mesh
        )

    def load_pretrained(self, workdir: str) -> tuple[dict, dict, str]:
        """:meth:`load_weights` of the config's pretrained weights (WORKDIR/pretrained)."""
        return self.load_weights(workdir_lib.pretrained_path(workdir, self.config.pretrained))

    def expected_variables(self) -> dict[str, Any]:
        """Shapes of the model's ``{'params': ..., 'batch_stats': ...}`` (no compute)."""
        sample = jnp.zeros((1, *self.source.image_shape), jnp.float32)
        init = functools.partial(self.model.init, train=False)
        return jax.eval_shape(init, jax.random.key(0), sample)

    def load_weights(self, path: str) -> tuple[dict, dict, str]:
        """Weights checked leaf by leaf against the model, placed on the mesh
        (:func:`parallel.shard_state`); and their fingerprint."""
        llama = self.config.model.name == llama_weights.MODEL_NAME
        if llama and not llama_weights.is_converted(path):  # a GGUF file or HF folder
            params, statistics = _llama_weights(path).params, {}
            meta = {'model': {'name': llama_weights.MODEL_NAME}}
        else:
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

    def read_jackpot(self, path: str) -> tuple[dict, dict, dict[str, Any]]:
        """``(masks, statistics, meta)`` of the jackpot at ``path`` (on the host), its
        masks and batch statistics checked against the model.

        Raises CheckpointError naming the path, what is missing or does not fit, and the
        fix, where the model would otherwise fail inside its first evaluation.
        """
        _, masks, statistics, meta = checkpoint.read_jackpot_bundle(path)
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


@functools.lru_cache(maxsize=1)
def _llama_weights(path: str) -> llama_weights.LlamaWeights:
    """A LLaMA's weights, read once per process for every run context of the same file."""
    return llama_weights.load_llama(path)


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


def jackpot_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The jackpot folder of a mode that needs one; config.jackpot 'none' (no jackpot) is
    never a folder name."""
    if config_lib.is_no_jackpot(config.jackpot):
        raise ValueError(
            f'config.jackpot={config.jackpot!r} means no jackpot, but mode {config.mode!r} needs '
            "one: set config.jackpot to a jackpot folder ('' = WORKDIR/jackpot)"
        )
    return workdir_lib.jackpot_path(workdir, config.jackpot)


def check_jackpot_weights(
    config: ml_collections.ConfigDict, workdir: str, jackpot_meta: Mapping, fingerprint: str
) -> None:
    """Raises ValueError unless the jackpot was found in the weights of this fingerprint."""
    if jackpot_meta.get('weights_fingerprint') not in (None, fingerprint):
        raise ValueError(
            f'the jackpot at {jackpot_path(config, workdir)} was found in other weights than '
            f'{workdir_lib.pretrained_path(workdir, config.pretrained)} (weights fingerprint '
            f"{jackpot_meta['weights_fingerprint'][:12]} != {fingerprint[:12]}); point "
            'config.pretrained at the original weights, or config.jackpot at a jackpot of these'
        )
