"""A toy extension: a peak encoder and a selection objective, each registered in one place, as a
user's own package registers them. tests/test_registry.py loads it the way such a package is
loaded: named in XFER_EXTENSIONS (and importable: on PYTHONPATH), so that every process of a
sweep, Ray's trial workers included, imports it when it first reads a registry.
"""

from __future__ import annotations

from torch import Tensor

from xfer.model.encoders import EncoderOutput, PeakEncoder
from xfer.model.layers import mlp
from xfer.registry import EncoderSpec, ObjectiveSpec, Param, register_encoder, register_objective


class ToyEncoder(PeakEncoder):
    """One hidden layer of `toy_width` units; its own loss: toy_weight x the mean squared latent."""

    def __init__(self, n_peaks, cfgs, noise):
        super().__init__(n_peaks, cfgs, noise)
        self.net = mlp(self.size, [n_peaks, self.cfg.toy_width, self.cfg.latent_dim], [c.dropout for c in cfgs], noise)

    def forward(self, x: Tensor) -> EncoderOutput:
        return EncoderOutput(self.net(x))

    def objective(self, x_clean, out, z_source) -> dict:
        return {"toy_norm": (self.hp.get("toy_weight"), lambda: (out.z.float() ** 2).mean((1, 2)))}


register_encoder(EncoderSpec("toy", ToyEncoder, params=(
    Param("toy_width", 16, at_least=1, search={"broad": {"type": "categorical", "choices": [8, 16]}}),
    Param("toy_weight", 0.1, at_least=0, member=True, weighs=("toy_norm",),
          search={"broad": {"type": "float", "low": 0.01, "high": 1.0, "log": True}}),
)))


def toy_confidence(x) -> float:
    """The mean largest class probability of the test line's PEAK predictions (one member)."""
    return float(x.p_test.max(-1).values.mean())


register_objective(ObjectiveSpec("toy_confidence", needs=frozenset({"test_peaks"}), value=toy_confidence))
