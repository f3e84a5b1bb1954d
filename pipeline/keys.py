"""Class names as MLflow keys: the one place where a class name becomes part of a metric key or
an artifact path.

Class names stay verbatim everywhere else (manifest, model metadata, predictions, reports).
MLflow keys take ASCII letters, digits, `_ - . /` and spaces, up to 250 characters, and no
`.`/`..` path segments. A class name that is already such a key (no slash, no leading dot or
space, at most MAX_VERBATIM characters) is its own key; any other becomes its ASCII
transliteration with the remaining characters as `_`, plus `-` and a hash of the name, so that
two names never share a key: `Zelltyp (größer)?` -> `Zelltyp_groer-c442b0`.
"""

import hashlib
import re
import unicodedata

SAFE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-. ]*")
MAX_VERBATIM = 100


def class_keys(names) -> dict[str, str]:
    """{class name: its key}, the keys valid for MLflow and unique among names."""
    keys = {name: _key(name) for name in names}
    if len(set(keys.values())) < len(keys):  # a verbatim name equal to another's mapped key
        keys = {name: _mapped(name, 16) for name in names}
    return keys


def _key(name: str) -> str:
    verbatim = SAFE.fullmatch(name) and not name.endswith(" ") and len(name) <= MAX_VERBATIM
    return name if verbatim else _mapped(name, 6)


def _mapped(name: str, digits: int) -> str:
    ascii_ = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    readable = re.sub(r"[^A-Za-z0-9_\-.]+", "_", ascii_).strip("._")[:MAX_VERBATIM] or "class"
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:digits]
    return f"{readable}-{digest}"
