"""LLaMA models from and to Hugging Face checkpoint folders (``config.json`` + safetensors).

:func:`read_hf_llama` reads a ``LlamaForCausalLM`` folder as saved by
``save_pretrained(safe_serialization=True)``: ``config.json`` and ``model.safetensors``,
or shards ``model-0000x-of-0000y.safetensors`` listed in ``model.safetensors.index.json``;
tensors in any dtype safetensors' numpy API reads (bfloat16 through ml_dtypes) become
float32 Flax params of :class:`jackpot_jax.models.llama.Llama`, linear weights
transposed to (in, out). :func:`write_hf_llama` writes the same layout back. Only numpy
and the ``safetensors`` package are needed (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jackpot_jax.core.errors import UserError
from jackpot_jax.models.llama import LlamaConfig, name_table, shape_of

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
SAFETENSORS_INSTALL = "python -m pip install 'safetensors>=0.4'"

# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


def _safetensors_numpy() -> Any:
    try:
        import safetensors.numpy
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UserError(
            f'Hugging Face checkpoints need the safetensors package ({error}); '
            f'{SAFETENSORS_INSTALL}'
        ) from error
    return safetensors.numpy


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f'{path!r} is not valid JSON ({error}); save the checkpoint again')


def config_from_hf(hf: Mapping[str, Any], where: str = CONFIG_FILE) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``config.json`` dict; refuses another
    ``model_type``/``architectures`` and features the Flax model lacks, by name."""
    model_type = hf.get('model_type')
    if model_type != 'llama':
        raise UserError(
            f'{where}: model_type={model_type!r}; only \'llama\' checkpoints '
            '(LlamaForCausalLM) can be read'
        )
    archs = hf.get('architectures') or ['LlamaForCausalLM']
    if list(archs) != ['LlamaForCausalLM']:
        raise UserError(
            f'{where}: architectures={archs!r}; only LlamaForCausalLM checkpoints can be read'
        )
    for key, want in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
        if hf.get(key, want) != want:
            raise UserError(
                f'{where}: {key}={hf[key]!r}; the Flax LLaMA supports only {key}={want!r}'
            )
    rope = dict(hf.get('rope_parameters') or {})  # transformers >= 5
    scaling = hf.get('rope_scaling') or {}
    rope_type = rope.get('rope_type', scaling.get('rope_type', scaling.get('type', 'default')))
    if rope_type not in ('default', None):
        raise UserError(
            f'{where}: rope_type={rope_type!r}; only plain RoPE (rope_type \'default\') is '
            'supported'
        )
    theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
    for key in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads'):
        if key not in hf:
            raise UserError(f'{where} lacks {key!r}; it is not a complete LLaMA config')
    heads = int(hf['num_attention_heads'])
    config = LlamaConfig(
        vocab_size=int(hf['vocab_size']),
        width=int(hf['hidden_size']),
        depth=int(hf['num_hidden_layers']),
        heads=heads,
        kv_heads=int(hf.get('num_key_value_heads') or heads),
        mlp_width=int(hf.get('intermediate_size', 11008)),
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        rope_base=float(theta),
        context=int(hf.get('max_position_embeddings', 2048)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    )
    try:
        config.check()
    except UserError as error:
        raise UserError(f'{where}: {error}') from error
    head_dim = hf.get('head_dim')
    if head_dim is not None and head_dim != config.head_dim:
        raise UserError(
            f'{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = '
            f'{config.head_dim}; only head_dim = hidden_size / heads is supported'
        )
    return config


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``config`` (read back by
    :func:`config_from_hf` and by ``transformers.LlamaConfig``)."""
    return {
        'architectures': ['LlamaForCausalLM'],
        'model_type': 'llama',
        'vocab_size': config.vocab_size,
        'hidden_size': config.width,
        'num_hidden_layers': config.depth,
        'num_attention_heads': config.heads,
        'num_key_value_heads': config.kv_heads,
        'head_dim': config.head_dim,
        'intermediate_size': config.mlp_width,
        'rms_norm_eps': config.norm_eps,
        'rope_theta': config.rope_base,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': config.rope_base},
        'max_position_embeddings': config.context,
        'tie_word_embeddings': config.tie_embeddings,
        'hidden_act': 'silu',
        'attention_bias': False,
        'mlp_bias': False,
        'torch_dtype': 'float32',
    }


def _shard_files(folder: str) -> list[str]:
    single = os.path.join(folder, SINGLE_FILE)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index).get('weight_map')
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f'{index!r} has no weight_map; save the checkpoint again')
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if absent:
            raise UserError(
                f'{folder!r}: shard(s) {", ".join(absent)} listed in {INDEX_FILE} are missing; '
                'copy every shard of the checkpoint'
            )
        return [os.path.join(folder, f) for f in files]
    if os.path.isfile(single):
        return [single]
    raise UserError(
        f'{folder!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; give a folder saved with '
        'save_pretrained(safe_serialization=True)'
    )


def read_hf_llama(folder: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any]]:
    """Reads a Hugging Face LLaMA folder: ``(config, params)``, float32 Flax params of
    :class:`jackpot_jax.models.llama.Llama`. Refuses a missing folder or config, other
    model types, and missing, unexpected or mis-shaped tensors, naming them."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise UserError(f'no checkpoint folder at {folder!r}; give a save_pretrained folder')
    if not os.path.isfile(config_path):
        raise UserError(f'{folder!r} has no {CONFIG_FILE}; give a save_pretrained folder')
    config = config_from_hf(_read_json(config_path), config_path)
    st = _safetensors_numpy()
    tensors: dict[str, np.ndarray] = {}
    for path in _shard_files(folder):
        try:
            tensors.update(st.load_file(path))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise UserError(
                f'{path!r} is not a readable safetensors file ({type(error).__name__}: '
                f'{error}); save the checkpoint again'
            ) from error
    for name in [n for n in tensors if n.endswith(_IGNORED_SUFFIXES)]:
        del tensors[name]
    table = name_table(config)
    if config.tie_embeddings and 'lm_head.weight' in tensors:
        # Some savers keep the tied head; it must be the embedding itself.
        head = tensors.pop('lm_head.weight')
        embed = tensors.get('model.embed_tokens.weight')
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            raise UserError(
                f'{folder!r}: tie_word_embeddings is true but lm_head.weight differs from '
                'model.embed_tokens.weight; set tie_word_embeddings=false in config.json'
            )
    missing = [row.hf for row in table if row.hf not in tensors]
    if missing:
        raise UserError(
            f'{folder!r} lacks {len(missing)} tensor(s) of a {config.depth}-layer LLaMA: '
            f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}; the checkpoint '
            'is incomplete or does not match its config.json'
        )
    extra = sorted(set(tensors) - {row.hf for row in table})
    if extra:
        raise UserError(
            f'{folder!r} has tensor(s) a LLaMA with this config.json does not: '
            f'{", ".join(extra[:8])}{" ..." if len(extra) > 8 else ""}; check '
            'num_hidden_layers and tie_word_embeddings'
        )
    flat = {}
    for row in table:
        value = np.asarray(tensors[row.hf], np.float32)
        if row.kind == 'kernel':
            value = np.ascontiguousarray(value.T)
        want = shape_of(config, row)
        if value.shape != want:
            raise UserError(
                f'{folder!r}: tensor {row.hf!r} has shape {value.shape} in Flax layout, '
                f'{want} expected from config.json'
            )
        flat[row.flax] = value
    return config, traverse_util.unflatten_dict(flat)


def write_hf_llama(
    folder: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any], shards: int = 1
) -> None:
    """Writes ``params`` of ``Llama(config)`` as a Hugging Face checkpoint folder
    (``config.json`` and float32 safetensors, in ``shards`` files with an index when more
    than one), readable by :func:`read_hf_llama` and ``LlamaForCausalLM.from_pretrained``."""
    folder = os.fspath(folder)
    if not (isinstance(shards, int) and shards >= 1):
        raise UserError(f'shards must be a positive integer, got {shards!r}')
    st = _safetensors_numpy()
    flat = traverse_util.flatten_dict(dict(params))
    table = name_table(config)
    missing = [row.flax for row in table if row.flax not in flat]
    if missing:
        raise UserError(f'params lack {missing[:5]} of Llama({config}); pass the model\'s params')
    tensors = {}
    for row in table:
        value = np.asarray(flat[row.flax], np.float32)
        tensors[row.hf] = np.ascontiguousarray(value.T if row.kind == 'kernel' else value)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
        json.dump(config_to_hf(config), f, indent=2)
    metadata = {'format': 'pt'}
    if shards == 1:
        st.save_file(tensors, os.path.join(folder, SINGLE_FILE), metadata=metadata)
        return
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f'model-{i:05d}-of-{shards:05d}.safetensors'
        st.save_file({n: tensors[n] for n in group}, os.path.join(folder, file), metadata=metadata)
        weight_map.update({n: file for n in group})
    total = int(sum(t.nbytes for t in tensors.values()))
    with open(os.path.join(folder, INDEX_FILE), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
