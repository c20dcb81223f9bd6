"""Byte-level BPE tokenizers built from a GGUF file's vocabulary (the ``tokenizers`` package).

A GGUF file of a GPT-2-style tokenizer (``tokenizer.ggml.model = 'gpt2'``) carries the
token strings (in GPT-2's byte-to-unicode alphabet: ``'Ġthe'`` is ``' the'``), the merges
in rank order, the special token ids and a pre-tokenizer name ``tokenizer.ggml.pre``.
Before BPE, llama.cpp splits the text by a list of regular expressions chosen by that
name, each applied to the pieces the previous one left; the same splits are built here:

* ``smollm`` (and the other names llama.cpp treats alike: ``starcoder``, ``refact``,
  ``codeshell``, ``command-r``, ``exaone``): every number character ``\\p{N}`` alone
  (``2024`` is four pieces), then GPT-2's regex;
* ``gpt-2``, ``phi-2``: GPT-2's regex only
  (``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``).

Other names are refused: their rules differ and a silent mismatch gives wrong ids.
Control tokens (``<|im_start|>``...) are matched in the text only with
``parse_special=True``; user-defined tokens always are, as llama.cpp does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jackpot_jax.core.errors import UserError

TOKENIZERS_INSTALL = "python -m pip install 'tokenizers>=0.20'"

# tokenizer.ggml.pre -> split before GPT-2's regex (llama.cpp's pre-tokenizer types).
DIGITS_THEN_GPT2 = ('smollm', 'starcoder', 'refact', 'codeshell', 'command-r', 'exaone')
GPT2_ONLY = ('gpt-2', 'phi-2')
PRE_TOKENIZERS = DIGITS_THEN_GPT2 + GPT2_ONLY

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UserError(
            f'the GGUF tokenizer needs the tokenizers package ({error}); {TOKENIZERS_INSTALL}'
        )
    return tokenizers


class GGUFTokenizer:
    """A byte-level BPE tokenizer: :meth:`encode` text to ids, :meth:`decode` ids to text.

    ``bos_id``/``eos_id`` are the file's beginning/end-of-sequence ids (None when absent);
    ``vocab_size`` the number of tokens; ``pre`` the pre-tokenizer name it follows."""

    def __init__(
        self, backend: Any, vocab_size: int, pre: str, bos_id: int | None, eos_id: int | None
    ) -> None:
        self.backend = backend
        self.vocab_size = vocab_size
        self.pre = pre
        self.bos_id = bos_id
        self.eos_id = eos_id

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """The token ids of ``text``; ``add_bos`` puts ``bos_id`` first; ``parse_special``
        reads control tokens written in the text (``<|im_start|>``) as their ids instead of
        as plain characters."""
        self.backend.encode_special_tokens = not parse_special
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise UserError('this tokenizer has no BOS token; call encode(add_bos=False)')
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens included as their text)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(
                f'token id(s) {bad[:5]} are outside the vocabulary of {self.vocab_size} tokens'
            )
        return self.backend.decode(ids, skip_special_tokens=False)


def _pre_tokenizer(pre: str) -> Any:
    tk = _tokenizers()
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GPT2_ONLY:
        return byte_level
    if pre in DIGITS_THEN_GPT2:
        digits = tk.pre_tokenizers.Split(tk.Regex(r'\p{N}'), behavior='isolated')
        return tk.pre_tokenizers.Sequence([digits, byte_level])
    raise UserError(
        f'unknown GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: '
        f'{", ".join(PRE_TOKENIZERS)} (another needs its own splitting rules)'
    )


def build_tokenizer(
    tokens: Sequence[str],
    merges: Sequence[str],
    pre: str,
    token_types: Sequence[int] | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> GGUFTokenizer:
    """A :class:`GGUFTokenizer` from GGUF-style data: ``tokens`` in id order (byte-level
    strings), ``merges`` as ``'left right'`` strings in rank order, the pre-tokenizer name
    ``pre``, llama.cpp token types (3: control, 4: user-defined; others are ordinary)."""
    tk = _tokenizers()
    pre_tokenizer = _pre_tokenizer(pre)
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated string keeps its first id
    pairs = []
    for merge in merges:
        parts = merge.split(' ')
        if len(parts) != 2:
            raise UserError(f'GGUF merge {merge!r} is not two tokens separated by one space')
        pairs.append((parts[0], parts[1]))
    model = tk.models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    backend = tk.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = tk.decoders.ByteLevel()
    if token_types is not None:
        if len(token_types) != len(tokens):
            raise UserError(
                f'{len(token_types)} token types for {len(tokens)} tokens; the GGUF file is '
                'inconsistent'
            )
        control = [
            tk.AddedToken(tokens[i], special=True, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == TOKEN_CONTROL and vocab.get(tokens[i]) == i
        ]
        user = [
            tk.AddedToken(tokens[i], special=False, normalized=False)
            for i, kind in enumerate(token_types)
            if kind == TOKEN_USER_DEFINED and vocab.get(tokens[i]) == i
        ]
        backend.add_special_tokens(control)
        backend.add_tokens(user)
    for name, value in (('bos', bos_id), ('eos', eos_id)):
        if value is not None and not 0 <= value < len(tokens):
            raise UserError(f'{name} token id {value} is outside the {len(tokens)} tokens')
    return GGUFTokenizer(backend, len(tokens), pre, bos_id, eos_id)


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> GGUFTokenizer:
    """The tokenizer of a GGUF file from its metadata (as returned by
    :func:`jackpot_jax.io.gguf.read_gguf`); refuses a non-BPE tokenizer model or an
    unknown pre-tokenizer by name."""
    model = metadata.get('tokenizer.ggml.model')
    if model != 'gpt2':
        raise UserError(
            f'GGUF tokenizer model tokenizer.ggml.model={model!r} is not supported; only '
            "byte-level BPE ('gpt2') tokenizers can be built"
        )
    for key in ('tokenizer.ggml.tokens', 'tokenizer.ggml.merges'):
        if key not in metadata:
            raise UserError(f'the GGUF metadata lacks {key!r}; the file has no usable tokenizer')
    return build_tokenizer(
        metadata['tokenizer.ggml.tokens'],
        metadata['tokenizer.ggml.merges'],
        metadata.get('tokenizer.ggml.pre', 'default'),
        metadata.get('tokenizer.ggml.token_type'),
        metadata.get('tokenizer.ggml.bos_token_id'),
        metadata.get('tokenizer.ggml.eos_token_id'),
    )


def load_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """The tokenizer of the GGUF file at ``path`` (reads the metadata only)."""
    from jackpot_jax.io import gguf

    return tokenizer_from_gguf_metadata(gguf.gguf_metadata(gguf.open_gguf(path)))


def load_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """The tokenizer at ``path``: a GGUF file's, or a Hugging Face ``tokenizer.json``."""
    path = os.fspath(path)
    if path.endswith('.json'):
        if not os.path.isfile(path):
            raise UserError(f'tokenizer file {path!r} does not exist; pass the folder\'s tokenizer.json')
        backend = _tokenizers().Tokenizer.from_file(path)
        return GGUFTokenizer(backend, backend.get_vocab_size(), 'tokenizer.json', None, None)
    return load_gguf_tokenizer(path)
