"""The base configuration (the embedded digits demo) and its validation.

Every file under ``configs/`` starts from :func:`get_config` and overrides a few
fields, so :func:`validate` can reject unknown keys and bad values before any
work starts. This file is itself a config file: ``--config=jackpot_jax/config.py``.
"""

from __future__ import annotations

import math
import re

import ml_collections

from jackpot_jax import criteria, data, models, search, sparsity, structured, user_models

# fmt: off
MODES = ('demo', 'pretrain', 'search', 'tune', 'evaluate', 'export', 'overlap', 'search_cost',
         'restriction', 'sweep', 'stability')
# fmt: on
CPU_COLLECTIVES = ('', 'gloo', 'mpi')
# config.jackpot = 'none': no jackpot (evaluate the weights as they are). Modes that
# never read config.jackpot accept it too.
NO_JACKPOT = 'none'
NO_JACKPOT_MODES = ('evaluate', 'pretrain')
# Modes that refuse model.dtype='bfloat16': 'overlap' ranks weights by SNIP/GraSP/SynFlow
# gradients, which bfloat16 would blur into ties.
FLOAT32_ONLY_MODES = ('overlap',)
# Mask-update rules compared by mode 'restriction': the three short-restriction rates and
# the 2021 edge-popup rule.
RESTRICTION_VARIANTS = sparsity.RATE_SCHEDULES + ('edge_popup',)
# Variants of mode 'stability': the paper's protocol, each change of the stable one on
# its own, and the stable protocol.
STABILITY_VARIANTS = ('paper', 'paper+recalibration', 'paper+freeze', 'stable')
# What config.protocol sets for every field left at -1 ("set by the protocol").
# 'stable': a validation split for every choice, BatchNorm statistics re-estimated
# under each evaluated mask, and the mask held fixed over the last quarter of the
# epochs (at rate 1 it otherwise oscillates between near-tied weights to the end).
# 'paper': the published protocol, exactly as the authors' released code runs it.
PROTOCOLS = {
    'stable': {
        'data.validation_fraction': 0.1,
        'search.bn_recalibration_steps': 50,
        'search.mask_freeze_fraction': 0.25,
    },
    'paper': {
        'data.validation_fraction': 0.0,
        'search.bn_recalibration_steps': 0,
        'search.mask_freeze_fraction': 0.0,
    },
}


def get_config() -> ml_collections.ConfigDict:
    """Digits demo: pretrain a small CNN, then search a 90%-sparse jackpot in it."""
    config = ml_collections.ConfigDict()
    config.mode = 'demo'
    # 'stable' (default) | 'paper': fills every field below that is left at -1; see PROTOCOLS.
    config.protocol = 'stable'
    config.seed = 0
    config.num_devices = 0  # devices of the data-parallel mesh; 0 = all.
    # Dense weights to search in; '' means WORKDIR/pretrained (made by 'pretrain').
    config.pretrained = ''
    # The jackpot to evaluate, tune or export; '' means WORKDIR/jackpot (made by 'search'),
    # 'none' evaluates the weights as they are.
    config.jackpot = ''
    # Cap on training steps per epoch (0 = whole epochs); for smoke tests and benchmarks.
    config.steps_per_epoch = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = 'digits'
    config.data.data_dir = ''  # '' = the dataset's default location.
    config.data.eval_batch_size = 512
    # Share of the training images held out as the validation split, the only split any
    # selection looks at (the test split is reported, never used to choose); in [0, 1).
    # -1 = set by config.protocol (stable: 0.1, paper: 0).
    config.data.validation_fraction = -1.0
    # Cores the tfds input pipeline may use (a private tf.data thread pool); 0 = every core.
    config.data.threads = 0
    # 'tfds:NAME' (any tfds image-classification dataset, prepared in data_dir) only:
    config.data.image_size = 0  # model input height = width; 0 = the dataset's own size.
    config.data.resize = 0  # > 0: shorter side resized to this, then an image_size crop
    #                         (random in training, centred in eval); 0 = resize to image_size.
    config.data.random_flip = False  # random horizontal flips in training.
    config.data.mean = '0.5'  # of [0, 1] pixels: one value, or one per channel, comma-separated.
    config.data.std = '0.5'
    config.data.eval_split = ''  # '' = 'test', else 'validation'.

    config.model = ml_collections.ConfigDict()
    config.model.name = 'small_cnn'
    # Computation dtype: 'float32' | 'bfloat16' (params, scores, optimizer state and
    # BatchNorm statistics stay float32; logits and loss are float32 either way).
    config.model.dtype = 'float32'
    config.model.width = 64  # keyword arguments of the model besides its name and dtype.

    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.epochs = 30
    config.pretrain.batch_size = 64
    config.pretrain.learning_rate = 0.05
    config.pretrain.weight_decay = 5e-4
    config.pretrain.momentum = 0.9
    config.pretrain.label_smoothing = 0.0

    config.search = ml_collections.ConfigDict()
    config.search.sparsity = 0.9  # fraction of prunable weights removed.
    config.search.allocation = 'global_magnitude'  # | 'uniform' | 'erk'
    config.search.epochs = 10
    config.search.batch_size = 64
    config.search.learning_rate = 0.1
    config.search.weight_decay = 5e-4
    config.search.momentum = 0.9
    config.search.label_smoothing = 0.0
    config.search.pruned_score = 0.99  # initial score of magnitude-pruned weights.
    # 'magnitude' (the paper) | 'kaiming' (edge-popup's scaled Kaiming uniform) | 'random' U(0,1).
    config.search.score_init = 'magnitude'
    config.search.mask_update = 'short_restriction'  # | 'edge_popup'
    config.search.rate_schedule = 'all'  # | 'poly4' | 'cosine'
    config.search.bn_mode = 'train'  # | 'frozen': keep the pre-trained running statistics.
    # > 0: evaluate each epoch, and save the jackpot, with BatchNorm statistics re-estimated
    # over N training batches under the current mask (no weight or mask changes; the search
    # itself goes on with its own running statistics). 0 = the paper's: the search's own.
    # -1 = set by config.protocol (stable: 50, paper: 0).
    config.search.bn_recalibration_steps = -1
    # Fraction of the final epochs during which the masks stay fixed (the scores and the
    # BatchNorm statistics still train): ends the late oscillation between near-tied weights.
    # In [0, 1); 0 = never (the paper). -1 = set by config.protocol (stable: 0.25, paper: 0).
    config.search.mask_freeze_fraction = -1.0
    # Also evaluate every epoch with the other statistics (the search's running ones and ones
    # re-estimated under the mask), recorded as *_running / *_recalibrated: a diagnostic.
    config.search.compare_bn_statistics = False
    config.search.prune_include = sparsity.DEFAULT_INCLUDE  # regex over parameter paths.
    config.search.prune_exclude = sparsity.DEFAULT_EXCLUDE  # classifiers, a ViT's conv_proj.
    # 'N:M' (e.g. '2:4'): keep N of every M consecutive input-channel weights in each
    # prunable layer whose input channels are a multiple of M (the others stay dense);
    # search.sparsity must then equal (M - N) / M (search.allocation is not used).
    # '' = unstructured.
    config.search.pattern = ''
    # Also record every step's loss, mask changes and flip-backs in the epoch records.
    config.search.step_trace = False

    # Optional weight tuning under the found mask (the paper's "+T" rows); 0 epochs = none.
    config.tune = ml_collections.ConfigDict()
    config.tune.epochs = 0
    config.tune.batch_size = 64
    config.tune.learning_rate = 0.01
    config.tune.weight_decay = 0.0
    config.tune.momentum = 0.9
    config.tune.label_smoothing = 0.0

    # Search checkpoints in WORKDIR/checkpoints: every N steps (0 = each epoch's end only),
    # keeping the latest `keep` and the best by test top-1.
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 0
    config.checkpoint.keep = 3

    # Mode 'overlap': other pruning criteria at the jackpot's per-layer counts.
    config.overlap = ml_collections.ConfigDict()
    config.overlap.criteria = 'magnitude,random,snip,grasp,synflow'  # comma-separated.
    config.overlap.batch_size = 0  # SNIP/GraSP scoring batch; 0 = search.batch_size.
    config.overlap.bn_steps = 0  # > 0: also evaluate with BN stats re-estimated over N batches.

    # Studies that run one search per variant, in WORKDIR/<mode>/<variant> (resumable).
    # Mode 'search_cost': score inits compared by epochs to reach a test top-1 target.
    config.search_cost = ml_collections.ConfigDict()
    config.search_cost.inits = 'magnitude,kaiming,random'  # comma-separated score inits.
    config.search_cost.target = 0.0  # test top-1 to reach; 0 = the 'kaiming' search's final one.
    # Mode 'restriction': mask-update rules side by side, with per-step telemetry.
    config.restriction = ml_collections.ConfigDict()
    config.restriction.variants = 'all,poly4,cosine,edge_popup'
    # Mode 'sweep': accuracy vs sparsity (jackpot, magnitude and random masks).
    config.sweep = ml_collections.ConfigDict()
    config.sweep.sparsities = '0.5,0.7,0.8,0.9,0.95'
    # Mode 'stability': what makes a jackpot's accuracy swing from epoch to epoch. Each
    # variant records both BatchNorm statistics every epoch and every step's mask changes.
    config.stability = ml_collections.ConfigDict()
    config.stability.variants = 'paper,paper+recalibration,paper+freeze,stable'

    # Multi-host runs (one process per host, e.g. a Cloud TPU pod): the launcher calls
    # jax.distributed.initialize before any other JAX use. Left at their defaults, the
    # coordinator, process count and id are detected (Cloud TPU, SLURM, Open MPI).
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False
    config.distributed.coordinator_address = ''  # 'host:port' of process 0.
    config.distributed.num_processes = 0  # 0 = auto.
    config.distributed.process_id = -1  # -1 = auto.
    config.distributed.cpu_collectives = ''  # 'gloo' for multi-process runs on CPUs.
    return config


def resolve_protocol(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every field left at -1 set by ``config.protocol``.

    Idempotent; fields set explicitly (>= 0) are kept, so a protocol can be mixed with
    single changes (e.g. the paper's protocol with re-estimated statistics).
    """
    _check_choice('protocol', config.protocol, tuple(PROTOCOLS))
    resolved = ml_collections.ConfigDict(config.to_dict())
    for field, value in PROTOCOLS[config.protocol].items():
        group, name = field.split('.')
        if resolved[group][name] == -1:
            resolved[group][name] = value
    if config.data.validation_fraction == -1 and config.data.name not in data.DATASETS:
        # A validation split carved from a tfds training split is not supported yet: such
        # runs choose on the test split, as the paper does, and their summaries say so
        # ('best_selected_on': 'test'); an explicit fraction > 0 is refused with the fix.
        resolved.data.validation_fraction = 0.0
    return resolved


def _check_keys(
    config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, prefix: str = ''
) -> None:
    for key, value in config.items():
        name = prefix + key
        if key not in base:
            raise ValueError(f"unknown config key '{name}'; known keys here: {sorted(base.keys())}")
        if isinstance(base[key], ml_collections.ConfigDict) and name != 'model':
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"config key '{name}' must be a group of fields, got {value!r}")
            _check_keys(value, base[key], name + '.')


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(choices)}')


def parse_list(name: str, text: str, kind: type = str) -> tuple:
    """A comma-separated config field as a tuple of ``kind``; empty or unparsable -> ValueError."""
    items = [item.strip() for item in str(text).split(',') if item.strip()]
    if not items:
        raise ValueError(f'{name} is empty; give a comma-separated list')
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ValueError(f'{name}={text!r}: every item must be a {kind.__name__}') from None


def _check_list(name: str, text: str, choices: tuple[str, ...]) -> None:
    for item in parse_list(name, text):
        _check_choice(name, item, choices)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f'{name} must be positive, got {value!r}')


def is_no_jackpot(jackpot: str) -> bool:
    """Whether a ``config.jackpot`` value means "no jackpot" ('none', any case)."""
    return str(jackpot).strip().lower() == NO_JACKPOT


def _check_optimizer(group: str, cfg: ml_collections.ConfigDict) -> None:
    """Finite positive learning rate, finite weight decay >= 0, momentum in [0, 1)."""
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise ValueError(
            f'{group}.learning_rate must be a finite number > 0, got {cfg.learning_rate!r}'
        )
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(
            f'{group}.weight_decay must be a finite number >= 0 (0 = none), '
            f'got {cfg.weight_decay!r}'
        )
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f'{group}.momentum must be in [0, 1) (0 = none), got {cfg.momentum!r}')


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f'{name}={pattern!r} is not a valid regular expression ({e}); it is matched '
            "against parameter paths such as 'conv1/kernel'"
        ) from None


def _check_distributed(d: ml_collections.ConfigDict) -> None:
    _check_choice('distributed.cpu_collectives', d.cpu_collectives, CPU_COLLECTIVES)
    if d.num_processes < 0 or d.process_id < -1:
        raise ValueError(
            'distributed.num_processes must be >= 0 (0 = auto) and distributed.process_id '
            f'>= -1 (-1 = auto), got {d.num_processes!r} and {d.process_id!r}'
        )
    if d.num_processes and d.process_id >= d.num_processes:
        raise ValueError(
            f'distributed.process_id={d.process_id} is out of range for '
            f'distributed.num_processes={d.num_processes}'
        )


def _check_dtype(config: ml_collections.ConfigDict) -> None:
    dtype = config.model.get('dtype', 'float32')
    models.compute_dtype(dtype)  # unknown names raise
    if dtype != 'float32' and config.mode in FLOAT32_ONLY_MODES:
        raise ValueError(
            f'mode {config.mode!r} cannot run in model.dtype={dtype!r}: its criteria rank '
            'weights by gradients that need float32; rerun it with --config.model.dtype=float32 '
            '(the jackpot it reads may come from a bfloat16 search)'
        )


def _check_open_names(config: ml_collections.ConfigDict) -> None:
    """The dataset and model names: built-in ones, 'tfds:NAME' and 'package.module:Factory'."""
    if data.is_tfds_name(config.data.name):
        data.tfds_options(config.data)
    else:
        _check_choice(
            'dataset', config.data.name, data.DATASETS + data.TFDS_DATASETS + ('tfds:NAME',)
        )
    if not user_models.is_import_path(config.model.name):
        known = tuple(models.MODELS) + ('package.module:Factory',)
        _check_choice('model', config.model.name, known)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field and how to fix it."""
    _check_keys(config, get_config())
    config = resolve_protocol(config)
    _check_choice('mode', config.mode, MODES)
    _check_open_names(config)
    if 'width' in config.model and not config.model.width > 0:
        raise ValueError(f'model.width must be a positive integer, got {config.model.width!r}')
    if is_no_jackpot(config.jackpot) and config.mode not in NO_JACKPOT_MODES:
        raise ValueError(
            f"config.jackpot={config.jackpot!r} means no jackpot, which mode {config.mode!r} "
            "cannot use: set config.jackpot to a jackpot folder ('' = WORKDIR/jackpot), or use "
            "'none' with --mode=evaluate to evaluate the weights as they are"
        )
    _check_dtype(config)
    s = config.search
    if not 0.0 <= s.sparsity < 1.0:
        raise ValueError(
            f'search.sparsity must be in [0, 1), got {s.sparsity!r}; it is the '
            'fraction of prunable weights removed (0.9 keeps 10%)'
        )
    _check_choice('allocation', s.allocation, sparsity.ALLOCATIONS)
    _check_choice('mask_update', s.mask_update, sparsity.MASK_UPDATES)
    _check_choice('rate_schedule', s.rate_schedule, sparsity.RATE_SCHEDULES)
    _check_choice('bn_mode', s.bn_mode, search.BN_MODES)
    _check_choice('search.score_init', s.score_init, sparsity.SCORE_INITS)
    _check_regex('search.prune_include', s.prune_include)
    _check_regex('search.prune_exclude', s.prune_exclude)
    pattern = structured.parse_pattern(s.pattern)
    if pattern and abs(s.sparsity - structured.pattern_sparsity(*pattern)) > 1e-9:
        n, m = pattern
        raise ValueError(
            f'search.pattern {s.pattern!r} removes {m - n}/{m} of every eligible layer, but '
            f'search.sparsity is {s.sparsity!r}; set --config.search.sparsity={(m - n) / m!r}'
        )
    _check_list('search_cost.inits', config.search_cost.inits, sparsity.SCORE_INITS)
    _check_list('restriction.variants', config.restriction.variants, RESTRICTION_VARIANTS)
    _check_list('stability.variants', config.stability.variants, STABILITY_VARIANTS)
    for value in parse_list('sweep.sparsities', config.sweep.sparsities, float):
        if not 0.0 <= value < 1.0:
            raise ValueError(f'sweep.sparsities: {value!r} is not in [0, 1)')
    if not 0.0 <= config.search_cost.target <= 1.0:
        raise ValueError(
            f'search_cost.target must be a test top-1 in [0, 1] (0 = the kaiming search\'s '
            f'final accuracy), got {config.search_cost.target!r}'
        )
    for name, value in [
        ('data.validation_fraction', config.data.validation_fraction),
        ('search.mask_freeze_fraction', s.mask_freeze_fraction),
    ]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f'{name} must be in [0, 1) (or -1: set by config.protocol), got {value!r}')
    if not 0.0 <= s.pruned_score < 1.0:
        raise ValueError(
            f'search.pruned_score must be in [0, 1) so magnitude-kept weights '
            f'(score 1.0) rank first, got {s.pruned_score!r}'
        )
    for group in ('pretrain', 'search', 'tune'):
        for field in ('epochs', 'batch_size'):
            if group != 'tune' or field != 'epochs':
                _check_positive(f'{group}.{field}', config[group][field])
        _check_optimizer(group, config[group])
        if not 0.0 <= config[group].label_smoothing < 1.0:
            raise ValueError(
                f'{group}.label_smoothing must be in [0, 1), '
                f'got {config[group].label_smoothing!r}'
            )
    _check_positive('data.eval_batch_size', config.data.eval_batch_size)
    _check_distributed(config.distributed)
    _check_positive('checkpoint.keep', config.checkpoint.keep)
    _check_list('overlap.criteria', config.overlap.criteria, tuple(criteria.CRITERIA))
    for name, value in [
        ('tune.epochs', config.tune.epochs),
        ('checkpoint.every_steps', config.checkpoint.every_steps),
        ('steps_per_epoch', config.steps_per_epoch),
        ('overlap.batch_size', config.overlap.batch_size),
        ('overlap.bn_steps', config.overlap.bn_steps),
        ('data.threads', config.data.threads),
        ('search.bn_recalibration_steps', s.bn_recalibration_steps),
    ]:
        if value < 0:
            raise ValueError(f'{name} must be >= 0, got {value!r}')
