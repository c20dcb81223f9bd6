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

import glob
import hashlib
import html.parser
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jackpot_jax.core.errors import UserError

PYTHON_DOCS_GLOB = '/usr/share/doc/python3*/html'
PYTHON_DOCS_INSTALL = 'apt-get install -y python3-doc'
# Parts of the corpus and their shares of the pages (by a hash of the page's path).
PARTS = ('calibration', 'search', 'validation', 'test')
SHARES = (0.05, 0.75, 0.10, 0.10)
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
    if len(shares) != len(PARTS) or abs(sum(shares) - 1.0) > 1e-9 or min(shares) <= 0:
        raise ValueError(f'shares {tuple(shares)} must be {len(PARTS)} positive numbers summing to 1')
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
