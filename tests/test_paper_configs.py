"""The paper's config files: every published row loads with the reference settings, and
the ``tiny`` form of three rows (each model, each CIFAR dataset and sparsity, ImageNet
with tuning) runs pretrain -> search (-> tune) end to end on tfds mock data."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
from unittest import mock

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint, workdir as workdir_lib
from jackpot_jax.launch import config_checks, modes, run_context as rc, search_mode, weight_training
from jackpot_jax.launch.config_checks import resolved

tfds = pytest.importorskip('tensorflow_datasets')

from tensorflow_datasets.testing import test_utils as tfds_test_utils  # noqa: E402

from jackpot_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_EXAMPLES = 16  # per split: 2 tiny steps of 8


@dataclasses.dataclass(frozen=True)
class Row:
    """One published result of the paper and the config string that runs it."""

    config: str
    model: str
    dataset: str
    sparsity: float
    epochs: int
    tune_epochs: int
    top1: float

    def __str__(self):
        return self.config.split(':', 1)[1]


def load_module(name: str):
    path = os.path.join(REPO, 'configs', name)
    spec = importlib.util.spec_from_file_location(f'paper_configs_{name[:-3]}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _published(name: str) -> dict[str, float]:
    """A paper config's ``PUBLISHED`` (argument -> top-1 %): the one place they are kept."""
    return load_module(name).PUBLISHED


def _cifar_rows():
    names = {'vgg19': 'vgg19_cifar', 'resnet32': 'resnet32'}
    rows = []
    for arg, top1 in _published('cifar_search.py').items():
        model, data, percent, epochs = arg.split(',')
        rows.append(
            Row(f'configs/cifar_search.py:{arg}', names[model], data, int(percent) / 100,
                int(epochs), 0, top1)
        )  # fmt: skip
    return rows


def _imagenet_rows():
    return [
        Row(f'configs/imagenet_search.py:{arg}', 'resnet50', 'imagenet2012',
            int(arg.split(',')[0]) / 100, 30, 10 if arg.endswith(',tune') else 0, top1)
        for arg, top1 in _published('imagenet_search.py').items()
    ]  # fmt: skip


IMAGENET_ROWS = _imagenet_rows()
ROWS = _cifar_rows() + IMAGENET_ROWS
# Run end to end (tiny): both CIFAR models and datasets, both sparsities, and ImageNet with
# tuning. The other rows differ from these only in fields the load tests pin.
END_TO_END_ROWS = [
    r
    for r in ROWS
    if r.config.split(':')[1] in ('vgg19,cifar10,90,30', 'resnet32,cifar100,95,30', '90,tune')
]
PRETRAIN_ARGS = ['vgg19,cifar10', 'vgg19,cifar100', 'resnet32,cifar10', 'resnet32,cifar100']
# Fields that 'tiny' may change; everything else must stay the row's.
TINY_FIELDS = {
    'steps_per_epoch',
    'data/eval_batch_size',
    'checkpoint/every_steps',
    *(f'{g}/{f}' for g in ('pretrain', 'search', 'tune') for f in ('epochs', 'batch_size')),
}


def load_config(config_string: str):
    """The config exactly as ``--config=configs/...`` gives it to the launcher."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True)
    flag_values(['test', f'--config={os.path.join(REPO, config_string)}'])
    return flag_values.config


def flat(config) -> dict:
    out = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f'{prefix}{key}/')
            else:
                out[prefix + key] = value

    walk(config.to_dict(), '')
    return out


# ----------------------------------------------------------------------------
# Loading and validation (fast).
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('row', ROWS, ids=str)
def test_published_row_loads_with_reference_settings(row):
    config = load_config(row.config)
    modes.validate(config)
    imagenet = row.dataset == 'imagenet2012'
    assert config.mode == 'search'
    assert config.data.name == row.dataset and config.model.to_dict() == {
        'name': row.model,
        'dtype': 'float32',
    }
    assert config.pretrained == '' and config.steps_per_epoch == 0
    s = config.search
    assert s.sparsity == pytest.approx(row.sparsity) and s.epochs == row.epochs
    assert (s.batch_size, s.learning_rate, s.momentum, s.label_smoothing) == (256, 0.1, 0.9, 0.0)
    assert s.weight_decay == (1e-4 if imagenet else 5e-4)
    assert (s.allocation, s.mask_update, s.rate_schedule, s.bn_mode) == (
        'global_magnitude',
        'short_restriction',
        'constant',
        'train',
    )
    assert s.pruned_score == 0.99
    t = config.tune
    assert t.epochs == row.tune_epochs
    assert (t.learning_rate, t.weight_decay, t.momentum, t.label_smoothing) == (0.01, 0.0, 0.9, 0.0)
    for batch in (
        config.data.eval_batch_size,
        s.batch_size,
        t.batch_size,
        config.pretrain.batch_size,
    ):
        assert batch % 64 == 0  # divides over 1, 2, 4, 8, ... 64 devices


@pytest.mark.parametrize('row', ROWS, ids=str)
def test_tiny_changes_only_the_budget(row):
    full, tiny = flat(load_config(row.config)), flat(load_config(row.config + ',tiny'))
    assert full.keys() == tiny.keys()
    changed = {k for k in full if full[k] != tiny[k]}
    assert changed <= TINY_FIELDS
    assert tiny['steps_per_epoch'] == 2 and tiny['data/eval_batch_size'] == 8
    for group in ('pretrain', 'search'):
        assert (tiny[f'{group}/epochs'], tiny[f'{group}/batch_size']) == (1, 8)
    assert tiny['tune/epochs'] == min(row.tune_epochs, 1)


def test_the_paper_rows_are_the_published_ones():
    """Every row of the paper's CIFAR (2 models x 2 datasets x 2 sparsities x 30/160 epochs)
    and ImageNet (80/90 %, with and without tuning) tables has a config argument."""
    assert len(ROWS) == 16 + 4
    assert {(r.model, r.dataset, r.sparsity, r.epochs) for r in ROWS if 'cifar' in r.dataset} == {
        (m, d, s, e)
        for m in ('vgg19_cifar', 'resnet32')
        for d in ('cifar10', 'cifar100')
        for s in (0.9, 0.95)
        for e in (30, 160)
    }
    assert {(r.sparsity, r.tune_epochs) for r in IMAGENET_ROWS} == {
        (s, t) for s in (0.8, 0.9) for t in (0, 10)
    }


@pytest.mark.parametrize('row', ROWS, ids=str)
def test_docstring_and_docs_list_every_published_row(row):
    """The config's docstring names the row; docs/paper_experiments.md shows its published top-1."""
    module = load_module(row.config.split(':')[0].split('/')[1])
    assert any(line.startswith(f'| {row.config} ') for line in module.__doc__.splitlines())
    with open(os.path.join(REPO, 'docs', 'paper_experiments.md')) as f:
        page = f.read().splitlines()
    shown = row.config.removesuffix(',tune').replace(',160', ',30')
    (line,) = [x for x in page if x.startswith(f'| `{shown}`')]
    assert f'{row.top1:.2f}' in line


@pytest.mark.parametrize('arg', PRETRAIN_ARGS)
def test_pretrain_config_matches_the_search_configs(arg):
    config = load_config(f'configs/cifar_pretrain.py:{arg}')
    modes.validate(config)
    assert config.mode == 'pretrain'
    p = config.pretrain
    assert (p.epochs, p.batch_size, p.learning_rate, p.weight_decay, p.momentum) == (
        200,
        128,
        0.1,
        5e-4,
        0.9,
    )
    search = load_config(f'configs/cifar_search.py:{arg},90,30')
    assert search.pretrain.to_dict() == p.to_dict()
    assert search.model.to_dict() == config.model.to_dict()
    assert search.data.to_dict() == config.data.to_dict()
    assert load_config(f'configs/cifar_pretrain.py:{arg},160').pretrain.epochs == 160
    tiny = load_config(f'configs/cifar_pretrain.py:{arg},tiny')
    assert (tiny.pretrain.epochs, tiny.pretrain.batch_size, tiny.steps_per_epoch) == (1, 8, 2)


def test_default_arguments_and_the_five_epoch_claim():
    assert load_config('configs/cifar_search.py').model.name == 'resnet32'
    assert load_config('configs/cifar_pretrain.py').mode == 'pretrain'
    claim = load_config('configs/imagenet_search.py:90,5')
    assert (claim.search.sparsity, claim.search.epochs, claim.tune.epochs) == (0.9, 5, 0)


@pytest.mark.parametrize(
    'config_string, message',
    [
        ('configs/cifar_search.py:vgg19,cifar10,90', 'expected 4 fields'),
        ('configs/cifar_search.py:vgg19,cifar10,ninety,30', 'SPARSITY must be an integer'),
        ('configs/cifar_search.py:vgg19,svhn,90,30', "dataset 'svhn'"),
        ('configs/cifar_search.py:vgg99,cifar10,90,30', "unknown model 'vgg99'"),
        ('configs/cifar_search.py:vgg19,cifar10,100,30', 'must be in \\[0, 1\\)'),
        ('configs/cifar_search.py:vgg19,tiny,cifar10,90,30', 'modifiers go last'),
        ('configs/imagenet_search.py:90,30,5', 'usage'),
        ('configs/cifar_pretrain.py:vgg19,cifar10,tune', 'usage'),
    ],
)
def test_bad_arguments_say_what_is_wrong(config_string, message):
    """Malformed arguments fail as the flag is parsed; bad values when the launcher
    validates the config (config files import no library module to check names)."""
    with pytest.raises((flags.IllegalFlagValueError, ValueError), match=message):
        modes.validate(load_config(config_string))


# ----------------------------------------------------------------------------
# Every row, tiny, end to end on tfds mock data (8 simulated devices).
# ----------------------------------------------------------------------------
class ThreadConfinedMockFs(tfds_test_utils.MockFs):
    """tfds's mock file system, redirecting only the thread that entered it.

    ``tfds.testing.mock_data`` enters a MockFs around every ``as_dataset``, which
    redirects the file operations of every thread into a temporary folder. Orbax's
    background threads (tmp-folder cleanup, async commits) then list or rename the
    wrong folders, e.g. FileNotFoundError on WORKDIR/checkpoints.
    """

    def __enter__(self):
        self._owner = threading.get_ident()
        return super().__enter__()

    def _mock_open(self, original_fn, *args, **kwargs):
        return self._confined('_mock_open', original_fn, *args, **kwargs)

    def _mock_fn(self, original_fn, *args, **kwargs):
        return self._confined('_mock_fn', original_fn, *args, **kwargs)

    def _mock_fn_2_args(self, original_fn, *args, **kwargs):
        return self._confined('_mock_fn_2_args', original_fn, *args, **kwargs)

    def _mock_glob(self, original_fn, *args, **kwargs):
        return self._confined('_mock_glob', original_fn, *args, **kwargs)

    def _mock_walk(self, original_fn, *args, **kwargs):
        return self._confined('_mock_walk', original_fn, *args, **kwargs)

    def _confined(self, name, original_fn, *args, **kwargs):
        if threading.get_ident() != self._owner:
            return original_fn(*args, **kwargs)
        return getattr(super(), name)(original_fn, *args, **kwargs)


def test_mock_fs_redirects_only_its_own_thread(tmp_path):
    from etils import epath  # pylint: disable=g-import-not-at-top

    real = tmp_path / 'real.txt'
    real.write_text('on disk')
    seen = {}
    with ThreadConfinedMockFs():
        seen['owner'] = epath.Path(real).exists()
        other = threading.Thread(target=lambda: seen.update(other=epath.Path(real).exists()))
        other.start()
        other.join()
    assert seen == {'owner': False, 'other': True}


@pytest.fixture(scope='module')
def mock_data_dir(tmp_path_factory):
    """An empty data_dir that only tfds's mock serves, with 16 examples per split."""
    input_pipeline.clear_cache()
    with (
        mock.patch.object(tfds_test_utils, 'MockFs', ThreadConfinedMockFs),
        tfds.testing.mock_data(num_examples=MOCK_EXAMPLES),
    ):
        yield str(tmp_path_factory.mktemp('tfds'))
    input_pipeline.clear_cache()


@pytest.fixture(scope='module')
def pretrained(mock_data_dir, tmp_path_factory):
    """(model, dataset) -> tiny dense weights, made once per pair."""
    made = {}
    short = {'vgg19_cifar': 'vgg19', 'resnet32': 'resnet32'}

    def get(model: str, dataset: str) -> str:
        if (model, dataset) not in made:
            workdir = str(tmp_path_factory.mktemp(f'pretrain_{model}_{dataset}'))
            imagenet = dataset == 'imagenet2012'
            config = load_config(
                'configs/imagenet_search.py:90,tiny'
                if imagenet
                else f'configs/cifar_pretrain.py:{short[model]},{dataset},tiny'
            )
            config.data.data_dir = mock_data_dir
            if imagenet:
                # No pretrain config (users bring torchvision's weights): ResNet-50 at its
                # initialisation, which spares the suite a ResNet-50 training compile.
                setup = rc.Setup(resolved(config))
                variables = weight_training.initial_variables(setup, config.seed)
                meta = {'model': config.model.to_dict(), 'num_classes': setup.source.num_classes}
                checkpoint.save_weights(
                    workdir_lib.pretrained_path(workdir, config.pretrained),
                    variables['params'], variables['batch_stats'], meta,
                )
            else:
                weight_training.run_pretrain(resolved(config), workdir)
                records = read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))
                assert [r['mode'] for r in records] == ['pretrain', 'pretrain']  # epoch + test
            made[model, dataset] = workdir_lib.pretrained_path(workdir, config.pretrained)
        return made[model, dataset]

    return get


@pytest.fixture(scope='module')
def tiny_run(mock_data_dir, pretrained, tmp_path_factory):
    """row -> (workdir, summary) of its tiny search (+ tune)."""
    done = {}

    def get(row: Row):
        if row not in done:
            config = load_config(row.config + ',tiny')
            config.data.data_dir = mock_data_dir
            config.pretrained = pretrained(config.model.name, config.data.name)
            workdir = str(tmp_path_factory.mktemp('search'))
            summary = search_mode.run_search(resolved(config), workdir)
            del summary['state']  # 8 device copies of the weights, scores and momenta
            done[row] = workdir, summary
        return done[row]

    return get


@pytest.mark.parametrize('row', END_TO_END_ROWS, ids=str)
def test_tiny_row_runs_end_to_end(row, tiny_run):
    workdir, summary = tiny_run(row)
    _, masks, _, meta = checkpoint.read_jackpot_bundle(os.path.join(workdir, workdir_lib.JACKPOT_DIR))
    total = sum(m.size for m in masks.values())
    pruned = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
    assert pruned == sum(meta['counts'].values())
    assert abs(pruned - row.sparsity * total) <= 1  # keep = int(N * (1 - sparsity))
    assert summary['sparsity'] == pytest.approx(row.sparsity, abs=1e-6)
    assert meta['summary']['sparsity'] == pytest.approx(row.sparsity, abs=1e-6)
    assert len(masks) == {'vgg19_cifar': 16, 'resnet32': 31, 'resnet50': 53}[row.model]

    records = read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE))
    search = [r for r in records if r['mode'] == 'search']
    assert [r['epoch'] for r in search] == [1]
    assert 0.0 <= search[0]['test_top1'] <= 1.0 and np.isfinite(search[0]['train_loss'])
    if row.tune_epochs:
        tune = [r for r in records if r['mode'] == 'tune']
        assert tune and 'test_top1' in tune[-1]
        assert os.path.isdir(os.path.join(workdir, workdir_lib.TUNED_DIR))
        assert 0.0 <= summary['tuned_top1'] <= 1.0
