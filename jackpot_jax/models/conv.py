"""2-D convolution computed the fastest of a few ways on XLA:CPU, and a drop-in for ``nn.Conv``.

XLA:CPU computes a conv's filter gradient as a convolution with the batch contracted and
a window as large as the image, behind layout copies: up to 26 forwards' time, most of a
CPU search step; its forward and input gradient take 100x a GEMM's time on 2x2 maps.
:func:`conv2d` is ``lax.conv_general_dilated`` (NHWC, HWIO) with a ``jax.custom_vjp``
whose forward, input gradient and filter gradient each take, on the CPU, one of: ``xla``
(XLA's own); ``taps`` (a matmul per kernel tap on the input shifted to it, e.g. ``dW[i, j]
= sum_{n,h,w} xpad[n, i + s h, j + s w]^T g[n, h, w]``); ``im2col`` (the taps side by side
as patches, one GEMM); both over batch chunks that fit a cache. The input gradient's are
the forward's on ``g`` dilated by the stride, the kernel flipped and transposed.

By default every formulation follows a fixed rule (:func:`heuristic_formulation`), so a
run's floats do not depend on timings. With ``JACKPOT_CONV_MEASURE=1`` the filter
gradient's formulation of a big conv is instead chosen once per shape by timing each on
this machine, and remembered for the process (:func:`measurements`): sometimes faster,
but two runs may then round differently. All give the same values within float rounding. The CPU formulations are selected at lowering time
(``lax.platform_dependent``): a GPU or TPU program gets XLA's own (:func:`backend_path`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jackpot_jax.core.errors import UserError

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]

LAYOUT = ('NHWC', 'HWIO', 'NHWC')
FORMULATIONS = ('xla', 'taps', 'im2col')
CHOICES = ('auto', 'heuristic') + FORMULATIONS  # conv2d's ``formulation``
COMPUTATIONS = ('forward', 'input', 'filter')  # the output, dL/dinput, dL/dkernel
MEASURED = ('filter',)  # what 'auto' times (XLA's forward, input gradient: see heuristic)
MEASURE_ENV = 'JACKPOT_CONV_MEASURE'
# Smaller convs (a ResNet-32 layer at batch 8) are not measured: XLA's filter gradient.
MEASURE_MIN_MACS = 100_000_000
TIMING_ORDER = ('im2col', 'taps', 'xla')  # the usual winner first: slow ones run once
# Bytes of a batch chunk's tap slice (taps) or patches (im2col): about a cache's size.
TAP_CHUNK_BYTES = 1 << 19
IM2COL_CHUNK_BYTES = 1 << 22
# Output maps of at most this many pixels, where XLA:CPU's own conv is pathologically slow.
SMALL_MAP_PIXELS = 4


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """What a formulation is chosen for: the conv's shapes, strides, padding and dtype."""

    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dtype: str

    @property
    def output_hw(self) -> tuple[int, int]:
        return _out_hw(self.input_shape[1:3], self.kernel_shape[:2], self.strides, self.padding)

    @property
    def macs(self) -> int:
        """Multiply-adds of the conv (and of each of its gradients)."""
        kh, kw, ci, co = self.kernel_shape
        return self.input_shape[0] * int(np.prod(self.output_hw)) * kh * kw * ci * co


# (shape, computation) -> (chosen formulation, seconds per call of each)
_MEASURED: dict[tuple[ConvShape, str], tuple[str, dict[str, float]]] = {}
_LOCK = threading.Lock()


def measuring_enabled() -> bool:
    """Whether ``'auto'`` may time formulations (env ``JACKPOT_CONV_MEASURE=1``; default off,
    so that results do not depend on timings)."""
    return os.environ.get(MEASURE_ENV, '0').strip().lower() in ('1', 'true', 'on', 'yes')


def measurements() -> dict[tuple[ConvShape, str], tuple[str, dict[str, float]]]:
    """``(shape, computation) -> (chosen formulation, seconds per call of each)`` for every
    choice timed in this process."""
    with _LOCK:
        return dict(_MEASURED)


def clear_cache() -> None:
    """Forget every choice: the next trace of each shape measures again."""
    with _LOCK:
        _MEASURED.clear()


def backend_path(platform: str) -> str:
    """How a program lowered for ``platform`` computes the conv: ``'custom'`` (the chosen
    formulations) for the CPU, ``'xla'`` (XLA's own) for every other platform."""
    return 'custom' if platform.lower() in ('cpu', 'host') else 'xla'


# Formulations. x [n,h,w,ci], kernel [kh,kw,ci,co], g (output gradient) [n,oh,ow,co].
def _xla_conv(x, kernel, strides, padding) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=LAYOUT)


def _xla_input_gradient(x, kernel, g, strides, padding) -> Array:
    return jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding), x)[1](g)[0]


def _xla_filter_gradient(x, kernel, g, strides, padding) -> Array:
    return jax.vjp(lambda k_: _xla_conv(x, k_, strides, padding), kernel)[1](g)[0]


def _out_hw(in_hw, kernel_hw, strides, padding) -> tuple[int, int]:
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip(in_hw, padding, kernel_hw, strides)
    )


def _chunks(x: Array, out_hw, kernel_shape, formulation: str) -> int:
    """How many equal batch chunks (a divisor of the batch) keep one chunk's tap slice
    (``taps``) or patches (``im2col``) within about a cache's size."""
    kh, kw, ci, _ = kernel_shape
    per_example = out_hw[0] * out_hw[1] * ci * x.dtype.itemsize
    if formulation == 'taps':
        target = TAP_CHUNK_BYTES
    else:
        target, per_example = IM2COL_CHUNK_BYTES, per_example * kh * kw
    batch = x.shape[0]
    want = max(1, min(batch, -(-batch * per_example // target)))
    return next(count for count in range(want, batch + 1) if batch % count == 0)


def _padded(x: Array, padding, dilation=(1, 1)) -> Array:
    """``x`` padded (negative: cropped) on H and W, ``dilation - 1`` zeros between pixels."""
    (pt, pb), (pl, pr) = padding
    config = ((0, 0, 0), (pt, pb, dilation[0] - 1), (pl, pr, dilation[1] - 1), (0, 0, 0))
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _taps(xpad: Array, kernel_hw, strides, out_hw) -> list[Array]:
    """The input under each kernel tap (row-major) at every output position: [n, oh, ow, ci]."""
    (sh, sw), (oh, ow) = strides, out_hw
    n, _, _, ci = xpad.shape
    return [
        lax.slice(
            xpad,
            (0, i, j, 0),
            (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, ci),
            (1, sh, sw, 1),
        )
        for i in range(kernel_hw[0])
        for j in range(kernel_hw[1])
    ]


def _dot(a: Array, b: Array, contract: tuple) -> Array:
    """``lax.dot_general`` accumulating in float32 at least."""
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=acc)


def _conv_by(x, kernel, strides, padding, dilation, formulation) -> Array:
    """A stride-``strides`` conv of ``x`` dilated by ``dilation``, by ``taps`` or ``im2col``."""
    kh, kw, ci, co = kernel.shape
    in_hw = tuple(d * (size - 1) + 1 for d, size in zip(dilation, x.shape[1:3]))
    out_hw = _out_hw(in_hw, (kh, kw), strides, padding)
    chunks = _chunks(x, out_hw, kernel.shape, formulation)

    def one(xc):
        taps = _taps(_padded(xc, padding, dilation), (kh, kw), strides, out_hw)
        if formulation == 'taps':
            terms = [_dot(t, w, ((3,), (0,))) for t, w in zip(taps, kernel.reshape(-1, ci, co))]
            return functools.reduce(jnp.add, terms)
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        return _dot(patches, kernel.reshape(kh * kw * ci, co), ((3,), (0,)))

    if chunks == 1:
        return one(x).astype(x.dtype)
    ys = lax.map(one, x.reshape((chunks, -1) + x.shape[1:]))
    return ys.reshape((x.shape[0],) + ys.shape[2:]).astype(x.dtype)


def forward(x: Array, kernel: Array, strides, padding, formulation: str) -> Array:
    """The conv's output by one formulation (``xla``: ``lax.conv_general_dilated``)."""
    strides, padding = _static(strides, padding, formulation)
    if formulation == 'xla':
        return _xla_conv(x, kernel, strides, padding)
    return _conv_by(x, kernel, strides, padding, (1, 1), formulation)


def input_gradient(
    kernel: Array, g: Array, input_shape: Sequence[int], strides, padding, formulation: str
) -> Array:
    """``dL/dx`` of the conv by one formulation: XLA's transpose, or the forward's ``taps``
    / ``im2col`` on ``g`` dilated by the stride with the kernel flipped, channels swapped."""
    strides, padding = _static(strides, padding, formulation)
    if formulation == 'xla':
        x = jnp.zeros(tuple(input_shape), g.dtype)
        return _xla_input_gradient(x, kernel, g, strides, padding)
    kernel_hw = kernel.shape[:2]
    # Input rows/cols past the last window (when (H + pads - k) % s > 0) get no gradient.
    pads = tuple(
        (k - 1 - lo, k - 1 - hi + (size + lo + hi - k) % s)
        for size, (lo, hi), k, s in zip(input_shape[1:3], padding, kernel_hw, strides)
    )
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return _conv_by(g, flipped, (1, 1), pads, strides, formulation)


def filter_gradient(
    x: Array, g: Array, kernel_shape: Sequence[int], strides, padding, formulation: str
) -> Array:
    """``dL/dkernel`` of the conv by one formulation: ``xla`` (XLA's own), ``taps`` (one
    matmul per tap) or ``im2col`` (one GEMM), summed over batch chunks."""
    strides, padding = _static(strides, padding, formulation)
    kh, kw, ci, co = kernel_shape = tuple(kernel_shape)
    if formulation == 'xla':
        return _xla_filter_gradient(x, jnp.zeros(kernel_shape, x.dtype), g, strides, padding)
    out_hw = g.shape[1:3]
    chunks = _chunks(x, out_hw, kernel_shape, formulation)
    contract = ((0, 1, 2), (0, 1, 2))

    def one(xc, gc):
        taps = _taps(_padded(xc, padding), (kh, kw), strides, out_hw)
        if formulation == 'taps':
            return jnp.stack([_dot(t, gc, contract) for t in taps]).reshape(kernel_shape)
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        return _dot(patches, gc, contract).reshape(kernel_shape)

    if chunks == 1:
        return one(x, g).astype(x.dtype)
    xs, gs = (a.reshape((chunks, -1) + a.shape[1:]) for a in (x, g))
    zero = jnp.zeros(kernel_shape, jnp.promote_types(x.dtype, jnp.float32))
    total, _ = lax.scan(lambda total, c: (total + one(*c), None), zero, (xs, gs))
    return total.astype(x.dtype)


def _static(strides, padding, formulation: str):
    if formulation not in FORMULATIONS:
        raise UserError(f'unknown conv formulation {formulation!r}; choose one of {FORMULATIONS}')
    return tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in padding)


# Choosing a formulation.
def heuristic_formulation(shape: ConvShape, computation: str) -> str:
    """The fixed choice for ``computation`` ('forward', 'input' or 'filter'), no timing.

    As measured in search steps (``docs/benchmarks.md``): XLA:CPU's filter gradient wins on
    small convs (ResNet-20 at batch 8 or 32) and loses to the patches GEMM on big ones;
    its forward and input gradient are as fast as any except on tiny maps (VGG's 2x2
    stage), where they take 100x the GEMM's time.
    """
    if computation == 'filter':
        return 'im2col' if shape.macs >= MEASURE_MIN_MACS else 'xla'
    return 'im2col' if int(np.prod(shape.output_hw)) <= SMALL_MAP_PIXELS else 'xla'


def time_formulations(
    shape: ConvShape,
    computation: str,
    formulations: Sequence[str] = FORMULATIONS,
    repeats: int = 3,
) -> dict[str, float]:
    """Seconds per call (compiled beforehand; best of up to ``repeats``) of each formulation
    of one computation on the CPU, on random data of ``shape``. They are timed in
    :data:`TIMING_ORDER`, and one twice as slow as the best so far is timed once."""
    cpu = jax.devices('cpu')[0]
    out = (shape.input_shape[0],) + shape.output_hw + (shape.kernel_shape[3],)
    rng = np.random.default_rng(0)
    x, k, g = (
        jax.device_put(rng.standard_normal(dims).astype(jnp.dtype(shape.dtype)), cpu)
        for dims in (shape.input_shape, shape.kernel_shape, out)
    )
    s, p = shape.strides, shape.padding
    run = {
        'forward': lambda x, k, g, form: forward(x, k, s, p, form),
        'input': lambda x, k, g, form: input_gradient(k, g, shape.input_shape, s, p, form),
        'filter': lambda x, k, g, form: filter_gradient(x, g, shape.kernel_shape, s, p, form),
    }[computation]
    seconds: dict[str, float] = {}
    for name in sorted(formulations, key=TIMING_ORDER.index):
        fn = jax.jit(run, static_argnums=3).lower(x, k, g, name).compile()
        best, leader = float('inf'), min(seconds.values(), default=float('inf'))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, k, g))
            best = min(best, time.perf_counter() - t0)
            if best > 2 * leader:
                break
        seconds[name] = best
    return seconds


def choose_formulation(shape: ConvShape, computation: str, mode: str = 'auto') -> str:
    """The CPU formulation of ``computation`` ('forward', 'input', 'filter') for ``shape``.

    ``mode`` 'auto': for the computations in :data:`MEASURED`, timed once and remembered
    when the default backend is the CPU, measuring is on and the conv is big enough to be
    worth it; otherwise (and for 'heuristic') :func:`heuristic_formulation`. A
    formulation's name forces it.
    """
    if computation not in COMPUTATIONS:
        raise UserError(f'unknown computation {computation!r}; choose one of {COMPUTATIONS}')
    if mode in FORMULATIONS:
        return mode
    if (
        mode == 'heuristic'
        or computation not in MEASURED
        or not measuring_enabled()
        or shape.macs < MEASURE_MIN_MACS
        or jax.default_backend() != 'cpu'  # the CPU branch is pruned anyway
    ):
        return heuristic_formulation(shape, computation)
    key = (shape, computation)
    with _LOCK:
        if key in _MEASURED:
            return _MEASURED[key][0]
    # Called while a program is traced: a fresh thread has no trace, so the timed calls
    # run for real instead of being staged into that program.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        seconds = pool.submit(time_formulations, shape, computation).result()
    with _LOCK:
        return _MEASURED.setdefault(key, (min(seconds, key=seconds.get), seconds))[0]


# The differentiable conv.
def _on_platform(computation: str, shape: ConvShape, mode: str, xla_fn, custom_fn, *args):
    """``xla_fn(*args)`` for a GPU or TPU, ``custom_fn(formulation, *args)`` (named
    ``conv_<computation>_<formulation>`` in profiles) when lowered for the CPU."""
    form = choose_formulation(shape, computation, mode)
    if form == 'xla':
        return xla_fn(*args)

    def cpu(*args):
        with jax.named_scope(f'conv_{computation}_{form}'):
            return custom_fn(form, *args)

    return lax.platform_dependent(*args, cpu=cpu, default=xla_fn)


def _primal(x, kernel, strides, padding, mode):
    shape = ConvShape(x.shape, kernel.shape, strides, padding, str(x.dtype))
    xla = functools.partial(_xla_conv, strides=strides, padding=padding)
    custom = lambda form, x, k: forward(x, k, strides, padding, form)  # noqa: E731
    return _on_platform('forward', shape, mode, xla, custom, x, kernel)


_conv = jax.custom_vjp(_primal, nondiff_argnums=(2, 3, 4))


def _conv_fwd(x, kernel, strides, padding, mode):
    return _primal(x, kernel, strides, padding, mode), (x, kernel)


def _conv_bwd(strides, padding, mode, residuals, g):
    x, kernel = residuals
    shape = ConvShape(x.shape, kernel.shape, strides, padding, str(x.dtype))
    dx = _on_platform(
        'input', shape, mode,
        lambda k, g: _xla_input_gradient(x, k, g, strides, padding),
        lambda form, k, g: input_gradient(k, g, x.shape, strides, padding, form),
        kernel, g,
    )  # fmt: skip
    dk = _on_platform(
        'filter', shape, mode,
        lambda x, g: _xla_filter_gradient(x, kernel, g, strides, padding),
        lambda form, x, g: filter_gradient(x, g, kernel.shape, strides, padding, form),
        x, g,
    )  # fmt: skip
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
    x: Array,
    kernel: Array,
    strides: Sequence[int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
    *,
    formulation: str = 'auto',
) -> Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC',
    'HWIO', 'NHWC'))``, its forward and gradients computed the fastest way found on
    XLA:CPU (module docstring); other backends get XLA's own.

    ``padding``: ``(lo, hi)`` pairs for H and W, or 'SAME' / 'VALID'. ``formulation``:
    ``'auto'`` (the filter gradient measured on a CPU backend, else the heuristic),
    ``'heuristic'``, or one of :data:`FORMULATIONS` for all three computations (on the
    CPU). Negative paddings and mixed dtypes go to ``lax.conv_general_dilated`` as they are.
    """
    if formulation not in CHOICES:
        raise UserError(
            f"formulation={formulation!r} is not one of {CHOICES}; use 'auto' unless a test "
            'needs one formulation'
        )
    strides = tuple(int(s) for s in strides)
    if x.ndim != 4 or kernel.ndim != 4 or len(strides) != 2:
        raise UserError(
            f'conv2d takes NHWC input, an HWIO kernel and 2 strides; got input shape '
            f'{x.shape}, kernel shape {kernel.shape}, strides {strides}: give a batch of '
            'images [N, H, W, C] (reshape other batch dims into N)'
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if x.dtype != kernel.dtype or min(min(p) for p in pads) < 0 or min(strides) < 1:
        return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=LAYOUT)
    return _conv(x, kernel, strides, pads, formulation)


class Conv(nn.Module):
    """``nn.Conv`` for 2-D NHWC input computed by :func:`conv2d`: built with the same
    arguments (integer tuples for kernel size, strides and padding pairs, as in the zoo),
    it has the same parameters, initial values and outputs (these within float rounding
    on maps of at most :data:`SMALL_MAP_PIXELS` pixels, where the forward is a GEMM)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    formulation: str = 'auto'

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel_shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
        kernel = self.param('kernel', self.kernel_init, kernel_shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, self.padding, formulation=self.formulation)
        return y if bias is None else y + bias.reshape((1, 1, 1, -1))
