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

By default each formulation follows a fixed rule (:func:`heuristic_formulation`), so a
run's floats do not depend on timings; with ``JACKPOT_CONV_MEASURE=1`` a big conv's filter
gradient takes the fastest on this machine, timed once per shape (:func:`measurements`).
All agree within float rounding. The CPU formulations are chosen at lowering time
(``lax.platform_dependent``): a GPU or TPU program gets XLA's own.
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
    """Whether ``'auto'`` may time formulations (``JACKPOT_CONV_MEASURE=1``; default off)."""
    return os.environ.get(MEASURE_ENV, '0').strip().lower() in ('1', 'true', 'on', 'yes')


def measurements() -> dict[tuple[ConvShape, str], tuple[str, dict[str, float]]]:
    """Every choice timed in this process: ``(shape, computation) -> (choice, seconds)``."""
    with _LOCK:
        return dict(_MEASURED)


def clear_cache() -> None:
    """Forget every choice: the next trace of each shape measures again."""
    with _LOCK:
        _MEASURED.clear()


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
    """How many batch chunks keep a chunk's taps or patches within about a cache's size: a
    divisor of each device's share of the batch, so a data-parallel shard loops over its own
    examples (:func:`_split`), with no collective in the loop (that can deadlock XLA:CPU)."""
    kh, kw, ci, _ = kernel_shape
    per_example = out_hw[0] * out_hw[1] * ci * x.dtype.itemsize
    if formulation == 'taps':
        target = TAP_CHUNK_BYTES
    else:
        target, per_example = IM2COL_CHUNK_BYTES, per_example * kh * kw
    batch = x.shape[0]
    local = batch // _shards(batch)
    want = max(1, min(local, -(-batch * per_example // target)))
    return next(count for count in range(want, local + 1) if local % count == 0)


def _shards(batch: int) -> int:
    """How many data-parallel shards a batch may be split into: every device, if it divides."""
    return jax.device_count() if batch % jax.device_count() == 0 else 1


def _split(a: Array, chunks: int) -> Array:
    """``[chunks, batch / chunks, ...]``, chunk ``k`` every ``chunks``-th example from ``k``."""
    return a.reshape((-1, chunks) + a.shape[1:]).swapaxes(0, 1)


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


def _dot_per_shard(a: Array, b: Array, shards: int) -> Array:
    """``[shards, p, q]``: ``a [n, ..., p]``, ``b [n, ..., q]`` contracted per batch shard."""
    a, b = (v.reshape(shards, -1, v.shape[-1]) for v in (a, b))
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc)


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
    ys = lax.map(one, _split(x, chunks))  # back to the batch's order:
    return ys.swapaxes(0, 1).reshape(x.shape[:1] + ys.shape[2:]).astype(x.dtype)


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
    shards = _shards(x.shape[0]) if chunks > 1 else 1

    def one(xc, gc):  # [shards, kh, kw, ci, co]
        taps = _taps(_padded(xc, padding), (kh, kw), strides, out_hw)
        if formulation == 'taps':
            terms = jnp.stack([_dot_per_shard(t, gc, shards) for t in taps], axis=1)
            return terms.reshape((shards,) + kernel_shape)
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        return _dot_per_shard(patches, gc, shards).reshape((shards,) + kernel_shape)

    if chunks == 1:
        return one(x, g)[0].astype(x.dtype)
    xs, gs = _split(x, chunks), _split(g, chunks)
    zero = jnp.zeros((shards,) + kernel_shape, jnp.promote_types(x.dtype, jnp.float32))
    total, _ = lax.scan(lambda total, c: (total + one(*c), None), zero, (xs, gs))
    return total.sum(0).astype(x.dtype)  # each device's sum: one all-reduce, after the loop


def _static(strides, padding, formulation: str):
    if formulation not in FORMULATIONS:
        raise UserError(f'unknown conv formulation {formulation!r}; choose one of {FORMULATIONS}')
    return tuple(int(s) for s in strides), tuple((int(lo), int(hi)) for lo, hi in padding)


# Choosing a formulation.
def heuristic_formulation(shape: ConvShape, computation: str) -> str:
    """The fixed choice for ``computation`` ('forward', 'input' or 'filter'), no timing.

    Measured in search steps (``docs/benchmarks.md``): XLA:CPU's filter gradient wins on
    small convs, the patches GEMM on big ones; XLA's forward and input gradient are as fast
    as any except on tiny maps (VGG's 2x2 stage), where they take 100x the GEMM's time.
    """
    if computation == 'filter':
        return 'im2col' if shape.macs >= MEASURE_MIN_MACS else 'xla'
    return 'im2col' if int(np.prod(shape.output_hw)) <= SMALL_MAP_PIXELS else 'xla'


def time_formulations(
    shape: ConvShape, computation: str, formulations: Sequence[str] = FORMULATIONS, repeats=3
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

    ``mode`` 'auto': timed once and remembered for :data:`MEASURED` computations of big
    convs when measuring is on and the backend is the CPU; otherwise (and for 'heuristic')
    :func:`heuristic_formulation`. A formulation's name forces it.
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
    """``lax.conv_general_dilated`` in :data:`LAYOUT`, computed the fastest way found on
    XLA:CPU (module docstring); other backends get XLA's own. ``padding``: ``(lo, hi)`` per
    H and W, or 'SAME' / 'VALID'. ``formulation``: ``'auto'`` (measured if enabled, else
    the heuristic), ``'heuristic'``, or one of :data:`FORMULATIONS` for all three
    computations. Negative paddings and mixed dtypes go to ``lax`` as they are."""
    if formulation not in CHOICES:
        raise UserError(f"formulation={formulation!r} is not one of {CHOICES}; use 'auto'")
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
