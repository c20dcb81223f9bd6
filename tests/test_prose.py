"""The English corpus from the Python documentation: page text, parts, cached tokens."""

import os

import numpy as np
import pytest

from jackpot_jax.core.errors import UserError
from jackpot_jax.data import prose

PAGE = """<html><head><title>t</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><ul><li>Navigation</li></ul></div>
<div class="document"><div class="body" role="main">
<section id="a"><h1>4. More Control Flow Tools<a class="headerlink" href="#a">¶</a></h1>
<p>Besides the <a href="x"><code><span class="pre">while</span></code></a> statement,
Python uses the usual   flow control.</p>
<div class="highlight"><pre>for x in range(3):
    print(x)</pre></div>
<p>Caf&eacute; &amp; na&iuml;ve.</p></section></div></div>
<div class="footer">Copyright</div></body></html>"""


def test_page_text_keeps_the_prose_and_drops_code_navigation_and_marks():
    assert prose.html_text(PAGE) == (
        '4. More Control Flow Tools\n\n'
        'Besides the while statement, Python uses the usual flow control.\n\n'
        'Café & naïve.'
    )


def write_docs(tmp_path, n=40):
    root = tmp_path / 'html'
    for i in range(n):
        folder = root / ('tutorial' if i % 2 else 'library')
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'page{i}.html').write_text(PAGE.replace('Tools', f'Tools {i}'))
    (root / 'genindex.html').write_text(PAGE)  # generated index: not prose
    return str(root)


def test_parts_are_disjoint_stable_and_cover_every_page(tmp_path):
    docs = prose.read_documents(write_docs(tmp_path))
    assert len(docs) == 40 and 'genindex.html' not in docs
    parts = {name: prose.part_of(name) for name in docs}
    assert set(parts.values()) == set(prose.PARTS)  # 40 pages reach every part
    assert parts == {name: prose.part_of(name) for name in sorted(docs, reverse=True)}
    texts = prose.split_parts(docs)
    for name, part in parts.items():
        title = docs[name].split('\n')[0]
        assert [p for p, t in texts.items() if title + '\n' in t + '\n'] == [part]
    with pytest.raises(ValueError, match='summing to 1'):
        prose.part_of('x', (0.5, 0.5, 0.5, 0.5))


def test_tokens_are_cached_and_reused(tmp_path):
    root, cache, calls = write_docs(tmp_path), str(tmp_path / 'cache'), []

    def encode(text):
        calls.append(len(text))
        return list(text.encode())

    first = prose.tokenized_parts(encode, 'bytes', cache, root)
    assert len(calls) == 4 and all(v.dtype == np.int32 for v in first.values())
    again = prose.tokenized_parts(encode, 'bytes', cache, root)
    assert len(calls) == 4  # read from the cache
    for part in prose.PARTS:
        np.testing.assert_array_equal(first[part], again[part])
    prose.tokenized_parts(encode, 'another tokenizer', cache, root)
    assert len(calls) == 8


def test_missing_documentation_and_bad_text_files_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        prose.python_docs_root(str(tmp_path / 'nope'))
    empty, latin = tmp_path / 'empty.txt', tmp_path / 'latin.txt'
    empty.write_text('  \n')
    latin.write_bytes('café'.encode('latin-1'))
    with pytest.raises(UserError, match='is empty'):
        prose.read_text_file(str(empty))
    with pytest.raises(UserError, match='not UTF-8'):
        prose.read_text_file(str(latin))
    with pytest.raises(UserError, match='does not exist'):
        prose.read_text_file(str(tmp_path / 'missing.txt'))
    assert os.path.exists(latin)
