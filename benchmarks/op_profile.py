"""Per-op profile of the jitted search step on the local backend (CPU by design).

Runs the search step of ``benchmarks.search_step`` (same model, masks, scores and
optimizer), traces a few calls with ``jax.profiler`` and reads the trace back with
``jax.profiler.ProfileData``: every XLA op's self time (nested events excluded),
summed over the traced calls and divided by their number, joined with the compiled
HLO so each op is named by what it computes (its JAX source op and a role: conv
forward, conv input gradient, conv filter gradient, batch norm, ...).

``--xla_conv`` profiles the step with every conv computed by XLA's own convolution and
gradients (``jackpot_jax.models.conv`` off), as the step was before that module.

Run from the repository root::

    python -m benchmarks.op_profile --models=resnet32:128,vgg19_cifar:64,resnet50:16
    python -m benchmarks.op_profile --models=resnet32:128 --xla_conv

Prints, per model, the roles' totals and the top ops with their share of the summed op
time, and one JSON document to ``--output`` if given.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any
from unittest import mock

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import search_step as bench  # noqa: E402

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'^[^ ]+(?:\{[^}]*\})? ([\w\-]+)\(|^\([^=]*\) ([\w\-]+)\(')


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='resnet32:128,vgg19_cifar:64,resnet50:16')
    p.add_argument('--steps', type=int, default=3, help='traced calls per model')
    p.add_argument('--top', type=int, default=15, help='ops listed per model')
    p.add_argument('--sparsity', type=float, default=0.9)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--xla_conv', action='store_true', help="XLA's own conv gradients (models.conv off)"
    )
    p.add_argument('--output', default='', help='also write the JSON to this file')
    return p.parse_args(argv)


def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
    """Every instruction of an HLO module text: name -> {line, op_name, source}."""
    ops = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        source = re.search(r'source_file="([^"]*)" source_line=(\d+)', rest)
        ops[name] = {
            'text': rest,
            'op_name': op_name.group(1) if op_name else '',
            'source': f'{os.path.basename(source.group(1))}:{source.group(2)}' if source else '',
        }
    return ops


def _called(text: str) -> list[str]:
    return re.findall(r'(?:calls|body|condition|to_apply)=%?([\w.\-]+)', text)


def _operands(text: str) -> list[str]:
    m = re.search(r'\w\(([^)]*)\)', text)
    return re.findall(r'%([\w.\-]+)', m.group(1)) if m else []


def split_computations(hlo_text: str) -> dict[str, str]:
    """Computation name -> its body text (to see what a fusion computes)."""
    out, current, lines = {}, None, []
    for line in hlo_text.splitlines():
        m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) ', line)
        if m and line.rstrip().endswith('{'):
            current, lines = m.group(1), []
        elif line.startswith('}') and current:
            out[current] = '\n'.join(lines)
            current = None
        elif current:
            lines.append(line)
    return out


def _body(name: str, ops: dict, computations: dict[str, str]) -> str:
    text = ops.get(name, {}).get('text', '')
    seen, todo, body = set(), _called(text), [text]
    while todo:
        c = todo.pop()
        if c in seen or c not in computations:
            continue
        seen.add(c)
        body.append(computations[c])
        todo += _called(computations[c])
    return '\n'.join(body)


_NAMED = {
    'forward': 'conv forward',
    'input': 'conv input gradient',
    'filter': 'conv filter gradient',
}
_CONV_SHAPE = re.compile(r'= f32\[([\d,]*)\][^ ]* convolution\(')


def roles(
    ops: dict[str, dict[str, str]], computations: dict[str, str], kernel_shapes: set
) -> dict[str, str]:
    """What every op computes, from its HLO and its JAX op name.

    A convolution is a filter gradient when its result has a kernel's shape (the
    batch is contracted; XLA drops its JAX name); layout copies that feed one are
    counted with it. Else the JAX name tells forward from the backward pass.
    """
    out: dict[str, str] = {}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for name, info in ops.items():
        for operand in _operands(info['text']):
            users[operand].append(name)
    for name, info in ops.items():
        op_name, body = info['op_name'], _body(name, ops, computations)
        body = f"= {info['text']}\n{body}"
        backward = 'transpose(' in op_name
        last = op_name.split('/')[-1]
        source = info['source'].split(':')[0]
        shapes = _CONV_SHAPE.findall(body)
        named = re.search(r'conv_(forward|input|filter)_(taps|im2col)', op_name)
        if named:  # jackpot_jax.models.conv's own formulations, by their named scope
            out[name] = _NAMED[named.group(1)]
        elif shapes:
            dims = [tuple(sorted(int(d) for d in s.split(','))) for s in shapes]
            if any(d in kernel_shapes for d in dims):
                out[name] = 'conv filter gradient'
            elif backward:
                out[name] = 'conv input gradient'
            else:
                out[name] = 'conv forward'
        elif ' dot(' in body:
            out[name] = 'matmul backward' if backward else 'matmul forward'
        elif 'kth_smallest' in op_name or 'update_masks' in op_name or ' while(' in body:
            out[name] = 'mask update'
        elif source in ('sparsity.py', 'structured.py'):
            out[name] = 'masked weights / score gradient'
        elif 'optax' in info['source'] or source in ('search.py', 'step.py'):
            out[name] = 'optimizer / loss / metrics'
        elif 'select-and-scatter(' in body or 'reduce-window(' in body:
            out[name] = 'pooling'
        elif last in ('pad', 'slice') or 'option_a' in op_name:
            out[name] = 'shortcut (pad/slice)'
        elif (
            'BatchNorm' in op_name
            or '/bn' in op_name
            or '/downsample_1' in op_name
            or ('rsqrt' in body)
        ):
            out[name] = 'batch norm + relu backward' if backward else 'batch norm + relu forward'
        elif 'relu' in op_name or last in ('max', 'select_n'):
            out[name] = 'batch norm + relu backward' if backward else 'batch norm + relu forward'
        elif ' transpose(' in body or ' copy(' in body:
            out[name] = 'transpose/copy'
        else:
            out[name] = 'other backward' if backward else 'other'
    for name, r in list(out.items()):
        if not r.startswith('conv'):
            if any(out.get(u) == 'conv filter gradient' for u in users[name]):
                out[name] = 'conv filter gradient: input layouts'
    return out


def self_times(xspace_path: str) -> dict[str, float]:
    """Summed self time (ns) per HLO op over the trace: nested events are subtracted."""
    data = jax.profiler.ProfileData.from_file(xspace_path)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            events = []
            for e in line.events:
                stats = dict(e.stats)
                if 'hlo_op' in stats:
                    events.append((e.start_ns, e.duration_ns, stats['hlo_op']))
            events.sort(key=lambda t: (t[0], -t[1]))
            stack: list[list] = []  # [end, name, self]
            for start, dur, name in events:
                while stack and stack[-1][0] <= start:
                    end, n, own = stack.pop()
                    totals[n] += own
                if stack:
                    stack[-1][2] -= min(dur, stack[-1][0] - start)
                stack.append([start + dur, name, dur])
            for end, n, own in stack:
                totals[n] += own
    return totals


def profile_model(name: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Trace ``args.steps`` search steps of one model and attribute their time to ops."""
    run_args = argparse.Namespace(
        batch_size=batch,
        image_size=0,
        dtype='float32',
        sparsity=args.sparsity,
        pattern='',
        seed=args.seed,
        devices=1,
        fsdp=1,
    )
    s = bench.setup(name, run_args)
    mesh = bench.parallel.make_mesh(1, 1)
    images, labels = bench.parallel.shard_batch(mesh, s['images'], s['labels'])
    state = bench.search_state(s, mesh)
    step = bench.make_search_fn(s, state, mesh)
    with contextlib.ExitStack() as stack:
        if args.xla_conv:  # only tracing looks at it
            stack.enter_context(
                mock.patch.object(bench.conv, 'choose_formulation', bench._xla_formulation)
            )
        hlo = step.lower(state, images, labels).compile().as_text()
        state, _ = step(state, images, labels)  # compile + warm-up
    jax.block_until_ready(state)
    state, _ = step(state, images, labels)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        t0, c0 = time.perf_counter(), time.process_time()
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.steps):
            state, _ = step(state, images, labels)
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)[-1]
        totals = self_times(path)
    ops, computations = hlo_ops(hlo), split_computations(hlo)
    kernel_shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(s['params']) if x.ndim == 4}
    op_roles = roles(ops, computations, kernel_shapes)
    total = sum(totals.values())
    rows = []
    for op, ns in sorted(totals.items(), key=lambda kv: -kv[1]):
        info = ops.get(op, {})
        rows.append(
            {
                'op': op,
                'ms': ns / 1e6 / args.steps,
                'share': ns / total,
                'role': op_roles.get(op, 'other'),
                'jax_op': info.get('op_name', ''),
                'source': info.get('source', ''),
            }
        )
    by_role: dict[str, float] = collections.defaultdict(float)
    for row in rows:
        by_role[row["role"]] += row["ms"]
    return {
        'model': name,
        'batch_size': s['batch_size'],
        'xla_conv': args.xla_conv,
        'steps': args.steps,
        'step_wall_ms': 1e3 * wall / args.steps,
        'step_cpu_ms': 1e3 * cpu / args.steps,
        'op_ms': total / 1e6 / args.steps,
        'roles': {
            k: {'ms': v, 'share': v / (total / 1e6 / args.steps)}
            for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])
        },
        'ops': rows,
    }


def report(result: dict[str, Any], top: int) -> str:
    """One model's roles and top ops as plain text."""
    lines = [
        f"{result['model']} (batch {result['batch_size']}"
        f"{', XLA conv' if result['xla_conv'] else ''}): traced step {result['step_wall_ms']:.0f} ms "
        f"wall, {result['step_cpu_ms']:.0f} ms CPU; op self time {result['op_ms']:.0f} ms",
        '  by role:',
    ]
    for name, r in result['roles'].items():
        lines.append(f"    {name:<36} {r['ms']:9.1f} ms  {r['share']:6.1%}")
    lines.append(f'  top {top} ops:')
    for row in result['ops'][:top]:
        jax_op = row['jax_op'].split('/')[-3:]
        lines.append(
            f"    {row['ms']:9.1f} ms {row['share']:6.1%}  {row['role']:<36} {row['op']:<28} "
            f"{'/'.join(jax_op)[:90]}"
        )
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = {}
    for name, batch, _ in bench.parse_model_specs(args.models):
        bench.log(f'{name}: profiling')
        r = profile_model(name, batch, args)
        results[f'{name}:{r["batch_size"]}'] = r
        print(report(r, args.top), flush=True)
    if args.output:
        with open(args.output, 'w') as f:
            json.dump({'environment': bench.environment(), 'models': results}, f, indent=1)
    return results


if __name__ == '__main__':
    main()
