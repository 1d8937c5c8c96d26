"""The built-in peak encoders, selection objectives and peak representations, registered as an
extension registers its own (xfer.registry loads this module first). Implementations are named
as "module:attribute" and imported when first used, so that reading a config imports no torch.

Encoders (xfer/model/encoders.py):

    dae          input corruption + reconstruction through a decoder
    vae          reparameterised latent, beta-weighted KL + reconstruction
    contrastive  NT-Xent between a cell's accessibility view and its expression view
    hybrid       residual GELU blocks
    mlp          plain feed-forward baseline

Selection objectives (xfer/selection.py, where their formulas and references are), and peak
representations (xfer/prepare.py: peaks, lsi, joint_lsi, none).
"""

from __future__ import annotations

from .registry import (EncoderSpec, ObjectiveSpec, Param, PeakReprSpec, register_encoder, register_objective,
                       register_peak_repr)

_ENC = "xfer.model.encoders:"
_SEL = "xfer.selection:"
_PREP = "xfer.prepare:"


def _float(low, high, log=False) -> dict:
    spec = {"type": "float", "low": low, "high": high}
    return {**spec, "log": True} if log else spec


def _choices(*values) -> dict:
    return {"type": "categorical", "choices": list(values)}


# ----------------------------------------------------------------------------- encoders

LAMBDA_RECON = Param("lambda_recon", 1.0, at_least=0, member=True, weighs=("recon", "kl"),
                     search={"broad": _float(0.1, 3.0, log=True), "centred": _float(0.3, 3.0, log=True)},
                     help="weight of the reconstruction loss (and, for vae, of beta x KL)")

register_encoder(EncoderSpec("dae", _ENC + "DAEEncoder", params=(
    Param("corruption", 0.05, at_least=0, below=1, member=True,
          search={"broad": _float(0.0, 0.3), "centred": _float(0.0, 0.15)},
          help="fraction of input entries zeroed"),
    LAMBDA_RECON,
)))
register_encoder(EncoderSpec("vae", _ENC + "VAEEncoder", params=(
    Param("beta", 1.7, at_least=0, member=True, search={"broad": _float(0.1, 4.0, log=True)},
          help="weight of KL(q(z|x) || N(0, I))"),
    LAMBDA_RECON,
)))
register_encoder(EncoderSpec("contrastive", _ENC + "ContrastiveEncoder", params=(
    Param("temperature", 0.1, above=0, member=True, search={"broad": _float(0.03, 0.5, log=True)},
          help="NT-Xent temperature"),
    Param("proj_dim", 128, at_least=1, search={"broad": _choices(64, 128, 256)},
          help="projection size for NT-Xent"),
    Param("aug_dropout", 0.2, at_least=0, below=1, member=True, search={"broad": _float(0.05, 0.5)},
          help="peak dropout augmentation of the accessibility view"),
    Param("lambda_contrastive", 1.0, at_least=0, member=True, weighs=("contrastive",),
          search={"broad": _float(0.1, 3.0, log=True)}, help="weight of the NT-Xent loss"),
)))
register_encoder(EncoderSpec("hybrid", _ENC + "HybridEncoder", params=(
    Param("n_blocks", 2, at_least=1, search={"broad": {"type": "int", "low": 1, "high": 4}},
          help="residual GELU blocks"),
    Param("hybrid_width", 2048, at_least=1, search={"broad": _choices(512, 1024, 2048)},
          help="width of the residual blocks"),
)))
register_encoder(EncoderSpec("mlp", _ENC + "MLPEncoder"))


# ----------------------------------------------------------------------------- selection objectives
# (source_val, the training line's own validation metric, is the registry's first entry)

register_objective(ObjectiveSpec("entropy", value=_SEL + "entropy_value", members=_SEL + "entropy_members"))
register_objective(ObjectiveSpec("im", value=_SEL + "im_value", members=_SEL + "im_members"))
register_objective(ObjectiveSpec("snd", value=_SEL + "snd_value", members=_SEL + "snd_members"))
register_objective(ObjectiveSpec("iwcv", value=_SEL + "iwcv_value", members=_SEL + "iwcv_members"))
register_objective(ObjectiveSpec("dev", value=_SEL + "dev_value", members=_SEL + "dev_members"))
register_objective(ObjectiveSpec("agreement", needs=frozenset({"test_peaks", "test_gex"}),
                                 value=_SEL + "agreement_value", members=_SEL + "agreement_members"))
for _other in ("entropy", "im", "agreement"):
    register_objective(ObjectiveSpec(f"source_val_{_other}", mean_of=("source_val", _other)))


# ----------------------------------------------------------------------------- peak representations

register_peak_repr(PeakReprSpec("peaks", _PREP + "PeaksRepr"))
register_peak_repr(PeakReprSpec("lsi", _PREP + "LSIRepr"))
register_peak_repr(PeakReprSpec("joint_lsi", _PREP + "JointLSIRepr"))
register_peak_repr(PeakReprSpec("none", _PREP + "NoPeakRepr", features=False))
