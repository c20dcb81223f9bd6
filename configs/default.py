"""The embedded demo: small CNN on scikit-learn digits, 90% sparsity."""

from jackpot_jax.launch.config import get_config  # pylint: disable=unused-import
