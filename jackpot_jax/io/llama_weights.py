"""LLaMA weights by path, whatever the format: a GGUF file (llama.cpp's, quantized or
not) or a Hugging Face checkpoint folder (``config.json`` + safetensors), with the
tokenizer that goes with them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jackpot_jax.core.errors import UserError
from jackpot_jax.io import gguf, safetensors_llama
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
