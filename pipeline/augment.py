"""Random augmentation as Keras layers at the front of the model: active in fit, identity in predict.

The layers are Keras' own, so the logged model still loads without this package and predicts
exactly as the same model without them (tests/test_accuracy.py checks both).

- cells: a blood smear has no up, down, left or right: flips both ways, rotation by any angle
  (which includes the 90-degree turns; Keras has no layer for those alone, and a custom one
  would make the logged model need custom code to load), shifts of up to 15% each way (a third of
  the validation errors of the 112 px recipe were cells near or cut by the edge of their crop),
  zoom and contrast within 10% and 20%.
- xray: a chest X-ray has a left and a right (the heart is on one side), so no flips: rotation
  within 10 degrees, zoom and contrast within 10%.

Geometric layers fill the corners they uncover by reflecting the image.
"""

import keras


def augmentation(kind: str, seed: int) -> keras.Sequential | None:
    """The "augment" block for kind (none: None), its random layers seeded from seed."""
    if kind == "none":
        return None
    layers = {
        "cells": lambda s: [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=s),
            keras.layers.RandomRotation(0.5, fill_mode="reflect", seed=s + 1),
            keras.layers.RandomTranslation(0.15, 0.15, fill_mode="reflect", seed=s + 4),
            keras.layers.RandomZoom((-0.1, 0.1), fill_mode="reflect", seed=s + 2),
            keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=s + 3),
        ],
        "xray": lambda s: [
            keras.layers.RandomRotation(10 / 360, fill_mode="reflect", seed=s + 1),
            keras.layers.RandomZoom((-0.1, 0.1), fill_mode="reflect", seed=s + 2),
            keras.layers.RandomContrast(0.1, value_range=(0, 255), seed=s + 3),
        ],
    }[kind](seed)
    return keras.Sequential(layers, name="augment")
