"""The torch tests run in their own pytest process: ``python -m pytest -q tests/torch``.

``import torch`` after ``import tensorflow`` segfaults, so these tests are not collected
when tensorflow is already loaded (e.g. by a run over the whole ``tests`` folder that
imported it first); they are skipped when torch is not installed.
"""

import importlib.util
import sys
import warnings

collect_ignore_glob = []
if 'tensorflow' in sys.modules:
    warnings.warn(
        'tests/torch skipped: tensorflow is loaded; run `python -m pytest tests/torch` alone'
    )
    collect_ignore_glob = ['*.py']
elif importlib.util.find_spec('torch') is None or importlib.util.find_spec('torchvision') is None:
    warnings.warn('tests/torch skipped: pip install torch==2.14.1 torchvision==0.29.1 safetensors')
    collect_ignore_glob = ['*.py']
