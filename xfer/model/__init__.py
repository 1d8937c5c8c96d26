"""Torch modules only: projection head, the five peak encoders, classifier,
CDANN discriminator and gradient reversal, assembled by `build_model`."""

from .cdann import CDANN, build_model
from .encoders import ENCODERS, EncoderOutput, PeakEncoder

__all__ = ["CDANN", "build_model", "ENCODERS", "EncoderOutput", "PeakEncoder"]
