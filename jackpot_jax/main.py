"""Command line: ``jackpot-jax --config=configs/<file>.py[:ARGS] --workdir=DIR``
(or ``python -m jackpot_jax.main ...``).

With no flags it runs the embedded demo on scikit-learn's digits. Fields can be
overridden on the command line, e.g. ``--config.search.sparsity=0.95``.
A mistake in the input ends in one line on stderr; ``--traceback`` shows the traceback.
"""

from __future__ import annotations

import ast
import difflib
import logging as std_logging
import os
import re
import sys
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jackpot_jax.core import errors, parallel, sparsity
from jackpot_jax.io import workdir as workdir_lib
from jackpot_jax.launch import config as config_lib, modes

DEFAULT_CONFIG = os.path.abspath(config_lib.__file__)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# No default here: parse_flags supplies it, so that a bad override is reported when flags
# are parsed, not while this module is imported.
_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'A config file, FILE.py[:ARGS]. configs/NAME.py names the file under the working '
    'directory or, when there is none, the copy installed with the package. Default: '
    'jackpot_jax/launch/config.py (the digits demo).',
    lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Folder for weights, jackpots, metrics.')
_MODE = flags.DEFINE_enum('mode', None, list(modes.MODES), 'Overrides config.mode.')
_TRACEBACK = flags.DEFINE_bool('traceback', False, errors.TRACEBACK_HELP)
# Modes that only read the workdir: no lock, no writability check.
READ_ONLY_MODES = ('evaluate',)
# --help, --helpshort, -?: the launcher's own help (absl's --helpfull lists every flag).
_HELP_FLAG = re.compile(r'(-{1,2}(help|helpshort)(=(true|1))?|-\?)$')


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def packaged_configs_dir() -> str | None:
    """The config files' folder: ``jackpot_jax/configs`` once installed (pyproject.toml
    maps the repository's ``configs/`` there), the repository's ``configs/`` in a clone."""
    for folder in (os.path.join(PACKAGE_DIR, 'configs'),
                   os.path.join(os.path.dirname(PACKAGE_DIR), 'configs')):  # fmt: skip
        if os.path.isfile(os.path.join(folder, '__init__.py')):
            return folder
    return None


def resolve_config_argument(value: str) -> str:
    """``configs/NAME.py[:ARGS]`` (or ``jackpot_jax/.../NAME.py``) as the file under the working
    directory if there is one, else as the copy that ships with the package."""
    path, colon, args = value.partition(':')
    if os.path.exists(path):
        return value
    parts = os.path.normpath(path).split(os.sep)
    folder = {'configs': packaged_configs_dir(), 'jackpot_jax': PACKAGE_DIR}.get(parts[0])
    if len(parts) >= 2 and folder and os.path.isfile(os.path.join(folder, *parts[1:])):
        return os.path.join(folder, *parts[1:]) + colon + args
    return value


def _with_config(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config=DEFAULT_CONFIG`` first unless a config file is given; a
    given ``configs/NAME.py`` missing under the working directory is the packaged one."""
    out, given = [argv[0]], False
    for arg in argv[1:]:
        match = re.match(r'(-{1,2}config=)(.*)$', arg)
        if match:
            arg = match.group(1) + resolve_config_argument(match.group(2))
        elif re.match(r'-{1,2}config$', out[-1]):  # '--config VALUE'
            arg = resolve_config_argument(arg)
        given = given or bool(re.match(r'-{1,2}config(=|$)', arg))
        out.append(arg)
    return out if given else [argv[0], f'--config={DEFAULT_CONFIG}', *argv[1:]]


def _first_line(doc: str | None) -> str:
    """A docstring's first line without its mode prefix, its usage and its quoting."""
    line = (doc or '').strip().split('\n', 1)[0].replace('``', '')
    line = re.sub(r"^Mode '\w+': ", '', line).split(': --config=')[0].rstrip(':.')
    return line[:1].upper() + line[1:]


def _config_files() -> list[tuple[str, str]]:
    """(usage, first docstring line) of every shipped config file, read without running it."""
    folder = packaged_configs_dir()
    rows = []
    for name in sorted(os.listdir(folder) if folder else ()):
        if not name.endswith('.py') or name.startswith('_'):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        usage = f'configs/{name}'
        for node in tree.body:  # the file's USAGE string, up to its first ', '
            target = node.targets[0] if isinstance(node, ast.Assign) else None
            if getattr(target, 'id', '') == 'USAGE' and isinstance(node.value, ast.Constant):
                usage = str(node.value.value).split(', ')[0]
        rows.append((usage, _first_line(ast.get_docstring(tree))))
    return rows


def help_text() -> str:
    """What ``--help`` and ``--helpshort`` print: usage, the modes, the config files and the
    launcher's own flags (not the hundreds that absl and the libraries define)."""
    lines = [(__doc__ or '').strip(), '', 'modes (--mode=NAME, or the config\'s mode field):']
    width = max(map(len, modes.MODES))
    lines += [f'  {m:<{width}}  {_first_line(f.__doc__)}' for m, f in modes.MODES.items()]
    files = _config_files()
    if files:
        lines += ['', 'config files (--config=FILE[:ARGS]; installed with the package too):']
        lines += [f'  {usage}\n      {doc}' for usage, doc in files]
    lines += ['', 'flags:']
    module = flags.FLAGS.find_module_defining_flag(_WORKDIR.name)
    for flag in sorted(flags.FLAGS.get_key_flags_for_module(module), key=lambda f: f.name):
        name = f'--[no]{flag.name}' if flag.boolean else f'--{flag.name}'
        default = '' if flag.default is None else f' (default: {flag.default_as_str})'
        text = f'{name}: {flag.help}{default}'
        lines.append(flags.text_wrap(text, indent='      ', firstline_indent='  '))
    lines += ['', 'Try --helpfull to get a list of all flags (absl\'s and the libraries\' too).']
    return '\n'.join(lines)


def _unknown_key_message(error: Exception, argv: Sequence[str]) -> str | None:
    """'unknown config key ...; did you mean ...' for an override naming no field."""
    match = re.search(r"'([^'\\]+)\\*'", str(error))
    if not match:
        return None
    overrides = [
        a.split('=', 1)[0].lstrip('-')[len('config.') :]
        for a in argv[1:]
        if re.match(r'-{1,2}config\.', a)
    ]
    overrides = [o for o in overrides if match.group(1) in o.split('.')]
    if not overrides:
        return None
    known = [p.replace('/', '.') for p in sparsity.flatten(config_lib.get_config().to_dict())]
    close = difflib.get_close_matches(overrides[0], known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else '; the fields are in jackpot_jax/launch/config.py'
    return f"unknown config key '{overrides[0]}' (--config.{overrides[0]}){hint}"


def flag_error_message(error: Exception, argv: Sequence[str]) -> str:
    """One line for a flag that cannot be parsed: the flag, and the config file's own message."""
    if isinstance(error, (AttributeError, KeyError)):
        message = _unknown_key_message(error, argv)
        if message:
            return message
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if 'Traceback (most recent call last)' in text:
        # The config file raised: its last line is 'SomeError: message'.
        cause = re.sub(r'^\w+(Error|Exception): ', '', lines[-1])
        flag = re.match(r'flag (--\S+?): ', lines[0])
        return f'{flag.group(1)}: {cause}' if flag else cause
    if 'Failed loading config file' in text:  # a missing or unloadable config file
        given = [a for a in argv[1:] if re.match(r'-{1,2}config=', a)]
        return f'{given[-1] if given else "--config"}: {lines[-1]}'
    return lines[0] if lines else type(error).__name__


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing; a bad flag, override or config argument ends in one usage line."""
    if any(_HELP_FLAG.match(a) for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    argv = _with_config(argv)
    sys.argv = argv  # ml_collections reads the config overrides from sys.argv
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.mode  # pylint: disable=pointless-statement  (a missing file fails here)
        return rest
    except Exception as e:  # pylint: disable=broad-except  (flag errors, config files' errors)
        if '--traceback' in argv:
            raise
        errors.exit_with(f'error: {flag_error_message(e, argv)}', errors.EXIT_USAGE)


def run_mode() -> None:
    """Validates the config and the workdir, then runs the mode (flags must be parsed)."""
    config = _CONFIG.value
    if _MODE.value:
        config.mode = _MODE.value
    config = modes.validate(config)  # checked and resolved, once, for every mode below
    workdir = _WORKDIR.value
    writes = config.mode not in READ_ONLY_MODES
    workdir_lib.prepare(workdir, writes)
    d = config.distributed
    if d.initialize:  # before anything else touches a JAX backend
        parallel.initialize_distributed(
            d.coordinator_address, d.num_processes, d.process_id, d.cpu_collectives
        )
    if writes:
        workdir_lib.lock(workdir)
    if jax.process_index():  # one log for the whole run: process 0's
        logging.set_verbosity(logging.WARNING)
    logging.info(
        'process %d of %d; %d local and %d global devices',
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    logging.info('mode %s, workdir %s\n%s', config.mode, workdir, config)
    modes.MODES[config.mode](config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietLibraries())
    status = errors.report_user_errors(run_mode, traceback=_TRACEBACK.value)
    if status:
        sys.exit(status)


def run() -> None:
    """The ``jackpot-jax`` console script: the launcher with absl's flag parsing."""
    app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
    run()
