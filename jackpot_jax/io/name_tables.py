"""Name tables: every convertible architecture's PyTorch module names, row by row.

Each row maps one torch module (``layer1.0.conv1``) to its flax module path
(``layer1_0/conv1``) and a layer kind, which fixes the layout of its tensors; the
conversion itself lives in :mod:`jackpot_jax.io.convert`. Two families: ``torchvision``
(ResNet-18 to 152, VGG-11 to 19 with batch norm, ViT-B/16, ViT-B/32, ViT-L/16, any
torchvision ``VisionTransformer`` through :func:`vit_arch`) and ``official`` (the
lottery-jackpot authors' ResNet-32, VGG-19 CIFAR and ResNet-50, whose classifier is a
1x1 conv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jackpot_jax.models import vit, zoo

FAMILIES = ('torchvision', 'official')

# Layer kinds of the name tables.
CONV = 'conv'  # weight OIHW, no bias.
CONV_BIAS = 'conv_bias'  # weight OIHW + bias.
BN = 'bn'  # weight, bias, running_mean, running_var (+ num_batches_tracked).
LINEAR = 'linear'  # weight [out, in] + bias.
CONV_FC = 'conv_fc'  # the official classifier: 1x1 conv weight [C, D, 1, 1] + bias.
LAYER_NORM = 'layer_norm'  # weight, bias.
ATTENTION = 'attention'  # in_proj_weight [3D, D] + in_proj_bias [3D]: q, k, v stacked.
TENSOR = 'tensor'  # a bare parameter (class token, position embedding), same layout.


@dataclasses.dataclass(frozen=True)
class Layer:
    """One row of a name table: torch module name, flax module path, kind."""

    torch: str
    flax: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Arch:
    """A convertible architecture: its flax model and its explicit name table."""

    name: str
    family: str
    model: str
    table: tuple[Layer, ...]
    classifier: str
    default_classes: int
    image_size: int
    # Keyword arguments of models.get_model beyond the registered defaults, as sorted pairs.
    model_kwargs: tuple[tuple[str, Any], ...] = ()


_BASIC = (('conv1', CONV), ('bn1', BN), ('conv2', CONV), ('bn2', BN))
_BOTTLENECK = _BASIC + (('conv3', CONV), ('bn3', BN))
_DOWNSAMPLE = (('downsample.0', CONV), ('downsample.1', BN))


def _block(torch_prefix: str, flax_prefix: str, rows: Sequence[tuple[str, str]]) -> list[Layer]:
    return [
        Layer(f'{torch_prefix}.{n}', f"{flax_prefix}/{n.replace('.', '_')}", k) for n, k in rows
    ]


def resnet_table(
    stage_sizes: Sequence[int], bottleneck: bool, classifier_kind: str
) -> tuple[Layer, ...]:
    """torchvision ResNet (v1.5) names: stem, ``layer{s}.{b}`` blocks, ``fc``."""
    table = [Layer('conv1', 'conv1', CONV), Layer('bn1', 'bn1', BN)]
    in_features = 64
    for stage, num_blocks in enumerate(stage_sizes):
        out_features = 64 * 2**stage * (4 if bottleneck else 1)
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            rows = _BOTTLENECK if bottleneck else _BASIC
            if stride != 1 or in_features != out_features:
                rows = rows + _DOWNSAMPLE
            table += _block(f'layer{stage + 1}.{index}', f'layer{stage + 1}_{index}', rows)
            in_features = out_features
    table.append(Layer('fc', 'fc', classifier_kind))
    return tuple(table)


def cifar_resnet_table(blocks_per_stage: int) -> tuple[Layer, ...]:
    """Official CIFAR ResNet names: stem, ``layer{1,2,3}.{b}`` (option-A, no downsample), ``fc``."""
    table = [Layer('conv1', 'conv1', CONV), Layer('bn1', 'bn1', BN)]
    for stage in range(3):
        for index in range(blocks_per_stage):
            table += _block(f'layer{stage + 1}.{index}', f'layer{stage + 1}_{index}', _BASIC)
    table.append(Layer('fc', 'fc', CONV_FC))
    return tuple(table)


def vgg_table(
    cfg: Sequence[int | str], conv_kind: str, classifier: Sequence[tuple[str, str]]
) -> tuple[Layer, ...]:
    """VGG names: ``features.{i}`` (conv at i, BN at i + 1, ReLU, one index per pool)."""
    table = []
    index = 0
    for item in cfg:
        if item == 'M':
            index += 1
            continue
        table.append(Layer(f'features.{index}', f'features_{index}', conv_kind))
        table.append(Layer(f'features.{index + 1}', f'features_{index + 1}', BN))
        index += 3
    table += [Layer(name, name.replace('.', '_'), kind) for name, kind in classifier]
    return tuple(table)


def vit_table(num_layers: int) -> tuple[Layer, ...]:
    """torchvision VisionTransformer names: patch conv, tokens, ``num_layers`` blocks, head."""
    table = [
        Layer('conv_proj', 'conv_proj', CONV_BIAS),
        Layer('class_token', 'class_token', TENSOR),
        Layer('encoder.pos_embedding', 'encoder/pos_embedding', TENSOR),
    ]
    for i in range(num_layers):
        t, f = f'encoder.layers.encoder_layer_{i}', f'encoder/layers/encoder_layer_{i}'
        table += [
            Layer(f'{t}.ln_1', f'{f}/ln_1', LAYER_NORM),
            Layer(f'{t}.self_attention', f'{f}/self_attention', ATTENTION),
            Layer(f'{t}.self_attention.out_proj', f'{f}/self_attention/out_proj', LINEAR),
            Layer(f'{t}.ln_2', f'{f}/ln_2', LAYER_NORM),
            Layer(f'{t}.mlp.0', f'{f}/mlp_0', LINEAR),
            Layer(f'{t}.mlp.3', f'{f}/mlp_3', LINEAR),
        ]
    table += [
        Layer('encoder.ln', 'encoder/ln', LAYER_NORM),
        Layer('heads.head', 'heads/head', LINEAR),
    ]
    return tuple(table)


def vit_arch(
    image_size: int,
    patch_size: int,
    num_layers: int,
    num_heads: int,
    hidden_dim: int,
    mlp_dim: int,
    num_classes: int = 1000,
    name: str = 'vit',
) -> Arch:
    """Any torchvision ``VisionTransformer`` (no representation layer), by its hyperparameters."""
    kwargs = dict(
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
    )
    return Arch(
        name,
        'torchvision',
        'vit_tiny',
        vit_table(num_layers),
        'heads.head',
        num_classes,
        image_size,
        tuple(sorted(kwargs.items())),
    )


_RESNET_STAGES = {
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
    'resnet152': ((3, 8, 36, 3), True),
}
_TV_CLASSIFIER = (('classifier.0', LINEAR), ('classifier.3', LINEAR), ('classifier.6', LINEAR))


def _build_archs() -> dict[str, dict[str, Arch]]:
    archs: dict[str, dict[str, Arch]] = {'torchvision': {}, 'official': {}}
    for name, (stages, bottleneck) in _RESNET_STAGES.items():
        archs['torchvision'][name] = Arch(
            name, 'torchvision', name, resnet_table(stages, bottleneck, LINEAR), 'fc', 1000, 224
        )
    for name, cfg in zoo.VGG_BN_CFGS.items():
        archs['torchvision'][name] = Arch(
            name,
            'torchvision',
            name,
            vgg_table(cfg, CONV_BIAS, _TV_CLASSIFIER),
            'classifier.6',
            1000,
            224,
        )
    for name in ('vit_b_16', 'vit_b_32', 'vit_l_16'):
        layers = vit.CONFIGS[name]['num_layers']
        archs['torchvision'][name] = Arch(
            name, 'torchvision', name, vit_table(layers), 'heads.head', 1000, 224
        )
    archs['official']['resnet32'] = Arch(
        'resnet32', 'official', 'resnet32', cifar_resnet_table(5), 'fc', 10, 32
    )
    archs['official']['vgg19_cifar'] = Arch(
        'vgg19_cifar',
        'official',
        'vgg19_cifar',
        vgg_table(zoo.VGG19_CFG, CONV, (('classifier', CONV_FC),)),
        'classifier',
        10,
        32,
    )
    archs['official']['resnet50'] = Arch(
        'resnet50',
        'official',
        'resnet50',
        resnet_table((3, 4, 6, 3), True, CONV_FC),
        'fc',
        1000,
        224,
    )
    return archs


ARCHS = _build_archs()


def get_arch(name: str, family: str) -> Arch:
    """The architecture ``name`` of ``family`` ('torchvision' or 'official')."""
    if family not in ARCHS:
        raise ValueError(f'unknown family {family!r}; choose one of {FAMILIES}')
    if name not in ARCHS[family]:
        raise ValueError(
            f"unknown {family} architecture {name!r}; choose one of: {', '.join(ARCHS[family])}"
        )
    return ARCHS[family][name]
