"""Benchmark: the jackpot search step against the dense training step of the same model.

Prints one JSON document to stdout (progress goes to stderr). For every model it
times, interleaved step by step after compilation and warm-up:

  * ``search``: the jitted search step (``step_lib.make_search_step``, state donated);
  * ``dense``: the jitted dense training step (``weight_training.make_train_step``, same optimizer);
  * ``mask_update``: the jitted mask update over all layers, rate 'constant' (``--pattern``: N:M):
    one search over every layer at once;
  * ``mask_update_per_layer``: the per-layer update it replaced (one search per layer,
    ``benchmarks/per_layer_reference.py``), on the same inputs, for comparison;
  * ``mask_update_rate``: the all-layer update with a traced rate < 1 (the general path);
  * ``search_no_mask_update``: the search step traced with the mask update replaced by
    the identity, so ``search - search_no_mask_update`` is the in-step cost of the update.

It reports wall-clock medians (and, steadier on a shared CPU machine, the process CPU
time), images/s, search/dense, the mask update's share of the search step, compile
seconds, and whether the search step compiled again after its first call. A table of
the main figures goes to stderr at the end.

``--xla_conv`` adds ``search_xla_conv``: the same search step with every conv computed by
XLA's own convolution and gradients (``jackpot_jax.models.conv`` off: the step before
it existed). ``--compare_torch`` also times the same model's PyTorch search step in this
process (``benchmarks/torch_step.py``: the CIFAR ResNets, vgg19_cifar, resnet50) and prints the
ratio; tensorflow must not be loaded (importing torch after it segfaults). The JSON's
environment names the CPU model.

``--models`` entries may carry their own batch and timed steps, ``name:batch:steps``
(e.g. ``resnet50:256:2``: big steps on a CPU, so few of them).
``--scaling`` adds the search step's images/s on 1, 2, 4, 8 devices of a data-parallel
mesh at a fixed global batch (on CPU, simulated devices: ``jax_num_cpu_devices`` is set
before the first JAX operation).
``--fsdp=N`` runs the comparison with the state split over N devices (a ``data`` x
``fsdp`` mesh of ``--devices``, see ``jackpot_jax/core/parallel.py``); ``--memory`` adds, for
fsdp = 1, 2, 4, 8 over all devices (or ``--devices``), the compiled search step's bytes
per device (search state, arguments, outputs, temporaries; XLA's memory analysis) and,
with ``--memory_timing``, the search and dense step times at each fsdp.

Run from the repository root::

    python -m benchmarks.search_step --models=resnet32 --steps=5
    python -m benchmarks.search_step \
        --models=resnet32:128,vgg19_cifar:64,resnet50:16,resnet50:256:2
    python -m benchmarks.search_step --models=resnet32:128:5 --xla_conv --compare_torch \
        --no-per_layer --no-rate_update --no-ablation
    python -m benchmarks.search_step --models=resnet20 --scaling --no-compare
    python -m benchmarks.search_step --models=vit_b_16:8 --memory --no-compare
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (importing jax initialises no backend)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import per_layer_reference  # noqa: E402
from jackpot_jax.core import parallel, sparsity, step as step_lib, structured
from jackpot_jax.launch import weight_training
from jackpot_jax.models import conv, zoo

# name: (image size, default batch, classes, weight decay)
MODEL_DEFAULTS = {
    'small_cnn': (32, 128, 10, 5e-4),
    'resnet20': (32, 128, 10, 5e-4),
    'resnet32': (32, 128, 10, 5e-4),
    'resnet56': (32, 128, 10, 5e-4),
    'vgg19_cifar': (32, 64, 10, 5e-4),
}
IMAGENET_DEFAULTS = (224, 16, 1000, 1e-4)
DEFAULT_MODELS = 'resnet32,vgg19_cifar,resnet50'
SCALING_DEVICES = (1, 2, 4, 8)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MASK_UPDATE_TARGET = 0.03  # mask update <= 3% of the search step
SEARCH_OVER_DENSE_TARGET = 1.10  # search step <= 1.10x the dense step
EPOCHS, STEPS_PER_EPOCH = 30, 100  # only shape the LR schedule

_TRACE = '/jax/core/compile/jaxpr_trace_duration'
_LOWER = '/jax/core/compile/jaxpr_to_mlir_module_duration'
_COMPILE = '/jax/core/compile/backend_compile_duration'


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument(
        '--models',
        default=DEFAULT_MODELS,
        help='comma-separated model names, each optionally name:batch or name:batch:steps',
    )
    p.add_argument('--batch_size', type=int, default=0, help='global batch (0: per-model default)')
    p.add_argument('--image_size', type=int, default=0, help='0: per-model default')
    p.add_argument('--dtype', choices=tuple(DTYPES), default='float32', help='compute dtype')
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('--pattern', default='', help="N:M masks, e.g. '2:4' (sets the sparsity)")
    p.add_argument('--steps', type=int, default=10, help='timed samples per function')
    p.add_argument('--inner', type=int, default=1, help='calls per timed sample')
    p.add_argument('--warmup', type=int, default=1, help='untimed calls after the first')
    p.add_argument('--devices', type=int, default=1, help='data-parallel mesh size')
    p.add_argument(
        '--fsdp', type=int, default=1, help='devices sharing one copy of the state (divides --devices)'
    )
    p.add_argument('--rate', type=float, default=0.5, help='traced rate of mask_update_rate')
    p.add_argument(
        '--compare',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='run the search / dense / mask-update comparison',
    )
    p.add_argument(
        '--rate_update',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='also time the mask update with a traced rate < 1',
    )
    p.add_argument(
        '--per_layer',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='also time the per-layer mask update the all-layer one replaced',
    )
    p.add_argument(
        '--ablation',
        action=argparse.BooleanOptionalAction,
        default=True,
        help='also time the search step without its mask update',
    )
    p.add_argument(
        '--xla_conv',
        action='store_true',
        help="also time the search step with XLA's own conv gradients (models.conv off)",
    )
    p.add_argument(
        '--compare_torch',
        action='store_true',
        help='also time the PyTorch search step of the same model and print the ratio',
    )
    p.add_argument(
        '--scaling',
        action='store_true',
        help='search-step images/s on 1, 2, 4, 8 devices at a fixed global batch',
    )
    p.add_argument(
        '--memory',
        action='store_true',
        help='per-device memory of the search step at fsdp = 1, 2, 4, 8',
    )
    p.add_argument(
        '--memory_timing',
        action=argparse.BooleanOptionalAction,
        default=False,
        help='with --memory, also time the search and dense steps at each fsdp',
    )
    p.add_argument(
        '--cpu_devices',
        type=int,
        default=8,
        help='simulated CPU devices when --scaling, --memory or --devices > 1',
    )
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output', default='', help='also write the JSON to this file')
    args = p.parse_args(argv)
    if args.steps < 1 or args.inner < 1 or args.warmup < 0:
        p.error('--steps and --inner must be >= 1, --warmup >= 0')
    if not 0.0 < args.rate < 1.0:
        p.error('--rate must be in (0, 1)')
    if args.fsdp < 1 or args.devices % args.fsdp:
        p.error(f'--fsdp={args.fsdp} must be >= 1 and divide --devices={args.devices}')
    return args


def parse_model_specs(text: str) -> list[tuple[str, int, int]]:
    """``'resnet32,resnet50:256:2'`` -> [(name, batch or 0, steps or 0), ...]."""
    specs = []
    for entry in (e.strip() for e in text.split(',')):
        if not entry:
            continue
        name, *numbers = entry.split(':')
        if len(numbers) > 2 or not all(n.isdigit() and int(n) > 0 for n in numbers):
            raise ValueError(
                f'--models entry {entry!r} is not name, name:batch or name:batch:steps '
                'with positive integers; e.g. resnet50:256:2'
            )
        batch, steps = ([int(n) for n in numbers] + [0, 0])[:2]
        specs.append((name, batch, steps))
    return specs


def configure_devices(args: argparse.Namespace) -> None:
    """Ask for simulated CPU devices; must run before the first JAX operation.

    Only the CPU client is affected, so this is harmless on a GPU machine. If a backend
    is already up (e.g. under pytest, whose conftest asks for 8), it is left as it is.
    """
    wanted = max(args.devices, args.cpu_devices if args.scaling or args.memory else 1)
    if wanted > 1:
        try:
            jax.config.update('jax_num_cpu_devices', wanted)
        except RuntimeError:
            log('note: JAX backends already initialised; keeping their device count')


class CompileLog:
    """Counts backend compiles and sums trace + lowering + compile seconds."""

    def __init__(self):
        self.seconds = 0.0
        self.compiles = 0

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in (_TRACE, _LOWER, _COMPILE):
            self.seconds += duration
        self.compiles += event == _COMPILE


def model_settings(name: str, args: argparse.Namespace) -> tuple[int, int, int, float]:
    """(image size, global batch, classes, weight decay) for a model, flags applied."""
    size, batch, classes, wd = MODEL_DEFAULTS.get(name, IMAGENET_DEFAULTS)
    return args.image_size or size, args.batch_size or batch, classes, wd


def fresh(tree: Any) -> Any:
    """A copy with its own buffers (donation deletes the buffers of the state it is given)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Random-init model, global-magnitude counts, magnitude masks, scores, a fixed batch."""
    size, batch, classes, wd = model_settings(name, args)
    model = zoo.get_model(name, classes, dtype=DTYPES[args.dtype])
    init = jax.jit(lambda rng, x: model.init(rng, x, train=False))
    variables = init(jax.random.key(args.seed), jnp.zeros((1, size, size, 3), jnp.float32))
    params, statistics = variables['params'], variables.get('batch_stats', {})
    flat = sparsity.flatten(params)
    kernels = {p: flat[p] for p in sparsity.prunable_paths(params)}
    pattern = structured.parse_pattern(args.pattern)
    if pattern:
        counts = structured.nm_counts({p: w.shape for p, w in kernels.items()}, *pattern)
        magnitude = functools.partial(
            structured.magnitude_masks, counts=counts, n=pattern[0], m=pattern[1]
        )
    else:
        counts = sparsity.pruned_counts(kernels, args.sparsity)
        magnitude = functools.partial(sparsity.magnitude_masks, counts=counts)
    masks = jax.jit(magnitude)(kernels)
    scores = sparsity.init_scores(masks)
    rng = np.random.default_rng(args.seed)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    optimizer = step_lib.sgd_optimizer(0.1, wd, 0.9, EPOCHS, STEPS_PER_EPOCH)
    sizes = {p: int(np.size(w)) for p, w in kernels.items()}
    return dict(
        name=name,
        model=model,
        image_size=size,
        batch_size=batch,
        num_classes=classes,
        params=params,
        statistics=statistics,
        counts=counts,
        masks=masks,
        scores=scores,
        images=images,
        labels=labels,
        optimizer=optimizer,
        sizes=sizes,
        pattern=pattern,
    )


def make_search_fn(s: dict[str, Any], state: Any = None, mesh: Any = None) -> Callable:
    """The jitted search step; with ``state`` and ``mesh``, keeping the state's layout."""
    return step_lib.make_search_step(
        state_sharding=None if mesh is None else parallel.state_sharding(state, mesh),
        model=s['model'],
        optimizer=s['optimizer'],
        counts=s['counts'],
        steps_per_epoch=STEPS_PER_EPOCH,
        epochs=EPOCHS,
        pattern=s['pattern'],
    )


def update_fn(s: dict[str, Any], per_layer: bool = False) -> Callable:
    """The mask update of every layer: ``(scores, masks, rate=...) -> (masks, changes)``.

    ``per_layer``: the update with one search per layer that the library ran before.
    """
    if s['pattern']:
        n, m = s['pattern']
        if per_layer:
            return functools.partial(
                per_layer_reference.nm_update_masks,
                counts=s['counts'],
                n=n,
                m=m,
                mode='short_restriction',
            )
        return functools.partial(structured.update_masks, counts=s['counts'], n=n, m=m)
    if per_layer:
        return functools.partial(per_layer_reference.update_masks, counts=s['counts'])
    return functools.partial(sparsity.update_masks, counts=s['counts'])


def _identity_update(scores, masks, counts, *pattern, mode='short_restriction', rate=None):
    """Stand-in for the mask update that changes nothing (for the ablation)."""
    return dict(masks), {p: jnp.zeros((), jnp.int32) for p in masks}


def search_state(s: dict[str, Any], mesh) -> step_lib.SearchState:
    state = step_lib.init_search_state(
        fresh(s['params']),
        fresh(s['statistics']),
        fresh(s['masks']),
        fresh(s['scores']),
        s['optimizer'],
    )
    return parallel.shard_state(state, mesh)


def abstract_search_state(s: dict[str, Any], mesh) -> Any:
    """The search state's shapes, dtypes and shardings on ``mesh``, no arrays."""
    shapes = jax.eval_shape(
        functools.partial(step_lib.init_search_state, optimizer=s['optimizer']),
        s['params'], s['statistics'], s['masks'], s['scores'],
    )
    return jax.tree.map(
        lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
        shapes, parallel.state_sharding(shapes, mesh),
    )


def dense_state_and_fn(s: dict[str, Any], mesh) -> tuple[Any, Callable]:
    """The dense training state, placed like the search state, and its jitted step."""
    state = parallel.shard_state(
        weight_training.init_train_state(fresh(s['params']), fresh(s['statistics']), s['optimizer']),
        mesh,
    )
    step = functools.partial(weight_training.train_step, model=s['model'], optimizer=s['optimizer'])
    out = (parallel.state_sharding(state, mesh), parallel.replicated(mesh))
    return state, jax.jit(step, donate_argnums=0, out_shardings=out)


class Stateful:
    """A jitted step with a donated state: each call advances the state.

    ``patches``: ``(object, attribute, value)`` set while it runs; they only affect
    tracing (a cache hit never looks at them).
    """

    def __init__(self, fn: Callable, state: Any, *args: Any, patches: Sequence[tuple] = ()):
        self.fn, self.state, self.args, self.patches = fn, state, args, tuple(patches)

    def __call__(self) -> Any:
        with contextlib.ExitStack() as stack:
            for target, attribute, value in self.patches:
                stack.enter_context(mock.patch.object(target, attribute, value))
            self.state, out = self.fn(self.state, *self.args)
        return self.state, out


def _xla_formulation(shape, computation, mode='auto'):
    """Stand-in for ``conv.choose_formulation``: XLA's own conv and gradients everywhere."""
    return 'xla'


class Pure:
    """A jitted function of fixed arguments."""

    def __init__(self, fn: Callable, *args: Any):
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        return self.fn(*self.args)


def summarize(seconds: Sequence[float], batch: int | None = None) -> dict[str, float]:
    med = statistics.median(seconds)
    out = {
        'ms_median': 1e3 * med,
        'ms_min': 1e3 * min(seconds),
        'ms_max': 1e3 * max(seconds),
        'samples': len(seconds),
    }
    if batch:
        out['images_per_s'] = batch / med
    return out


def measure(
    runners: dict[str, Callable], args: argparse.Namespace, compile_log: CompileLog
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]], int]:
    """First call (compile) of each, warm-up, then timed samples interleaved round-robin.

    The training steps and the pure functions (the mask updates) are warmed up and timed
    in two separate phases. A call right after a large step runs slower (on XLA:CPU,
    ResNet-50's all-layer update took 1.37 s after a batch-128 step, 0.22-0.33 s on its
    own), and a rotated round-robin keeps the same function right after the step.

    Returns (wall-clock seconds per call, first-call info plus the median process CPU
    time per call, backend compiles after the first calls, i.e. during warm-up and
    timing: any is a recompilation). On a shared machine the CPU time (all threads of
    this process) is the steadier measure of work; wall time is what a user waits.
    """
    first, compiles_before = {}, compile_log.compiles
    for name, run in runners.items():
        before, t0 = compile_log.seconds, time.perf_counter()
        jax.block_until_ready(run())
        first[name] = {
            'first_call_s': time.perf_counter() - t0,
            'compile_s': compile_log.seconds - before,
        }
        log(f'  {name}: first call {first[name]["first_call_s"]:.2f} s')
    if compile_log.compiles == compiles_before:  # this JAX reports no compile events
        log('note: no compile events seen; compile_s and recompile counts are unknown')
        for info in first.values():
            info['compile_s'] = None
    compiles = compile_log.compiles
    samples: dict[str, list[float]] = {n: [] for n in runners}
    cpu: dict[str, list[float]] = {n: [] for n in runners}
    steps = [n for n, run in runners.items() if isinstance(run, Stateful)]
    for names in (steps, [n for n in runners if n not in steps]):
        if not names:
            continue
        for _ in range(args.warmup):
            for name in names:
                jax.block_until_ready(runners[name]())
        for i in range(args.steps):
            shift = i % len(names)  # rotate the order so no function always runs first
            for name in names[shift:] + names[:shift]:
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.inner - 1):
                    runners[name]()
                jax.block_until_ready(runners[name]())
                samples[name].append((time.perf_counter() - t0) / args.inner)
                cpu[name].append((time.process_time() - c0) / args.inner)
    for name in runners:
        first[name]['cpu_ms_median'] = 1e3 * statistics.median(cpu[name])
    seen = compile_log.compiles > compiles_before
    return samples, first, compile_log.compiles - compiles if seen else None


def cache_size(fn: Callable) -> int | None:
    """Number of compiled specialisations held by a jitted function (None if unknown)."""
    try:
        return int(fn._cache_size())
    except AttributeError:
        return None


def recompiled(later_compiles: int | None, size: int | None) -> bool | None:
    """From compile events when JAX reports them, else from the jit cache (<= 2 entries)."""
    if later_compiles is not None:
        return later_compiles > 0
    return None if size is None else size > 2


def bench_model(name: str, args: argparse.Namespace, compile_log: CompileLog) -> dict[str, Any]:
    """The side-by-side comparison for one model."""
    s = setup(name, args)
    mesh = parallel.make_mesh(args.devices, args.fsdp)
    parallel.check_batch_size(s['batch_size'], mesh)
    batch = parallel.shard_batch(mesh, s['images'], s['labels'])
    state = search_state(s, mesh)
    search_fn = make_search_fn(s, state, mesh)
    dense_state, dense_fn = dense_state_and_fn(s, mesh)
    # Scores as they look after some steps: continuous values, so the update swaps weights.
    noise = np.random.default_rng(args.seed + 1)
    moved = {
        p: v + jnp.asarray(noise.normal(0, 0.01, v.shape), jnp.float32)
        for p, v in s['scores'].items()
    }
    mask_args = parallel.shard_state((moved, fresh(s['masks'])), mesh)
    mask_fn = jax.jit(functools.partial(update_fn(s), rate=None))
    runners: dict[str, Callable] = {
        'search': Stateful(search_fn, state, *batch),
        'dense': Stateful(dense_fn, dense_state, *batch),
        'mask_update': Pure(mask_fn, *mask_args),
    }
    if args.per_layer:
        per_layer_fn = jax.jit(functools.partial(update_fn(s, per_layer=True), rate=None))
        runners['mask_update_per_layer'] = Pure(per_layer_fn, *mask_args)
    if args.rate_update:
        update = update_fn(s)
        rate_fn = jax.jit(lambda sc, m, r: update(sc, m, rate=r))
        rate = parallel.replicate(jnp.float32(args.rate), mesh)
        runners['mask_update_rate'] = Pure(rate_fn, *mask_args, rate)
    if args.ablation:
        ablated = search_state(s, mesh)
        patches = [(lib, 'update_masks', _identity_update) for lib in (sparsity, structured)]
        runners['search_no_mask_update'] = Stateful(
            make_search_fn(s, ablated, mesh), ablated, *batch, patches=patches
        )
    if args.xla_conv:
        plain = search_state(s, mesh)
        runners['search_xla_conv'] = Stateful(
            make_search_fn(s, plain, mesh),
            plain,
            *batch,
            patches=[(conv, 'choose_formulation', _xla_formulation)],
        )
    log(f'{name}: batch {s["batch_size"]}, {args.dtype}, {args.devices} device(s), '
        f'{parallel.describe(mesh)}')
    samples, first, later_compiles = measure(runners, args, compile_log)

    b = s['batch_size']
    result: dict[str, Any] = {
        'model': name,
        'image_size': s['image_size'],
        'batch_size': b,
        'num_classes': s['num_classes'],
        'dtype': args.dtype,
        'sparsity': sum(s['counts'].values()) / sum(s['sizes'].values()),
        'pattern': args.pattern,
        'num_devices': args.devices,
        'fsdp': args.fsdp,
        'prunable_layers': len(s['sizes']),
        'prunable_weights': sum(s['sizes'].values()),
        'kept_weights': sum(s['sizes'].values()) - sum(s['counts'].values()),
        'largest_layer': max(s['sizes'].values()),
    }
    for key, secs in samples.items():
        with_images = key in ('search', 'dense', 'search_no_mask_update', 'search_xla_conv')
        result[key] = {**summarize(secs, b if with_images else None), **first[key]}
    search_ms = result['search']['ms_median']
    result['search_over_dense'] = search_ms / result['dense']['ms_median']
    result['search_over_dense_cpu_time'] = (
        result['search']['cpu_ms_median'] / result['dense']['cpu_ms_median']
    )
    result['mask_update']['fraction_of_search_step'] = (
        result['mask_update']['ms_median'] / search_ms
    )
    result['mask_update']['fraction_of_search_step_cpu_time'] = (
        result['mask_update']['cpu_ms_median'] / result['search']['cpu_ms_median']
    )
    if args.per_layer:
        row = result['mask_update_per_layer']
        row['fraction_of_search_step'] = row['ms_median'] / search_ms
        row['fraction_of_search_step_cpu_time'] = (
            row['cpu_ms_median'] / result['search']['cpu_ms_median']
        )
        result['per_layer_over_all_layer'] = row['ms_median'] / result['mask_update']['ms_median']
    if args.rate_update:
        result['mask_update_rate']['fraction_of_search_step'] = (
            result['mask_update_rate']['ms_median'] / search_ms
        )
    if args.ablation:
        in_step = search_ms - result['search_no_mask_update']['ms_median']
        result['mask_update_in_step_ms'] = in_step
        result['mask_update_in_step_fraction'] = in_step / search_ms
        result['mask_update_in_step_fraction_cpu_time'] = 1 - (
            result['search_no_mask_update']['cpu_ms_median'] / result['search']['cpu_ms_median']
        )
        result['search_no_mask_update_over_dense'] = (
            result['search_no_mask_update']['ms_median'] / result['dense']['ms_median']
        )
    if args.xla_conv:
        xla = result['search_xla_conv']
        result['xla_conv_over_search'] = xla['ms_median'] / search_ms
        result['xla_conv_over_search_cpu_time'] = (
            xla['cpu_ms_median'] / result['search']['cpu_ms_median']
        )
    if args.compare_torch:
        del runners, state, dense_state, mask_args  # free their memory for PyTorch's step
        result['torch'] = torch_comparison(s, args)
        torch_ms = result['torch']['ms_median']
        result['torch_over_search'] = torch_ms / search_ms
        result['torch_over_search_cpu_time'] = (
            result['torch']['cpu_ms_median'] / result['search']['cpu_ms_median']
        )
        if args.xla_conv:
            xla_ms = result['search_xla_conv']['ms_median']
            result['torch_over_search_xla_conv'] = torch_ms / xla_ms
    # A recompilation is a trace + backend compile after the first call. The jit cache
    # may still hold 2 entries without one: on a mesh the first state carries the specs
    # P() that parallel.replicate gives, later ones the P(None, ...) that jit returns.
    result['recompilation'] = {
        'search_calls': 1 + args.warmup + args.steps * args.inner,
        'search_cache_size': cache_size(search_fn),
        'dense_cache_size': cache_size(dense_fn),
        'compiles_after_first_calls': later_compiles,
        'search_recompiled': recompiled(later_compiles, cache_size(search_fn)),
    }
    result['targets'] = {
        'mask_update_fraction_max': MASK_UPDATE_TARGET,
        'mask_update_met': result['mask_update']['fraction_of_search_step'] <= MASK_UPDATE_TARGET,
        'search_over_dense_max': SEARCH_OVER_DENSE_TARGET,
        'search_over_dense_met': result['search_over_dense'] <= SEARCH_OVER_DENSE_TARGET,
    }
    return result


def torch_comparison(s: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The PyTorch search step of the same model, batch and sparsity (``torch_step``)."""
    if 'tensorflow' in sys.modules:
        raise RuntimeError(
            'tensorflow is loaded in this process and importing torch after it segfaults; '
            'run --compare_torch from a process that does not import tensorflow'
        )
    from benchmarks import torch_step  # imports torch: only when asked

    log(f"{s['name']}: PyTorch search step")
    return torch_step.time_search_step(
        s['name'],
        s['batch_size'],
        s['image_size'],
        s['num_classes'],
        steps=args.steps,
        sparsity=args.sparsity,
        weight_decay=MODEL_DEFAULTS.get(s['name'], IMAGENET_DEFAULTS)[3],
        warmup=args.warmup,
        seed=args.seed,
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return ''


def bench_scaling(name: str, args: argparse.Namespace, compile_log: CompileLog) -> dict[str, Any]:
    """Search-step images/s on meshes of 1, 2, 4, 8 devices at one global batch."""
    s = setup(name, args)
    b = s['batch_size']
    available = len(jax.devices())
    counts = [n for n in SCALING_DEVICES if n <= available and b % n == 0]
    runners = {}
    for n in counts:
        mesh = parallel.make_mesh(n)
        batch = parallel.shard_batch(mesh, s['images'], s['labels'])
        state = search_state(s, mesh)
        runners[f'devices_{n}'] = Stateful(make_search_fn(s, state, mesh), state, *batch)
    log(f'{name} scaling: batch {b}, devices {counts} of {available}')
    samples, first, later_compiles = measure(runners, args, compile_log)
    rows = []
    for n in counts:
        row = {'devices': n, **summarize(samples[f'devices_{n}'], b), **first[f'devices_{n}']}
        rows.append(row)
    sizes = [cache_size(r.fn) for r in runners.values()]
    base = rows[0]['images_per_s']
    for row in rows:
        row['speedup'] = row['images_per_s'] / base
        row['efficiency'] = row['speedup'] / (row['devices'] / rows[0]['devices'])
    return {
        'model': name,
        'global_batch_size': b,
        'dtype': args.dtype,
        'available_devices': available,
        'rows': rows,
        'search_cache_sizes': sizes,
        'compiles_after_first_calls': later_compiles,
        'search_recompiled': recompiled(
            later_compiles, max((s for s in sizes if s is not None), default=None)
        ),
    }


MEMORY_FSDP = (1, 2, 4, 8)


def bench_memory(name: str, args: argparse.Namespace, compile_log: CompileLog) -> dict[str, Any]:
    """Per-device bytes of the compiled search step at fsdp = 1, 2, 4, 8 over one device
    count (``--devices`` if > 1, else all), one global batch; and step times if asked."""
    s = setup(name, args)
    b = s['batch_size']
    devices = args.devices if args.devices > 1 else len(jax.devices())
    rows = []
    for fsdp in (f for f in MEMORY_FSDP if devices % f == 0):
        mesh = parallel.make_mesh(devices, fsdp)
        parallel.check_batch_size(b, mesh)
        # Shapes and shardings only: the compiled program's sizes need no memory.
        abstract = abstract_search_state(s, mesh)
        batch = [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.batch_sharding(mesh))
            for a in (s['images'], s['labels'])
        ]
        search_fn = make_search_fn(s, abstract, mesh)
        t0 = time.perf_counter()
        sizes = parallel.step_memory(search_fn, abstract, *batch, state=abstract)
        row: dict[str, Any] = {
            'fsdp': fsdp,
            'mesh': parallel.describe(mesh),
            'compile_s': time.perf_counter() - t0,
            **{f'{k}_bytes': v for k, v in sizes.items()},
        }
        log(f'{name} fsdp={fsdp}: {parallel.format_memory(sizes)}')
        if args.memory_timing:
            state = search_state(s, mesh)
            batch = parallel.shard_batch(mesh, s['images'], s['labels'])
            dense_state, dense_fn = dense_state_and_fn(s, mesh)
            runners = {
                'search': Stateful(search_fn, state, *batch),
                'dense': Stateful(dense_fn, dense_state, *batch),
            }
            samples, first, _ = measure(runners, args, compile_log)
            for key in runners:
                row[key] = {**summarize(samples[key], b), **first[key]}
            row['search_over_dense'] = row['search']['ms_median'] / row['dense']['ms_median']
            del runners, dense_state, state
        rows.append(row)
    base = rows[0]['state_bytes']
    for row in rows:
        # 1.0: the state is split evenly; more: some leaves stay replicated.
        row['state_over_even_split'] = row['state_bytes'] / (base / row['fsdp'])
    return {
        'model': name,
        'global_batch_size': b,
        'devices': devices,
        'dtype': args.dtype,
        'min_sharded_size': parallel.MIN_SHARDED_SIZE,
        'rows': rows,
    }


def memory_table(results: dict[str, dict[str, Any]]) -> str:
    """:func:`bench_memory` results as a plain-text table (MiB per device)."""
    header = ('model (batch)', 'fsdp', 'state MiB', 'vs 1/fsdp', 'args MiB', 'temp MiB',
              'peak MiB', 'search ms', 'dense ms', 'search/dense')
    table = [header]
    mib = lambda n: f'{n / 2**20:.1f}'  # noqa: E731
    for r in results.values():
        for row in r['rows']:
            timed = 'search' in row
            table.append((
                f"{r['model']} ({r['global_batch_size']})", str(row['fsdp']),
                mib(row['state_bytes']), f"{row['state_over_even_split']:.3f}",
                mib(row['argument_bytes']), mib(row['temp_bytes']), mib(row['peak_bytes']),
                f"{row['search']['ms_median']:.0f}" if timed else '-',
                f"{row['dense']['ms_median']:.0f}" if timed else '-',
                f"{row['search_over_dense']:.3f}" if timed else '-',
            ))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return '\n'.join(
        ' | '.join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table
    )


def environment() -> dict[str, Any]:
    devices = jax.devices()
    return {
        'jax': jax.__version__,
        'platform': devices[0].platform,
        'device_kind': devices[0].device_kind,
        'device_count': len(devices),
        'cpu_count': os.cpu_count(),
        'cpu_model': cpu_model(),
        'python': sys.version.split()[0],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the JSON and returns it as a dict."""
    args = parse_args(argv)
    configure_devices(args)
    specs = parse_model_specs(args.models)
    for name, _, _ in specs:
        zoo.get_model(name, 10)  # fail fast on an unknown name
    compile_log = CompileLog()
    jax.monitoring.register_event_duration_secs_listener(compile_log)
    try:
        result: dict[str, Any] = {
            'benchmark': 'search_step',
            'environment': environment(),
            'flags': {k: v for k, v in vars(args).items()},
            'models': {},
        }
        for name, batch, steps in specs:
            key = f'{name}:{batch}' if batch else name
            run_args = argparse.Namespace(
                **{**vars(args), 'batch_size': batch or args.batch_size, 'steps': steps or args.steps}
            )
            if args.compare:
                try:
                    result['models'][key] = bench_model(name, run_args, compile_log)
                except jax.errors.JaxRuntimeError as e:
                    if 'RESOURCE_EXHAUSTED' not in str(e):
                        raise
                    # Too big for this device: say so and go on with the next model.
                    reason = f'out of memory: {str(e).splitlines()[0]}'
                    log(f'{key}: skipped, {reason}')
                    result['models'][key] = {'model': name, 'batch_size': batch, 'skipped': reason}
            if args.scaling:
                result.setdefault('scaling', {})[key] = bench_scaling(name, run_args, compile_log)
            if args.memory:
                result.setdefault('memory', {})[key] = bench_memory(name, run_args, compile_log)
    finally:
        unregister = getattr(jax.monitoring, 'unregister_event_duration_listener', None)
        if unregister is not None:
            unregister(compile_log)
    text = json.dumps(result, indent=2, default=_json_default)
    print(text, flush=True)
    if result['models']:
        log(summary_table(result['models']))
        if args.compare_torch or args.xla_conv:
            log(f"CPU: {result['environment']['cpu_model']}")
            log(conv_table(result['models']))
    if result.get('memory'):
        log(memory_table(result['memory']))
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')
    return result


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """The main figures of :func:`bench_model` results as a plain-text table.

    Step times are wall-clock medians; the ratio and the shares in CPU time (all
    threads of this process) follow in brackets, steadier on a shared machine.
    """

    def share(row: dict[str, Any]) -> str:
        return (
            f"{row['ms_median']:.0f} ms, {row['fraction_of_search_step']:.1%} "
            f"[{row['fraction_of_search_step_cpu_time']:.1%}]"
        )

    header = (
        'model (batch)',
        'search ms',
        'dense ms',
        'search/dense [cpu]',
        'update, all layers: ms, share [cpu]',
        'update, per layer: ms, share [cpu]',
    )
    table = [header]
    for r in rows.values():
        if 'skipped' in r:
            table.append((f"{r['model']} ({r['batch_size']})", r['skipped'], '', '', '', ''))
            continue
        per_layer = r.get('mask_update_per_layer')
        table.append(
            (
                f"{r['model']} ({r['batch_size']})",
                f"{r['search']['ms_median']:.0f}",
                f"{r['dense']['ms_median']:.0f}",
                f"{r['search_over_dense']:.3f} [{r['search_over_dense_cpu_time']:.3f}]",
                share(r['mask_update']),
                share(per_layer) if per_layer else '-',
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return '\n'.join(
        ' | '.join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table
    )


def conv_table(rows: dict[str, dict[str, Any]]) -> str:
    """Our search step against itself with XLA's conv gradients and against PyTorch's:
    wall-clock medians in ms, CPU time in brackets; speed-ups as time ratios."""

    def cell(row: dict[str, Any]) -> str:
        return f"{row['ms_median']:.0f} [{row['cpu_ms_median']:.0f}]"

    header = (
        'model (batch)',
        'ours ms [cpu]',
        'XLA conv ms [cpu]',
        'XLA conv / ours',
        'PyTorch ms [cpu]',
        'PyTorch / ours [cpu]',
    )
    table = [header]
    for r in rows.values():
        if 'skipped' in r:
            continue
        xla, torch_row = r.get('search_xla_conv'), r.get('torch')
        table.append(
            (
                f"{r['model']} ({r['batch_size']})",
                cell(r['search']),
                cell(xla) if xla else '-',
                f"{r['xla_conv_over_search']:.2f}" if xla else '-',
                cell(torch_row) if torch_row else '-',
                (
                    f"{r['torch_over_search']:.2f} [{r['torch_over_search_cpu_time']:.2f}]"
                    if torch_row
                    else '-'
                ),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return '\n'.join(
        ' | '.join(text.ljust(w) for text, w in zip(line, widths)).rstrip() for line in table
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


if __name__ == '__main__':
    main()
