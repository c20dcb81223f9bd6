"""Per-epoch test top-1 of searches side by side, from their metrics.jsonl files.

  PYTHONPATH=. python scripts/plot_protocol_curves.py OUT.png DENSE_TOP1 LABEL=WORKDIR [LABEL=WORKDIR ...]

Reads each WORKDIR/metrics.jsonl (the search records) and draws one curve per workdir,
with the dense network's test top-1 as a dashed line. Reporting only: nothing is chosen
from these curves.
"""

import os
import sys

from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.launch import plots


def main(argv: list[str]) -> None:
    if len(argv) < 4 or any('=' not in a for a in argv[3:]):
        raise SystemExit(__doc__)
    out, dense = argv[1], float(argv[2])
    curves = {}
    for arg in argv[3:]:
        label, workdir = arg.split('=', 1)
        records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
        curves[label] = [(r['epoch'], r['test_top1']) for r in records if r['mode'] == 'search']
    plots.plot_curves(
        curves, out, xlabel='search epoch', ylabel='test top-1 (no weight trained)',
        title='Fashion-MNIST, small_cnn width 32: the stable protocol against the paper\'s',
        hline=(dense, 'dense'),
    )


if __name__ == '__main__':
    main(sys.argv)
