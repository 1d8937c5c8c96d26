"""cellcycle-xfer: cross-modal cell-cycle label transfer (expression -> accessibility).

The science lives here and never imports Ray; the Ray Tune layer is the
separate `tune` package.
"""

__version__ = "0.1.0"
