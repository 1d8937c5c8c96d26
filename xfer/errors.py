"""Errors the `xfer` command reports as one clear line (no traceback).

Every message names where the problem is: the file (or store path / config
source) and the field (column, key, row) inside it.
"""

from __future__ import annotations


class XferError(Exception):
    """Base class: a problem with the user's input, config or store."""

    def __reduce__(self):
        # rebuild from the constructor's arguments (Ray pickles and copies trial errors)
        return (type(self), getattr(self, "_args", self.args))


class InputError(XferError):
    """A malformed or inconsistent input file."""

    def __init__(self, path, field: str | None, message: str):
        self.path = str(path)
        self.field = field
        self._args = (path, field, message)
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")


class StoreError(XferError):
    """A missing, corrupted or incompatible store entry."""

    def __init__(self, path, message: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        self._args = (path, message, field)
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")


class ConfigError(XferError):
    """A bad configuration key or value (names the key)."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        self._args = (key, message, source)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config key '{key}': {message}")
