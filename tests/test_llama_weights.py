"""A LLaMA by path (GGUF file or Hugging Face folder), and its conversion into a workdir."""

import dataclasses

import numpy as np
import pytest
from flax import traverse_util
from test_llama import TINY, random_params, write_gguf  # tests/test_llama.py

from jackpot_jax.core.errors import UserError
from jackpot_jax.io import checkpoint, convert_cli, llama_weights, safetensors_llama


@pytest.fixture(scope='module')
def tiny_params():
    return random_params(TINY)


def _same(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_allclose(np.asarray(fa[key]), np.asarray(fb[key]), rtol=0, atol=1e-6)


def test_either_format_reads_to_the_same_model(tmp_path, tiny_params):
    write_gguf(tmp_path / 'tiny.gguf', TINY, tiny_params)
    safetensors_llama.write_hf_llama(str(tmp_path / 'hf'), TINY, tiny_params)
    from_gguf = llama_weights.read_llama_weights(str(tmp_path / 'tiny.gguf'))
    from_hf = llama_weights.read_llama_weights(str(tmp_path / 'hf'))
    assert from_gguf.config == from_hf.config == TINY
    _same(from_gguf.params, tiny_params)
    _same(from_hf.params, tiny_params)
    assert from_gguf.tokenizer_path.endswith('tiny.gguf')
    with pytest.raises(UserError, match='neither a .gguf file nor a Hugging Face LLaMA folder'):
        llama_weights.read_llama_weights(str(tmp_path))


def test_the_convert_command_writes_weights_the_launcher_can_rebuild(tmp_path, tiny_params, capsys):
    write_gguf(tmp_path / 'tiny.gguf', TINY, tiny_params)
    out = tmp_path / 'run'
    assert convert_cli.main(['llama', '--input', str(tmp_path / 'tiny.gguf'), '--output', str(out)]) == 0
    params, statistics, meta = checkpoint.load_weights(str(out / 'pretrained'))
    _same(params, tiny_params)
    assert statistics == {}
    assert meta['model'] == {'name': 'llama', **dataclasses.asdict(TINY)}
    assert meta['num_classes'] == TINY.vocab_size and meta['tokenizer'].endswith('tiny.gguf')
    capsys.readouterr()
    assert convert_cli.main(['llama', '--input', str(tmp_path / 'tiny.gguf'), '--output', str(out)]) != 0
    assert 'already holds pretrained' in capsys.readouterr().err  # nothing replaced unasked
