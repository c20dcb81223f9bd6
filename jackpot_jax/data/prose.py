"""Real English prose that needs no download: the Python documentation, as text.

Debian's ``python3-doc`` package (``apt-get install -y python3-doc``) installs the HTML
documentation of the system's Python under ``/usr/share/doc/python3.X/html``: the
tutorial, the how-tos, the FAQ, the language and library references, about 500 pages
written by many authors over two decades. It is chosen because every machine of the
Debian family can have it offline, it is written English prose rather than code or
lists, and it is large enough (about 3 million tokens for SmolLM2's tokenizer) for
disjoint calibration, search, validation and test parts.

Each page is reduced to the text of its main body: code blocks (``<pre>``), navigation,
scripts and permalink marks are dropped, block elements become line breaks. Pages are
assigned to the parts by a hash of their relative path, so the split is the same on
every machine and does not move when pages are added. Tokenized parts are cached as
``.npy`` files keyed by the text and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import html.parser
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jackpot_jax.core.errors import UserError
from jackpot_jax.data import text, tokenizer as tokenizer_lib

PYTHON_DOCS_GLOB = '/usr/share/doc/python3*/html'
PYTHON_DOCS_INSTALL = 'apt-get install -y python3-doc'
# Parts of the corpus and their shares of the pages (by a hash of the page's path).
PARTS = ('calibration', 'search', 'validation', 'test')
SHARES = (0.05, 0.75, 0.10, 0.10)
DEFAULT_CONTEXT = 256  # tokens per window of the 'python_docs' dataset when data.context is 0
_SKIPPED_TAGS = {'pre', 'script', 'style', 'nav', 'head'}
_BLOCK_TAGS = {'p', 'div', 'section', 'li', 'dt', 'dd', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6',
               'tr', 'table', 'blockquote', 'br', 'ul', 'ol', 'dl'}  # fmt: skip


def python_docs_root(root: str | None = None) -> str:
    """The HTML folder of the Python documentation (``root`` if given, else the newest
    ``/usr/share/doc/python3*/html``); a UserError names the install command if absent."""
    if root:
        if not os.path.isdir(root):
            raise UserError(f'documentation folder {root!r} does not exist; pass a folder of HTML')
        return root
    found = sorted(glob.glob(PYTHON_DOCS_GLOB))
    if not found:
        raise UserError(
            f'the Python documentation is not installed (no {PYTHON_DOCS_GLOB}); install it '
            f'with `{PYTHON_DOCS_INSTALL}`, or pass the folder of another HTML documentation'
        )
    return found[-1]


class _MainText(html.parser.HTMLParser):
    """Collects the text of ``<div role="main">`` without code blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # div depth inside the main body (0: outside)
        self.skipping = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == 'div' and self.depth:
            self.depth += 1
        elif tag == 'div' and ('role', 'main') in attrs:
            self.depth = 1
        if not self.depth:
            return
        if tag in _SKIPPED_TAGS or ('class', 'headerlink') in attrs:
            self.skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append('\n')

    def handle_endtag(self, tag: str) -> None:
        if not self.depth:
            return
        if self.skipping and (tag in _SKIPPED_TAGS or tag == 'a'):
            self.skipping -= 1
        elif tag in _BLOCK_TAGS:
            self.parts.append('\n')
        if tag == 'div':
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth and not self.skipping:
            self.parts.append(data)


def html_text(page: str) -> str:
    """The prose of one documentation page: paragraphs separated by blank lines, runs of
    spaces collapsed, code blocks and permalink marks dropped."""
    parser = _MainText()
    parser.feed(page)
    parser.close()
    text = ''.join(parser.parts)
    lines = [re.sub(r'[ \t\r\f\v]+', ' ', line).strip() for line in text.split('\n')]
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(' '.join(current))
            current = []
    if current:
        paragraphs.append(' '.join(current))
    return '\n\n'.join(paragraphs)


def read_documents(root: str | None = None) -> dict[str, str]:
    """Relative page path -> text, for every HTML page under ``root`` with any prose."""
    root = python_docs_root(root)
    documents = {}
    for path in _pages(root):
        with open(path, encoding='utf-8') as f:
            text = html_text(f.read())
        if text:
            documents[os.path.relpath(path, root)] = text
    if not documents:
        raise UserError(f'no HTML pages with text under {root!r}')
    return documents


def part_of(name: str, shares: Sequence[float] = SHARES) -> str:
    """Which part a document belongs to: a stable hash of its name against the shares."""
    if len(shares) != len(PARTS) or abs(sum(shares) - 1.0) > 1e-9 or min(shares) < 0:
        raise ValueError(f'shares {tuple(shares)} must be {len(PARTS)} numbers >= 0 summing to 1')
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big') / 2.0**64
    edge = 0.0
    for part, share in zip(PARTS, shares):
        edge += share
        if u < edge:
            return part
    return PARTS[-1]


def split_parts(documents: Mapping[str, str], shares: Sequence[float] = SHARES) -> dict[str, str]:
    """Part -> the text of its documents (sorted by name, separated by blank lines)."""
    texts: dict[str, list[str]] = {part: [] for part in PARTS}
    for name in sorted(documents):
        texts[part_of(name, shares)].append(documents[name])
    return {part: '\n\n'.join(chunks) for part, chunks in texts.items()}


def _pages(root: str) -> list[str]:
    """The HTML pages of prose under ``root`` (generated indexes and sources left out)."""
    pages = []
    for path in sorted(glob.glob(os.path.join(root, '**', '*.html'), recursive=True)):
        if not os.path.relpath(path, root).startswith(('_', 'genindex', 'py-modindex', 'search')):
            pages.append(path)
    return pages


def tokenized_parts(
    encode: Callable[[str], Sequence[int]],
    tokenizer_id: str,
    cache_dir: str,
    root: str | None = None,
    shares: Sequence[float] = SHARES,
) -> dict[str, np.ndarray]:
    """Part -> int32 token ids of its text, each part tokenized whole (no BOS), cached in
    ``cache_dir`` under a key of the pages (names, sizes, times), the shares and
    ``tokenizer_id`` (e.g. the GGUF file's hash); the pages are read only on a miss."""
    root = python_docs_root(root)
    digest = hashlib.sha256(f'{tokenizer_id}|{tuple(shares)}'.encode())
    for path in _pages(root):
        stat = os.stat(path)
        digest.update(f'{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns};'.encode())
    folder = os.path.join(cache_dir, f'prose-{digest.hexdigest()[:16]}')
    paths = {part: os.path.join(folder, f'{part}.npy') for part in PARTS}
    if not all(os.path.exists(p) for p in paths.values()):
        parts = split_parts(read_documents(root), shares)
        os.makedirs(folder, exist_ok=True)
        for part, path in paths.items():
            tmp = path + '.tmp.npy'
            np.save(tmp, np.asarray(encode(parts[part]), np.int32))
            os.replace(tmp, path)  # a half-written cache never replaces a whole one
    return {part: np.load(path) for part, path in paths.items()}


def read_text_file(path: str) -> str:
    """A user's UTF-8 text file; one clear error for a missing, empty or non-UTF-8 file."""
    if not os.path.isfile(path):
        raise UserError(f'text file {path!r} does not exist; pass the path of a UTF-8 text file')
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UserError(
            f'text file {path!r} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); '
            'convert it, e.g. `iconv -f latin1 -t utf-8`'
        ) from None
    if not text.strip():
        raise UserError(f'text file {path!r} is empty; pass a file with text to score')
    return text


@dataclasses.dataclass(frozen=True)
class ProseDataset(text.TextDataset):
    """Token windows of the parts: 'search' trains, 'validation' chooses, 'test' reports,
    and the 'calibration' windows feed one-shot criteria (Wanda, SparseGPT)."""

    calibration_images: np.ndarray | None = None
    calibration_labels: np.ndarray | None = None


def default_cache_dir() -> str:
    """Where tokenized parts are cached: ``$XDG_CACHE_HOME/jackpot_jax`` (~/.cache)."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'jackpot_jax')


def _windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, next tokens) ``[N, context]``: windows of ``context + 1`` tokens every
    ``context`` tokens, the tail that fills no window dropped."""
    count = max(0, (len(tokens) - 1) // context)
    windows = tokens[np.arange(count)[:, None] * context + np.arange(context + 1)]
    return windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)


def load_python_docs(
    tokenizer_path: str,
    root: str | None = None,
    context: int = 0,
    *,
    validation_fraction: float = 0.0,
    max_eval_tokens: int = 0,
    cache_dir: str | None = None,
) -> ProseDataset:
    """The ``python_docs`` dataset: windows of ``context`` tokens (0 = 256) of the parts,
    tokenized by the model's tokenizer (a GGUF file or a ``tokenizer.json``).

    ``validation_fraction`` is the validation part's share of the pages, taken from the
    search part (0: no validation split); the calibration (5 %) and test (10 %) pages do
    not move with it. ``max_eval_tokens`` > 0 keeps the first windows of the validation
    and test parts up to that many tokens, so each evaluation costs a bounded time.
    """
    context = context or DEFAULT_CONTEXT
    if not (isinstance(context, int) and context >= 1):
        raise ValueError(f'data.context must be a positive integer, got {context!r} (e.g. 256)')
    if not 0.0 <= validation_fraction < SHARES[1] + SHARES[2]:
        raise ValueError(
            f'data.validation_fraction={validation_fraction!r} must be in [0, '
            f'{SHARES[1] + SHARES[2]}) for python_docs (the search part gives it its pages)'
        )
    if not (isinstance(max_eval_tokens, int) and max_eval_tokens >= 0):
        raise ValueError(f'data.max_eval_tokens must be an int >= 0, got {max_eval_tokens!r}')
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
    search = SHARES[1] + SHARES[2] - validation_fraction
    shares = (SHARES[0], search, validation_fraction, SHARES[3])
    with open(tokenizer_path, 'rb') as f:
        tokenizer_id = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    parts = tokenized_parts(
        tok.encode, f'{tokenizer_id}:{os.path.getsize(tokenizer_path)}',
        cache_dir or default_cache_dir(), root, shares,
    )  # fmt: skip
    arrays = {part: _windows(tokens, context) for part, tokens in parts.items()}
    for part in ('search', 'test', 'calibration'):
        if not len(arrays[part][0]):
            raise ValueError(
                f'the {part} part of the documentation holds {len(parts[part])} tokens, no '
                f'window of data.context + 1 = {context + 1}; lower data.context'
            )
    if max_eval_tokens:
        cap = max(1, max_eval_tokens // context)
        for part in ('validation', 'test'):
            arrays[part] = tuple(a[:cap] for a in arrays[part])
    manifest = {
        'root': python_docs_root(root),
        'context': context,
        'shares': dict(zip(PARTS, shares)),
        'part_tokens': {part: int(len(tokens)) for part, tokens in parts.items()},
        'windows': {part: int(len(a[0])) for part, a in arrays.items()},
    }
    validation = arrays['validation'] if validation_fraction else (None, None)
    return ProseDataset(
        *arrays['search'], *arrays['test'], tok.vocab_size, *validation,
        manifest=manifest,
        calibration_images=arrays['calibration'][0],
        calibration_labels=arrays['calibration'][1],
    )  # fmt: skip
