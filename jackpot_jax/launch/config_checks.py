"""A config checked against the library: protocol resolution and validation.

:func:`resolve_protocol` fills the fields left to ``config.protocol``; :func:`validate`
names the first bad field and its fix. Both need the library's lists of valid names,
which is why they live here and not in :mod:`jackpot_jax.launch.config` (which imports only
ml_collections, so loading a config file never imports JAX).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections

from jackpot_jax.baselines import criteria
from jackpot_jax.core import selection, settings as settings_lib, sparsity, step, structured
from jackpot_jax.data import catalog
from jackpot_jax.launch.config import (
    CPU_COLLECTIVES,
    FLOAT32_ONLY_MODES,
    NO_JACKPOT_MODES,
    PROTOCOLS,
    STABILITY_VARIANTS,
    get_config,
    is_no_jackpot,
    parse_list,
)
from jackpot_jax.models import user_models, zoo

# Mask-update rules compared by mode 'restriction': the three short-restriction rates and
# the 2021 edge-popup rule.
RESTRICTION_VARIANTS = sparsity.RATE_SCHEDULES + ('edge_popup',)
# Which epoch's jackpot a search keeps (search.selection_rule).


def resolve_protocol(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every field left to ``config.protocol`` (-1, or '' for a
    text field) set by it.

    Idempotent; fields set explicitly (>= 0) are kept, so a protocol can be mixed with
    single changes (e.g. the paper's protocol with re-estimated statistics). Without a
    validation split the jackpot's epoch is the last epoch's (one rule with the library:
    :meth:`jackpot_jax.core.settings.SearchSettings.resolved`).
    """
    check_choice('protocol', config.protocol, tuple(PROTOCOLS))
    resolved = ml_collections.ConfigDict(config.to_dict())
    for field, value in PROTOCOLS[config.protocol].items():
        group, name = field.split('.')
        if resolved[group][name] in (-1, ''):
            if field == 'search.selection_rule' and not resolved.data.validation_fraction:
                value = 'last'
            resolved[group][name] = value
    return resolved


def check_selection_rule(config: ml_collections.ConfigDict) -> None:
    """Refuses a choice on the validation split when there is none (a resolved config)."""
    choice = config.search.selection_rule
    if choice != 'last' and not config.data.validation_fraction:
        raise ValueError(
            f"search.selection_rule={choice!r} chooses on the validation split, but "
            'data.validation_fraction is 0 (no validation split); set '
            "--config.data.validation_fraction=0.1, or --config.search.selection_rule=last"
        )


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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'unknown {name} {value!r}; choose one of {", ".join(choices)}')



def _check_list(name: str, text: str, choices: tuple[str, ...]) -> None:
    for item in parse_list(name, text):
        check_choice(name, item, choices)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f'{name} must be positive, got {value!r}')


def lm_pruning_sparsities(text: str) -> tuple[tuple[str, float, str], ...]:
    """``'0.5,0.7,2:4'`` -> ``(label, search.sparsity, search.pattern)`` per entry."""
    out = []
    for item in parse_list('lm_pruning.sparsities', text):
        if ':' in item:
            try:
                nm = structured.parse_pattern(item)
            except ValueError as e:
                raise ValueError(
                    f'lm_pruning.sparsities: {item!r} is not an N:M pattern ({e}); write e.g. 2:4'
                ) from None
            out.append((f'{nm[0]}:{nm[1]}', float(structured.pattern_sparsity(*nm)), item))
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(
                f'lm_pruning.sparsities: {item!r} is neither a fraction nor an N:M pattern; '
                "write e.g. '0.5,0.7,2:4'"
            ) from None
        if not 0.0 < value < 1.0:
            raise ValueError(
                f'lm_pruning.sparsities: {value!r} is not in (0, 1); it is the fraction of '
                'each layer pruned, e.g. 0.5'
            )
        out.append((f'{value:g}', value, ''))
    labels = [label for label, _, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f'lm_pruning.sparsities: {text!r} names a sparsity twice; list each once')
    return tuple(out)


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


def _check_distributed(d: ml_collections.ConfigDict) -> None:
    check_choice('distributed.cpu_collectives', d.cpu_collectives, CPU_COLLECTIVES)
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


def _check_fsdp(config: ml_collections.ConfigDict) -> None:
    """An integer >= 1 that divides config.num_devices when that is given (the device count
    itself is checked when the mesh is built)."""
    fsdp = config.fsdp
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(
            f'fsdp={fsdp!r} must be an integer >= 1: the devices that share one copy of the '
            'search state (1 = a full copy on every device); e.g. --config.fsdp=2'
        )
    if config.num_devices > 0 and config.num_devices % fsdp:
        divisors = [d for d in range(1, config.num_devices + 1) if config.num_devices % d == 0]
        raise ValueError(
            f'fsdp={fsdp} does not divide num_devices={config.num_devices}; choose fsdp among '
            f'{", ".join(map(str, divisors))}, or set num_devices to a multiple of {fsdp}'
        )


def _check_dtype(config: ml_collections.ConfigDict) -> None:
    dtype = config.model.get('dtype', 'float32')
    zoo.compute_dtype(dtype)  # unknown names raise
    if dtype != 'float32' and config.mode in FLOAT32_ONLY_MODES:
        raise ValueError(
            f'mode {config.mode!r} cannot run in model.dtype={dtype!r}: its criteria rank '
            'weights by gradients that need float32; rerun it with --config.model.dtype=float32 '
            '(the jackpot it reads may come from a bfloat16 search)'
        )


def _check_open_names(config: ml_collections.ConfigDict) -> None:
    """The dataset and model names: built-in ones, 'tfds:NAME' and 'package.module:Factory'."""
    if catalog.is_tfds_name(config.data.name):
        catalog.tfds_options(config.data)
    else:
        check_choice(
            'dataset', config.data.name, catalog.DATASETS + catalog.TFDS_DATASETS + ('tfds:NAME',)
        )
    if not user_models.is_import_path(config.model.name):
        known = tuple(zoo.MODELS) + ('package.module:Factory',)
        check_choice('model', config.model.name, known)


def validate(config: ml_collections.ConfigDict, modes: Sequence[str] = ()) -> None:
    """Raises ValueError naming the first bad field and how to fix it; with ``modes`` (the
    launcher's table) the mode must be one of them."""
    _check_keys(config, get_config())
    config = resolve_protocol(config)
    if modes:
        check_choice('mode', config.mode, tuple(modes))
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
    if not isinstance(config.overwrite, bool):
        raise ValueError(
            f'overwrite must be true or false (replace what exists), got {config.overwrite!r}'
        )
    s = config.search
    if not 0.0 <= s.sparsity < 1.0:
        raise ValueError(
            f'search.sparsity must be in [0, 1), got {s.sparsity!r}; it is the '
            'fraction of prunable weights removed (0.9 keeps 10%)'
        )
    check_choice('allocation', s.allocation, sparsity.ALLOCATIONS)
    check_choice('mask_update', s.mask_update, sparsity.MASK_UPDATES)
    check_choice('rate_schedule', s.rate_schedule, sparsity.RATE_SCHEDULES)
    check_choice('bn_mode', s.bn_mode, step.BN_MODES)
    check_choice('search.optimizer', s.optimizer, settings_lib.OPTIMIZERS)
    check_choice('search.score_init', s.score_init, sparsity.SCORE_INITS)
    check_choice('search.selection_rule', s.selection_rule, selection.SELECTION_RULES)
    settings_lib.check_regex('search.prune_include', s.prune_include)
    settings_lib.check_regex('search.prune_exclude', s.prune_exclude)
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
    lm_pruning_sparsities(config.lm_pruning.sparsities)
    _check_positive('lm_pruning.calibration_batches', config.lm_pruning.calibration_batches)
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
    check_selection_rule(config)
    step.check_swap_margin(s.swap_margin, s.mask_update, 'search.swap_margin')
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
    _check_fsdp(config)
    _check_positive('checkpoint.keep', config.checkpoint.keep)
    _check_list('overlap.criteria', config.overlap.criteria, tuple(criteria.CRITERIA))
    for name, value in [
        ('tune.epochs', config.tune.epochs),
        ('checkpoint.every_steps', config.checkpoint.every_steps),
        ('steps_per_epoch', config.steps_per_epoch),
        ('overlap.batch_size', config.overlap.batch_size),
        ('overlap.reestimation_steps', config.overlap.reestimation_steps),
        ('data.threads', config.data.threads),
        ('search.reestimation_steps', s.reestimation_steps),
    ]:
        if value < 0:
            raise ValueError(f'{name} must be >= 0, got {value!r}')
