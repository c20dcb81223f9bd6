"""The README stays a short entry point: its commands exist, its figures and links lead
to the docs pages that hold the evidence."""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_README_LINES = 260
# A figure with a percent sign: '99.44 %', '91.97%', '10 %'.
PERCENT = re.compile(r'(?<![\w.])(\d+(?:\.\d+)?)\s?%')
LINK = re.compile(r'\]\(([^)\s]+)\)')


def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def _section(text, heading):
    return text.split(f'\n## {heading}\n', 1)[1].split('\n## ', 1)[0]


def _anchor(heading):
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def _anchors(path):
    with open(path) as f:
        lines = f.read().split('\n')
    fenced, anchors = False, set()
    for line in lines:
        if line.startswith('```'):
            fenced = not fenced
        elif not fenced and re.match(r'#{1,6} ', line):
            anchors.add(_anchor(line.lstrip('#')))
    return anchors


def _docs_text():
    text = '\n'.join(_read(os.path.relpath(p, REPO)) for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))
    return re.sub(r'(\d)\s+%', r'\1%', text)


def test_readme_is_short():
    lines = len(_read('README.md').splitlines())
    assert lines <= MAX_README_LINES, f'README.md has {lines} lines; move details to docs/'


def test_quick_start_commands_exist():
    quick = _section(_read('README.md'), 'Quick start')
    (block,) = re.findall(r'```bash\n(.*?)```', quick, re.S)
    commands = [line.split('#')[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [['bash', 'scripts/demo.sh'], ['bash', 'scripts/test.sh']]
    for _, script in commands:
        assert os.path.isfile(os.path.join(REPO, script)), script
    # The first sets up and runs the main job (the launcher's default: the embedded demo).
    assert 'jackpot_jax.main' in _read('scripts/demo.sh')
    assert 'pytest' in _read('scripts/test.sh')
    assert 'bash scripts/test.sh' in _read('.ci', 'run')  # CI runs the README's test command


def test_every_percent_figure_is_in_the_docs():
    readme, docs = _read('README.md'), _docs_text()
    figures = {m.group(1) for m in PERCENT.finditer(readme)}
    assert figures, 'no figures found: the pattern is wrong'
    missing = sorted(f for f in figures if f'{f}%' not in docs)
    assert not missing, f'README figures in no docs/*.md page: {missing}'


def test_readme_links_lead_somewhere():
    for target in LINK.findall(_read('README.md')):
        if target.startswith(('http://', 'https://')):
            continue
        path, _, anchor = target.partition('#')
        full = os.path.join(REPO, path) if path else os.path.join(REPO, 'README.md')
        assert os.path.exists(full), f'README links to missing {path}'
        if anchor:
            assert anchor in _anchors(full), f'README links to missing anchor {target}'


def test_docs_links_to_the_readme_lead_somewhere():
    readme_anchors = _anchors(os.path.join(REPO, 'README.md'))
    for page in glob.glob(os.path.join(REPO, 'docs', '*.md')):
        for target in LINK.findall(_read(os.path.relpath(page, REPO))):
            path, _, anchor = target.partition('#')
            if path == '../README.md' and anchor:
                assert anchor in readme_anchors, f'{page} links to missing README anchor {anchor}'


def test_readme_has_one_python_example():
    """docs/library.md and docs/selection.md run the README's Python block as it stands."""
    assert len(re.findall(r'^```python$', _read('README.md'), re.M)) == 1
