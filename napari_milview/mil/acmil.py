"""ACMIL (Attention-Challenging MIL, ECCV 2024): ACMIL-GA, ACMIL-MHA; AEM's MHA.

Reimplemented from ``reference/algorithms.md`` section 1 (names and shapes of
dazhangyu123/ACMIL ``architecture/transformer.py``).

ACMIL-GA, for a bag ``x`` [N, in_dim] with K branches (``n_token``)::

    h = ReLU(dimreduction.fc1 x)                       [N, inner]
    A = gated attention logits                          [K, N]
    (training only) STKIM: per branch, int(k * mask_drop) of the top-k logits -> -1e9,
                   k = min(n_masked_patch, N)
    branch_logits[k] = classifier[k](softmax_N(A_k) h)  [K, C]  (auxiliary)
    slide_logits = Slide_classifier(mean_k softmax_N(A_k) h)   [C]  (the prediction)

ACMIL-MHA replaces the gated attention with K single-query 8-head attentions
(``sub_attention``) and pools the bag with ``bag_attention`` using, per head, the
softmaxed logits averaged over the K branches.

AEM (``dazhangyu123/AEM``) trains ACMIL's ``ABMIL`` (see ``abmil``, alias ``"aem"``) and
``MHA`` classes with an entropy regulariser; at inference they are plain models. ``MHA`` is
a single learnable query with one 8-head attention and one classifier: :class:`MHA`, arch
``"mha"``, alias ``"aem_mha"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import MILModel, MILOutput, _count_indexed, _shape, register_alias, register_model
from .layers import (
    AttentionGated,
    BagAttention,
    Classifier1fc,
    DimReduction,
    MultiHeadAttention,
    stkim_mask,
)

__all__ = ["ACMIL_GA", "ACMIL_MHA", "MHA"]


@register_model
class ACMIL_GA(MILModel):
    """ACMIL with multi-branch gated attention (``--arch ga``).

    Parameters
    ----------
    in_dim : int
        Feature dimension (ACMIL ``D_feat``).
    n_classes : int
        ACMIL ``n_class``.
    inner_dim : int
        ACMIL ``D_inner`` (512 for 1024-d features; see the presets in the reference).
    n_token : int
        Number of attention branches K (5 in the paper).
    attn_dim : int
        Attention hidden size ``D`` (128).
    n_masked_patch, mask_drop :
        STKIM settings (paper: 10, 0.6), used in training mode only.
    dropout : float
        ACMIL ``droprate`` before the classifiers (0).

    State dict (in 1024, inner 512, C 2, K 5)
    ------------------------------------------
    ``dimreduction.fc1.weight`` [512, 1024] (no bias);
    ``attention.attention_V.0.weight`` [128, 512] / ``.bias`` [128];
    ``attention.attention_U.0.weight`` [128, 512] / ``.bias`` [128];
    ``attention.attention_weights.weight`` [5, 128] / ``.bias`` [5];
    ``classifier.{0..4}.fc.weight`` [2, 512] / ``.bias`` [2];
    ``Slide_classifier.fc.weight`` [2, 512] / ``.bias`` [2].

    Attention sources
    -----------------
    ``"branch/{k}"`` softmax attention of branch k; ``"raw/branch/{k}"`` its logits (after
    STKIM masking in training mode, as ACMIL returns them); ``"branch/mean"`` the mean over
    branches of the per-branch softmax, i.e. the weights of the slide pooling -- the default
    (ACMIL's heatmap). ``aux["branch_logits"]`` [K, C].
    """

    arch = "acmil_ga"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, inner_dim: int = 512,
                 n_token: int = 5, attn_dim: int = 128, n_masked_patch: int = 10,
                 mask_drop: float = 0.6, dropout: float = 0.0) -> None:
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, inner_dim=inner_dim,
                          n_token=n_token, attn_dim=attn_dim, n_masked_patch=n_masked_patch,
                          mask_drop=mask_drop, dropout=dropout)
        self.n_token = n_token
        self.n_masked_patch = n_masked_patch
        self.mask_drop = mask_drop
        self.dimreduction = DimReduction(in_dim, inner_dim)
        self.attention = AttentionGated(inner_dim, attn_dim, n_token, gated=True)
        self.classifier = nn.ModuleList(
            Classifier1fc(inner_dim, n_classes, dropout) for _ in range(n_token))
        self.Slide_classifier = Classifier1fc(inner_dim, n_classes, dropout)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        h = self.dimreduction(x)  # [N, inner]
        raw = self.attention(h)  # [K, N]
        if self.training and self.n_masked_patch > 0:
            raw = stkim_mask(raw, self.n_masked_patch, self.mask_drop)
        a = torch.softmax(raw, dim=1)  # [K, N]
        z = a @ h  # [K, inner]
        branch_logits = torch.stack([clf(z[k]) for k, clf in enumerate(self.classifier)])
        bag_a = a.mean(dim=0)  # [N]
        logits = self.Slide_classifier(bag_a @ h)
        sources: dict[str, Tensor] = {}
        if with_sources:
            for k in range(self.n_token):
                sources[f"branch/{k}"] = a[k]
            sources["branch/mean"] = bag_a
            for k in range(self.n_token):
                sources[f"raw/branch/{k}"] = raw[k]
        return MILOutput(logits=logits, sources=sources, default_source="branch/mean",
                         aux={"branch_logits": branch_logits})

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("dimreduction.fc1.weight" in sd and "attention.attention_weights.weight" in sd
                and "Slide_classifier.fc.weight" in sd and "classifier.0.fc.weight" in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        inner, in_dim = _shape(sd, "dimreduction.fc1.weight", "ACMIL_GA")
        k, attn_dim = _shape(sd, "attention.attention_weights.weight", "ACMIL_GA")
        n_classes, _ = _shape(sd, "Slide_classifier.fc.weight", "ACMIL_GA")
        n_clf = _count_indexed(sd, "classifier.")
        if n_clf != k:
            raise ValueError(f"ACMIL_GA state_dict: {k} attention branches but {n_clf} "
                             "branch classifiers")
        return {"in_dim": in_dim, "n_classes": n_classes, "inner_dim": inner, "n_token": k,
                    "attn_dim": attn_dim}


def _mha_sources(logits: Tensor) -> dict[str, Tensor]:
    """Sources of ACMIL-MHA from logits [H, K, N]."""
    sm = torch.softmax(logits, dim=-1)
    n_heads, n_tok, _ = sm.shape
    out: dict[str, Tensor] = {}
    for k in range(n_tok):
        out[f"branch/{k}"] = sm[:, k].mean(dim=0)
    out["branch/mean"] = sm.mean(dim=(0, 1))
    per_head = sm.mean(dim=1)  # [H, N]
    for h in range(n_heads):
        out[f"head/{h}"] = per_head[h]
    out["head/mean"] = out["branch/mean"]
    for k in range(n_tok):
        for h in range(n_heads):
            out[f"branch/{k}/head/{h}"] = sm[h, k]
    for k in range(n_tok):
        for h in range(n_heads):
            out[f"raw/branch/{k}/head/{h}"] = logits[h, k]
    return out


@register_model
class ACMIL_MHA(MILModel):
    """ACMIL with K single-query multi-head attention branches (``--arch mha``).

    Parameters
    ----------
    in_dim, n_classes, inner_dim, n_token, n_masked_patch, mask_drop :
        As :class:`ACMIL_GA`.
    heads : int
        Heads per attention (8 in ACMIL; not recoverable from the weights).
    dropout : float
        Dropout after ``out_proj`` (0.1 in ACMIL; off in eval).

    State dict (inner d, K branches, C classes)
    --------------------------------------------
    ``dimreduction.fc1.weight`` [d, in_dim]; ``q`` [1, K, d];
    ``sub_attention.{i}.{q_proj,k_proj,v_proj,out_proj}.weight`` [d, d] / ``.bias`` [d];
    ``sub_attention.{i}.layer_norm.weight`` / ``.bias`` [d];
    ``bag_attention.{v_proj,out_proj}.weight`` [d, d] / ``.bias`` [d];
    ``bag_attention.layer_norm.weight`` / ``.bias`` [d];
    ``classifier.{i}.fc.weight`` [C, d] / ``.bias`` [C];
    ``Slide_classifier.fc.weight`` [C, d] / ``.bias`` [C].

    Attention sources (softmax over N of the scaled logits ``[H, K, N]``)
    ----------------------------------------------------------------------
    ``"branch/{k}/head/{h}"`` one head of one branch; ``"branch/{k}"`` mean over heads;
    ``"head/{h}"`` mean over branches (the weights head h pools the bag with);
    ``"branch/mean"`` (= ``"head/mean"``) mean over heads and branches -- the default;
    ``"raw/branch/{k}/head/{h}"`` the logits (after STKIM in training mode).
    ``aux["branch_logits"]`` [K, C].
    """

    arch = "acmil_mha"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, inner_dim: int = 512,
                 n_token: int = 5, heads: int = 8, n_masked_patch: int = 10,
                 mask_drop: float = 0.6, dropout: float = 0.1) -> None:
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, inner_dim=inner_dim,
                          n_token=n_token, heads=heads, n_masked_patch=n_masked_patch,
                          mask_drop=mask_drop, dropout=dropout)
        self.n_token = n_token
        self.dimreduction = DimReduction(in_dim, inner_dim)
        self.sub_attention = nn.ModuleList(
            MultiHeadAttention(inner_dim, heads, dropout, n_masked_patch, mask_drop)
            for _ in range(n_token))
        self.bag_attention = BagAttention(inner_dim, heads, dropout)
        self.q = nn.Parameter(torch.empty(1, n_token, inner_dim))
        nn.init.normal_(self.q, std=1e-6)
        self.classifier = nn.ModuleList(
            Classifier1fc(inner_dim, n_classes) for _ in range(n_token))
        self.Slide_classifier = Classifier1fc(inner_dim, n_classes)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        h = self.dimreduction(x).unsqueeze(0)  # [1, N, d]
        branch_logits, attn = [], []
        for i, att in enumerate(self.sub_attention):
            feat, lg = att(self.q[:, i:i + 1], h)  # [1, d], [H, 1, N]
            branch_logits.append(self.classifier[i](feat))
            attn.append(lg)
        logits_att = torch.cat(attn, dim=1)  # [H, K, N]
        bag_a = torch.softmax(logits_att, dim=-1).mean(dim=1, keepdim=True)  # [H, 1, N]
        logits = self.Slide_classifier(self.bag_attention(h, bag_a))[0]  # [C]
        sources = _mha_sources(logits_att) if with_sources else {}
        return MILOutput(logits=logits, sources=sources, default_source="branch/mean",
                         aux={"branch_logits": torch.cat(branch_logits, dim=0)})

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("dimreduction.fc1.weight" in sd and "sub_attention.0.q_proj.weight" in sd
                and "bag_attention.v_proj.weight" in sd and "q" in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        inner, in_dim = _shape(sd, "dimreduction.fc1.weight", "ACMIL_MHA")
        _, k, inner2 = _shape(sd, "q", "ACMIL_MHA")
        n_classes, _ = _shape(sd, "Slide_classifier.fc.weight", "ACMIL_MHA")
        n_sub = _count_indexed(sd, "sub_attention.")
        if inner2 != inner or n_sub != k:
            raise ValueError(f"inconsistent ACMIL_MHA state_dict: q {k}x{inner2}, "
                             f"{n_sub} sub-attentions, inner {inner}")
        return {"in_dim": in_dim, "n_classes": n_classes, "inner_dim": inner, "n_token": k}


@register_model
class MHA(MILModel):
    """ACMIL/AEM ``MHA``: one learnable query, one 8-head attention, one classifier.

    ``logits = classifier.fc(LN(Dropout(out_proj(softmax(q k^T/sqrt(d)) v))))``.
    This is AEM's ``--arch mha`` model (alias ``"aem_mha"``).

    Parameters
    ----------
    in_dim, n_classes, inner_dim :
        As :class:`ACMIL_GA`.
    heads : int
        8 (not recoverable from the weights).
    dropout : float
        0.1 after ``out_proj`` (off in eval).

    State dict (inner d, C classes)
    -------------------------------
    ``dimreduction.fc1.weight`` [d, in_dim]; ``q`` [1, 1, d];
    ``attention.{q_proj,k_proj,v_proj,out_proj}.weight`` [d, d] / ``.bias`` [d];
    ``attention.layer_norm.weight`` / ``.bias`` [d];
    ``classifier.fc.weight`` [C, d] / ``.bias`` [C].

    Attention sources
    -----------------
    ``"head/{h}"`` softmax attention of head h; ``"head/mean"`` their mean -- the default;
    ``"raw/head/{h}"`` the scaled logits.
    """

    arch = "mha"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, inner_dim: int = 512,
                 heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, inner_dim=inner_dim,
                          heads=heads, dropout=dropout)
        self.dimreduction = DimReduction(in_dim, inner_dim)
        self.attention = MultiHeadAttention(inner_dim, heads, dropout)
        self.q = nn.Parameter(torch.empty(1, 1, inner_dim))
        nn.init.normal_(self.q, std=1e-6)
        self.classifier = Classifier1fc(inner_dim, n_classes)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        h = self.dimreduction(x).unsqueeze(0)  # [1, N, d]
        feat, lg = self.attention(self.q, h)  # [1, d], [H, 1, N]
        logits = self.classifier(feat)[0]
        sources: dict[str, Tensor] = {}
        if with_sources:
            sm = torch.softmax(lg[:, 0], dim=-1)  # [H, N]
            for hh in range(sm.shape[0]):
                sources[f"head/{hh}"] = sm[hh]
            sources["head/mean"] = sm.mean(dim=0)
            for hh in range(sm.shape[0]):
                sources[f"raw/head/{hh}"] = lg[hh, 0]
        return MILOutput(logits=logits, sources=sources, default_source="head/mean")

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("dimreduction.fc1.weight" in sd and "attention.q_proj.weight" in sd
                and "classifier.fc.weight" in sd and "q" in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        inner, in_dim = _shape(sd, "dimreduction.fc1.weight", "MHA")
        n_classes, _ = _shape(sd, "classifier.fc.weight", "MHA")
        qs = _shape(sd, "q", "MHA")
        if qs != (1, 1, inner):
            raise ValueError(f"MHA state_dict: q has shape {qs}, expected (1, 1, {inner})")
        return {"in_dim": in_dim, "n_classes": n_classes, "inner_dim": inner}


register_alias("aem_mha", "mha")
