"""A small Vision Transformer on scikit-learn digits: ``--config=configs/vit_digits.py``.

8x8 images cut into 2x2 patches (16 tokens and the class token), 4 pre-norm blocks of
width 64. The search prunes the attention (query, key, value, out_proj) and MLP
kernels; the patch embedding, class token, position embedding, LayerNorms and head
stay dense. The model has no BatchNorm, so there are no batch statistics to adapt.
"""

import ml_collections

from jackpot_jax.launch import config as config_lib


def get_config():
    config = config_lib.get_config()
    config.model = ml_collections.ConfigDict(
        {
            'name': 'vit_tiny',
            'patch_size': 2,
            'hidden_dim': 64,
            'num_layers': 4,
            'num_heads': 4,
            'mlp_dim': 128,
        }
    )
    config.pretrain.epochs = 30
    config.search.epochs = 10
    return config
