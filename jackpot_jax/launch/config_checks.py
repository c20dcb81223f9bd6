"""A config checked against the library and resolved: the launcher's one resolution.

:func:`resolved` names the first bad field and its fix, and returns a copy with every
field left unset (None) filled by ``config.protocol``, through the library's one rule
(:func:`jackpot_jax.core.settings.fill_protocol`); the search group is checked by
:meth:`~jackpot_jax.core.settings.SearchSettings.check`, as the library's options are.
The launcher calls it once, at its entry; everything below takes the resolved config
(and, below ``launch/``, plain values or :class:`~jackpot_jax.core.settings.SearchSettings`).
It lives here and not in :mod:`jackpot_jax.launch.config` (which imports only ml_collections,
so loading a config file never imports JAX) because it needs the library's names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_collections

from jackpot_jax.baselines import criteria
from jackpot_jax.core import choices, settings as settings_lib, structured
from jackpot_jax.core.choices import check_choice
from jackpot_jax.core.settings import SearchSettings
from jackpot_jax.data import catalog
from jackpot_jax.io import gguf, llama_weights
from jackpot_jax.launch.config import (
    CPU_COLLECTIVES,
    FLOAT32_ONLY_MODES,
    NO_JACKPOT_MODES,
    STABILITY_VARIANTS,
    get_config,
    is_no_jackpot,
    parse_list,
)
from jackpot_jax.models import user_models, zoo

# Mask-update rules compared by mode 'restriction': the three short-restriction rates and
# the 2021 edge-popup rule.
RESTRICTION_VARIANTS = choices.RATE_SCHEDULES + ('edge_popup',)
# The search fields of SearchSettings; its protocol is config.protocol.
_SEARCH_FIELDS = tuple(f.name for f in dataclasses.fields(SearchSettings) if f.name != 'protocol')
# Search fields whose None no protocol fills: it has a meaning of its own (selection_mode:
# the direction read from the metric's name).
_UNSET_MEANS_DEFAULT = frozenset({'selection_mode'})


def search_settings(config: ml_collections.ConfigDict) -> SearchSettings:
    """The typed settings of ``config.search`` under ``config.protocol``, as they are (a
    resolved config gives resolved settings)."""
    return SearchSettings(
        protocol=config.protocol, **{name: config.search[name] for name in _SEARCH_FIELDS}
    )


def validation_fraction(config: ml_collections.ConfigDict) -> float:
    """``data.validation_fraction``, or the protocol's when it is left unset."""
    fraction = config.data.validation_fraction
    if fraction is None:
        fraction = settings_lib.fill_protocol(
            config.protocol, {'validation_fraction': None}, has_validation=True
        )['validation_fraction']
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f'data.validation_fraction must be a number in [0, 1), got {fraction!r}')
    if not 0.0 <= fraction < 1.0:
        raise ValueError(
            f'data.validation_fraction must be in [0, 1) (unset: set by config.protocol), got '
            f'{fraction!r}'
        )
    return fraction


def require_resolved(config: ml_collections.ConfigDict) -> None:
    """Raises unless :func:`resolved` made ``config`` (no field is left unset)."""
    unset = [
        f'search.{n}'
        for n in _SEARCH_FIELDS
        if config.search[n] is None and n not in _UNSET_MEANS_DEFAULT
    ]
    unset += ['data.validation_fraction'] if config.data.validation_fraction is None else []
    if unset:
        raise ValueError(
            f'{", ".join(unset)} {"is" if len(unset) == 1 else "are"} unset: resolve the config '
            'first with jackpot_jax.launch.config_checks.resolved(config), as the launcher does '
            'at its entry'
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


def _check_list(name: str, text: str, choices: tuple[str, ...]) -> None:
    for item in parse_list(name, text):
        check_choice(name, item, choices)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f'{name} must be positive, got {value!r}')


def start_scores(text: str) -> tuple[str, float]:
    """``lm_pruning.start_scores`` as ``(kind, spread)``: 'flat', 'ranked:SPREAD' (> 0)
    or 'scaled'."""
    kind, _, spread = str(text).partition(':')
    try:
        value = float(spread) if kind == 'ranked' else 0.0
    except ValueError:
        value = -1.0
    if kind not in ('flat', 'ranked', 'scaled') or (kind == 'ranked') != (value > 0) or (
        kind != 'ranked' and spread
    ):
        raise ValueError(
            f"lm_pruning.start_scores={text!r}: write 'flat', 'ranked:SPREAD' (a spread > 0, "
            "e.g. ranked:0.02) or 'scaled'"
        )
    return kind, value


def start_scores_list(text: str) -> tuple[str, ...]:
    """``lm_pruning.start_scores``: one or more comma-separated :func:`start_scores`."""
    items = parse_list('lm_pruning.start_scores', text)
    for item in items:
        start_scores(item)
    if len(set(items)) != len(items):
        raise ValueError(f'lm_pruning.start_scores={text!r} names one twice; list each once')
    return tuple(items)


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
        catalog.tfds_options(config.data.to_dict())
    else:
        check_choice(
            'dataset', config.data.name, catalog.DATASETS + catalog.TFDS_DATASETS + ('tfds:NAME',)
        )
    if not user_models.is_import_path(config.model.name):
        known = tuple(zoo.MODELS) + ('package.module:Factory',)
        check_choice('model', config.model.name, known)


def resolved(
    config: ml_collections.ConfigDict, modes: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """The config checked, with every field left unset filled by ``config.protocol``.

    Raises ValueError naming the first bad field and how to fix it; with ``modes`` (the
    launcher's table) the mode must be one of them. Idempotent.
    """
    _check_keys(config, get_config())
    if modes:
        check_choice('mode', config.mode, tuple(modes))
    fraction = validation_fraction(config)
    settings = search_settings(config).resolved(fraction > 0, prefix='search.')
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.validation_fraction = fraction
    for name in _SEARCH_FIELDS:
        out.search[name] = getattr(settings, name)
    if out.model.name == llama_weights.MODEL_NAME and not out.pretrained:
        out.pretrained = gguf.smollm2_gguf_path()  # a LLaMA's weights are given, never trained
    _check_launcher_fields(out)
    return out


def _check_launcher_fields(config: ml_collections.ConfigDict) -> None:
    """What only the launcher has: names, modes' groups, devices, weight training."""
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
    _check_list('search_cost.inits', config.search_cost.inits, choices.SCORE_INITS)
    _check_list('restriction.variants', config.restriction.variants, RESTRICTION_VARIANTS)
    _check_list('stability.variants', config.stability.variants, STABILITY_VARIANTS)
    for value in parse_list('sweep.sparsities', config.sweep.sparsities, float):
        if not 0.0 <= value < 1.0:
            raise ValueError(f'sweep.sparsities: {value!r} is not in [0, 1)')
    lm_pruning_sparsities(config.lm_pruning.sparsities)
    _check_positive('lm_pruning.calibration_batches', config.lm_pruning.calibration_batches)
    start_scores_list(config.lm_pruning.start_scores)
    if not 0.0 <= config.search_cost.target <= 1.0:
        raise ValueError(
            f'search_cost.target must be a test top-1 in [0, 1] (0 = the kaiming search\'s '
            f'final accuracy), got {config.search_cost.target!r}'
        )
    _check_positive('search.batch_size', config.search.batch_size)
    for group in ('pretrain', 'tune'):
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
    ]:
        if value < 0:
            raise ValueError(f'{name} must be >= 0, got {value!r}')
