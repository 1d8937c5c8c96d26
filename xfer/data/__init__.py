"""Data: readers, validation, stores, peak filter and mapper, simulator."""

from .dataset import CellMatrix, make_matrix

__all__ = ["CellMatrix", "make_matrix"]
