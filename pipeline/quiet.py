"""Quiet by default: lines that look like failures and are not stay off the console.

TensorFlow's C++ side logs through absl before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does
not stop its notices (oneDNN, `E0000 ... NodeDef ... use_unbounded_threadpool`, tf.data's
`FAILED_PRECONDITION` at the end of a generator); they are filtered out of the process's stderr
file descriptor instead, which also covers the trial processes it starts. Real errors (any other
`E` or `F` line, Python tracebacks, the pipeline's own `Error: ...`) pass through.
"""

import atexit
import logging
import os
import re
import threading

# absl's C++ log format: severity, date, time, thread, file:line]
CPP_LOG = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^ ]+:\d+\] ")
NOISE = (rb"All log messages before absl::InitializeLog()", rb"use_unbounded_threadpool", rb"FAILED_PRECONDITION",
         rb"oneDNN supports DT_HALF", rb"retracing")


def quiet() -> None:
    """Silence TensorFlow, absl and MLflow chatter; call before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating a new experiment", DB migrations
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # "... triggered tf.function retracing"
    logging.getLogger("absl").setLevel(logging.ERROR)
    _filter_stderr()


def noise(line: bytes) -> bool:
    """A C++ log line that is not an error, or an error known to be harmless."""
    match = CPP_LOG.match(line)
    if match and match.group(1) in (b"I", b"W"):
        return True
    return any(n in line for n in NOISE) and not line.startswith(b"Error:")


def _filter_stderr() -> None:
    """Route file descriptor 2 through a pipe whose reader drops the noise lines."""
    if os.environ.get("PIPELINE_STDERR_FILTERED") == str(os.getpid()):
        return
    os.environ["PIPELINE_STDERR_FILTERED"] = str(os.getpid())
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward():
        rest = b""
        while chunk := os.read(read, 65536):
            *lines, rest = (rest + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not noise(line))
            if kept:
                os.write(original, kept)
        if rest and not noise(rest):
            os.write(original, rest)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        os.dup2(original, 2)  # closes the pipe's last write end of this process: the reader drains and ends
        thread.join(timeout=5)

    atexit.register(restore)
