"""Benchmark: images/s per CPU core of the tf.data input pipelines (ImageNet train and eval, CIFAR).

Writes ImageNet-like JPEGs (sizes drawn around ImageNet's mean of about 400x350 with its
spread, quality 90, 4:2:0 chroma, content tuned to ImageNet's ~110 KB per image) into
the two archives ImageNet ships, and CIFAR-10 records in the official binary layout;
the genuine tfds builders turn them into the prepared folders the pipeline reads.
Nothing is downloaded. Then it runs `input_pipeline.train_iterator` /
`eval_iterator` exactly as a search does, with the pipeline limited to `--threads`
cores, and reports per pipeline:

  * images/s (wall clock) and images per CPU-second of this process (all threads: the
    decode, the augmentation and the batching; steadier on a busy machine);
  * per core = images per CPU-second, and the cores needed to feed `--target` images/s.

Prints one JSON document to stdout and a table to stderr. Run from the repository root::

    python -m benchmarks.input_pipeline --threads=1 --seconds=10
    python -m benchmarks.input_pipeline --quick          # a few seconds: smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

if __package__ in (None, ''):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from jackpot_jax.data import input_pipeline

tfds.disable_progress_bar()

# ImageNet-1k train: mean width ~400 and height ~350 pixels, most images 500x375 or 375x500.
MEAN_SIZE, SIZE_SPREAD, MIN_SIZE, MAX_SIZE = (350, 400), (70, 90), 80, 800
JPEG_QUALITY = 90
NUM_CLASSES = 10  # classes with training images (the label space stays ImageNet's 1,000)
CIFAR_RECORDS_PER_FILE = 1000  # the official files hold 10,000 each
PIPELINES = ('imagenet_train', 'imagenet_eval', 'cifar10_train', 'cifar10_eval')


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--train_images', type=int, default=512, help='ImageNet training JPEGs')
    p.add_argument('--eval_images', type=int, default=256, help='ImageNet validation JPEGs')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--threads', type=int, default=1, help='cores the pipeline may use (0: all)')
    p.add_argument('--seconds', type=float, default=8.0, help='timed seconds per pipeline')
    p.add_argument('--target', type=float, default=3000.0, help='images/s an accelerator eats')
    p.add_argument('--pipelines', default=','.join(PIPELINES), help='comma-separated subset')
    p.add_argument('--data_dir', default='', help='keep the prepared data here (default: temp)')
    p.add_argument('--quick', action='store_true', help='tiny sizes and 1 s per pipeline')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output', default='', help='also write the JSON to this file')
    args = p.parse_args(argv)
    if args.quick:
        args.train_images, args.eval_images, args.batch_size = 16, 8, 4
        args.seconds = min(args.seconds, 1.0)
    unknown = set(args.pipelines.split(',')) - set(PIPELINES)
    if unknown:
        p.error(f'unknown pipelines {sorted(unknown)}; choose from {PIPELINES}')
    if min(args.train_images, args.eval_images, args.batch_size) < 1 or args.threads < 0:
        p.error('--train_images, --eval_images and --batch_size must be >= 1, --threads >= 0')
    return args


# ---------------------------------------------------------------------------
# Synthetic data in the formats the official archives use.
# ---------------------------------------------------------------------------


def image_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 2] (height, width) drawn around ImageNet's mean size with its spread."""
    sizes = rng.normal(MEAN_SIZE, SIZE_SPREAD, size=(n, 2))
    return np.clip(np.round(sizes), MIN_SIZE, MAX_SIZE).astype(np.int32)


def photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: smooth colour regions plus fine texture, so that a quality-90
    JPEG of it is about as large (and as slow to decode) as an ImageNet photo."""
    coarse = rng.uniform(0, 255, size=(max(2, height // 16), max(2, width // 16), 3))
    smooth = tf.image.resize(coarse[None], [height, width], 'bicubic')[0].numpy()
    texture = rng.normal(0, 40, size=(height, width, 1)) + rng.normal(0, 10, size=(height, width, 3))
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image, quality=JPEG_QUALITY, chroma_downsampling=True).numpy()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_imagenet_archives(manual_dir: str, num_train: int, num_eval: int, seed: int) -> dict:
    """ILSVRC2012_img_train.tar (one inner tar per synset) and ILSVRC2012_img_val.tar, as
    ImageNet distributes them; returns the JPEGs' sizes in bytes and pixels."""
    rng = np.random.default_rng(seed)
    synsets = tfds.features.ClassLabel(
        names_file=tfds.core.tfds_path('datasets/imagenet2012/labels.txt')
    ).names[:NUM_CLASSES]
    sizes = image_sizes(num_train + num_eval, rng)
    file_bytes = []
    per_class: dict[str, list[tuple[str, bytes]]] = {s: [] for s in synsets}
    for i, (h, w) in enumerate(sizes[:num_train]):
        synset = synsets[i % NUM_CLASSES]
        data = jpeg_bytes(photo_like(int(h), int(w), rng))
        file_bytes.append(len(data))
        per_class[synset].append((f'{synset}_{i}.JPEG', data))
    with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
        for synset, files in per_class.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as tar:
                for name, data in files:
                    _add(tar, name, data)
            _add(outer, f'{synset}.tar', inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as tar:
        for i, (h, w) in enumerate(sizes[num_train:]):
            data = jpeg_bytes(photo_like(int(h), int(w), rng))
            file_bytes.append(len(data))
            _add(tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', data)
    return {
        'jpeg_kb_mean': float(np.mean(file_bytes)) / 1e3,
        'height_mean': float(sizes[:, 0].mean()),
        'width_mean': float(sizes[:, 1].mean()),
        'height_range': [int(sizes[:, 0].min()), int(sizes[:, 0].max())],
        'width_range': [int(sizes[:, 1].min()), int(sizes[:, 1].max())],
        'jpeg_quality': JPEG_QUALITY,
    }


def prepare_imagenet(data_dir: str, num_train: int, num_eval: int, seed: int) -> dict:
    """The genuine imagenet2012 builder run on synthetic archives (reused if prepared)."""
    manual_dir = os.path.join(data_dir, 'manual')
    stats_file = os.path.join(manual_dir, 'jpeg_stats.json')
    builder = tfds.builder('imagenet2012', data_dir=data_dir)
    if builder.is_prepared() and os.path.exists(stats_file):
        with open(stats_file) as f:
            return json.load(f)
    os.makedirs(manual_dir, exist_ok=True)
    stats = write_imagenet_archives(manual_dir, num_train, num_eval, seed)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with contextlib.redirect_stdout(sys.stderr):  # tfds reports progress on stdout
        builder.download_and_prepare(download_config=config)
    with open(stats_file, 'w') as f:
        json.dump(stats, f)
    return stats


def write_cifar10_binaries(root: str, per_file: int, seed: int) -> str:
    """cifar-10-batches-bin/ as the official archive extracts (records: label, CHW pixels)."""
    folder = os.path.join(root, 'cifar-10-batches-bin')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
    for filename in names:
        labels = rng.integers(0, 10, (per_file, 1), np.uint8)
        pixels = rng.integers(0, 256, (per_file, 3 * 32 * 32), np.uint8)
        with open(os.path.join(folder, filename), 'wb') as f:
            f.write(np.concatenate([labels, pixels], axis=1).tobytes())
    label_names = tfds.builder('cifar10').info.features['label'].names
    with open(os.path.join(folder, 'batches.meta.txt'), 'w') as f:
        f.write('\n'.join(label_names) + '\n\n')
    return root


def prepare_cifar10(data_dir: str, per_file: int, seed: int) -> None:
    """The genuine cifar10 builder; its one download call is answered with local files."""
    builder = tfds.builder('cifar10', data_dir=data_dir)
    if builder.is_prepared():
        return
    extracted = write_cifar10_binaries(os.path.join(data_dir, 'cifar_extracted'), per_file, seed)
    with mock.patch.object(
        tfds.download.DownloadManager, 'download_and_extract', return_value=extracted
    ), contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare()


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def time_pipeline(
    epoch_batches: Callable[[int], Iterator[tuple]], batch_size: int, seconds: float
) -> dict[str, float]:
    """Pulls batches, epoch after epoch, for `seconds` after the first batch of the first
    epoch (start-up and, for CIFAR, filling the in-memory cache excluded)."""
    epoch = 0
    batches = epoch_batches(epoch)
    next(batches)
    images, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        try:
            batch = next(batches)
        except StopIteration:
            epoch += 1
            batches = epoch_batches(epoch)
            continue
        images += len(batch[0])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    batches.close()  # stops the pipeline's threads now, not at interpreter exit
    return {
        'images': images,
        'seconds': wall,
        'images_per_s': images / wall,
        'images_per_cpu_s': images / cpu if cpu > 0 else float('nan'),
    }


def run(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    wanted = args.pipelines.split(',')
    result: dict[str, Any] = {'pipelines': {}}
    if any(w.startswith('imagenet') for w in wanted):
        t0 = time.perf_counter()
        result['imagenet_data'] = prepare_imagenet(
            data_dir, args.train_images, args.eval_images, args.seed
        )
        log(f'imagenet: {args.train_images}+{args.eval_images} JPEGs prepared in '
            f'{time.perf_counter() - t0:.1f} s: {result["imagenet_data"]}')
    if any(w.startswith('cifar10') for w in wanted):
        per_file = max(args.batch_size, CIFAR_RECORDS_PER_FILE // (10 if args.quick else 1))
        prepare_cifar10(data_dir, per_file, args.seed)
    common = dict(data_dir=data_dir, process_index=0, process_count=1, threads=args.threads)
    for name in wanted:
        dataset = 'imagenet2012' if name.startswith('imagenet') else 'cifar10'
        if name.endswith('_train'):
            def epoch_batches(epoch, dataset=dataset):
                return input_pipeline.train_iterator(
                    dataset, batch_size=args.batch_size, seed=args.seed, epoch=epoch, **common
                )
        else:
            def epoch_batches(epoch, dataset=dataset):
                return input_pipeline.eval_iterator(dataset, batch_size=args.batch_size, **common)
        row = time_pipeline(epoch_batches, args.batch_size, args.seconds)
        row['cores_for_target'] = args.target / row['images_per_cpu_s']
        result['pipelines'][name] = row
        log(f'{name}: {row["images_per_s"]:.0f} images/s, '
            f'{row["images_per_cpu_s"]:.0f} per CPU-second')
    return result


def format_table(result: dict[str, Any], target: float) -> str:
    lines = [
        f'| pipeline | images/s (wall) | images/s per core | cores for {target:,.0f} images/s |',
        '|---|---|---|---|',
    ]
    for name, row in result['pipelines'].items():
        lines.append(
            f'| {name} | {row["images_per_s"]:,.0f} | {row["images_per_cpu_s"]:,.0f} | '
            f'{row["cores_for_target"]:.1f} |'
        )
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Prepares the data, times the pipelines, prints the JSON (and a table) and returns it."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        result = {
            'benchmark': 'input_pipeline',
            'environment': {
                'tensorflow': tf.__version__,
                'cpu_count': os.cpu_count(),
                'python': sys.version.split()[0],
            },
            'flags': vars(args),
            **run(args, data_dir),
        }
    log(format_table(result, args.target))
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')
    return result


if __name__ == '__main__':
    main()
