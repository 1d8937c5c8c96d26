"""Local paths and URIs (file://, s3://, ...) through pyarrow.fs, with atomic publication.

Every store reads and writes through `resolve(...)`, so a store root may be a
local directory, a file:// URI or an object-store URI that pyarrow supports.
Publication is atomic: on a local file system files and directories are
written under a temporary name beside the target and renamed into place
(rename is atomic on POSIX); object stores publish an object only when its
upload completes, and directories there are published manifest-last.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


# ----------------------------------------------------------------------------- local atomic files

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; it is renamed into place only when the
    block ends without an error (else removed), so readers see the old file or the whole new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_output_folder(path: str | os.PathLike, flag: str = "--output_folder") -> Path:
    """A local folder a command may write into, checked before any work: it is a folder or does
    not exist yet, and its nearest existing ancestor is a writable folder. InputError(path, flag)
    otherwise. URIs (s3://...) are left to their filesystem."""
    from ..errors import InputError

    if "://" in str(path):
        return Path(str(path))
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(p, flag, "exists and is not a folder; give a folder (new or existing)")
    up = p
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise InputError(p, flag, f"cannot be created: {up} is a file, not a folder")
    if not os.access(up, os.W_OK | os.X_OK):
        raise InputError(p, flag, f"cannot be written: {up} is not writable")
    return p


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def json_default(o):
    """json.dumps fallback for numpy scalars and arrays."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj, *, indent: int = 1, sort_keys: bool = False) -> Path:
    """Write `obj` as JSON, atomically (numpy values become plain numbers and lists)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default)
    return write_bytes_atomic(path, text.encode())


def save_torch(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically (a checkpoint is never seen half-written)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@dataclass(frozen=True)
class Location:
    """A file system and a path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str  # what the user gave, for messages

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it."""
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            write_bytes_atomic(self.path, data)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def listdir(self) -> list[str]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted(posixpath.basename(i.path) for i in infos)


def resolve(uri_or_path: str | os.PathLike) -> Location:
    """Turn a local path or a URI into a Location (local paths made absolute)."""
    text = os.fspath(uri_or_path)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return Location(fs, path.rstrip("/") or path, text)
    path = os.path.abspath(os.path.expanduser(text))
    return Location(pafs.LocalFileSystem(), path, path)


def resolve_store_root(uri_or_path: str | os.PathLike) -> Location:
    """`resolve` for a store root. A root that is an existing file (or, for a local path, sits
    under one) is a StoreError here, before the store reads or writes anything."""
    from ..errors import StoreError

    loc = resolve(uri_or_path)
    if loc.is_local:
        root = Path(loc.path)
        nearest = next((p for p in (root, *root.parents) if p.exists()), None)  # the part that exists
        if nearest is not None and not nearest.is_dir():
            raise StoreError(str(nearest), "is a file, not a store directory" if nearest == root else
                             f"is a file, so the store directory {root} cannot be made under it")
    elif loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        raise StoreError(loc.uri, "is a file, not a store directory")
    return loc


def tmp_sibling(loc: Location, tag: str = "tmp") -> Location:
    """A fresh, hidden sibling path used to build something before publishing it."""
    parent, base = posixpath.split(loc.path)
    name = f".{tag}-{base}-{uuid.uuid4().hex[:12]}"
    return Location(loc.fs, posixpath.join(parent, name), posixpath.join(posixpath.dirname(loc.uri), name))
