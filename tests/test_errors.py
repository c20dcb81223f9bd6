"""Bad input never passes silently: each mistake ends in one line naming the value and the fix.

The launcher runs in-process (its flag parser and ``main``), on tiny weights made
without training; one subprocess checks the real command line's stderr and exit code.
"""

import contextlib
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_model  # tests/tiny_model.py
from absl import flags
from test_data import _write_idx, make_fashion_files
from tiny_model import tiny_config  # tests/tiny_model.py

from jackpot_jax import main as cli
from jackpot_jax.core import errors, sparsity, step as step_lib
from jackpot_jax.data import sources
from jackpot_jax.engine import metrics
from jackpot_jax.engine.metrics import EpochMetrics
from jackpot_jax.io import checkpoint, convert_cli, workdir as workdir_lib
from jackpot_jax.launch import modes, run_context as rc, weight_training
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
@pytest.fixture
def launch(monkeypatch, capsys):
    """Runs the launcher in-process: ``launch(*flags) -> (exit status, stderr lines)``."""

    def run(*args):
        for name in [n for n in flags.FLAGS if n.startswith('config.')]:
            delattr(flags.FLAGS, name)  # the overrides of an earlier parse
        flags.FLAGS.unparse_flags()
        argv = ['jackpot_jax.main', *args]
        monkeypatch.setattr(sys, 'argv', argv)
        capsys.readouterr()
        try:
            cli.main(cli.parse_flags(argv))
            status = 0
        except SystemExit as done:
            status = done.code
        return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    yield run
    flags.FLAGS.unparse_flags()


@pytest.fixture(scope='module')
def weights_and_jackpot(tmp_path_factory):
    """Untrained small_cnn weights A, a magnitude 'jackpot' of A, and other weights B."""
    root = tmp_path_factory.mktemp('weights')
    weights_a, weights_b = str(root / 'a'), str(root / 'b')
    params = tiny_model.save_weights(weights_a, width=8, seed=0)['params']
    tiny_model.save_weights(weights_b, width=8, seed=1)
    plan = tiny_model.config_plan(tiny_config(), params)
    counts, masks = plan.counts, plan.magnitude_masks(params)
    jackpot = str(root / 'jackpot')
    fingerprint = checkpoint.weights_fingerprint(params)
    stats = tiny_model.variables(width=8)['batch_stats']
    checkpoint.save_jackpot(
        jackpot, None, masks, stats, {'counts': counts, 'weights_fingerprint': fingerprint}
    )
    return weights_a, weights_b, jackpot


# ----------------------------------------------------------------------------
# The rule: one line, non-zero exit, traceback on request.
# ----------------------------------------------------------------------------
def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_input():
        raise errors.UserError('search.sparsity=1.5 is not in [0, 1); set it to 0.9')

    assert errors.report_user_errors(bad_input) == errors.EXIT_ERROR
    assert capsys.readouterr().err == 'error: search.sparsity=1.5 is not in [0, 1); set it to 0.9\n'
    with pytest.raises(errors.UserError):
        errors.report_user_errors(bad_input, traceback=True)
    with pytest.raises(KeyError):
        errors.report_user_errors(lambda: {}['bug'])
    assert issubclass(checkpoint.CheckpointError, errors.UserError)
    assert issubclass(checkpoint.CheckpointError, RuntimeError)


def test_the_command_line_prints_one_line_and_exits_non_zero(tmp_path):
    cmd = [sys.executable, '-m', 'jackpot_jax.main', f'--workdir={tmp_path}']
    done = subprocess.run(
        [*cmd, '--config.search.sparsty=0.5'], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == errors.EXIT_USAGE
    assert done.stderr.strip().splitlines() == [
        "error: unknown config key 'search.sparsty' (--config.search.sparsty); "
        "did you mean 'search.sparsity'?"
    ]


# ----------------------------------------------------------------------------
# Wrong results or lost data (cases 1-6).
# ----------------------------------------------------------------------------
def _labels_file(folder):
    return os.path.join(folder, sources._FASHION_FILES['train_labels'])


def test_labels_outside_the_classes_are_refused_naming_the_file(tmp_path):
    arrays = make_fashion_files(tmp_path, n_train=12)
    _write_idx(_labels_file(tmp_path), arrays['train_labels'] % 10 + 5)  # 5..14
    with pytest.raises(ValueError, match=r'train-labels-idx1-ubyte.gz: \d+ labels lie outside'):
        sources.load_fashion_mnist(str(tmp_path))


def test_no_jackpot_is_never_a_folder_name(tmp_path):
    config = tiny_config(jackpot='none', mode='search')
    with pytest.raises(ValueError, match="config.jackpot='none' means no jackpot"):
        modes.validate(config)
    with pytest.raises(ValueError, match="config.jackpot='none' means no jackpot"):
        rc.jackpot_path(config, str(tmp_path))
    modes.validate(tiny_config(jackpot='none', mode='evaluate'))  # weights as they are


def test_evaluate_and_tune_check_which_weights_the_jackpot_was_found_in(weights_and_jackpot):
    weights_a, weights_b, jackpot = weights_and_jackpot
    workdir = os.path.dirname(jackpot)
    config = resolved(tiny_config(pretrained=weights_b, jackpot=jackpot, **{'tune.epochs': 1}))
    for run in (modes.run_evaluate, weight_training.run_tune):
        with pytest.raises(ValueError, match='was found in other weights than .*b'):
            run(config, workdir)


def test_convert_refuses_an_output_holding_weights_unless_told_to_overwrite(tmp_path, capsys):
    os.makedirs(tmp_path / workdir_lib.PRETRAINED_DIR)
    os.makedirs(tmp_path / workdir_lib.CHECKPOINTS_DIR)
    missing = str(tmp_path / 'resnet18.pth')
    for command in (
        ['torchvision', '--arch', 'resnet18'],
        ['official', '--arch', 'resnet32'],
    ):
        status = convert_cli.main([*command, '--input', missing, '--output', str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and len(err) == 1, err
        assert 'already holds pretrained, checkpoints' in err[0] and '--overwrite' in err[0]
    # With --overwrite it goes on (here to the missing input).
    status = convert_cli.main(
        ['torchvision', '--arch', 'resnet18', '--input', missing, '--output', str(tmp_path)]
        + ['--overwrite']
    )
    assert status == 1 and 'no such file' in capsys.readouterr().err


def test_a_failed_save_leaves_the_previous_checkpoint_in_place(weights_and_jackpot, tmp_path):
    weights_a, _, _ = weights_and_jackpot
    params, stats, meta = checkpoint.load_weights(weights_a)
    path = str(tmp_path / 'pretrained')
    checkpoint.save_weights(path, params, stats, meta)
    with pytest.raises(Exception):  # noqa: B017  (orbax cannot save a string leaf)
        checkpoint.save_weights(path, {'bad': 'not an array'}, stats, meta)
    restored, _, _ = checkpoint.load_weights(path)
    jax.tree.map(np.testing.assert_array_equal, params, restored)
    checkpoint.save_weights(path, jax.tree.map(lambda x: x * 2, params), stats, meta)
    doubled, _, _ = checkpoint.load_weights(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a * 2, b), params, doubled)
    assert sorted(os.listdir(tmp_path)) == ['pretrained']


def test_an_interrupted_replace_says_which_folder_to_rename(weights_and_jackpot, tmp_path):
    weights_a, _, _ = weights_and_jackpot
    path = str(tmp_path / 'pretrained')
    params, stats, meta = checkpoint.load_weights(weights_a)
    checkpoint.save_weights(path + checkpoint.OLD_SUFFIX, params, stats, meta)
    with pytest.raises(checkpoint.CheckpointError, match=r'rename that folder to .*pretrained'):
        checkpoint.load_weights(path)


def test_a_second_run_in_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path, launch):
    workdir = str(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys, time; from jackpot_jax.io import workdir; workdir.lock(sys.argv[1]); '
            'print("locked", flush=True); time.sleep(120)',
            workdir,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == 'locked'
        start = time.perf_counter()
        status, err = launch(f'--workdir={workdir}', '--mode=search')
        assert time.perf_counter() - start < 30
        assert status == 1 and len(err) == 1, err
        assert f'workdir {workdir} is in use by pid {holder.pid} on ' in err[0]
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    try:
        workdir_lib.lock(workdir)  # a dead holder never blocks a rerun
        assert workdir_lib.holder(workdir).startswith(f'pid {os.getpid()} on ')
    finally:
        workdir_lib.unlock(workdir)


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('search.learning_rate', math.inf, r'search.learning_rate must be a finite number > 0'),
        ('search.learning_rate', math.nan, r'search.learning_rate must be a finite number > 0'),
        ('tune.learning_rate', 0.0, r'tune.learning_rate must be'),
        ('pretrain.weight_decay', -1e-4, r'pretrain.weight_decay must be a finite number >= 0'),
        ('search.weight_decay', math.inf, r'search.weight_decay must be a finite number >= 0'),
        ('search.momentum', 1.0, r'search.momentum must be in \[0, 1\)'),
        ('tune.momentum', -0.5, r'tune.momentum must be in \[0, 1\)'),
    ],
)
def test_optimizer_settings_must_be_finite_and_in_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        modes.validate(tiny_config(**{field: value}))


def test_non_finite_scores_stop_the_search():
    """A step that breaks the scores stops the search there, though its loss is finite.

    (Every healthy search of the other tests passes the same check with finite scores.)
    """
    model = zoo.get_model('small_cnn', 10, width=4)
    variables = tiny_model.variables(width=4)
    paths = sparsity.prunable_paths(variables['params'])
    masks = {
        p: jnp.ones(w.shape, bool)
        for p, w in sparsity.flatten(variables['params']).items()
        if p in paths
    }
    optimizer = step_lib.sgd_optimizer(math.inf, 0.0, 0.9, 1, 1)  # validate() refuses it
    state = step_lib.init_search_state(
        variables['params'], variables['batch_stats'], masks, sparsity.init_scores(masks), optimizer
    )
    step = step_lib.make_search_step(
        model=model, optimizer=optimizer, counts={p: 0 for p in masks}, steps_per_epoch=1, epochs=1
    )
    rng = np.random.default_rng(0)
    _, metrics = step(state, rng.normal(size=(8, 8, 8, 1)).astype(np.float32), np.arange(8) % 10)
    assert np.isfinite(float(metrics['loss'])) and not bool(metrics['scores_finite'])
    epoch = EpochMetrics()
    epoch.add(7, metrics)
    with pytest.raises(FloatingPointError, match='scores became inf or NaN at step 7'):
        epoch.flush()


# ----------------------------------------------------------------------------
# Raw tracebacks (cases 7-19, and to-torch's output name).
# ----------------------------------------------------------------------------
def test_an_unknown_config_key_is_one_line_with_a_hint(launch):
    status, err = launch('--config=configs/default.py', '--config.serch.epochs=2')
    assert status == errors.EXIT_USAGE
    assert err == [
        "error: unknown config key 'serch.epochs' (--config.serch.epochs); "
        "did you mean 'search.epochs'?"
    ]


def test_a_pattern_that_prunes_nothing_is_an_error():
    config = tiny_config(**{'search.pattern': '1:3', 'search.sparsity': 2 / 3})
    modes.validate(config)
    params = tiny_model.variables(width=8)['params']
    with pytest.raises(ValueError, match=r"search.pattern '1:3' prunes nothing .*conv2/kernel': 8"):
        tiny_model.config_plan(config, params)


@pytest.mark.parametrize('field', ['prune_include', 'prune_exclude'])
def test_a_bad_prune_regex_names_the_field(field):
    with pytest.raises(ValueError, match=f"search.{field}='conv\\(' is not a valid regular"):
        modes.validate(tiny_config(**{f'search.{field}': 'conv('}))


def test_a_model_width_of_zero_is_a_config_error():
    with pytest.raises(ValueError, match='model.width must be a positive integer, got 0'):
        modes.validate(tiny_config(**{'model.width': 0}))


def test_a_config_argument_that_is_no_integer_percent_gives_the_usage(launch):
    status, err = launch('--config=configs/fashion_mnist.py:0.9')
    assert status == errors.EXIT_USAGE and len(err) == 1, err
    assert err[0].startswith("error: --config=configs/fashion_mnist.py:0.9: SPARSITY must be an")
    assert 'usage: configs/fashion_mnist.py[:SPARSITY]' in err[0]


def test_a_truncated_gzip_file_is_named(tmp_path):
    make_fashion_files(tmp_path)
    path = _labels_file(tmp_path)
    with open(path, 'rb') as f:
        whole = f.read()
    with open(path, 'wb') as f:
        f.write(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte.gz is not a complete gzip'):
        sources.load_fashion_mnist(str(tmp_path))


def test_a_file_that_is_not_gzip_is_named(tmp_path):
    make_fashion_files(tmp_path)
    with open(_labels_file(tmp_path), 'wb') as f:
        f.write(b'<html>not found</html>')
    with pytest.raises(ValueError, match='train-labels-idx1-ubyte.gz is not a complete gzip'):
        sources.load_fashion_mnist(str(tmp_path))


def test_image_and_label_counts_must_match(tmp_path):
    arrays = make_fashion_files(tmp_path, n_train=12)
    _write_idx(_labels_file(tmp_path), arrays['train_labels'][:10])
    with pytest.raises(ValueError, match='counts differ: 12 images in .*, 10 labels in'):
        sources.load_fashion_mnist(str(tmp_path))


@pytest.mark.parametrize('mode', ['export', 'tune', 'overlap', 'sweep', 'search_cost', 'demo'])
def test_no_jackpot_is_refused_where_a_jackpot_is_needed(mode, launch, tmp_path):
    status, err = launch(f'--workdir={tmp_path}', f'--mode={mode}', '--config.jackpot=none')
    assert status == 1 and len(err) == 1, err
    assert f"means no jackpot, which mode '{mode}' cannot use" in err[0]


def test_a_workdir_that_is_a_file_is_refused_up_front(tmp_path, launch):
    path = tmp_path / 'file'
    path.write_text('x')
    status, err = launch(f'--workdir={path}', '--mode=search')
    assert status == 1 and err == [
        f'error: --workdir={path} is a file, not a folder; pass a folder path '
        '(it is created if missing)'
    ]


def _read_only_folder(tmp_path) -> str:
    if os.geteuid() == 0:  # permission bits do not stop root; sysfs refuses new files even so
        return '/sys'
    folder = tmp_path / 'read_only'
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


def test_a_read_only_workdir_is_refused_up_front(tmp_path, launch):
    folder = _read_only_folder(tmp_path)
    status, err = launch(f'--workdir={folder}', '--mode=search')
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f'error: --workdir={folder} is not writable')


def test_to_torch_refuses_an_output_name_it_cannot_write(tmp_path, capsys):
    status = convert_cli.main(
        ['to-torch', '--arch', 'resnet18', '--weights', str(tmp_path), '--output', 'out.txt']
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert '--output out.txt: the file name must end in .pth, .pt, .safetensors' in err[0]


# ----------------------------------------------------------------------------
# Never lose a user's work.
# ----------------------------------------------------------------------------
def test_a_metrics_file_cut_short_by_a_crash_still_reads(tmp_path, caplog):
    path = str(tmp_path / workdir_lib.METRICS_FILE)
    with open(path, 'w') as f:
        f.write('{"mode": "search", "step": 1}\n{"mode": "search", "st')  # died mid-write
    assert metrics.read_jsonl(path) == [{'mode': 'search', 'step': 1}]
    assert f'{path}: skipped its last line' in caplog.text
    # A resumed run appends to the cut line: its records still read, the cut one is dropped.
    metrics.MetricWriter(str(tmp_path)).write({'mode': 'search', 'step': 2, 'loss': {'a': 1.0}})
    caplog.clear()
    records = metrics.read_jsonl(path)
    assert [r['step'] for r in records] == [1, 2] and records[1]['loss'] == {'a': 1.0}
    assert f'{path}, line 2: dropped a record cut short' in caplog.text


def test_a_corrupt_metrics_line_names_the_file_and_line(tmp_path):
    path = str(tmp_path / workdir_lib.METRICS_FILE)
    with open(path, 'w') as f:
        f.write('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f'{path}, line 2: not a JSON record .*delete that line'):
        metrics.read_jsonl(path)


@contextlib.contextmanager
def _disk_full_past(limit: int):
    """Writes past ``limit`` bytes of any file fail in this process (EFBIG), as on a full disk."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _no_noise(capfd, caplog, unraisable):
    """Nothing but the raised error: no traceback on stderr, no error logged by orbax, no
    'Event loop is closed' of its background writes."""
    assert 'Traceback' not in capfd.readouterr().err
    assert not [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not unraisable


def test_a_failed_weights_write_is_one_error_naming_the_path(tmp_path, capfd, caplog, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
    v = tiny_model.variables(width=64)  # 170 KB of random kernels
    path = str(tmp_path / 'pretrained')
    capfd.readouterr()
    with _disk_full_past(64 * 1024), pytest.raises(checkpoint.CheckpointError) as failed:
        checkpoint.save_weights(path, v['params'], v['batch_stats'], {})
    assert str(failed.value).startswith(
        f'could not write the checkpoint {path}: File too large; free space on that disk'
    )
    _no_noise(capfd, caplog, unraisable)
    assert os.listdir(tmp_path) == []  # nothing half-written left to take space


def test_a_failed_search_checkpoint_write_is_one_error_naming_the_folder(
    tmp_path, capfd, caplog, monkeypatch
):
    unraisable = []
    monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
    kernels = {
        p: w for p, w in sparsity.flatten(tiny_model.variables(width=64)['params']).items()
        if p.endswith('kernel')
    }
    masks = {p: np.ones(w.shape, bool) for p, w in kernels.items()}
    state = types.SimpleNamespace(
        step=np.int32(6), scores=kernels, masks=masks, ever_flipped=masks,
        opt_state={}, statistics={},
    )  # fmt: skip
    ckpts = checkpoint.SearchCheckpoints(str(tmp_path / 'checkpoints'))
    capfd.readouterr()
    with _disk_full_past(64 * 1024), pytest.raises(checkpoint.CheckpointError) as failed:
        ckpts.save(state, {}, {'selection_top1': 0.5})
        ckpts.wait()
    ckpts.close()
    assert str(failed.value).startswith(
        f'could not write a search checkpoint in {ckpts.directory}: File too large; free space'
    )
    assert str(failed.value).endswith('(none yet: it starts again)')
    _no_noise(capfd, caplog, unraisable)
    assert os.listdir(ckpts.directory) == []


def _tree_files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), 'rb') as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_a_search_never_writes_into_another_workdirs_jackpot(weights_and_jackpot, tmp_path, launch):
    weights_a, _, jackpot = weights_and_jackpot
    other = str(tmp_path / 'other' / workdir_lib.JACKPOT_DIR)
    shutil.copytree(jackpot, other)
    before = _tree_files(other)
    new = str(tmp_path / 'new')
    status, err = launch(
        f'--workdir={new}', '--mode=search', f'--config.jackpot={other}',
        f'--config.pretrained={weights_a}', '--config.model.width=8',
        '--config.search.epochs=1', '--config.steps_per_epoch=1',
    )  # fmt: skip
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: config.jackpot='{other}' lies outside --workdir={new}")
    assert f'pass --config.overwrite=true to write it to {other}, replacing the jackpot there' in err[0]
    assert _tree_files(other) == before
    assert not os.path.exists(os.path.join(new, workdir_lib.CHECKPOINTS_DIR))  # no step ran


def test_a_new_search_never_replaces_a_jackpot_it_would_not_resume(weights_and_jackpot, tmp_path):
    _, _, jackpot = weights_and_jackpot
    workdir = str(tmp_path)
    shutil.copytree(jackpot, os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    config = resolved(tiny_config(mode='search'))

    def check(config, workdir):
        workdir_lib.check_search_outputs(
            workdir, config.jackpot, tunes=bool(config.tune.epochs), overwrite=config.overwrite
        )

    for run in (check, modes.run_demo, modes.MODES['search']):
        with pytest.raises(errors.UserError, match=(
            f'{workdir}/jackpot already exists, and {workdir}/checkpoints holds no search to '
            'resume, so a new search would replace them: search into another --workdir, or '
            'pass --config.overwrite=true'
        )):  # fmt: skip
            run(config, workdir)
    assert not os.path.exists(os.path.join(workdir, workdir_lib.PRETRAINED_DIR))  # demo: no training
    config.tune.epochs = 1
    os.makedirs(os.path.join(workdir, workdir_lib.TUNED_DIR))
    with pytest.raises(errors.UserError, match='jackpot and .*tuned already exist, '):
        check(config, workdir)
    # Allowed: a search that resumes its own checkpoints, or one told to overwrite.
    os.makedirs(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR, '12'))
    check(config, workdir)
    check(tiny_config(overwrite=True, jackpot=str(tmp_path / 'x')), workdir)


def test_pretrain_never_replaces_weights_naming_what_they_would_orphan(
    weights_and_jackpot, tmp_path, launch
):
    weights_a, _, jackpot = weights_and_jackpot
    workdir = str(tmp_path)
    pretrained = os.path.join(workdir, workdir_lib.PRETRAINED_DIR)
    shutil.copytree(weights_a, pretrained)
    shutil.copytree(jackpot, os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    before = _tree_files(pretrained)
    status, err = launch(
        f'--workdir={workdir}', '--mode=pretrain', '--config.model.width=8',
        '--config.pretrain.epochs=1', '--config.steps_per_epoch=1',
    )  # fmt: skip
    assert status == 1 and err == [
        f'error: {pretrained} already holds pre-trained weights; {workdir}/jackpot was made from '
        'them and would be orphaned: pretrain into another --workdir (or '
        '--config.pretrained=NEW_FOLDER), or pass --config.overwrite=true to replace them'
    ]
    assert _tree_files(pretrained) == before
    weight_training.ensure_pretrained(resolved(tiny_config()), workdir)  # the demo reuses them
    assert _tree_files(pretrained) == before


@pytest.mark.parametrize('mode, folder', [('tune', 'tuned'), ('export', 'masked_weights')])
def test_tune_and_export_never_replace_their_output(mode, folder, tmp_path, launch):
    os.makedirs(tmp_path / folder)
    flags = [f'--workdir={tmp_path}', f'--mode={mode}', '--config.tune.epochs=1']
    status, err = launch(*flags)
    assert status == 1 and err == [
        f'error: {tmp_path / folder} already holds {"tuned" if mode == "tune" else "masked"} '
        'weights: move it elsewhere first, or pass --config.overwrite=true to replace it'
    ]
    status, err = launch(*flags, '--config.overwrite=true')  # goes on, to the missing weights
    assert status == 1 and len(err) == 1 and 'no weights checkpoint at' in err[0], err


def test_a_jackpot_without_its_statistics_names_the_path_and_the_fix(weights_and_jackpot, tmp_path):
    weights_a, _, jackpot = weights_and_jackpot
    damaged = str(tmp_path / 'jackpot')
    shutil.copytree(jackpot, damaged)
    shutil.rmtree(os.path.join(damaged, 'statistics'))
    config = resolved(tiny_config(pretrained=weights_a, jackpot=damaged, **{'tune.epochs': 1}))
    for run in (modes.run_evaluate, modes.run_export, weight_training.run_tune):
        with pytest.raises(checkpoint.CheckpointError, match=(
            f"the jackpot at {damaged} holds no batch statistics, but model 'small_cnn' has "
            r'BatchNorm layers \(\d+ statistics, e.g. .*\); its statistics item was lost: '
            'search it again'
        )):  # fmt: skip
            run(config, str(tmp_path))
