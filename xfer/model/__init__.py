"""Torch modules only: projection head, the peak encoders, classifier,
CDANN discriminator and gradient reversal, assembled by `build_model`. Every
module is a population of P same-shape members (P = 1: one model)."""

from .cdann import CDANN, build_model, member_state
from .encoders import EncoderOutput, PeakEncoder, encoder_class

__all__ = ["CDANN", "build_model", "member_state", "EncoderOutput", "PeakEncoder", "encoder_class"]
