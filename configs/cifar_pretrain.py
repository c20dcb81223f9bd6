"""Dense CIFAR pre-training: ``--config=configs/cifar_pretrain.py:MODEL,DATASET[,EPOCHS][,tiny]``.

No pre-trained CIFAR weights can be downloaded here, so this makes the frozen
starting point of ``configs/cifar_search.py`` (its ``pretrain`` fields are the same).
A typical CIFAR recipe: SGD momentum 0.9, lr 0.1 with a per-epoch cosine, weight decay
5e-4, batch 128, EPOCHS 200 unless given (160 is the other common choice).

| --config=                                     | makes                         |
|-----------------------------------------------|-------------------------------|
| configs/cifar_pretrain.py:vgg19,cifar10       | dense VGG-19 on CIFAR-10      |
| configs/cifar_pretrain.py:vgg19,cifar100      | dense VGG-19 on CIFAR-100     |
| configs/cifar_pretrain.py:resnet32,cifar10    | dense ResNet-32 on CIFAR-10   |
| configs/cifar_pretrain.py:resnet32,cifar100   | dense ResNet-32 on CIFAR-100  |

Then search with ``--config.pretrained=PRETRAIN_WORKDIR/pretrained``.
"""

from jackpot_jax.launch import paper_configs

USAGE = 'configs/cifar_pretrain.py:MODEL,DATASET[,EPOCHS][,tiny]'
ARGS = ('vgg19,cifar10', 'vgg19,cifar100', 'resnet32,cifar10', 'resnet32,cifar100')


def get_config(arg: str = 'resnet32,cifar10'):
    parts, modifiers = paper_configs.split_args(arg, USAGE)
    if len(parts) not in (2, 3) or 'tune' in modifiers:
        raise ValueError(f'config argument {arg!r}: usage: {USAGE}')
    config = paper_configs.cifar_base('pretrain', parts[0], parts[1])
    if len(parts) == 3:
        config.pretrain.epochs = paper_configs.to_int(parts[2], 'EPOCHS', USAGE)
    return paper_configs.finish(config, modifiers)
