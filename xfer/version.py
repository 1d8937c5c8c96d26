"""The package version (what stores record as the writer's version)."""

__version__ = "0.1.0"
