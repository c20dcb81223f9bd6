"""Former names, readable for one release: config fields, search options, values and
epoch-record keys that were renamed, and the upgrades that read them under their names.

Every place that takes a name from outside (the command line, a config file, the
library's keyword arguments, a checkpoint written by an older version) upgrades it
here, so the rest of the package knows only the current names. A former name used by
hand gets a one-line deprecation message; one read back from a checkpoint is upgraded
silently (the checkpoint is not wrong, only older).

Pure Python: importing this module imports no JAX.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

# Config fields: former dotted name -> current one.
CONFIG_FIELDS = {
    'search.bn_recalibration_steps': 'search.reestimation_steps',
    'search.final_jackpot': 'search.selection_rule',
    'search.compare_bn_statistics': 'search.compare_statistics',
    'overlap.bn_steps': 'overlap.reestimation_steps',
}
# Search options (SearchSettings fields, find_jackpot keywords): former -> current.
OPTIONS = {
    'bn_recalibration_steps': 'reestimation_steps',
    'final_jackpot': 'selection_rule',
}
# Values: option -> {former value: current value}.
OPTION_VALUES = {
    'rate_schedule': {'all': 'constant'},
    'selection_rule': {'best_validation': 'best'},
}
# Config fields holding a value of OPTION_VALUES, or a comma-separated list of them.
CONFIG_VALUES = {
    'search.rate_schedule': OPTION_VALUES['rate_schedule'],
    'search.selection_rule': OPTION_VALUES['selection_rule'],
    'restriction.variants': OPTION_VALUES['rate_schedule'],
    'stability.variants': {'paper+recalibration': 'paper+reestimation'},
}
LISTS = ('restriction.variants', 'stability.variants')
# Epoch-record keys that are not a metric of the training batches (which are 'train_*').
RECORD_KEYS = frozenset(
    {
        'mode', 'epoch', 'step', 'learning_rate', 'swap_rate', 'trace',
        'mask_changes', 'mask_changes_per_layer', 'flip_backs', 'flip_backs_per_layer',
    }
)  # fmt: skip
_SPLIT_PREFIX = re.compile(r'^(train|validation|test|eval)_')
_FORMER_SUFFIX = '_recalibrated'  # now '_reestimated'


def _message(former: str, current: str) -> str:
    return f'{former} is now {current}; the former name goes in the next release'


def _upgrade_value(values: Mapping[str, str], value: Any, is_list: bool) -> Any:
    if not isinstance(value, str):
        return value
    if is_list:
        return ','.join(values.get(item.strip(), item.strip()) for item in value.split(','))
    return values.get(value, value)


def former_values(field: str, value: str) -> list[str]:
    """The former values of ``value`` in the config field of dotted name ``field``."""
    return [old for old, new in CONFIG_VALUES.get(field, {}).items() if new == value]


def upgrade_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with former ``--config.`` field names and values replaced by
    the current ones, each with a one-line warning."""
    out = []
    for arg in argv:
        match = re.match(r'^(-{1,2}config\.)([\w.]+)(=.*)?$', arg)
        if match:
            prefix, field, value = match.group(1), match.group(2), match.group(3) or ''
            if field in CONFIG_FIELDS:
                logging.warning(_message(prefix + field, prefix + CONFIG_FIELDS[field]))
                field = CONFIG_FIELDS[field]
            if value and field in CONFIG_VALUES:
                upgraded = _upgrade_value(CONFIG_VALUES[field], value[1:], field in LISTS)
                if upgraded != value[1:]:
                    logging.warning(
                        _message(f'{prefix}{field}{value}', f'{prefix}{field}={upgraded}')
                    )
                value = '=' + upgraded
            arg = prefix + field + value
        out.append(arg)
    return out


def upgrade_config(config: Any, warn: bool = True) -> None:
    """Moves a config's former fields (set by a config file written for an older version)
    to their current names and upgrades former values, in place (with ``warn``, a warning
    for each)."""
    for former, current in CONFIG_FIELDS.items():
        group, name = former.split('.')
        if group in config and name in config[group]:
            value = config[group][name]
            with config[group].unlocked():
                del config[group][name]
            config[group][current.split('.')[1]] = value
            if warn:
                logging.warning(_message(f'config.{former}', f'config.{current}'))
    for field, values in CONFIG_VALUES.items():
        group, name = field.split('.')
        if group in config and name in config[group]:
            value = config[group][name]
            upgraded = _upgrade_value(values, value, field in LISTS)
            if upgraded != value:
                config[group][name] = upgraded
                if warn:
                    logging.warning(_message(f'config.{field}={value!r}', repr(upgraded)))


def upgrade_options(options: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
    """Search options (keyword arguments, or settings read back from a checkpoint) under
    their current names and values; with ``warn``, a FutureWarning per former one."""
    out = {}
    for name, value in options.items():
        current = OPTIONS.get(name, name)
        if current != name and warn:
            warnings.warn(_message(f'{name}=', f'{current}='), FutureWarning, stacklevel=3)
        if current in out:
            raise ValueError(f'{current}= is given twice (once as its former name {name}=)')
        upgraded = _upgrade_value(OPTION_VALUES.get(current, {}), value, False)
        if upgraded != value and warn:
            warnings.warn(
                _message(f'{current}={value!r}', f'{current}={upgraded!r}'),
                FutureWarning,
                stacklevel=3,
            )
        out[current] = upgraded
    return out


def upgrade_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A launcher checkpoint's config identity ('/'-joined field -> value) under the
    current field names and values."""
    out = {}
    for key, value in identity.items():
        field = CONFIG_FIELDS.get(key.replace('/', '.'), key.replace('/', '.'))
        if field in CONFIG_VALUES:
            value = _upgrade_value(CONFIG_VALUES[field], value, field in LISTS)
        out[field.replace('.', '/')] = value
    return out


def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """An epoch record under the current keys: training-batch metrics as ``train_*``,
    re-estimated figures as ``*_reestimated``."""
    out = {}
    for key, value in record.items():
        if key.endswith(_FORMER_SUFFIX):
            key = key[: -len(_FORMER_SUFFIX)] + '_reestimated'
        elif key not in RECORD_KEYS and not _SPLIT_PREFIX.match(key):
            key = 'train_' + key
        out[key] = value
    return out


def upgrade_checkpoint_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A search checkpoint's meta (records, settings, config identity) under the current
    names; a current one comes back equal."""
    out = dict(meta)
    if 'history' in out:
        out['history'] = [upgrade_record(r) for r in out['history']]
    if 'settings' in out:
        out['settings'] = upgrade_options(out['settings'], warn=False)
    if 'config' in out:
        out['config'] = upgrade_identity(out['config'])
    return out


# Keys of a library Jackpot's report and of its epoch records: former -> current.
REPORT_KEYS = {'kept_epoch': 'chosen_epoch', 'loss': 'train_loss', 'top1': 'train_top1'}


class Report(dict):
    """A dict that still answers a former key (REPORT_KEYS) with a FutureWarning."""

    def __missing__(self, key: Any) -> Any:
        current = REPORT_KEYS.get(key)
        if current is None or current not in self:
            raise KeyError(key)
        warnings.warn(_message(f'[{key!r}]', f'[{current!r}]'), FutureWarning, stacklevel=2)
        return self[current]
