"""Test-wide setup: 8 simulated CPU devices, so the data-parallel paths run for real.

The 8 devices share the machine's few cores; on a loaded machine a collective can wait
long for its slowest device, and XLA:CPU would abort the whole run after its default
timeout. The tests wait instead (up to 15 minutes).
"""

import os

_PATIENT_COLLECTIVES = (
    '--xla_cpu_collective_call_terminate_timeout_seconds=900 '
    '--xla_cpu_collective_timeout_seconds=900'
)
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_PATIENT_COLLECTIVES}".strip()

import jax  # noqa: E402  (XLA_FLAGS must be set before the backend starts)

jax.config.update('jax_num_cpu_devices', 8)
