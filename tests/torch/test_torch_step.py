"""The PyTorch twins the search-step benchmark compares against (benchmarks/torch_step.py):
the zoo's conv shapes, the paper's masking and its search step, and ``--compare_torch``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import search_step, torch_step
from jackpot_jax.core import sparsity
from jackpot_jax.models import zoo


@pytest.mark.parametrize(
    'name, size, classes',
    [('resnet20', 32, 10), ('resnet32', 32, 10), ('vgg19_cifar', 32, 10), ('resnet50', 64, 1000)],
)
def test_twins_have_the_zoo_prunable_kernels(name, size, classes):
    model = torch_step.build(name, classes, sparsity=0.9)
    ours = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch_step.MaskedConv)]
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    jax_model = zoo.get_model(name, classes)
    params = jax.eval_shape(lambda x: jax_model.init(jax.random.key(0), x, train=False), x)
    flat = sparsity.flatten(params['params'])
    theirs = [flat[p].shape for p in sparsity.prunable_paths(params['params'])]
    # HWIO kernels against OIHW weights, in any order: the same multiset of shapes.
    assert sorted(ours) == sorted((o, i, h, w) for h, w, i, o in theirs)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in classifier] == [(classes, classifier[0].in_features)]


def test_masks_keep_the_top_scores_and_the_step_trains_only_scores():
    model = torch_step.build('resnet20', 10, sparsity=0.9)
    convs = [m for m in model.modules() if isinstance(m, torch_step.MaskedConv)]
    for m in convs:
        n = m.weight.numel()
        assert int(m.mask.sum()) == m.kept == n - int(0.9 * n)
        kept_scores = m.scores.detach()[m.mask.bool()]
        assert kept_scores.min() >= m.scores.detach()[~m.mask.bool()].max()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith('weight')}
    scores = [m.scores for m in convs]
    before = [s.detach().clone() for s in scores]
    optimizer = torch.optim.SGD(scores, lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = torch_step.search_step(model, optimizer, x, y)
    assert math.isfinite(loss)
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert all(not torch.equal(s.detach(), b) for s, b in zip(scores, before))
    for m in convs:  # the masks follow the new scores
        kept_scores = m.scores.detach()[m.mask.bool()]
        assert kept_scores.min() >= m.scores.detach()[~m.mask.bool()].max()


def test_masked_forward_is_the_weight_times_the_mask():
    conv = torch_step.MaskedConv(3, 4, 3, 1, 1, bias=False)
    conv.setup_search(0.5, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 5, 5)
    expected = torch.nn.functional.conv2d(x, conv.weight * conv.mask, None, 1, 1)
    torch.testing.assert_close(conv(x), expected)
    conv(x).sum().backward()  # the gradient reaches the scores straight through the mask
    assert conv.scores.grad is not None and conv.weight.grad is None
    assert float(np.abs(conv.scores.grad.numpy()).sum()) > 0


def test_search_step_benchmark_compares_torch(capsys):
    result = search_step.main(
        [
            '--models=resnet20:4:1',
            '--warmup=0',
            '--xla_conv',
            '--compare_torch',
            '--no-per_layer',
            '--no-rate_update',
            '--no-ablation',
        ]
    )
    m = result['models']['resnet20:4']
    for key in ('search', 'search_xla_conv', 'torch'):
        assert m[key]['ms_median'] > 0 and m[key]['cpu_ms_median'] > 0, key
    assert m['torch_over_search'] == pytest.approx(
        m['torch']['ms_median'] / m['search']['ms_median']
    )
    assert m['xla_conv_over_search'] > 0 and m['torch_over_search_xla_conv'] > 0
    assert result['environment']['cpu_model'] == search_step.cpu_model()
    assert 'PyTorch / ours' in capsys.readouterr().err
