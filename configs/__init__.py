"""Config files of the launcher, installed with the package as ``jackpot_jax.configs``.

Name one as ``--config=configs/NAME.py[:ARGS]`` from a clone or, after ``pip install``,
from any folder: with no such file under the working directory the launcher loads the
packaged copy (``jackpot_jax.main.resolve_config_argument``).
"""
