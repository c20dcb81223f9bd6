"""The PyTorch search step of the zoo's CNNs, timed beside ours (``search_step --compare_torch``).

The same architectures as ``jackpot_jax.models.zoo``, written in PyTorch the way the
paper's own code builds them (NCHW, ``nn.Conv2d`` / ``nn.BatchNorm2d``): the CIFAR ResNets
with option-A shortcuts (ResNet-32 2x wide), the CIFAR VGG-19 with BatchNorm,
torchvision's ResNet-50 (randomly initialised: nothing is downloaded). Its search step is what ours
computes: every conv but the classifier frozen and masked, ``W * (B + s - s.detach())``
(value ``W * B``, straight-through gradient to the scores ``s``), BatchNorm in training
mode, softmax cross-entropy, backward to the scores only, SGD with momentum and weight
decay on the scores, then each layer's mask rebuilt from its scores (the top
``n - pruned`` by ``torch.topk``, a layer at a time as in the paper's code).

Import this module only where tensorflow is not loaded: ``import torch`` after
``import tensorflow`` segfaults.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# name: (depth, width), as in jackpot_jax.models.zoo.MODELS
CIFAR_RESNETS = {'resnet20': (20, 16), 'resnet32': (32, 32), 'resnet56': (56, 16)}
TORCH_MODELS = (*CIFAR_RESNETS, 'vgg19_cifar', 'resnet50')
# fmt: off
VGG19 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M',
         512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M')
# fmt: on


class MaskedConv(nn.Conv2d):
    """A frozen conv whose weight is masked, with a straight-through score gradient."""

    def setup_search(self, sparsity: float, generator: torch.Generator) -> None:
        self.weight.requires_grad_(False)
        n = self.weight.numel()
        self.kept = n - int(sparsity * n)
        self.scores = nn.Parameter(torch.rand(self.weight.shape, generator=generator))
        self.register_buffer('mask', torch.zeros_like(self.weight))
        self.update_mask()

    @torch.no_grad()
    def update_mask(self) -> None:
        flat = self.mask.view(-1)
        flat.zero_()
        flat[torch.topk(self.scores.view(-1), self.kept, sorted=False).indices] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, 'scores'):
            return super().forward(x)
        gate = self.mask + self.scores - self.scores.detach()
        return F.conv2d(x, self.weight * gate, self.bias, self.stride, self.padding)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> MaskedConv:
    return MaskedConv(cin, cout, kernel, stride, kernel // 2, bias=False)


class BasicBlockA(nn.Module):
    """CIFAR basic block with the parameter-free option-A shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra:
            before = self.extra // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, before, self.extra - before))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet (3 stages, option A); ``width=32, depth=32`` is the zoo's ``resnet32``."""

    def __init__(self, num_classes: int = 10, depth: int = 32, width: int = 32):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, width, 3), nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage in range(3):
            for index in range((depth - 2) // 6):
                cout = width * 2**stage
                blocks.append(BasicBlockA(cin, cout, 2 if stage and not index else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class CifarVGG(nn.Module):
    """CIFAR VGG-19 with BatchNorm, global average pool, one linear classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for item in VGG19:
            if item == 'M':
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [_conv(cin, item, 3), nn.BatchNorm2d(item), nn.ReLU()]
                cin = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                masked = MaskedConv(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    bias=child.bias is not None,
                )
                masked.load_state_dict(child.state_dict())
                setattr(parent, name, masked)
    return model


def build(name: str, num_classes: int, sparsity: float, seed: int = 0) -> nn.Module:
    """One of :data:`TORCH_MODELS`, every conv masked at ``sparsity``, in training mode."""
    torch.manual_seed(seed)
    if name in CIFAR_RESNETS:
        model = CifarResNet(num_classes, *CIFAR_RESNETS[name])
    elif name == 'vgg19_cifar':
        model = CifarVGG(num_classes)
    elif name == 'resnet50':
        model = _resnet50(num_classes)
    else:
        raise ValueError(f'no PyTorch twin of {name!r}; --compare_torch knows {TORCH_MODELS}')
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, MaskedConv):
            module.setup_search(sparsity, generator)
    return model.train()


def search_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> float:
    """Forward, backward to the scores, SGD on the scores, every mask rebuilt; the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    for module in model.modules():
        if isinstance(module, MaskedConv):
            module.update_mask()
    return float(loss.detach())


def time_search_step(
    name: str,
    batch: int,
    image_size: int,
    num_classes: int,
    steps: int,
    sparsity: float = 0.9,
    weight_decay: float = 5e-4,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Median wall and process-CPU milliseconds of the PyTorch search step of ``name``."""
    model = build(name, num_classes, sparsity, seed)
    scores = [m.scores for m in model.modules() if isinstance(m, MaskedConv)]
    optimizer = torch.optim.SGD(scores, lr=0.1, momentum=0.9, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(batch, 3, image_size, image_size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, num_classes, size=batch).astype(np.int64))
    for _ in range(1 + warmup):
        search_step(model, optimizer, x, y)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        search_step(model, optimizer, x, y)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        'torch': torch.__version__,
        'threads': torch.get_num_threads(),
        'ms_median': 1e3 * statistics.median(wall),
        'cpu_ms_median': 1e3 * statistics.median(cpu),
        'ms_min': 1e3 * min(wall),
        'samples': steps,
        'images_per_s': batch / statistics.median(wall),
    }
