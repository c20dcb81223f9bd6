"""The conversion command line (``jackpot-jax-convert``): PyTorch weights and jackpots in,
and jackpot_jax weights and jackpots out, through :mod:`jackpot_jax.io.convert`.

Command line (weights land in ``OUT/pretrained``, jackpots in ``OUT/jackpot``, the
launcher's workdir layout)::

    python -m jackpot_jax.io.convert_cli torchvision --arch resnet50 --input FILE|cache --output OUT
    python -m jackpot_jax.io.convert_cli official --arch resnet32 --input FILE \\
        [--jackpot FILE --sparsity 0.9] --output OUT
    python -m jackpot_jax.io.convert_cli llama --input FILE.gguf|HF_FOLDER --output OUT
    python -m jackpot_jax.io.convert_cli to-torch --arch resnet32 --weights OUT/pretrained \\
        [--jackpot OUT/jackpot] --format torchvision|official [--masked] --output FILE \\
        [--overwrite]

An OUT that already holds weights, a jackpot or checkpoints, and a to-torch FILE that
exists, are refused unless ``--overwrite`` is given. Errors in the input end in one
line; ``--traceback`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jackpot_jax.core import errors, sparsity
from jackpot_jax.io import convert, official_releases, workdir as workdir_lib
from jackpot_jax.io.name_tables import ARCHS, FAMILIES, Arch, get_arch
from jackpot_jax.io.workdir import CHECKPOINTS_DIR, JACKPOT_DIR, PRETRAINED_DIR, TUNED_DIR

# What a workdir holds that belongs to its weights: convert refuses to write over it
# unless told to (--overwrite).
WORKDIR_CONTENTS = (PRETRAINED_DIR, JACKPOT_DIR, CHECKPOINTS_DIR, TUNED_DIR)


def weights_meta(arch: Arch, num_classes: int, source: str) -> dict[str, Any]:
    """The meta the launcher checks: model name, classes, and where the weights came from."""
    return {'model': {'name': arch.model}, 'num_classes': num_classes, 'source': source}


def _checkpoint():
    from jackpot_jax.io import checkpoint

    return checkpoint


def _torch_io():
    from jackpot_jax.io import torch_io

    return torch_io


def _weight_mismatches(a: Mapping, b: Mapping) -> list[str]:
    fa, fb = sparsity.flatten(a), sparsity.flatten(b)
    return [
        f'{p}: max |difference| {float(np.max(np.abs(np.asarray(fa[p]) - np.asarray(fb[p])))):.3g}'
        for p in sorted(fa)
        if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))
    ]


def check_output_free(output: str, overwrite: bool) -> None:
    """Raises UserError if ``output`` holds weights, a jackpot or checkpoints, unless ``overwrite``.

    With ``overwrite`` the converted weights (and jackpot) replace those there; other
    folders stay, and the launcher refuses to mix them with the new weights (fingerprints).
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise errors.UserError(f'--output {output} is a file; pass a folder (a workdir)')
    present = [n for n in WORKDIR_CONTENTS if os.path.exists(workdir_lib.path(output, n))]
    if present and not overwrite:
        raise errors.UserError(
            f'--output {output} already holds {", ".join(present)}; converting into it would '
            'replace its weights and orphan the rest: pass another --output, or --overwrite '
            'to replace them'
        )
    if present:
        print(f'note: replacing the converted parts of {output}; it also holds {present}')


def run_torchvision(arch_name: str, input_spec: str, output: str, overwrite: bool = False) -> str:
    """torchvision file / cache -> ``output/pretrained``; returns the weights path.

    Refuses an ``output`` that holds weights, a jackpot or checkpoints unless ``overwrite``.
    """
    arch = get_arch(arch_name, 'torchvision')
    check_output_free(output, overwrite)
    path = _torch_io().resolve_input(input_spec, arch_name)
    converted = convert.torch_to_flax(_torch_io().load_state_dict(path), arch, what=path)
    target = workdir_lib.pretrained_path(output)
    source = f'torchvision {arch_name} state dict {os.path.abspath(path)}'
    _checkpoint().save_weights(
        target,
        converted.params,
        converted.statistics,
        weights_meta(arch, converted.num_classes, source),
    )
    return target


def run_llama(input_path: str, output: str, overwrite: bool = False) -> str:
    """A LLaMA (GGUF file or Hugging Face folder) -> ``output/pretrained``; returns the
    weights path. The meta names the model's config and its tokenizer's file."""
    from jackpot_jax.io import llama_weights

    check_output_free(output, overwrite)
    weights = llama_weights.read_llama_weights(input_path)
    target = workdir_lib.pretrained_path(output)
    _checkpoint().save_weights(target, weights.params, {}, llama_weights.weights_meta(weights))
    return target


def run_official(
    arch_name: str,
    input_path: str,
    output: str,
    jackpot_path: str | None = None,
    sparsity_level: float | None = None,
    allocation: str = 'global_magnitude',
    overwrite: bool = False,
) -> dict[str, str]:
    """Official pre-trained (+ jackpot) files -> ``output/pretrained`` (+ ``output/jackpot``).

    Refuses an ``output`` that holds weights, a jackpot or checkpoints unless ``overwrite``.
    """
    arch = get_arch(arch_name, 'official')
    check_output_free(output, overwrite)
    io = _torch_io()
    path = io.resolve_input(input_path, None)
    dense = official_releases.official_weights_to_flax(io.load_state_dict(path), arch_name, what=path)
    written = {}
    jackpot = None
    if jackpot_path is not None:
        jpath = io.resolve_input(jackpot_path, None)
        jackpot = official_releases.official_jackpot_to_flax(
            io.load_state_dict(jpath),
            arch_name,
            sparsity_level=sparsity_level,
            allocation=allocation,
            frozen_params=dense.params,
            what=jpath,
        )
        mismatches = _weight_mismatches(dense.params, jackpot.params)
        if mismatches:
            raise convert.ConversionError(
                f'the jackpot {jpath} was searched on other weights than {path} '
                f'({len(mismatches)} differing params; the 2023 CIFAR script searched a fresh '
                'random model). To keep the jackpot with its own weights, pass the jackpot '
                'file as --input too.\n  ' + '\n  '.join(mismatches)
            )
    source = f'official {arch_name} checkpoint {os.path.abspath(path)}'
    written['weights'] = workdir_lib.pretrained_path(output)
    ckpt = _checkpoint()
    ckpt.save_weights(
        written['weights'],
        dense.params,
        dense.statistics,
        weights_meta(arch, dense.num_classes, source),
    )
    if jackpot is not None:
        removed = sum(jackpot.counts.values())
        total = sum(int(np.size(m)) for m in jackpot.masks.values())
        meta = {
            **weights_meta(
                arch,
                jackpot.num_classes,
                f'official {jackpot.format} jackpot {os.path.abspath(jpath)}',
            ),
            'format': jackpot.format,
            'counts': jackpot.counts,
            'sparsity': removed / total,
            'weights_fingerprint': ckpt.weights_fingerprint(dense.params),
        }
        if jackpot.format == '2021':
            meta.update({'requested_sparsity': sparsity_level, 'allocation': allocation})
        written['jackpot'] = workdir_lib.jackpot_path(output)
        ckpt.save_jackpot(
            written['jackpot'], jackpot.scores, jackpot.masks, jackpot.statistics, meta
        )
    return written


def _checkpoint_dir(path: str, child: str) -> str:
    """``path`` itself, or ``path/child`` when given a workdir."""
    nested = os.path.join(path, child)
    return nested if os.path.isdir(nested) else path


def run_to_torch(
    arch_name: str,
    weights: str,
    output: str,
    family: str = 'torchvision',
    jackpot: str | None = None,
    masked: bool = False,
    mask_format: str | None = None,
    overwrite: bool = False,
) -> str:
    """jackpot_jax weights (+ jackpot) -> a torch state dict file (.pth/.pt/.safetensors).

    Refuses an ``output`` that exists unless ``overwrite``; the file is replaced only once
    its successor is complete.
    """
    arch = get_arch(arch_name, family)
    if not output.endswith(convert.TORCH_SUFFIXES):
        raise errors.UserError(
            f'--output {output}: the file name must end in {", ".join(convert.TORCH_SUFFIXES)} '
            '(.safetensors writes a safetensors file, the others torch.save)'
        )
    if os.path.isdir(output):
        raise errors.UserError(f'--output {output} is a folder; pass a file name')
    if os.path.exists(output) and not overwrite:
        raise errors.UserError(
            f'--output {output} already exists; pass another --output, or --overwrite to '
            'replace it'
        )
    if mask_format is None:
        mask_format = '2023' if family == 'official' and jackpot is not None else 'none'
    if jackpot is not None and family == 'torchvision' and not masked:
        raise ValueError(
            'a torchvision state dict has no place for masks: pass --masked to write W * B'
        )
    ckpt = _checkpoint()
    params, statistics, meta = ckpt.load_weights(_checkpoint_dir(weights, PRETRAINED_DIR))
    saved = meta.get('model', {}).get('name')
    if saved != arch.model:
        raise ValueError(f'the weights at {weights} are for model {saved!r}, not {arch.model!r}')
    scores = masks = None
    if jackpot is not None:
        scores, masks, statistics, _ = ckpt.read_jackpot_bundle(_checkpoint_dir(jackpot, JACKPOT_DIR))
        if scores is None and mask_format != 'none':
            # A jackpot saved without scores: 1.0 kept / 0.0 pruned ranks to the same masks.
            print('note: the jackpot has no scores; writing the binary masks as .mask scores')
            scores = {p: np.asarray(m, np.float32) for p, m in masks.items()}
    state = convert.flax_to_torch(
        params,
        statistics,
        arch,
        masks=masks,
        scores=scores,
        masked=masked,
        mask_format=mask_format,
    )
    _torch_io().save_state_dict(state, output, wrap=family == 'official')
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='jackpot-jax-convert', description=__doc__.split('\n')[0]
    )
    sub = parser.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--traceback', action='store_true', help=errors.TRACEBACK_HELP)
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument(
        '--overwrite',
        action='store_true',
        help='write into an OUTPUT that already holds weights, a jackpot or checkpoints',
    )
    tv = sub.add_parser(
        'torchvision', help='torchvision weights -> OUTPUT/pretrained', parents=[common, overwrite]
    )
    tv.add_argument('--arch', required=True, choices=sorted(ARCHS['torchvision']))
    tv.add_argument(
        '--input',
        required=True,
        help="a .pth/.pt/.safetensors file, or 'cache' for $TORCH_HOME/hub/checkpoints",
    )
    tv.add_argument('--output', required=True, help='a workdir; weights go to OUTPUT/pretrained')
    llama = sub.add_parser(
        'llama',
        help='a LLaMA (GGUF file or Hugging Face folder) -> OUTPUT/pretrained',
        parents=[common, overwrite],
    )
    llama.add_argument('--input', required=True, help='a .gguf file or a config.json folder')
    llama.add_argument('--output', required=True, help='a workdir; weights go to OUTPUT/pretrained')
    off = sub.add_parser(
        'official',
        help='official checkpoints (+ jackpot) -> OUTPUT/{pretrained,jackpot}',
        parents=[common, overwrite],
    )
    off.add_argument('--arch', required=True, choices=sorted(ARCHS['official']))
    off.add_argument('--input', required=True, help='pre-trained {"state_dict": ...} file')
    off.add_argument('--jackpot', help='a found jackpot (2021 or 2023 format)')
    off.add_argument('--sparsity', type=float, help='sparsity of a 2021 jackpot (no b_mask)')
    off.add_argument('--allocation', default='global_magnitude', choices=sparsity.ALLOCATIONS)
    off.add_argument('--output', required=True, help='a workdir for the launcher')
    out = sub.add_parser(
        'to-torch', help='jackpot_jax weights (+ jackpot) -> a torch state dict', parents=[common]
    )
    out.add_argument('--arch', required=True)
    out.add_argument('--weights', required=True, help='weights checkpoint (or a workdir)')
    out.add_argument('--jackpot', help='jackpot checkpoint (or a workdir)')
    out.add_argument('--format', default='torchvision', choices=FAMILIES)
    out.add_argument('--masked', action='store_true', help='write W * B')
    out.add_argument(
        '--mask_format', choices=convert.MASK_FORMATS, help='official only; default 2023 with a jackpot'
    )
    out.add_argument('--output', required=True, help='.pth, .pt or .safetensors file')
    out.add_argument('--overwrite', action='store_true', help='replace an existing OUTPUT file')
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == 'torchvision':
        print(f'wrote {run_torchvision(args.arch, args.input, args.output, args.overwrite)}')
    elif args.command == 'llama':
        print(f'wrote {run_llama(args.input, args.output, args.overwrite)}')
    elif args.command == 'official':
        written = run_official(
            args.arch,
            args.input,
            args.output,
            args.jackpot,
            args.sparsity,
            args.allocation,
            args.overwrite,
        )
        for what, path in written.items():
            print(f'wrote {what}: {path}')
    else:
        path = run_to_torch(
            args.arch,
            args.weights,
            args.output,
            args.format,
            args.jackpot,
            args.masked,
            args.mask_format,
            args.overwrite,
        )
        print(f'wrote {path}')


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (a user error prints one line)."""
    args = _parser().parse_args(argv)
    return errors.report_user_errors(_run, args, traceback=args.traceback)


if __name__ == '__main__':
    sys.exit(main())
