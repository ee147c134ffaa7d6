"""ABMIL (Ilse et al. 2018), plain and gated, in ACMIL's baseline layout; AEM alias.

The gated model is ACMIL's ``ABMIL`` baseline class (also AEM's ``--arch abmil``)::

    h = ReLU(dimreduction.fc1 x)                 [N, inner_dim]
    e = attention_weights(tanh(V h) * sigmoid(U h))   [N]  (raw logits)
    a = softmax_N(e);  z = a @ h;  logits = classifier.fc(z)

The plain (tanh) variant drops ``U``: ``e = attention_weights(tanh(V h))``. It has no
official checkpoint layout; its keys are ACMIL's names minus ``attention_U``.

AEM (attention entropy maximisation) only adds a training regulariser, so at inference an
AEM-ABMIL checkpoint is this gated model: the ``"aem"`` alias builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import MILModel, MILOutput, _shape, register_alias, register_model
from .layers import AttentionGated, Classifier1fc, DimReduction

__all__ = ["ABMIL"]


@register_model
class ABMIL(MILModel):
    """Attention-based MIL, gated (ACMIL/AEM ``ABMIL``) or plain (tanh attention).

    Parameters
    ----------
    in_dim : int
        Feature dimension D (ACMIL ``D_feat``).
    n_classes : int
        Number of classes C (ACMIL ``n_class``).
    inner_dim : int
        Size after the bias-free reduction layer (ACMIL ``D_inner``; 512 for 1024-d input).
    attn_dim : int
        Hidden size of the attention MLP (``D``, 128).
    gated : bool
        Gated attention (the ACMIL/AEM baseline) or plain tanh attention.
    dropout : float
        Dropout before the classifier (ACMIL ``droprate``; 0 by default). No parameters.

    State dict (gated; in 1024, inner 512, C 2)
    ------------------------------------------
    ``dimreduction.fc1.weight`` [512, 1024] (no bias),
    ``attention.attention_V.0.weight`` [128, 512], ``attention.attention_V.0.bias`` [128],
    ``attention.attention_U.0.weight`` [128, 512], ``attention.attention_U.0.bias`` [128],
    ``attention.attention_weights.weight`` [1, 128], ``attention.attention_weights.bias`` [1],
    ``classifier.fc.weight`` [2, 512], ``classifier.fc.bias`` [2].
    The plain variant has the same keys without ``attention.attention_U.*``.

    Attention sources
    -----------------
    ``"attention"``: softmax attention [N] (sums to 1) -- the default;
    ``"raw/attention"``: the pre-softmax logits [N].
    """

    arch = "abmil"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, inner_dim: int = 512,
                 attn_dim: int = 128, gated: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, inner_dim=inner_dim,
                          attn_dim=attn_dim, gated=bool(gated), dropout=dropout)
        self.dimreduction = DimReduction(in_dim, inner_dim)
        self.attention = AttentionGated(inner_dim, attn_dim, 1, gated=gated)
        self.classifier = Classifier1fc(inner_dim, n_classes, dropout)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        h = self.dimreduction(x)  # [N, inner]
        raw = self.attention(h)[0]  # [N]
        a = torch.softmax(raw, dim=0)
        logits = self.classifier(a @ h)  # [C]
        sources = {"attention": a, "raw/attention": raw} if with_sources else {}
        return MILOutput(logits=logits, sources=sources, default_source="attention")

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("dimreduction.fc1.weight" in sd and "attention.attention_V.0.weight" in sd
                and "attention.attention_weights.weight" in sd and "classifier.fc.weight" in sd
                and "Slide_classifier.fc.weight" not in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        inner, in_dim = _shape(sd, "dimreduction.fc1.weight", "ABMIL")
        k, attn_dim = _shape(sd, "attention.attention_weights.weight", "ABMIL")
        n_classes, inner2 = _shape(sd, "classifier.fc.weight", "ABMIL")
        if k != 1 or inner2 != inner:
            raise ValueError(f"inconsistent ABMIL state_dict: {k} attention branches, "
                             f"classifier input {inner2} vs reduction output {inner}")
        return {"in_dim": in_dim, "n_classes": n_classes, "inner_dim": inner, "attn_dim": attn_dim,
                    "gated": "attention.attention_U.0.weight" in sd}


register_alias("aem", "abmil", gated=True)
