"""Same seed, data and packages, same metrics on a CPU; and what a rerun needs to match.

make_deterministic seeds Python, NumPy and TensorFlow (keras.utils.set_random_seed: weight
initialisation, dropout, augmentation, shuffling) and turns on TensorFlow's op determinism
(tf.config.experimental.enable_op_determinism: fixed reduction order, deterministic tf.data).
Op determinism is process-wide, stays on, and can cost some speed; an op without a
deterministic kernel (some GPU ops) then raises instead of varying silently.
"""

import importlib
import platform

# tag name -> module whose __version__ it records
PACKAGES = {"tensorflow": "tensorflow", "keras": "keras", "mlflow": "mlflow", "numpy": "numpy",
            "scikit-learn": "sklearn"}


def make_deterministic(seed: int) -> None:
    """Seed every random generator training uses and make TensorFlow's ops deterministic."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def run_tags(seed: int, data_digest: str) -> dict[str, str]:
    """Tags for a run: seed, data_digest, version.<package> for the packages that decide the
    numbers, version.python and platform (results can differ across CPU architectures)."""
    tags = {"seed": str(seed), "data_digest": data_digest, "version.python": platform.python_version(),
            "platform": f"{platform.system()}-{platform.machine()}"}
    for name, module in PACKAGES.items():
        tags[f"version.{name}"] = importlib.import_module(module).__version__
    return tags
