"""Tests for jackpot_jax.models.conv: every formulation of the forward, the input gradient
and the filter gradient against XLA's own (on the conv shapes of every zoo CNN) and
against a direct numpy sum; the custom path taken only when lowering for the CPU; the
choice measured once and remembered, or fixed when measuring is off; the Linen module
against ``nn.Conv``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jackpot_jax.core import parallel
from jackpot_jax.core.errors import UserError
from jackpot_jax.models import conv
from jackpot_jax.models import zoo
from jackpot_jax.models.zoo import MODELS, get_model

# Every CNN of the zoo, in the order their shapes are tested: each model's test covers
# the conv shapes no model before it has (ResNet-101/152 add none to ResNet-50's). Small
# inputs keep it fast: batch 1, the ImageNet models at 32x32 (their channels, kernels,
# strides and paddings, on smaller maps); VGG-19 at 32x32 reaches its 2x2 stage.
ZOO_CNNS = (
    ('small_cnn', 28, 1),
    ('resnet20', 32, 1),
    ('resnet32', 32, 1),
    ('resnet56', 32, 1),
    ('vgg19_cifar', 32, 1),
    ('vgg11_bn', 32, 1),
    ('vgg13_bn', 32, 1),
    ('vgg16_bn', 32, 1),
    ('vgg19_bn', 32, 1),
    ('resnet18', 32, 1),
    ('resnet34', 32, 1),
    ('resnet50', 32, 1),
    ('resnet101', 32, 1),
    ('resnet152', 32, 1),
)


# Zoo models whose conv shapes all occur in a model before them (same blocks, more of
# them); and how many tests share a model's shapes.
PARTS = 3
REPEATS = (
    'resnet56',
    'vgg11_bn',
    'vgg13_bn',
    'vgg16_bn',
    'vgg19_bn',
    'resnet34',
    'resnet101',
    'resnet152',
)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Measuring off unless a test turns it on; no choice carried between tests."""
    monkeypatch.setenv(conv.MEASURE_ENV, '0')
    conv.clear_cache()
    yield
    conv.clear_cache()


def _convs(jaxpr) -> list:
    """Every ``conv_general_dilated`` equation of a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    found += _convs(inner)
    return found


@functools.lru_cache(maxsize=None)
def zoo_conv_shapes(name: str, size: int, batch: int) -> frozenset[conv.ConvShape]:
    """The distinct conv shapes (input, kernel, strides, padding) of a zoo model's forward."""
    channels = 1 if name == 'small_cnn' else 3
    x = jnp.zeros((batch, size, size, channels), jnp.float32)
    shapes = set()
    for eqn in _model_convs(get_model(name, 10), x):
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        assert eqn.params['dimension_numbers'].lhs_spec == (0, 3, 1, 2)  # NHWC
        shapes.add(
            conv.ConvShape(
                tuple(lhs),
                tuple(rhs),
                tuple(eqn.params['window_strides']),
                tuple(tuple(p) for p in eqn.params['padding']),
                'float32',
            )
        )
    return frozenset(shapes)


def new_zoo_shapes(name: str) -> list[conv.ConvShape]:
    """The shapes of ``name`` that no model before it in :data:`ZOO_CNNS` has."""
    index = [n for n, _, _ in ZOO_CNNS].index(name)
    seen = set().union(*(zoo_conv_shapes(*spec) for spec in ZOO_CNNS[:index]))
    new = zoo_conv_shapes(*ZOO_CNNS[index]) - seen
    return sorted(new, key=lambda s: (s.input_shape, s.kernel_shape, s.strides))


def _data(shape: conv.ConvShape, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = (shape.input_shape[0],) + shape.output_hw + (shape.kernel_shape[3],)
    return tuple(
        jnp.asarray(rng.standard_normal(dims), jnp.float32)
        for dims in (shape.input_shape, shape.kernel_shape, out)
    )


def _all_formulations(shape: conv.ConvShape):
    """One jitted function: every computation by every formulation, ``{(comp, form): value}``."""

    def run(x, k, g):
        s, p = shape.strides, shape.padding
        out = {}
        for form in conv.FORMULATIONS:
            out['forward', form] = conv.forward(x, k, s, p, form)
            out['input', form] = conv.input_gradient(k, g, x.shape, s, p, form)
            out['filter', form] = conv.filter_gradient(x, g, k.shape, s, p, form)
        return out

    return jax.jit(run)


def _assert_close(value, reference, what):
    scale = float(jnp.max(jnp.abs(reference)))
    np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize('part', range(PARTS))
@pytest.mark.parametrize('name', [n for n, _, _ in ZOO_CNNS if n not in REPEATS])
def test_every_formulation_matches_xla_on_the_zoo_shapes(name, part):
    shapes = new_zoo_shapes(name)[part::PARTS]  # a few shapes per test
    for shape in shapes:
        out = _all_formulations(shape)(*_data(shape))
        for (computation, form), value in out.items():
            _assert_close(value, out[computation, 'xla'], f'{name} {shape} {computation} {form}')


@pytest.mark.parametrize('name', [n for n, _, _ in ZOO_CNNS])
def test_zoo_models_with_shapes_of_their_own(name):
    assert bool(new_zoo_shapes(name)) == (name not in REPEATS)


def test_zoo_shapes_cover_strides_kernels_and_padding():
    shapes = set().union(*(zoo_conv_shapes(*spec) for spec in ZOO_CNNS))
    kinds = {(s.kernel_shape[:2], s.strides, s.padding) for s in shapes}
    assert ((7, 7), (2, 2), ((3, 3), (3, 3))) in kinds  # the ImageNet stem
    assert ((3, 3), (2, 2), ((1, 1), (1, 1))) in kinds
    assert ((3, 3), (1, 1), ((1, 1), (1, 1))) in kinds
    assert ((1, 1), (2, 2), ((0, 0), (0, 0))) in kinds
    assert ((1, 1), (1, 1), ((0, 0), (0, 0))) in kinds
    assert any(s.output_hw == (2, 2) for s in shapes)  # VGG's last stage at CIFAR size
    assert {n for n, _, _ in ZOO_CNNS} == {
        n for n in MODELS if n.startswith(('resnet', 'vgg', 'small_cnn'))
    }


def _direct(x, k, g, strides, padding):
    """Forward, input and filter gradient by explicit loops over the taps (numpy, float64)."""
    x, k, g = (np.asarray(a, np.float64) for a in (x, k, g))
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    kh, kw = k.shape[:2]
    oh, ow = g.shape[1:3]
    xpad = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    y = np.zeros(g.shape)
    dxpad = np.zeros(xpad.shape)
    dk = np.zeros(k.shape)
    for i in range(kh):
        for j in range(kw):
            window = xpad[:, i : i + sh * oh : sh, j : j + sw * ow : sw][:, :oh, :ow]
            y += window @ k[i, j]
            dk[i, j] = np.einsum('nhwc,nhwd->cd', window, g)
            dxpad[:, i : i + sh * oh : sh, j : j + sw * ow : sw][:, :oh, :ow] += g @ k[i, j].T
    dx = dxpad[:, pt : pt + x.shape[1], pl : pl + x.shape[2]]
    return y, dx, dk


@pytest.mark.parametrize(
    'x_shape, k_shape, strides, padding',
    [
        ((2, 5, 5, 2), (3, 3, 2, 3), (1, 1), ((1, 1), (1, 1))),
        ((2, 7, 6, 3), (3, 3, 3, 2), (2, 2), ((1, 1), (1, 1))),  # odd size: a row left over
        ((1, 6, 6, 2), (1, 1, 2, 4), (2, 2), ((0, 0), (0, 0))),
        ((1, 9, 9, 1), (7, 7, 1, 2), (2, 2), ((3, 3), (3, 3))),
        ((2, 4, 5, 2), (2, 3, 2, 2), (1, 2), ((0, 2), (1, 0))),  # asymmetric everything
    ],
)
def test_formulations_match_a_direct_sum(x_shape, k_shape, strides, padding):
    shape = conv.ConvShape(x_shape, k_shape, strides, padding, 'float32')
    x, k, g = _data(shape, seed=3)
    y, dx, dk = _direct(x, k, g, strides, padding)
    out = _all_formulations(shape)(x, k, g)
    for form in conv.FORMULATIONS:
        np.testing.assert_allclose(out['forward', form], y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out['input', form], dx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out['filter', form], dk, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', ['taps', 'im2col'])
def test_batch_chunks_stay_on_their_device(monkeypatch, form):
    # Chunks of a cache's size (here shrunk so a 64-example batch needs 8): the values are
    # the unchunked ones, and with the batch sharded over the 8 test devices each device
    # loops over its own examples; the only collective is the filter gradient's sum,
    # after the loop (collectives inside XLA:CPU loops have deadlocked whole searches).
    monkeypatch.setattr(conv, 'TAP_CHUNK_BYTES', 1 << 12)
    monkeypatch.setattr(conv, 'IM2COL_CHUNK_BYTES', 1 << 12)
    shape = conv.ConvShape((64, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), 'float32')
    x, k, g = _data(shape, seed=5)
    assert conv._chunks(x, shape.output_hw, shape.kernel_shape, form) == 8
    y, dx, dk = _direct(x, k, g, shape.strides, shape.padding)
    mesh = parallel.make_mesh()
    batch = NamedSharding(mesh, P(mesh.axis_names))
    x, g = jax.device_put(x, batch), jax.device_put(g, batch)

    def run(x, k, g):
        s, p = shape.strides, shape.padding
        return (
            conv.forward(x, k, s, p, form),
            conv.input_gradient(k, g, x.shape, s, p, form),
            conv.filter_gradient(x, g, k.shape, s, p, form),
        )

    compiled = jax.jit(run).lower(x, k, g).compile()
    for got, want in zip(compiled(x, k, g), (y, dx, dk)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    text = compiled.as_text()
    collectives = ('all-reduce(', 'all-gather(', 'all-to-all(', 'collective-permute(')
    lines = [line for line in text.splitlines() if any(c in line for c in collectives)]
    entry = text.split('\nENTRY ')[1]
    assert len(lines) == 1 and lines[0] in entry  # the filter gradient's, outside the loop


def test_golden_filter_gradient():
    # x = 1..9 on a 3x3 map, g = 1 everywhere, 2x2 kernel, no padding: dK[i, j] is the sum
    # of the 2x2 block of x starting at (i, j).
    x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    g = jnp.ones((1, 2, 2, 1))
    golden = np.array([[12.0, 16.0], [24.0, 28.0]]).reshape(2, 2, 1, 1)
    for form in conv.FORMULATIONS:
        dk = conv.filter_gradient(x, g, (2, 2, 1, 1), (1, 1), ((0, 0), (0, 0)), form)
        np.testing.assert_array_equal(dk, golden)


CONFIGS = [
    ((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),
    ((1, 20, 20, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
    ((2, 7, 7, 4), (3, 3, 4, 4), (1, 1), 'SAME'),
]


def _lax_conv(x, k, strides, padding):
    return jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )


@pytest.mark.parametrize(
    'mode, x_shape, k_shape, strides, padding',
    [(m, *c) for m in ('taps', 'im2col', 'heuristic') for c in CONFIGS]
    + [(m, *CONFIGS[1]) for m in ('xla', 'auto')],
)
def test_conv2d_value_and_gradients_match_lax(mode, x_shape, k_shape, strides, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)

    def loss(conv_fn):
        return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k)))

    ours = jax.jit(
        jax.value_and_grad(
            loss(lambda x, k: conv.conv2d(x, k, strides, padding, formulation=mode)), (0, 1)
        )
    )
    theirs = jax.value_and_grad(loss(lambda x, k: _lax_conv(x, k, strides, padding)), (0, 1))
    (v1, (dx1, dk1)), (v2, (dx2, dk2)) = ours(x, k), theirs(x, k)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-4)
    _assert_close(dx1, dx2, 'input gradient')
    _assert_close(dk1, dk2, 'filter gradient')
    y = conv.conv2d(x, k, strides, padding, formulation=mode)
    _assert_close(y, _lax_conv(x, k, strides, padding), 'forward')


def _lowered_text(fn, platform: str, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize('mode', ('taps', 'im2col', 'heuristic'))
def test_custom_path_only_when_lowering_for_the_cpu(mode):
    # Big enough for the heuristic's GEMM filter gradient; only traced and lowered.
    x = jnp.ones((16, 32, 32, 32))
    k = jnp.ones((3, 3, 32, 32))

    def step(x, k):
        loss = lambda x, k: jnp.sum(conv.conv2d(x, k, (1, 1), ((1, 1), (1, 1)), formulation=mode))
        return jax.grad(loss, (0, 1))(x, k)

    jaxpr = str(jax.make_jaxpr(step)(x, k))
    assert 'platform_index' in jaxpr  # the choice is left to lowering
    cpu = _lowered_text(step, 'cpu', x, k)
    assert 'dot_general' in cpu
    for platform in ('cuda', 'rocm', 'tpu'):
        other = _lowered_text(step, platform, x, k)
        assert 'dot_general' not in other, platform
        assert other.count('stablehlo.convolution') == 2, platform  # input + filter gradient


def test_xla_formulation_is_plain_autodiff():
    x, k = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    step = lambda x, k: jax.grad(  # noqa: E731
        lambda x, k: jnp.sum(conv.conv2d(x, k, formulation='xla')), (0, 1)
    )(x, k)
    assert 'platform_index' not in str(jax.make_jaxpr(step)(x, k))
    assert 'dot_general' not in _lowered_text(step, 'cpu', x, k)


def test_heuristic_without_measuring(monkeypatch):
    calls = []
    monkeypatch.setattr(conv, 'time_formulations', lambda *a, **k: calls.append(a) or {})
    pad = ((1, 1), (1, 1))
    tiny = conv.ConvShape((64, 2, 2, 512), (3, 3, 512, 512), (1, 1), pad, 'float32')
    big = conv.ConvShape((128, 32, 32, 32), (3, 3, 32, 32), (1, 1), pad, 'float32')
    small = conv.ConvShape((8, 32, 32, 16), (3, 3, 16, 16), (1, 1), pad, 'float32')
    assert small.macs < conv.MEASURE_MIN_MACS <= min(big.macs, tiny.macs)
    for mode in ('auto', 'heuristic'):  # measuring is off (the fixture)
        assert conv.choose_formulation(big, 'filter', mode) == 'im2col'
        assert conv.choose_formulation(small, 'filter', mode) == 'xla'
        assert conv.choose_formulation(tiny, 'filter', mode) == 'im2col'
        for computation in ('forward', 'input'):
            assert conv.choose_formulation(big, computation, mode) == 'xla'
            assert conv.choose_formulation(small, computation, mode) == 'xla'
            assert conv.choose_formulation(tiny, computation, mode) == 'im2col'  # a 2x2 map
    assert conv.choose_formulation(small, 'filter', 'taps') == 'taps'
    assert calls == [] and conv.measurements() == {}


def test_measured_once_per_shape_and_remembered(monkeypatch):
    monkeypatch.setenv(conv.MEASURE_ENV, '1')
    monkeypatch.setattr(conv, 'MEASURE_MIN_MACS', 0)
    real = conv.time_formulations
    calls = []

    def counting(shape, computation, *args, **kwargs):
        calls.append((shape, computation))
        return real(shape, computation, *args, repeats=1)

    monkeypatch.setattr(conv, 'time_formulations', counting)
    x, k = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    grad = jax.grad(lambda x, k: jnp.sum(conv.conv2d(x, k, (1, 1), ((1, 1), (1, 1)))), (0, 1))
    jax.jit(grad)(x, k)
    assert [c for _, c in calls] == ['filter']  # conv.MEASURED
    measured = conv.measurements()
    assert set(measured) == set(calls)
    for (shape, computation), (chosen, seconds) in measured.items():
        assert shape.input_shape == (2, 8, 8, 4) and shape.kernel_shape == (3, 3, 4, 6)
        assert set(seconds) == set(conv.FORMULATIONS)
        assert chosen == min(seconds, key=seconds.get)
        assert conv.choose_formulation(shape, computation) == chosen
    # The forward and the input gradient are never timed: the heuristic.
    assert conv.choose_formulation(shape, 'forward') == 'xla'
    assert conv.choose_formulation(shape, 'input') == 'xla'
    assert len(calls) == 1
    jax.jit(lambda x, k: grad(x, k))(x, k)  # a new trace of the same shape: no new timing
    assert len(calls) == 1 and conv.measurements() == measured
    conv.clear_cache()
    assert conv.measurements() == {}


def test_measuring_switch(monkeypatch):
    for value, enabled in (('0', False), ('off', False), ('false', False), ('1', True)):
        monkeypatch.setenv(conv.MEASURE_ENV, value)
        assert conv.measuring_enabled() is enabled
    monkeypatch.delenv(conv.MEASURE_ENV)
    assert not conv.measuring_enabled()  # default off: floats independent of timings


def test_unsupported_configs_fall_back_to_lax():
    x, k = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
    y = conv.conv2d(x, k, (1, 1), ((-1, 0), (0, 0)))  # a negative padding crops
    np.testing.assert_array_equal(y, _lax_conv(x, k, (1, 1), ((-1, 0), (0, 0))))
    jaxpr = str(
        jax.make_jaxpr(jax.grad(lambda k: jnp.sum(conv.conv2d(x, k, (1, 1), ((-1, 0), (0, 0))))))(k)
    )
    assert 'custom_vjp' not in jaxpr and 'platform_index' not in jaxpr
    with pytest.raises(TypeError, match='same dtypes'):  # lax's own error, as for nn.Conv's
        conv.conv2d(x.astype(jnp.bfloat16), k, (1, 1), 'SAME')


def test_bad_arguments_name_the_value():
    x, k = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 3))
    with pytest.raises(UserError, match="formulation='fast' is not one of"):
        conv.conv2d(x, k, formulation='fast')
    with pytest.raises(UserError, match=r'input shape \(6, 6, 2\)'):
        conv.conv2d(x[0], k)
    with pytest.raises(UserError, match="unknown conv formulation 'gemm'"):
        conv.filter_gradient(x, jnp.ones((1, 4, 4, 3)), k.shape, (1, 1), ((0, 0), (0, 0)), 'gemm')
    with pytest.raises(UserError, match="unknown computation 'backward'"):
        conv.choose_formulation(
            conv.ConvShape((1, 6, 6, 2), k.shape, (1, 1), ((0, 0),) * 2, 'float32'), 'backward'
        )


@pytest.mark.parametrize('use_bias', (False, True))
@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16))
def test_module_is_nn_conv(use_bias, dtype):
    kwargs = dict(
        features=6,
        kernel_size=(3, 3),
        strides=(2, 2),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
        bias_init=nn.initializers.normal(0.1),
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 4)), jnp.float32)
    ours, theirs = conv.Conv(**kwargs), nn.Conv(**kwargs)
    v1 = ours.init(jax.random.key(7), x)
    v2 = theirs.init(jax.random.key(7), x)
    assert jax.tree.structure(v1) == jax.tree.structure(v2)
    jax.tree.map(np.testing.assert_array_equal, v1, v2)
    y1, y2 = ours.apply(v1, x), theirs.apply(v2, x)
    assert y1.dtype == y2.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y2, np.float32))
    g2 = jax.grad(lambda v: jnp.sum(theirs.apply(v, x).astype(jnp.float32) ** 2))(v2)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    for form in ('auto', 'taps', 'im2col'):  # the forward and gradients of each
        module = conv.Conv(**kwargs, formulation=form)
        y = module.apply(v1, x)
        assert y.dtype == dtype
        _assert_close_tol(np.asarray(y, np.float32), np.asarray(y2, np.float32), tol)
        g1 = jax.grad(lambda v: jnp.sum(module.apply(v, x).astype(jnp.float32) ** 2))(v1)
        jax.tree.map(lambda a, b: _assert_close_tol(a, b, tol), g1, g2)


def _assert_close_tol(a, b, tol):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


def _nn_conv(features, kernel, stride, dtype, name, use_bias=False):
    """The zoo's conv as it was: flax's ``nn.Conv``."""
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=use_bias, kernel_init=zoo._CONV_INIT, dtype=dtype, param_dtype=jnp.float32,
        name=name,
    )  # fmt: skip


@pytest.mark.parametrize('name, size', [('resnet20', 32), ('vgg19_cifar', 32), ('small_cnn', 28)])
def test_zoo_models_use_the_module_and_are_unchanged(monkeypatch, name, size):
    monkeypatch.setattr(conv, 'MEASURE_MIN_MACS', 0)  # every filter gradient a GEMM
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)
    model = get_model(name, 10)
    variables = model.init(jax.random.key(0), x, train=False)
    grad = jax.grad(lambda v: jnp.sum(model.apply(v, x, train=False)))
    jaxpr = str(jax.make_jaxpr(grad)(variables))
    # One CPU-or-XLA choice per conv for its filter gradient, one more for the forward
    # and one for the input gradient of each conv whose output map has at most 4 pixels.
    convs = [eqn.outvars[0].aval.shape for eqn in _model_convs(model, x)]
    tiny = [s for s in convs if s[1] * s[2] <= conv.SMALL_MAP_PIXELS]
    assert jaxpr.count('platform_index[') == len(convs) + 2 * len(tiny)
    assert len(convs) == {'resnet20': 19, 'vgg19_cifar': 16, 'small_cnn': 3}[name]
    assert bool(tiny) == name.startswith('vgg')
    monkeypatch.setattr(zoo, '_conv', _nn_conv)
    before = get_model(name, 10)
    reference = before.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(reference)
    jax.tree.map(np.testing.assert_array_equal, variables, reference)
    for train in (False, True):
        ours = model.apply(variables, x, train=train, mutable=['batch_stats'])[0]
        theirs = before.apply(reference, x, train=train, mutable=['batch_stats'])[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    _, ours = jax.value_and_grad(lambda v: jnp.sum(model.apply(v, x, train=False) ** 2))(variables)
    _, theirs = jax.value_and_grad(lambda v: jnp.sum(before.apply(v, x, train=False) ** 2))(
        reference
    )
    jax.tree.map(lambda a, b: _assert_close(a, b, 'gradient'), ours, theirs)


def _model_convs(model, x) -> list:
    """Every conv equation of a model's forward (repeats included)."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return _convs(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables).jaxpr)
