"""SmolLM2-135M: the search step against a dense training step of the same model, and the
per-device memory of the search state at fsdp 1 and 8 (simulated CPU devices).

    python -m benchmarks.llm_step [--batch_size=2 --context=256 --steps=3]

Weights are random at SmolLM2-135M's shapes (the cost of a step does not depend on their
values); the search prunes 50 % of every attention and MLP projection (uniform). Times are
medians of ``--steps`` calls after ``--warmup``, wall and process CPU time, on one device;
the memory is XLA's analysis of the compiled step (shapes only) on a mesh of
``--devices`` simulated CPU devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--batch_size', type=int, default=2)
    parser.add_argument('--context', type=int, default=256)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--inner', type=int, default=1)
    parser.add_argument('--devices', type=int, default=8, help='simulated devices for memory')
    parser.add_argument('--no-memory', dest='memory', action='store_false')
    parser.add_argument('--no-timing', dest='timing', action='store_false')
    parser.add_argument('--output', default='', help='write the results as JSON here')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={args.devices}'
    import jax
    import numpy as np

    from benchmarks import search_step as bench
    from jackpot_jax.core import mask_plan, parallel, sparsity, step as step_lib
    from jackpot_jax.models.llama import Llama, init_params, smollm2_135m

    config = smollm2_135m()
    params = init_params(config)
    plan = mask_plan.plan_masks(params, 0.5, 'uniform')
    masks = plan.magnitude_masks(params)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, config.vocab_size, (args.batch_size, args.context + 1))
    s = {
        'model': Llama(config),
        'params': params,
        'statistics': {},
        'counts': plan.counts,
        'masks': masks,
        'scores': sparsity.init_scores(masks),
        'images': windows[:, :-1].astype(np.int32),
        'labels': windows[:, 1:].astype(np.int32),
        'optimizer': step_lib.sgd_optimizer(0.1, 5e-4, 0.9, bench.EPOCHS, bench.STEPS_PER_EPOCH),
        'pattern': None,
    }
    result: dict[str, Any] = {
        'model': 'smollm2_135m',
        'prunable_weights': int(sum(np.size(m) for m in masks.values())),
        'batch': f'{args.batch_size} x {args.context} tokens',
        'cpu': bench.cpu_model(),
    }
    if args.timing:
        mesh = parallel.make_mesh(1, 1)
        state = bench.search_state(s, mesh)
        dense_state, dense_fn = bench.dense_state_and_fn(s, mesh)
        runners = {
            'search': bench.Stateful(bench.make_search_fn(s, state, mesh), state, s['images'], s['labels']),
            'dense': bench.Stateful(dense_fn, dense_state, s['images'], s['labels']),
        }  # fmt: skip
        samples, first, _ = bench.measure(runners, args, bench.CompileLog())
        for name in runners:
            result[name] = {**bench.summarize(samples[name]), **first[name]}
        result['search_over_dense_wall'] = (
            result['search']['ms_median'] / result['dense']['ms_median']
        )
        result['search_over_dense_cpu'] = (
            first['search']['cpu_ms_median'] / first['dense']['cpu_ms_median']
        )
        del runners, state, dense_state
    if args.memory:
        rows = []
        for fsdp in (1, args.devices):
            mesh = parallel.make_mesh(args.devices, fsdp)
            abstract = bench.abstract_search_state(s, mesh)
            batch = [
                jax.ShapeDtypeStruct(
                    (args.devices,) + a.shape[1:], a.dtype, sharding=parallel.batch_sharding(mesh)
                )
                for a in (s['images'], s['labels'])
            ]
            sizes = parallel.step_memory(
                bench.make_search_fn(s, abstract, mesh), abstract, *batch, state=abstract
            )
            rows.append({'fsdp': fsdp, **{f'{k}_bytes': v for k, v in sizes.items()}})
            bench.log(f'fsdp={fsdp}: {parallel.format_memory(sizes)}')
        result['memory'] = {'devices': args.devices, 'batch_per_device': 1, 'rows': rows}
    print(json.dumps(result, indent=1, default=str))
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
