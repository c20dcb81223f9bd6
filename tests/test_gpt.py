"""The GPT-style language model: shapes, causality, the prune rule, token evaluation, and
pre-training through the launcher on a tiny text corpus."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_text_data import write_corpus  # tests/ is on the path

from jackpot_jax.core import adapters, sparsity, step
from jackpot_jax.engine import evaluation
from jackpot_jax.engine.metrics import read_jsonl
from jackpot_jax.io import checkpoint
from jackpot_jax.launch import run_context as rc, weight_training
from jackpot_jax.launch.config_checks import resolved
from jackpot_jax.models import gpt, zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=16, depth=2, heads=2, context=8)


def _init(model, length=8, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.float32), train=False)


@pytest.fixture(scope='module')
def tiny():
    model = zoo.get_model('gpt', 11, **TINY)
    return model, _init(model)


def test_logits_are_float32_per_position_over_the_vocabulary(tiny):
    model, variables = tiny
    tokens = np.arange(24).reshape(3, 8) % 11
    logits = model.apply(variables, tokens, train=False)
    assert logits.shape == (3, 8, 11) and logits.dtype == jnp.float32
    # Shorter inputs use the first positions; no batch statistics anywhere.
    assert model.apply(variables, tokens[:, :5], train=False).shape == (3, 5, 11)
    assert set(variables) == {'params'}
    bf16 = zoo.get_model('gpt', 11, dtype=jnp.bfloat16, **TINY)
    assert bf16.apply(variables, tokens, train=False).dtype == jnp.float32


def test_a_future_token_never_changes_earlier_logits(tiny):
    model, variables = tiny
    tokens = np.random.default_rng(0).integers(0, 11, (2, 8))
    base = np.asarray(model.apply(variables, tokens, train=False))
    for t in range(8):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 5) % 11
        out = np.asarray(model.apply(variables, changed, train=False))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])  # bit for bit
        assert np.abs(out[:, t:] - base[:, t:]).max() > 0  # position t sees its own token


def test_the_default_prune_rule_picks_exactly_the_attention_and_mlp_kernels():
    want = {
        f'h_{i}/{name}/kernel'
        for i in range(2)
        for name in ('attn/query', 'attn/key', 'attn/value', 'attn/out_proj')
        + ('mlp/c_fc', 'mlp/c_proj')
    }
    for tie in (True, False):
        model = zoo.get_model('gpt', 11, tie_embeddings=tie, **TINY)
        params = _init(model)['params']
        assert set(sparsity.prunable_paths(params)) == want
        flat = sparsity.flatten(params)
        assert ('classifier/kernel' in flat) is not tie  # the untied head stays dense
        assert flat['wte/embedding'].shape == (11, 16) and flat['wpe/embedding'].shape == (8, 16)
        assert flat['h_0/mlp/c_fc/kernel'].shape == (16, 64)  # (in, out): inputs on axis -2


def test_dropout_acts_only_when_training_with_an_rng():
    model = zoo.get_model('gpt', 11, dropout_rate=0.5, **TINY)
    variables = _init(model)
    tokens = np.ones((2, 8), np.int32)
    plain = model.apply(variables, tokens, train=False)
    np.testing.assert_array_equal(
        model.apply(variables, tokens, train=False, rngs={'dropout': jax.random.key(1)}), plain
    )
    np.testing.assert_array_equal(model.apply(variables, tokens, train=True), plain)
    dropped = model.apply(variables, tokens, train=True, rngs={'dropout': jax.random.key(1)})
    assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 0


def test_bad_sizes_name_the_value_and_the_fix(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match='input length 9 exceeds context=8'):
        model.apply(variables, np.zeros((1, 9), np.int32), train=False)
    with pytest.raises(ValueError, match='width 10 is not divisible by heads 4'):
        _init(zoo.get_model('gpt', 11, width=10, heads=4))
    with pytest.raises(ValueError, match='model.vocab_size=300 but the data has 256 tokens'):
        zoo.get_model('gpt', 256, vocab_size=300)
    assert isinstance(zoo.get_model('gpt', 256, vocab_size=256), gpt.GPT)


def test_evaluation_counts_tokens_of_valid_windows_and_averages_their_loss(tiny):
    model, variables = tiny
    rng = np.random.default_rng(2)
    tokens, labels = rng.integers(0, 11, (4, 8)), rng.integers(0, 11, (4, 8)).astype(np.int32)
    valid = np.array([True, True, False, True])
    forward = adapters.linen_forward(model, 'batch_stats')
    out = evaluation.evaluate_metrics(
        forward, variables['params'], {}, [(tokens, labels, valid)]
    )
    logits = np.asarray(model.apply(variables, tokens, train=False))
    top1 = logits.argmax(-1)
    top5 = np.argsort(-logits, axis=-1)[..., :5]
    assert out['examples'] == 3 * 8
    assert out['top1'] == ((top1 == labels) & valid[:, None]).sum() / 24
    assert out['top5'] == ((top5 == labels[..., None]).any(-1) & valid[:, None]).sum() / 24
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(out['loss'], float(losses[valid].sum()) / 24, rtol=1e-5)
    assert out['perplexity'] == pytest.approx(np.exp(out['loss']))


def _config_module():
    path = os.path.join(REPO, 'configs', 'gpt_text.py')
    spec = importlib.util.spec_from_file_location('gpt_text', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_config(text_dir):
    config = _config_module().get_config('tiny')
    config.data.data_dir = text_dir
    return config


def test_pretrain_through_the_launcher_reports_perplexity(tmp_path):
    text_dir = str(tmp_path / 'text')
    write_corpus(text_dir, sizes=(900,) * 12)
    config = _tiny_config(text_dir)
    workdir = str(tmp_path / 'run')
    os.makedirs(workdir)
    result = weight_training.run_pretrain(resolved(config), workdir)
    assert 0.0 <= result['top1'] <= result['top5'] <= 1.0
    assert result['perplexity'] == pytest.approx(np.exp(result['loss']))
    # Random printable bytes: about log(95) nats once trained at all, log(256) untrained.
    assert np.log(95) - 0.5 < result['loss'] < np.log(256) + 0.5
    records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    assert [r['epoch'] for r in records if 'train_loss' in r] == [1, 2]
    assert records[-1]['test_perplexity'] == result['perplexity']
    setup = rc.Setup(resolved(config))
    params, statistics, _ = setup.load_pretrained(workdir)
    assert setup.split_metrics(params, statistics) == result
    validation = setup.split_metrics(params, statistics, 'validation')
    assert {'top1', 'top5', 'loss', 'perplexity'} <= set(validation)
    assert validation['perplexity'] == pytest.approx(np.exp(validation['loss']))
    _, _, meta = checkpoint.load_weights(os.path.join(workdir, 'pretrained'))
    assert meta['model']['name'] == 'gpt'


def test_config_file_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="unknown argument\\(s\\) \\['huge'\\]"):
        _config_module().get_config('huge')
