"""Jackpot search in ResNet-50 on ImageNet: ``--config=configs/imagenet_search.py:ARGS``.

ARGS = ``SPARSITY[,EPOCHS][,tune][,tiny]``: SPARSITY in percent of the prunable weights
removed, EPOCHS of search (default 30), ``tune`` adds the paper's 10 epochs of weight
tuning under the found mask (SGD lr 0.01, wd 0, momentum 0.9, cosine), ``tiny`` shrinks
the run to 1 epoch of 2 steps of 8 images (same model) for smoke tests.

The searched weights are torchvision's ResNet-50, converted with
``python -m jackpot_jax.io.convert_cli torchvision --arch resnet50 --input FILE --output DIR``
and passed as ``--config.pretrained=DIR/pretrained``. ImageNet must be prepared for
tfds in ``--config.data.data_dir`` (see jackpot_jax/data/input_pipeline.py).

Published rows (the paper), their top-1 in ``PUBLISHED``:

| --config=                                | sparsity | search epochs | tune epochs |
|------------------------------------------|----------|---------------|-------------|
| configs/imagenet_search.py:80            | 80%      | 30            | 0           |
| configs/imagenet_search.py:80,tune       | 80%      | 30            | 10          |
| configs/imagenet_search.py:90            | 90%      | 30            | 0           |
| configs/imagenet_search.py:90,tune       | 90%      | 30            | 10          |

The abstract's claim (>70% at 90% after 5 search epochs): ``configs/imagenet_search.py:90,5``.
Append ``,tiny`` to any of them for a smoke run. Settings (docs/method.md §3): SGD
momentum 0.9 on the scores, lr 0.1 with a per-epoch cosine, weight decay 1e-4, batch 256,
pruned score 0.99, global magnitude allocation, short restriction with rate 1 ('constant'),
BatchNorm in training mode, no label smoothing; a search checkpoint every 1000 steps.
"""

from jackpot_jax.launch import paper_configs

USAGE = 'configs/imagenet_search.py:SPARSITY[,EPOCHS][,tune][,tiny]'
# The argument of every published row -> its published top-1 (%).
PUBLISHED = {'80': 75.19, '80,tune': 76.66, '90': 72.43, '90,tune': 74.62}


def get_config(arg: str = '90'):
    parts, modifiers = paper_configs.split_args(arg, USAGE)
    if len(parts) not in (1, 2):
        raise ValueError(f'config argument {arg!r}: usage: {USAGE}')
    epochs = paper_configs.to_int(parts[1], 'EPOCHS', USAGE) if len(parts) == 2 else 30
    config = paper_configs.imagenet_base('search')
    paper_configs.set_reference_search(
        config, paper_configs.to_int(parts[0], 'SPARSITY', USAGE), epochs, weight_decay=1e-4
    )
    return paper_configs.finish(config, modifiers)
