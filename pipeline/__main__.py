import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ start-up chatter, not errors

from pipeline.cli import cli  # noqa: E402

cli(prog_name="python -m pipeline")
