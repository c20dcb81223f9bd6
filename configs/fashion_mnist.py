"""The demo on real Fashion-MNIST (60k/10k 28x28): ``--config=configs/fashion_mnist.py:90``.

The argument is the sparsity in percent (90 or 95; default 90). The IDX files come
from Debian's ``dataset-fashion-mnist`` package or ``--config.data.data_dir``.
"""

from jackpot_jax.launch import config as config_lib, paper_configs

USAGE = 'configs/fashion_mnist.py[:SPARSITY], SPARSITY an integer percent (e.g. 90)'


def get_config(sparsity_percent: str = '90'):
    config = config_lib.get_config()
    config.data.name = 'fashion_mnist'
    config.data.eval_batch_size = 1000
    config.model.width = 32
    config.pretrain.epochs = 8
    config.pretrain.batch_size = 128
    config.search.epochs = 5
    config.search.batch_size = 128
    config.search.sparsity = paper_configs.to_int(sparsity_percent, 'SPARSITY', USAGE) / 100
    return config
