"""A language model's perplexity of a user's text file, from any LLaMA weights."""

import json
import math

import ml_collections
import numpy as np
import pytest
from test_llama import TINY, random_params, write_gguf  # tests/test_llama.py

from jackpot_jax.core.errors import UserError
from jackpot_jax.engine import perplexity
from jackpot_jax.io import convert_cli, safetensors_llama
from jackpot_jax.launch import text_eval

TEXT = 'The quick brown fox, 1234 times, jumps over the lazy dog.\n' * 12


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp('llama')
    params = random_params(TINY)
    write_gguf(root / 'tiny.gguf', TINY, params)
    safetensors_llama.write_hf_llama(str(root / 'hf'), TINY, params)
    assert convert_cli.main(['llama', '--input', str(root / 'tiny.gguf'), '--output', str(root / 'run')]) == 0
    return root, params


def _config(pretrained, text_file, context=0):
    return ml_collections.ConfigDict(
        {'pretrained': pretrained, 'data': {'text_file': text_file, 'context': context}}
    )


def test_every_weights_format_gives_the_same_perplexity(tmp_path, weights):
    root, params = weights
    text_file = tmp_path / 'text.txt'
    text_file.write_text(TEXT)
    figures = []
    for source in ('tiny.gguf', 'run/pretrained'):
        out = text_eval.run_text_perplexity(_config(str(root / source), str(text_file), 16), str(tmp_path / source.replace('/', '_')))
        with open(tmp_path / source.replace('/', '_') / 'summary.json') as f:
            assert json.load(f)['perplexity'] == out['perplexity']
        figures.append(out['perplexity'])
    model, loaded, tokenizer, _ = text_eval.load_language_model(str(root / 'tiny.gguf'))
    ids = tokenizer.encode(TEXT)
    direct = perplexity.perplexity(perplexity.flax_apply(model), params, ids, 16)
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)
    assert figures[0] == pytest.approx(direct['perplexity'], rel=1e-5)
    assert 1 < figures[0] < 10 * TINY.vocab_size and math.isfinite(figures[0])
    assert out['windows'] == len(ids) // 16 and out['context'] == 16


def test_bad_text_or_context_is_one_clear_error(tmp_path, weights):
    root, _ = weights
    empty, latin = tmp_path / 'empty.txt', tmp_path / 'latin.txt'
    empty.write_text('')
    latin.write_bytes('café'.encode('latin-1'))
    gguf_path = str(root / 'tiny.gguf')
    with pytest.raises(UserError, match='is empty'):
        text_eval.run_text_perplexity(_config(gguf_path, str(empty)), str(tmp_path / 'w'))
    with pytest.raises(UserError, match='not UTF-8'):
        text_eval.run_text_perplexity(_config(gguf_path, str(latin)), str(tmp_path / 'w'))
    text_file = tmp_path / 'text.txt'
    text_file.write_text(TEXT)
    with pytest.raises(UserError, match=f"longer than the model's {TINY.context}"):
        text_eval.run_text_perplexity(_config(gguf_path, str(text_file), 4 * TINY.context), str(tmp_path / 'w'))
    with pytest.raises(UserError, match='neither a .gguf file'):
        text_eval.run_text_perplexity(_config(str(tmp_path), str(text_file)), str(tmp_path / 'w'))
    np.testing.assert_equal(latin.read_bytes(), 'café'.encode('latin-1'))  # nothing touched


def test_the_command_line_prints_and_writes_the_perplexity(tmp_path, weights):
    import os
    import subprocess
    import sys

    root, _ = weights
    text_file = tmp_path / 'text.txt'
    text_file.write_text(TEXT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, '-m', 'jackpot_jax.main', '--config=configs/smollm2.py',
         '--mode=evaluate', f'--config.pretrained={root / "tiny.gguf"}',
         f'--config.data.text_file={text_file}', '--config.data.context=16',
         f'--workdir={tmp_path / "w"}'],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / 'w' / 'summary.json') as f:
        summary = json.load(f)
    assert f"perplexity {summary['perplexity']:.4f}" in done.stdout
    direct = text_eval.run_text_perplexity(
        _config(str(root / 'tiny.gguf'), str(text_file), 16), str(tmp_path / 'direct')
    )
    assert summary['perplexity'] == pytest.approx(direct['perplexity'], rel=1e-6)
