"""A GPT-style language model on the Python standard library's source, byte by byte:
``--config=configs/gpt_text.py[:tiny]``.

Data ``python_source``: the standard library's top-level modules of the running Python
(``--config.data.data_dir`` for another folder of ``*.py`` files), split by file into
train / validation (10 % of the non-test files, stable protocol) / test (10 %), cut into
windows of 128 bytes and their next bytes (vocabulary 256).

Model ``gpt``: width 192, 4 pre-LayerNorm blocks of 4 heads, context 128, head tied to the
token embedding: 1.85 M parameters, of which the 24 attention and MLP kernels (1.77 M)
are prunable by the default rule; embeddings, LayerNorms and biases stay dense.

``pretrain`` trains it with the launcher's SGD (momentum 0.9, per-epoch cosine) on
next-token cross-entropy; an "epoch" is ``steps_per_epoch`` = 250 batches of 16 windows
drawn from a fresh shuffle, 6 of them (1,500 steps, 3.1 M tokens, about 0.8 passes over
the 3.96 MB of training text; about 30 minutes on two busy CPU cores). The result
reports test top-1 / top-5 over tokens, the mean per-token ``loss`` (nats) and
``perplexity`` = exp(loss).

``tiny`` shrinks everything to seconds for smoke tests: width 32, 2 blocks, context 16,
2 epochs of 3 steps of 8 windows.
"""

import ml_collections

from jackpot_jax.launch import config as config_lib

USAGE = 'configs/gpt_text.py[:tiny]'


def get_config(args: str = ''):
    options = [a.strip() for a in args.split(',') if a.strip()]
    unknown = [a for a in options if a != 'tiny']
    if unknown:
        raise ValueError(f'unknown argument(s) {unknown} of {USAGE}; the only one is tiny')
    config = config_lib.get_config()
    config.data.name = 'python_source'
    config.data.context = 128
    config.data.eval_batch_size = 256
    config.model = ml_collections.ConfigDict(
        {'name': 'gpt', 'width': 192, 'depth': 4, 'heads': 4, 'context': 128}
    )
    config.steps_per_epoch = 250
    config.pretrain.epochs = 6
    config.pretrain.batch_size = 16
    config.pretrain.learning_rate = 0.1
    config.pretrain.weight_decay = 0.0
    config.pretrain.momentum = 0.9
    config.search.batch_size = 16
    config.search.epochs = 4
    if 'tiny' in options:
        config.data.context = 16
        config.data.eval_batch_size = 64
        config.model.update({'width': 32, 'depth': 2, 'heads': 2, 'context': 16})
        config.steps_per_epoch = 3
        config.pretrain.epochs = 2
        config.pretrain.batch_size = 8
        config.search.batch_size = 8
        config.search.epochs = 1
    return config
