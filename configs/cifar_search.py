"""Jackpot search on CIFAR (the paper's CIFAR rows): ``--config=configs/cifar_search.py:ARGS``.

ARGS = ``MODEL,DATASET,SPARSITY,EPOCHS[,tune][,tiny]``: MODEL ``vgg19`` (= ``vgg19_cifar``),
``resnet32`` or another registered CIFAR model; DATASET ``cifar10`` | ``cifar100``;
SPARSITY in percent of the prunable weights removed; EPOCHS of search. ``tune`` adds
10 epochs of weight tuning under the found mask; ``tiny`` shrinks the run to seconds
(1 epoch of 2 steps of 8 examples; same model) for smoke tests.

The searched weights are ``--config.pretrained=DIR/pretrained`` (default:
WORKDIR/pretrained), e.g. made by ``configs/cifar_pretrain.py:MODEL,DATASET``
(its pretrain settings are the ``pretrain`` fields here too) or converted from the
authors' checkpoints with ``python -m jackpot_jax.io.convert_cli official``.

Published rows (the paper; search only, frozen weights), their top-1 in ``PUBLISHED``:

| --config=                                        | model     | data      |
|--------------------------------------------------|-----------|-----------|
| configs/cifar_search.py:vgg19,cifar10,90,30      | VGG-19    | CIFAR-10  |
| configs/cifar_search.py:vgg19,cifar10,90,160     | VGG-19    | CIFAR-10  |
| configs/cifar_search.py:vgg19,cifar10,95,30      | VGG-19    | CIFAR-10  |
| configs/cifar_search.py:vgg19,cifar10,95,160     | VGG-19    | CIFAR-10  |
| configs/cifar_search.py:vgg19,cifar100,90,30     | VGG-19    | CIFAR-100 |
| configs/cifar_search.py:vgg19,cifar100,90,160    | VGG-19    | CIFAR-100 |
| configs/cifar_search.py:vgg19,cifar100,95,30     | VGG-19    | CIFAR-100 |
| configs/cifar_search.py:vgg19,cifar100,95,160    | VGG-19    | CIFAR-100 |
| configs/cifar_search.py:resnet32,cifar10,90,30   | ResNet-32 | CIFAR-10  |
| configs/cifar_search.py:resnet32,cifar10,90,160  | ResNet-32 | CIFAR-10  |
| configs/cifar_search.py:resnet32,cifar10,95,30   | ResNet-32 | CIFAR-10  |
| configs/cifar_search.py:resnet32,cifar10,95,160  | ResNet-32 | CIFAR-10  |
| configs/cifar_search.py:resnet32,cifar100,90,30  | ResNet-32 | CIFAR-100 |
| configs/cifar_search.py:resnet32,cifar100,90,160 | ResNet-32 | CIFAR-100 |
| configs/cifar_search.py:resnet32,cifar100,95,30  | ResNet-32 | CIFAR-100 |
| configs/cifar_search.py:resnet32,cifar100,95,160 | ResNet-32 | CIFAR-100 |

Append ``,tiny`` to any of them for a seconds-long smoke run.
Settings (docs/method.md §3): SGD momentum 0.9 on the scores, lr 0.1 with a per-epoch
cosine, weight decay 5e-4, batch 256, pruned score 0.99, global magnitude allocation,
short restriction with rate 1 ('constant'), BatchNorm in training mode, no label smoothing.
"""

from jackpot_jax.launch import paper_configs

USAGE = 'configs/cifar_search.py:MODEL,DATASET,SPARSITY,EPOCHS[,tune][,tiny]'
# The argument of every published row -> its published top-1 (%).
PUBLISHED = {
    'vgg19,cifar10,90,30': 93.88,
    'vgg19,cifar10,90,160': 93.94,
    'vgg19,cifar10,95,30': 93.49,
    'vgg19,cifar10,95,160': 93.74,
    'vgg19,cifar100,90,30': 72.59,
    'vgg19,cifar100,90,160': 74.61,
    'vgg19,cifar100,95,30': 71.76,
    'vgg19,cifar100,95,160': 73.35,
    'resnet32,cifar10,90,30': 93.70,
    'resnet32,cifar10,90,160': 94.39,
    'resnet32,cifar10,95,30': 92.90,
    'resnet32,cifar10,95,160': 93.41,
    'resnet32,cifar100,90,30': 72.22,
    'resnet32,cifar100,90,160': 73.43,
    'resnet32,cifar100,95,30': 69.38,
    'resnet32,cifar100,95,160': 70.31,
}


def get_config(arg: str = 'resnet32,cifar10,90,160'):
    parts, modifiers = paper_configs.split_args(arg, USAGE)
    if len(parts) != 4:
        raise ValueError(f'config argument {arg!r}: expected 4 fields; usage: {USAGE}')
    model, dataset, sparsity, epochs = parts
    config = paper_configs.cifar_base('search', model, dataset)
    paper_configs.set_reference_search(
        config,
        paper_configs.to_int(sparsity, 'SPARSITY', USAGE),
        paper_configs.to_int(epochs, 'EPOCHS', USAGE),
        weight_decay=5e-4,
    )
    return paper_configs.finish(config, modifiers)
