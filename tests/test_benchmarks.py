"""Smoke test of the search-step benchmark: runs end to end and reports sane numbers."""

import ast
import json
import math
import os

import pytest

from benchmarks import search_step

TIMED = ('search', 'dense', 'mask_update', 'mask_update_per_layer')


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_search_step_benchmark_smoke(capsys):
    # The rate<1 update and the ablation are left out: each is one more compile.
    result = search_step.main(
        [
            '--models=resnet20',
            '--batch_size=8',
            '--steps=2',
            '--warmup=0',
            '--sparsity=0.9',
            '--no-rate_update',
            '--no-ablation',
        ]
    )
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed['models'].keys() == result['models'].keys() == {'resnet20'}
    m = printed['models']['resnet20']
    assert m['batch_size'] == 8 and m['dtype'] == 'float32' and m['num_devices'] == 1
    assert 0 < m['kept_weights'] < m['prunable_weights']
    assert abs(m['kept_weights'] / m['prunable_weights'] - 0.1) < 1e-3
    for key in TIMED:
        row = m[key]
        assert row['samples'] == 2
        assert all(_positive(row[f]) for f in ('ms_median', 'ms_min', 'ms_max', 'first_call_s'))
        assert row['ms_min'] <= row['ms_median'] <= row['ms_max']
    assert 'mask_update_rate' not in m and 'search_no_mask_update' not in m
    for key in ('search', 'dense'):
        assert _positive(m[key]['images_per_s'])
    assert _positive(m['search_over_dense'])
    assert 0 < m['mask_update']['fraction_of_search_step']
    assert 0 < m['mask_update_per_layer']['fraction_of_search_step']
    assert _positive(m['per_layer_over_all_layer'])
    table = captured.err  # the summary table goes to stderr
    assert 'update, all layers' in table and 'resnet20 (8)' in table
    rec = m['recompilation']
    assert rec['search_recompiled'] is False
    assert rec['compiles_after_first_calls'] == 0
    assert set(m['targets']) == {
        'mask_update_fraction_max',
        'mask_update_met',
        'search_over_dense_max',
        'search_over_dense_met',
    }


def test_search_step_benchmark_times_n_m_masks(capsys):
    result = search_step.main(
        [
            '--models=resnet20:8:1',  # batch 8, one timed step
            '--warmup=0',
            '--pattern=2:4',
            '--no-rate_update',
        ]
    )
    m = result['models']['resnet20:8']
    assert m['batch_size'] == 8 and m['search']['samples'] == 1
    assert _positive(m['mask_update_per_layer']['ms_median'])  # the per-layer N:M update
    assert m['pattern'] == '2:4'
    # resnet20's first conv (3 input channels) stays dense; every other kernel is 2:4.
    assert 0.49 < m['sparsity'] < 0.5
    assert _positive(m['search_no_mask_update']['ms_median'])
    assert _positive(m['mask_update']['ms_median'])


def test_steps_and_pure_functions_are_timed_in_separate_phases():
    calls = []

    def step(name):
        return lambda state: (calls.append(name) or state + 1, state)

    def pure(name):
        return lambda: calls.append(name) or 0

    runners = {
        'search': search_step.Stateful(step('search'), 0),
        'dense': search_step.Stateful(step('dense'), 0),
        'mask_update': search_step.Pure(pure('mask_update')),
        'mask_update_per_layer': search_step.Pure(pure('mask_update_per_layer')),
    }
    args = search_step.parse_args(['--steps=3', '--warmup=1', '--inner=1'])
    samples, first, _ = search_step.measure(runners, args, search_step.CompileLog())
    assert all(len(samples[n]) == 3 and 'cpu_ms_median' in first[n] for n in runners)
    timed = calls[len(runners) :]  # after the first calls: warm-up and timed samples
    step_calls = (args.warmup + args.steps) * 2  # two steps, each called once a round
    steps, pure_calls = timed[:step_calls], timed[step_calls:]
    assert set(steps) == {'search', 'dense'} and set(pure_calls) == {
        'mask_update',
        'mask_update_per_layer',
    }
    # Steps only (the --scaling comparison): no empty phase to time.
    calls.clear()
    only_steps = {n: runners[n] for n in ('search', 'dense')}
    samples, _, _ = search_step.measure(only_steps, args, search_step.CompileLog())
    assert [len(samples[n]) for n in only_steps] == [3, 3]


def test_model_specs_parse_and_reject_bad_entries():
    assert search_step.parse_model_specs('resnet32, resnet50:256:2,vgg19_cifar:64') == [
        ('resnet32', 0, 0),
        ('resnet50', 256, 2),
        ('vgg19_cifar', 64, 0),
    ]
    for bad in ('resnet50:0', 'resnet50:big', 'resnet50:1:2:3'):
        with pytest.raises(ValueError, match=f"'{bad}'.*name:batch:steps"):
            search_step.parse_model_specs(bad)


def test_input_pipeline_benchmark_smoke(capsys, tmp_path):
    """Genuine tfds builders on generated JPEGs and CIFAR records; two pipelines timed."""
    from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top  (imports TF)

    wanted = ['imagenet_train', 'cifar10_eval']
    result = input_pipeline.main(
        ['--quick', '--seconds=0.2', f'--data_dir={tmp_path}', '--target=1000']
        + [f'--pipelines={",".join(wanted)}']
    )
    assert json.loads(capsys.readouterr().out) == result
    assert list(result['pipelines']) == wanted
    for row in result['pipelines'].values():
        assert row['images'] > 0
        assert _positive(row['images_per_s']) and _positive(row['images_per_cpu_s'])
        assert math.isclose(row['cores_for_target'], 1000 / row['images_per_cpu_s'])
    data = result['imagenet_data']
    assert data['jpeg_quality'] == 90 and 10 < data['jpeg_kb_mean'] < 400
    assert input_pipeline.MIN_SIZE <= data['height_range'][0] <= data['height_range'][1]


def test_llm_step_benchmark_smoke(monkeypatch, capsys):
    from benchmarks import llm_step
    from jackpot_jax.core import parallel
    from jackpot_jax.models import llama

    monkeypatch.setattr(parallel, 'MIN_SHARDED_SIZE', 256)  # the tiny kernels count as large
    tiny = llama.LlamaConfig(vocab_size=64, width=32, depth=2, heads=4, kv_heads=2, mlp_width=48)
    monkeypatch.setattr(llama, 'smollm2_135m', lambda: tiny)  # SmolLM2's shapes, shrunk
    result = llm_step.main(['--context=16', '--steps=1', '--warmup=0', '--devices=8'])
    assert result['prunable_weights'] == 2 * (3 * 32 * 48 + 2 * 32 * 32 + 2 * 32 * 16)
    assert result['search']['ms_median'] > 0 and result['dense']['ms_median'] > 0
    ratio = result['search']['ms_median'] / result['dense']['ms_median']
    assert result['search_over_dense_wall'] == pytest.approx(ratio)
    one, eight = result['memory']['rows']
    assert (one['fsdp'], eight['fsdp']) == (1, 8)
    assert eight['state_bytes'] < one['state_bytes']  # each device holds 1/8 of the state
    assert '"search_over_dense_wall"' in capsys.readouterr().out


def test_benchmarks_import_the_package_and_themselves_only():
    """A benchmark runs from a checkout without the tests: no import of tests/."""
    folder = os.path.dirname(search_step.__file__)
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split('.')[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split('.')[0]]
            else:
                continue
            assert 'tests' not in roots, f'benchmarks/{name} imports from tests/'
