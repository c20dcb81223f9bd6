"""What the studies share: one search per variant over the same frozen weights.

Each variant is an ordinary, resumable search in ``WORKDIR/<study>/<variant>`` (its own
checkpoints, jackpot, metrics and plots) over ``WORKDIR/pretrained``, which is trained
first if missing; rerunning a study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from jackpot_jax.io import workdir as workdir_lib
from jackpot_jax.launch import config_checks, run_context as rc
from jackpot_jax.launch.search_mode import run_search
from jackpot_jax.launch.weight_training import ensure_pretrained


def variant_config(
    config: ml_collections.ConfigDict, workdir: str, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A search config over the study's frozen weights with dotted-key ``overrides``,
    checked (``config`` is resolved; the overrides set values, never leave one unset)."""
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.mode = 'search'
    sub.pretrained = os.path.abspath(workdir_lib.pretrained_path(workdir, config.pretrained))
    sub.jackpot = ''
    sub.tune.epochs = 0
    for key, value in overrides.items():
        if '.' in key:
            group, field = key.split('.')
            sub[group][field] = value
        else:
            sub[key] = value
    return config_checks.resolved(sub)


def variant_folder(workdir: str, study: str, name: str) -> str:
    """``WORKDIR/<study>/<name>``: where one variant of a study searches."""
    return os.path.join(workdir_lib.path(workdir, study), name)


def run_variant(
    config: ml_collections.ConfigDict,
    workdir: str,
    study: str,
    name: str,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """One search of a study, in ``WORKDIR/<study>/<name>``; its summary and epoch history."""
    sub = variant_config(config, workdir, overrides)
    folder = variant_folder(workdir, study, name)
    rc.print_main(f'{study}: searching {name} in {folder}')
    found = run_search(sub, folder)
    return {k: v for k, v in found.items() if k not in ('state', 'counts')} | {'workdir': folder}


def run_variants(
    config: ml_collections.ConfigDict,
    workdir: str,
    study: str,
    overrides: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """:func:`run_variant` for every ``{name: overrides}``, pre-training first if needed."""
    ensure_pretrained(config, workdir)
    return {name: run_variant(config, workdir, study, name, o) for name, o in overrides.items()}


def save_result(
    workdir: str,
    study: str,
    result: Mapping[str, Any],
    plot: Callable[[str], None],
    text: str,
    figure: str = '',
) -> None:
    """Writes ``WORKDIR/<study>.json`` and the figure (``plot(path)``, default
    ``<study>.png``) on process 0, and prints ``text``."""
    if jax.process_index() == 0:
        with open(workdir_lib.path(workdir, f'{study}.json'), 'w') as f:
            json.dump(result, f, indent=2)
        plot(workdir_lib.path(workdir, figure or f'{study}.png'))
    rc.print_main(text)


def header(config: ml_collections.ConfigDict) -> dict[str, Any]:
    s = config.search
    return {
        'model': config.model.name,
        'data': config.data.name,
        'sparsity': s.sparsity,
        'allocation': s.allocation,
        'epochs': s.epochs,
    }
