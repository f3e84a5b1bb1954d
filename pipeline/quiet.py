"""Quiet by default: lines that look like failures and are not stay off the console.

TensorFlow's C++ side logs through absl before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does
not stop its notices (oneDNN, `E0000 ... NodeDef ... use_unbounded_threadpool`, tf.data's
`FAILED_PRECONDITION` at the end of a generator); they are filtered out of the process's stderr
file descriptor instead, which also covers the trial processes it starts. Real errors (any other
`E` or `F` line, Python tracebacks, the pipeline's own `Error: ...`) pass through.
"""

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
import warnings

# absl's C++ log format: severity, date, time, thread, file:line]
CPP_LOG = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^ ]+:\d+\] ")
NOISE = (rb"All log messages before absl::InitializeLog()", rb"use_unbounded_threadpool", rb"FAILED_PRECONDITION",
         rb"oneDNN supports DT_HALF", rb"retracing")
END = b"\0pipeline: end of the filtered stderr"  # the last line restore() sends through the filter


def quiet() -> None:
    """Silence TensorFlow, absl and MLflow chatter; call before TensorFlow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating a new experiment", DB migrations
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # "... triggered tf.function retracing"
    logging.getLogger("absl").setLevel(logging.ERROR)
    # What the pipeline does on purpose (a Python object as python_model, predict without type
    # hints) and what a small study gives Optuna's importance and plots: warnings, not errors.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(optuna|mlflow)\.")
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
    os.dup2(write, 2)  # write stays open (not inherited): restore's end line goes into this pipe

    drained = threading.Event()

    def forward():
        rest = b""
        while chunk := os.read(read, 65536):
            *lines, rest = (rest + chunk).split(b"\n")
            ended = any(END in line for line in lines)
            lines = [line.replace(END, b"") for line in lines if line != END]
            kept = b"".join(line + b"\n" for line in lines if not noise(line))
            if kept:
                os.write(original, kept)
            if ended:
                drained.set()
        if rest and not noise(rest):
            os.write(original, rest)

    threading.Thread(target=forward, name="stderr-filter", daemon=True).start()

    def restore():
        """Forward what this process wrote, then write to the console directly. Not by closing
        the pipe and waiting for the reader's end of file: the processes this one started
        (multiprocessing's resource tracker and forkserver) hold the pipe until after it exits."""
        with contextlib.suppress(OSError, ValueError):  # stderr closed
            sys.stderr.flush()
        os.write(write, END + b"\n")  # after what this process wrote, in the pipe's order
        drained.wait(timeout=5)
        with contextlib.suppress(OSError):
            if os.fstat(2).st_ino == os.fstat(write).st_ino:  # not if another has redirected it since (pytest)
                os.dup2(original, 2)

    atexit.register(restore)
