"""Writes that cannot happen: a full disk, a read-only folder or tracking store, as one line.

The tracking store and the artifact folders are MLflow's; when the disk under them is full or
they cannot be written, MLflow and the OS raise deep inside a step. write_error turns such an
exception into the line the CLI prints: which folder, what is wrong, how much space is free
(and needed, when known), what to do. The step's run has already ended FAILED by then (MLflow
ends a run FAILED when its `with` block raises), as long as the store itself can be written.
"""

import contextlib
import errno
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import PipelineError, cache_folder

FULL = {errno.ENOSPC, errno.EDQUOT}
DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
# What sqlite (through SQLAlchemy and MLflow) says when its file cannot be written.
SQLITE_FULL = ("database or disk is full",)
SQLITE_DENIED = ("readonly database", "unable to open database file")
SQLITE_DAMAGED = ("database disk image is malformed", "file is not a database")


def write_error(exc: BaseException) -> str | None:
    """The one-line message for an exception caused by a write that failed for lack of space or
    permission, or by a damaged sqlite tracking store; None for any other exception.

    The folder is named from the error when it says (a permission error names its file; a full
    disk often does not, or names the source of a copy), else it is the fullest, or the first
    read-only, of the folders a step writes to: the tracking store's, the last run's artifacts',
    the temporary folder and the feature cache."""
    for e in _chain(exc):
        text = str(e)
        if damage := next((s for s in SQLITE_DAMAGED if s in text), None):
            import mlflow

            return (f"the tracking store {mlflow.get_tracking_uri()} is damaged ({damage}): restore it from a "
                    "backup, or point MLFLOW_TRACKING_URI elsewhere")
        if isinstance(e, OSError) and e.errno in FULL or any(s in text for s in SQLITE_FULL):
            what, folder = min(_folders().items(), key=lambda item: _free_bytes(item[1]))
            return (f"no space left on the disk of {what} {folder} ({_mb(_free_bytes(folder))} free): free space "
                    "there, or point MLFLOW_TRACKING_URI (or the cache folder) elsewhere")
        if isinstance(e, OSError) and e.errno in DENIED or any(s in text for s in SQLITE_DENIED):
            detail = e.strerror if isinstance(e, OSError) else next(s for s in SQLITE_DENIED if s in text)
            verb = "write or read" if isinstance(e, OSError) and e.errno != errno.EROFS else "write"
            if isinstance(e, OSError) and e.filename:
                what, folder = "", Path(os.fsdecode(e.filename)).parent
            else:
                unwritable = {k: v for k, v in _folders().items() if not os.access(_existing(v), os.W_OK)}
                what, folder = next(iter(unwritable.items() or _folders().items()))
            return (f"cannot {verb} {what + ' ' if what else ''}{folder} ({detail}): make it writable, or point "
                    "MLFLOW_TRACKING_URI (or the cache folder) elsewhere")
    return None


def _folders() -> dict[str, Path]:
    """The folders a step writes to, by what they hold."""
    import tempfile

    import mlflow

    folders = {"the tracking store in": _store_folder()}
    with contextlib.suppress(Exception):
        run = mlflow.last_active_run()
        if run is not None and (artifacts := local_folder(run.info.artifact_uri)) is not None:
            folders["the run's artifacts in"] = artifacts
    folders["the temporary folder"] = Path(tempfile.gettempdir())
    if "pipeline.features" in sys.modules:
        folders["the feature cache"] = cache_folder()
    return folders


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(_existing(folder)).free
    except OSError:
        return 2**63


def check_store() -> None:
    """Fail in one line, before any run starts, if the tracking store is a sqlite file that cannot
    be written (read-only disk or file, immutable file); MLflow would fail at its first write."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):].split("?")[0])
    target = path if path.exists() else _existing(path.parent)
    if not os.access(target, os.W_OK) or (path.exists() and not os.access(path.parent, os.W_OK)):
        raise PipelineError(f"cannot write the tracking store {uri} ({target} is read-only): make it writable, "
                            "or point MLFLOW_TRACKING_URI elsewhere")


def quiet_store_errors() -> None:
    """MLflow's sqlite store logs every database error with a traceback before raising it; the
    error still reaches the CLI, which prints it as one line (write_error)."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def ensure_space(folder: str | Path, needed: int, what: str) -> None:
    """Fail in one line, before writing, if folder's disk has less than needed bytes free."""
    folder = _existing(Path(folder))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PipelineError(f"no space for {what} in {folder}: {_mb(needed)} needed, {_mb(free)} free; "
                            "free space there or point the artifacts elsewhere (MLFLOW_TRACKING_URI)")


def local_folder(uri: str) -> Path | None:
    """The local folder of a file:// or plain-path URI (an artifact location), else None."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path)
    return None


def _store_folder() -> Path:
    """The folder of the tracking store: a sqlite file's, else the working folder."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else urlparse(uri).path
    return Path(path or ".").resolve().parent if path else Path.cwd()


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"
