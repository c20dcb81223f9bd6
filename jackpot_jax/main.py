"""Command line: ``python -m jackpot_jax.main --config=configs/<file>.py --workdir=DIR``.

With no flags it runs the embedded demo on scikit-learn's digits. Fields can be
overridden on the command line, e.g. ``--config.search.sparsity=0.95``.
"""

import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jackpot_jax import config as config_lib
from jackpot_jax import parallel, train

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    os.path.abspath(config_lib.__file__),
    'Path to a config file (see configs/).',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Folder for weights, jackpots, metrics.')
_MODE = flags.DEFINE_enum('mode', None, list(config_lib.MODES), 'Overrides config.mode.')


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = _CONFIG.value
    if _MODE.value:
        config.mode = _MODE.value
    config_lib.validate(config)
    d = config.distributed
    if d.initialize:  # before anything else touches a JAX backend
        parallel.initialize_distributed(
            d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives
        )
    if jax.process_index():  # one log for the whole run: process 0's
        logging.set_verbosity(logging.WARNING)
    logging.info(
        'process %d of %d; %d local and %d global devices',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    os.makedirs(_WORKDIR.value, exist_ok=True)
    logging.info('mode %s, workdir %s\n%s', config.mode, _WORKDIR.value, config)
    train.MODES[config.mode](config, _WORKDIR.value)


def run() -> None:
    """The ``jackpot-jax`` console script: the launcher with absl's flag parsing."""
    app.run(main)


if __name__ == '__main__':
    run()
