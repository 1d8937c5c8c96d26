"""Safe loading of gene dictionaries (Geneformer's token, gene-median and gene-mapping files).

Geneformer ships its dictionaries as Python pickles. Unpickling runs code named
by the file, so a pickle from an untrusted source must never reach `pickle.load`.
Here a `.pkl` / `.pickle` file goes through `RestrictedUnpickler`, which builds
only plain containers and numbers: the builtins dict, list, str, int and float,
plus numpy numeric scalars (np.float64 / np.int64 ..., which Geneformer's median
dictionary may hold) rebuilt from their raw bytes by code in this module - numpy's
own constructors are never called. Any other global in the file (a class, a
function such as os.system) stops the load with an InputError naming the file.

JSON (an object) and two-column TSV/CSV files (key, value; `#` comments and a
header line allowed; .gz accepted) hold the same dictionaries without pickle.
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import json
import math
import pickle
import re
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InputError

Kind = Literal["token", "median", "mapping"]

ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)

_BUILTINS = {"dict", "list", "str", "int", "float"}
_NUMERIC_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _DType:
    """Stand-in for a pickled numpy dtype: a numeric type code and its byte order only."""

    def __init__(self, code: str, align: bool = False, copy: bool = False):
        if code not in _NUMERIC_DTYPES:
            raise pickle.UnpicklingError(f"dtype '{code}' is not a plain numeric type")
        self.code = code
        self.order = "<"

    def __setstate__(self, state) -> None:  # pickle's BUILD on a dtype passes (version, byteorder, ...)
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = "<" if state[1] in ("|", "=") else state[1]


def _scalar(dtype: _DType, data: bytes) -> float | int | bool:
    if not isinstance(dtype, _DType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar with a non-numeric payload")
    dt = np.dtype(dtype.code).newbyteorder(dtype.order)
    if len(data) != dt.itemsize:
        raise pickle.UnpicklingError("numpy scalar with a wrong payload size")
    return np.frombuffer(data, dtype=dt)[0].item()


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode only with latin1 text")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves no global except plain builtins and numeric numpy scalars."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if (module, name) in _NUMPY_SCALAR:
            return _scalar
        if (module, name) == ("numpy", "dtype"):
            return _DType
        if (module, name) == ("_codecs", "encode"):
            return _encode
        raise pickle.UnpicklingError(f"forbidden global '{module}.{name}' (only dict/list/str/int/float "
                                     "and numeric numpy scalars are allowed)")


def safe_unpickle(path: str | Path) -> object:
    """Read a pickle file with `RestrictedUnpickler` (never plain pickle.load)."""
    try:
        with _open_binary(Path(path)) as f:
            return RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError) as e:
        raise InputError(path, None, f"refused or unreadable pickle ({e}); give the dictionary as JSON or "
                         "TSV instead, or a pickle holding only a plain dict") from None


def load_dictionary(path: str | Path | None, kind: Kind, flag: str) -> dict:
    """Load one of Geneformer's dictionaries from .pkl/.pickle (restricted), .json or .tsv/.csv/.txt.

    kind: 'token'   Ensembl id (or <pad>/<mask>/<cls>/<eos>) -> int token id
          'median'  Ensembl id -> non-zero median expression (float > 0)
          'mapping' gene symbol or Ensembl id -> Ensembl id
    `flag` names the command-line option in error messages.
    """
    if path is None or str(path) == "":
        raise InputError(flag, None, "is required for this source model (the file is not downloaded at run time)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(p, None, f"{flag}: no such file")
    suffixes = [s.lower() for s in p.suffixes]
    base = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if base in (".pkl", ".pickle"):
        raw = safe_unpickle(p)
    elif base == ".json":
        try:
            with _open_text(p) as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(p, None, f"{flag}: not valid JSON ({e})") from None
    elif base in (".tsv", ".txt", ".csv", ".tab"):
        raw = _read_table(p, kind, sep="," if base == ".csv" else "\t")
    else:
        raise InputError(p, None, f"{flag}: unknown dictionary format '{base or p.name}' "
                         "(use .pkl, .json, .tsv or .csv)")
    return _validate(raw, kind, p, flag)


def dictionary_hash(d: dict) -> str:
    """A content hash of a parsed dictionary (the same for its .pkl, .json and .tsv forms)."""
    text = json.dumps(sorted((str(k), v) for k, v in d.items()), separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def is_special_token(key: str) -> bool:
    return key.startswith("<") and key.endswith(">")


# ----------------------------------------------------------------------------- internals

def _open_binary(p: Path):
    return gzip.open(p, "rb") if p.suffix.lower() == ".gz" else open(p, "rb")


def _open_text(p: Path):
    return io.TextIOWrapper(_open_binary(p), encoding="utf-8")


def _read_table(p: Path, kind: Kind, sep: str) -> dict:
    out: dict = {}
    with _open_text(p) as f:
        first = True
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [s.strip().strip('"') for s in line.split(sep)]
            if len(parts) < 2:
                raise InputError(p, f"line {lineno}", f"expected two columns (key{sep!r}value), got {line!r}")
            key, value = parts[0], parts[1]
            if first:
                first = False
                if _is_header(key, value, kind):
                    continue
            if key in out and out[key] != value:
                raise InputError(p, f"line {lineno}", f"key '{key}' appears twice with different values")
            out[key] = value
    return out


def _is_header(key: str, value: str, kind: Kind) -> bool:
    if kind == "mapping":
        return not ENSEMBL_RE.match(value) and not ENSEMBL_RE.match(key)
    try:
        float(value)
        return False
    except ValueError:
        return True


def _validate(raw: object, kind: Kind, p: Path, flag: str) -> dict:
    if not isinstance(raw, dict):
        raise InputError(p, None, f"{flag}: expected a dictionary (key -> value), found {type(raw).__name__}")
    if not raw:
        raise InputError(p, None, f"{flag}: the dictionary is empty")
    out: dict = {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise InputError(p, repr(k), f"{flag}: keys must be strings")
        if kind == "token":
            iv = _as_int(v)
            if iv is None or iv < 0:
                raise InputError(p, k, f"{flag}: token id must be a non-negative integer, got {v!r}")
            out[k] = iv
        elif kind == "median":
            fv = _as_float(v)
            if fv is None or not math.isfinite(fv) or fv <= 0:
                raise InputError(p, k, f"{flag}: gene median must be a positive number, got {v!r}")
            out[k] = fv
        else:
            if not isinstance(v, str) or not v:
                raise InputError(p, k, f"{flag}: must map to an Ensembl id string, got {v!r}")
            out[k] = v
    if kind == "token":
        seen: dict[int, str] = {}
        for k, v in out.items():
            if v in seen:
                raise InputError(p, k, f"{flag}: token id {v} is used by both '{seen[v]}' and '{k}'")
            seen[v] = k
    return out


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return None


def _as_float(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None
