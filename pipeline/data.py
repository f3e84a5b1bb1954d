"""tf.data input pipelines: decode and resize images in parallel, batch, prefetch.

Images come out as float32 RGB in [0, 255] of image_size x image_size, whatever the file held
(grayscale, RGBA, palette or 16-bit): the model's own first layer does ResNet50's preprocessing.
"""

import numpy as np
import pandas as pd
import tensorflow as tf

DECODING = "bilinear, antialiased past 2x, JPEG DCT scaling"  # in the feature cache's key: a change here
# changes every image the backbone sees


def load_image(path, image_size: int):
    """One image file -> float32 (image_size, image_size, 3) RGB tensor in [0, 255]."""
    return decode_image(tf.io.read_file(path), image_size)


def decode_image(contents, image_size: int):
    """An image file's bytes (JPEG, PNG, BMP or GIF) -> float32 (image_size, image_size, 3) RGB in
    [0, 255]: what training sees, and what the served model decodes requests with.

    Bilinear resizing, as Keras' image_dataset_from_directory does; antialiased only when an image
    shrinks more than twice (where plain bilinear would alias), since antialiasing cost 3.6x the
    JPEG decode itself (benchmarks/extraction.py: 472 vs 1,704 images/s for 320x240 JPEGs on 2
    cores). A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when its
    shorter side stays at least image_size, which is cheaper than decoding it whole."""
    image = tf.cond(tf.io.is_jpeg(contents), lambda: _decode_jpeg(contents, image_size),
                    lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False))
    image.set_shape([None, None, 3])
    size = [image_size, image_size]
    shrinks = tf.reduce_max(tf.shape(image)[:2]) > 2 * image_size
    return tf.cond(shrinks, lambda: tf.image.resize(image, size, antialias=True), lambda: tf.image.resize(image, size))


def _decode_jpeg(contents, image_size: int):
    """A JPEG at the smallest of 1, 1/2, 1/4, 1/8 scale whose shorter side is still image_size or more."""
    shorter = tf.reduce_min(tf.image.extract_jpeg_shape(contents)[:2])
    halvings = tf.reduce_sum(tf.cast(shorter // [2, 4, 8] >= image_size, tf.int32))
    return tf.switch_case(halvings, [lambda r=r: tf.io.decode_jpeg(contents, channels=3, ratio=r) for r in (1, 2, 4, 8)])


def make_dataset(rows: pd.DataFrame, image_size: int, batch_size: int, shuffle_seed: int | None = None,
                 drop_remainder: bool = False):
    """(image, label_index) batches of rows from PreparedData.split; shuffled each epoch if seeded;
    without a last, smaller batch if drop_remainder."""
    ds = tf.data.Dataset.from_tensor_slices((rows["path"].to_numpy(str), rows["label_index"].to_numpy(np.int32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(rows), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y: (load_image(p, image_size), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def load_images(paths, image_size: int) -> np.ndarray:
    """Eagerly load a few image files into one (n, image_size, image_size, 3) float32 array."""
    return np.stack([load_image(str(p), image_size).numpy() for p in paths])
