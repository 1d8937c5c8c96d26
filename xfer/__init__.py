"""cellcycle-xfer: cross-modal cell-cycle label transfer (expression -> accessibility).

The Python API (xfer/api.py; README "Python API (notebooks)"):

    xfer.Inputs(src=, tgt=, test=, sup_peak=, store=)   the data of the two lines
    xfer.train(inputs, **params) -> Model                the same run as `xfer train`
    xfer.load(path) -> predictor                         any best_model.pt; .predict(adata)

The science lives here and never imports Ray; the Ray Tune layer is the separate `tune`
package (a sweep from Python: `tune.sweep`). Importing `xfer` loads nothing heavy: the API
is imported on first use.
"""

from .version import __version__

__all__ = ["Inputs", "Model", "train", "load", "__version__"]
_API = ("Inputs", "Model", "train", "load")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'xfer' has no attribute {name!r}")
