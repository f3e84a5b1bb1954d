"""tf.data input pipelines: decode and resize images in parallel, batch, prefetch.

Images come out as float32 RGB in [0, 255] of image_size x image_size, whatever the file held
(grayscale, RGBA, palette or 16-bit): the model's own first layer does ResNet50's preprocessing.
"""

import numpy as np
import pandas as pd
import tensorflow as tf


def load_image(path, image_size: int):
    """One image file -> float32 (image_size, image_size, 3) RGB tensor in [0, 255]."""
    return decode_image(tf.io.read_file(path), image_size)


def decode_image(contents, image_size: int):
    """An image file's bytes (JPEG, PNG, BMP or GIF) -> float32 (image_size, image_size, 3) RGB in
    [0, 255]: what training sees, and what the served model decodes requests with."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, [image_size, image_size], antialias=True)


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
