"""Image preprocessing for the tf.data pipelines: pure TF functions, one example at a time.

They reproduce the reference's torchvision transforms: CIFAR's pad-crop-flip, ImageNet's
random-resized crop (``RandomResizedCrop.get_params``' draws and fallback), resize of
the shorter side to 256 and centre crop 224, both antialiased bilinear as PIL resizes,
and the per-channel normalisation; :class:`ImageTransform` is the configurable resize,
crop and flip of any other tfds dataset (``data.name='tfds:NAME'``). Randomness is
stateless, from a ``[2]`` int seed, so the same seed gives the same pixels on every run
and after every resume. The ``augment_*`` functions stop before the normalisation, which
the pipeline applies to whole batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """uint8 (or 0..255 float) HWC image -> float32 scaled to [0, 1], then (x - mean) / std."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def augment_cifar_train(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Zero-pad 4, random 32x32 crop, random horizontal flip (uint8 stays uint8)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])  # black pixels, like torchvision fill=0
    image = tf.image.stateless_random_crop(padded, [32, 32, 3], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def preprocess_cifar_train(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Zero-pad 4, random 32x32 crop, random horizontal flip, normalise."""
    return normalize(augment_cifar_train(image, seed), CIFAR_MEAN, CIFAR_STD)


def preprocess_cifar_eval(image: tf.Tensor) -> tf.Tensor:
    """Normalise only."""
    return normalize(image, CIFAR_MEAN, CIFAR_STD)


def random_resized_crop_window(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params picks them.

    Up to `attempts` (area, log-uniform aspect) draws; the first that fits wins. If none
    fits, fall back to the largest centred crop whose aspect lies within `ratio`.
    """
    area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = h_f * w_f
    target = area * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform(
        [attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1])
    )
    aspect = tf.exp(log_ratio)
    ws = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)  # round half to even, as Python
    hs = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(fits)

    in_ratio = w_f / h_f
    fb_w = tf.where(
        in_ratio < ratio[0],
        width,
        tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width),
    )
    fb_h = tf.where(
        in_ratio < ratio[0],
        tf.cast(tf.round(w_f / ratio[0]), tf.int32),
        height,
    )
    h = tf.where(found, hs[first], fb_h)
    w = tf.where(found, ws[first], fb_w)
    # torch.randint(0, H - h + 1): uniform over [0, H - h].
    rand_top = tf.random.stateless_uniform([], top_seed, 0, height - h + 1, dtype=tf.int32)
    rand_left = tf.random.stateless_uniform([], left_seed, 0, width - w + 1, dtype=tf.int32)
    top = tf.where(found, rand_top, (height - h) // 2)
    left = tf.where(found, rand_left, (width - w) // 2)
    return top, left, h, w


def _decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
    """Any tfds-encoded image (JPEG/PNG) -> uint8 HWC with 3 channels."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _crop_decoded(image_bytes: tf.Tensor, window: Any) -> tf.Tensor:
    top, left, h, w = window
    return tf.image.crop_to_bounding_box(_decode_rgb(image_bytes), top, left, h, w)


def _resize(image: tf.Tensor, size: Any) -> tf.Tensor:
    """Bilinear resize, antialiased as PIL's is; the antialiasing kernel only differs from
    plain bilinear where a side shrinks, so the cheaper plain kernel serves pure upscales."""
    shape = tf.shape(image)
    shrinks = (shape[0] > size[0]) | (shape[1] > size[1])
    return tf.cond(
        shrinks,
        lambda: tf.image.resize(image, size, 'bilinear', antialias=True),
        lambda: tf.image.resize(image, size, 'bilinear', antialias=False),
    )


def augment_imagenet_train(image_bytes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Encoded image -> random-resized-crop 224 (bilinear, antialiased) and flip; float32
    pixels in [0, 255], not yet normalised. A JPEG is decoded only inside the crop window,
    and the flip acts on the crop before the resize (they commute; the crop is smaller)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    is_jpeg = tf.io.is_jpeg(image_bytes)
    shape = tf.cond(
        is_jpeg,
        lambda: tf.image.extract_jpeg_shape(image_bytes, output_type=tf.int32),
        lambda: tf.shape(_decode_rgb(image_bytes), out_type=tf.int32),
    )
    window = random_resized_crop_window(shape[0], shape[1], crop_seed)
    top, left, h, w = window
    image = tf.cond(
        is_jpeg,  # decode only the crop window of a JPEG: much cheaper
        lambda: tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([top, left, h, w]), channels=3),
        lambda: _crop_decoded(image_bytes, window),
    )
    image.set_shape([None, None, 3])
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = _resize(image, [IMAGENET_SIZE, IMAGENET_SIZE])
    image.set_shape([IMAGENET_SIZE, IMAGENET_SIZE, 3])
    return image


def preprocess_imagenet_train(image_bytes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Encoded image -> random-resized-crop 224 (bilinear, antialiased), flip, normalise."""
    return normalize(augment_imagenet_train(image_bytes, seed), IMAGENET_MEAN, IMAGENET_STD)


def resize_shorter_side(image: tf.Tensor, size: int = IMAGENET_RESIZE) -> tf.Tensor:
    """Bilinear (antialiased) resize so the shorter side is `size`; the longer one is
    floor(size * long / short), as torchvision's Resize(int) computes it."""
    shape = tf.shape(image, out_type=tf.int64)
    h, w = shape[0], shape[1]
    new_h = tf.where(h <= w, tf.constant(size, tf.int64), size * h // w)
    new_w = tf.where(h <= w, size * w // h, tf.constant(size, tf.int64))
    size_hw = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    return _resize(image, size_hw)


def center_crop(image: tf.Tensor, size: int = IMAGENET_SIZE) -> tf.Tensor:
    """Centre `size` x `size` crop; offsets rounded as torchvision's CenterCrop does."""
    shape = tf.shape(image, out_type=tf.int32)
    top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def augment_imagenet_eval(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded image -> resize shorter side to 256, centre crop 224 (float32, not normalised)."""
    image = center_crop(resize_shorter_side(_decode_rgb(image_bytes)))
    image.set_shape([IMAGENET_SIZE, IMAGENET_SIZE, 3])
    return image


def preprocess_imagenet_eval(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded image -> resize shorter side to 256, centre crop 224, normalise."""
    return normalize(augment_imagenet_eval(image_bytes), IMAGENET_MEAN, IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """Preprocessing of a 'tfds:NAME' dataset, from the config's ``data.*`` fields.

    With ``resize`` > 0 the shorter side is resized to it first, then an ``image_size``
    square is cropped: at random in training, in the centre for evaluation. With
    ``resize`` 0 images are resized straight to ``image_size`` (unless they have that size
    already). Training adds random horizontal flips when ``random_flip``. Pixels are
    scaled to [0, 1], then normalised per channel with ``mean`` and ``std``.
    """

    image_size: tuple[int, int]  # (height, width) of the model input
    channels: int
    resize: int
    random_flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_size: tuple[int | None, int | None]  # the dataset's own (height, width)

    def _sized(self, image: tf.Tensor, crop_seed: tf.Tensor | None) -> tf.Tensor:
        height, width = self.image_size
        image = tf.cast(image, tf.float32)
        if self.resize:
            image = resize_shorter_side(image, self.resize)
            if crop_seed is None:
                top = (tf.shape(image)[0] - height) // 2
                left = (tf.shape(image)[1] - width) // 2
                image = tf.image.crop_to_bounding_box(image, top, left, height, width)
            else:
                image = tf.image.stateless_random_crop(
                    image, [height, width, self.channels], seed=crop_seed
                )
        elif tuple(self.native_size) != (height, width):
            image = tf.image.resize(image, [height, width], 'bilinear', antialias=True)
        image.set_shape([height, width, self.channels])
        return image

    def augment(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Training crop/resize and flip, not yet normalised (pixels in [0, 255])."""
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = self._sized(image, crop_seed)
        if self.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return image

    def train(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        return normalize(self.augment(image, seed), self.mean, self.std)

    def eval(self, image: tf.Tensor) -> tf.Tensor:
        return normalize(self._sized(image, None), self.mean, self.std)
