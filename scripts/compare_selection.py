"""Compare the epoch-selection rules of jackpot_jax.core.selection on recorded searches.

    python scripts/compare_selection.py NAME=PATH[@N] ...

PATH is a launcher workdir, its ``metrics.jsonl``, or any JSON-lines file of per-epoch
records (``'epoch'``, ``'validation_top1'``, a test figure ``'test_top1'`` or
``'eval_top1'``, and ``'mask_changes'`` for the rule ``'best_frozen'``); launcher records
of other modes than ``search`` are skipped, and of an epoch recorded twice (a resumed
run) the latest counts. N is the size of the validation split (the binomial standard
error needs it; without it the standard error is 0). A NAME of the form GROUP/RUN adds
the mean over the group's runs to the second table.

Every rule chooses on the validation figures only; the test figures are printed beside
them and never read by a rule. Prints two markdown tables: one row per run and rule,
then the test top-1 of each rule per run, and the default's against the last epoch's and
the best epoch's (differences in points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from jackpot_jax.core import selection

METRIC = 'validation_top1'
TEST_METRICS = ('test_top1', 'eval_top1')
LABELS = {
    'best': 'best',
    'one_standard_error': 'one SE',
    'best_frozen': 'best frozen',
    'last': 'last',
}


def read_records(path: str) -> list[dict]:
    """Per-epoch search records of a workdir or a JSON-lines file, one per epoch."""
    if os.path.isdir(path):
        path = os.path.join(path, 'metrics.jsonl')
    by_epoch = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get('mode', 'search') != 'search' or METRIC not in record:
                continue
            by_epoch[record['epoch']] = record
    if not by_epoch:
        raise SystemExit(f'{path}: no search records with {METRIC!r}')
    return [by_epoch[e] for e in sorted(by_epoch)]


def parse_run(argument: str) -> tuple[str, str, int | None]:
    if '=' not in argument:
        raise SystemExit(f'{argument!r}: pass NAME=PATH or NAME=PATH@N')
    name, path = argument.split('=', 1)
    num_examples = None
    if '@' in path:
        path, n = path.rsplit('@', 1)
        num_examples = int(n)
    return name, path, num_examples


def test_of(record: dict) -> float | None:
    for key in TEST_METRICS:
        if record.get(key) is not None:
            return float(record[key])
    return None


def pct(value: float | None) -> str:
    return 'n/a' if value is None else f'{100 * value:.2f}'


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', help='NAME=PATH[@N]')
    args = parser.parse_args(argv)

    rows, summary = [], []
    for argument in args.runs:
        name, path, n = parse_run(argument)
        records = read_records(path)
        tests = {r['epoch']: test_of(r) for r in records}
        last = records[-1]['epoch']
        kept = {}
        for rule in selection.SELECTION_RULES:
            try:
                choice = selection.choose_epoch(records, rule=rule, num_examples=n)
            except ValueError as e:
                if rule != 'best_frozen' or 'mask_changes' not in str(e):
                    raise
                kept[rule] = None
                rows.append(f'| {name} | {LABELS[rule]} | mask changes not recorded | | | |')
                continue
            kept[rule] = choice
            default = ' (default)' if rule == selection.DEFAULT_RULE else ''
            rows.append(
                f'| {name} | {LABELS[rule]}{default} | {choice.epoch} | '
                f'{pct(choice.value)} | {pct(tests[choice.epoch])} | {pct(tests[last])} |'
            )
        best = kept['best']
        se = f'{100 * best.standard_error:.2f}' if best.standard_error else '0'
        summary.append((name, n, se, {r: c and tests[c.epoch] for r, c in kept.items()},
                        tests[last]))

    print('| run | rule | chosen epoch | validation top-1 | test top-1 | last epoch, test top-1 |')
    print('|---|---|---|---|---|---|')
    print('\n'.join(rows))
    print()
    rules = selection.SELECTION_RULES
    print(
        '| run | validation examples | SE (points) | '
        + ' | '.join(f'test: {LABELS[r]}' for r in rules)
        + ' | default - last | default - best |'
    )
    print('|---' * (len(rules) + 5) + '|')
    groups = {}
    for name, n, se, test, last_test in summary:
        print(_summary_row(name, n, se, test, last_test))
        if '/' in name:
            groups.setdefault(name.split('/')[0], []).append((test, last_test))
    for group, members in groups.items():
        if len(members) < 2:
            continue
        mean = {}
        for rule in rules:
            values = [t[rule] for t, _ in members]
            mean[rule] = None if None in values else sum(values) / len(values)
        last_mean = sum(lt for _, lt in members) / len(members)
        print(_summary_row(f'{group}: mean of {len(members)}', '', '', mean, last_mean))


def _summary_row(name, n, se, test, last_test) -> str:
    default = test[selection.DEFAULT_RULE]
    cells = [pct(test[r]) for r in selection.SELECTION_RULES]
    diff = lambda a, b: 'n/a' if a is None or b is None else f'{100 * (a - b):+.2f}'  # noqa: E731
    return (
        f"| {name} | {n if n is not None else ''} | {se} | " + ' | '.join(cells)
        + f' | {diff(default, last_test)} | {diff(default, test["best"])} |'
    )


if __name__ == '__main__':
    main(sys.argv[1:])
