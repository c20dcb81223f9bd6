"""Test-wide setup: 8 simulated CPU devices, so the data-parallel paths run for real."""

import jax

jax.config.update('jax_num_cpu_devices', 8)
