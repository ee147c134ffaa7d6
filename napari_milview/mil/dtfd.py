"""DTFD-MIL (Zhang et al., CVPR 2022): double-tier feature distillation MIL.

Reimplemented from the authors' description and code (``hrzhang1123/DTFD-MIL`` at
``10964f4``, MIT: ``Main_DTFD_MIL.py`` ``test_attention_DTFD_preFeat_MultipleMean``,
``Model/Attention.py``, ``Model/network.py``, ``utils.get_cam_1d``); nothing is copied.

Inference on one bag ``x`` [N, D] (the authors' test loop, ``num_MeanInference`` = 1)::

    h = dim_reduction(x)                       [N, m]   ReLU(fc1 x) (+ residual blocks)
    e = attention(h)                           [N]      gated attention logits (whole bag)
    split a permutation of 0..N-1 into G = num_group pseudo-bags (np.array_split sizes)
    for each pseudo-bag P_g:
        a_k = softmax_{k in P_g}(e_k)                    tier-1 attention
        f_g = sum_k a_k h_k                              [m]
        tier-1 logits  classifier(f_g)                   [C]   (trained, not used to predict)
        instance logits  s_kc = W_c . (a_k h_k)          [n_g, C]  (Grad-CAM derivation,
                         no bias; ``get_cam_1d``), instance probabilities p_k = softmax_c(s_k)
        distilled features (``distill``):
            'AFS'     f_g                                (the training script's default)
            'MaxS'    h_k of the k_g instances with the highest p_k[C-1]
            'MaxMinS' h_k of the k_g highest and the k_g lowest p_k[C-1]
            (k_g = total_instance // num_group; instances ranked by the last class)
    slide logits = att_classifier(distilled features)   [C]   (gated ABMIL, tier 2)

The split. The authors shuffle the instance indices with Python's global ``random`` at every
call, so their prediction changes from run to run. Ours is deterministic: the permutation is
``numpy.random.default_rng(seed).permutation(N)`` (computed on the CPU, whatever the device),
split with ``numpy.array_split`` semantics (the first ``N % G`` pseudo-bags get one instance
more). Same ``seed`` and N, same split; the seed is a hyper-parameter on the model card.

A pseudo-bag can be empty only when N < G. The authors' code then gives that pseudo-bag a
zero feature under 'AFS' (the sum over no instance) and nothing under 'MaxS'/'MaxMinS'; so
does this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._weights import strip_prefixes
from .base import MILModel, MILOutput, _count_indexed, _shape, register_model
from .layers import AttentionGated, Classifier1fc

__all__ = ["DTFD", "DTFDDimReduction", "pseudo_bag_split"]

#: the feature-distillation variants of the paper (section 3.2) / ``--distill_type``
DISTILL_TYPES = ("AFS", "MaxS", "MaxMinS")

#: the four modules of the authors' checkpoint, in the order ``Main_DTFD_MIL.py`` saves them
MODULES = ("classifier", "dim_reduction", "attention", "att_classifier")


def pseudo_bag_split(n: int, num_group: int, seed: int) -> list[Tensor]:
    """The deterministic pseudo-bag split of a bag of ``n`` instances.

    Parameters
    ----------
    n : int
        Number of instances N.
    num_group : int
        Number of pseudo-bags G.
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    list of Tensor
        G int64 index tensors (CPU) that partition ``0..n-1``: the chunks of
        ``default_rng(seed).permutation(n)`` split as ``numpy.array_split`` does (the first
        ``n % G`` chunks have ``n // G + 1`` indices, the others ``n // G``; empty when
        ``n < G``).
    """
    perm = np.random.default_rng(int(seed)).permutation(int(n))
    return [torch.from_numpy(np.ascontiguousarray(c, dtype=np.int64))
            for c in np.array_split(perm, int(num_group))]


class _ResidualBlock(nn.Module):
    """The authors' ``residual_block``: ``x + ReLU(W2 ReLU(W1 x))``, bias-free.

    Keys: ``block.0.weight`` [m, m], ``block.2.weight`` [m, m].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(),
                                   nn.Linear(dim, dim, bias=False), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., m] -> [..., m]"""
        return x + self.block(x)


class DTFDDimReduction(nn.Module):
    """The authors' ``DimReduction``: ``ReLU(fc1 x)`` then ``num_res`` residual blocks.

    Keys: ``fc1.weight`` [m, D] (no bias), ``resBlocks.{i}.block.{0,2}.weight`` [m, m].
    """

    def __init__(self, in_dim: int, m_dim: int, num_res: int = 0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, m_dim, bias=False)
        self.resBlocks = nn.Sequential(*[_ResidualBlock(m_dim) for _ in range(num_res)])

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, D] -> [N, m]"""
        return self.resBlocks(torch.relu(self.fc1(x)))


class _AttentionWithClassifier(nn.Module):
    """The authors' tier-2 ``Attention_with_Classifier``: gated ABMIL on pseudo-features.

    Keys: ``attention.attention_{V,U}.0.*``, ``attention.attention_weights.*``,
    ``classifier.fc.*``.
    """

    def __init__(self, dim: int, attn_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.attention = AttentionGated(dim, attn_dim, 1, gated=True)
        self.classifier = Classifier1fc(dim, n_classes, dropout)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """f: [M, m] -> (logits [C], attention [M])"""
        a = torch.softmax(self.attention(f)[0], dim=0)
        return self.classifier(a @ f), a


@register_model
class DTFD(MILModel):
    """DTFD-MIL: tier-1 gated ABMIL on seeded pseudo-bags, tier-2 ABMIL on distilled features.

    Parameters
    ----------
    in_dim : int
        Feature dimension D (the authors' ``in_chn``, 1024).
    n_classes : int
        Number of classes C (``--num_cls``, 2).
    m_dim : int
        Size after the dimension reduction (``--mDim``, 512).
    attn_dim : int
        Hidden size of both gated attention MLPs (``D``, 128).
    num_res : int
        Residual blocks after the reduction (``--numLayer_Res``, 0).
    num_group : int
        Number of pseudo-bags G (``--numGroup_test``; 4, the training script's default: the
        checkpoint stores no configuration).
    total_instance : int
        ``--total_instance_test`` (4): 'MaxS'/'MaxMinS' keep ``total_instance // num_group``
        instances per pseudo-bag (and as many lowest for 'MaxMinS').
    distill : str
        Feature distillation: 'AFS' (the training script's default), 'MaxS' or 'MaxMinS'.
        It must be the one the checkpoint was trained with; the weights do not show it.
    seed : int
        Seed of the pseudo-bag split (:func:`pseudo_bag_split`); 0 by default.
    dropout, dropout2 : float
        Dropout before the tier-1 / tier-2 classifier (``--droprate``, ``--droprate_2``; 0).

    State dict (in 1024, m 512, C 2: the authors' container flattened as ``<module>.<key>``)
    ---------------------------------------------------------------------------------------
    ``classifier.fc.weight`` [2, 512], ``classifier.fc.bias`` [2];
    ``dim_reduction.fc1.weight`` [512, 1024] (+ ``dim_reduction.resBlocks.{i}.block.{0,2}
    .weight`` [512, 512] when ``num_res`` > 0);
    ``attention.attention_V.0.{weight [128, 512], bias [128]}``, ``attention.attention_U.0.*``
    (same shapes), ``attention.attention_weights.{weight [1, 128], bias [1]}``;
    ``att_classifier.attention.*`` (same keys and shapes as ``attention.*``),
    ``att_classifier.classifier.fc.{weight [2, 512], bias [2]}``.

    Attention sources
    -----------------
    ``"tier1/attention"``: each instance's softmax attention within its pseudo-bag (sums to 1
    over every pseudo-bag); ``"raw/tier1/attention"``: its logits (whole bag, split-free);
    ``"instance/{c}"``: the paper's derived instance probability of class ``c`` (section 3.3,
    ``get_cam_1d``: softmax over classes of ``W_c . (a_k h_k)``). Default:
    ``"instance/{C-1}"``, the class the authors rank instances by (the tumour class of
    Camelyon-16), which the paper draws.

    Aux
    ---
    ``"pseudo_bag"`` [N] int64: the pseudo-bag of each instance; ``"tier1_logits"`` [G, C];
    ``"tier2_attention"`` [M]: tier-2 attention over the M distilled features.
    """

    arch = "dtfd"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, m_dim: int = 512,
                 attn_dim: int = 128, num_res: int = 0, num_group: int = 4,
                 total_instance: int = 4, distill: str = "AFS", seed: int = 0,
                 dropout: float = 0.0, dropout2: float = 0.0) -> None:
        super().__init__()
        if distill not in DISTILL_TYPES:
            raise ValueError(f"distill must be one of {DISTILL_TYPES}, got {distill!r}")
        if int(num_group) < 1:
            raise ValueError(f"num_group must be >= 1, got {num_group}")
        if distill != "AFS" and int(total_instance) // int(num_group) < 1:
            raise ValueError(f"{distill} keeps total_instance // num_group instances per "
                             f"pseudo-bag: {total_instance} // {num_group} = 0")
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, m_dim=m_dim, attn_dim=attn_dim,
                          num_res=num_res, num_group=int(num_group),
                          total_instance=int(total_instance), distill=distill, seed=int(seed),
                          dropout=dropout, dropout2=dropout2)
        self.classifier = Classifier1fc(m_dim, n_classes, dropout)
        self.dim_reduction = DTFDDimReduction(in_dim, m_dim, num_res)
        self.attention = AttentionGated(m_dim, attn_dim, 1, gated=True)
        self.att_classifier = _AttentionWithClassifier(m_dim, attn_dim, n_classes, dropout2)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        hp = self.hparams
        n = x.shape[0]
        h = self.dim_reduction(x)  # [N, m]
        raw = self.attention(h)[0]  # [N]
        w = self.classifier.fc.weight  # [C, m], the Grad-CAM weights (no bias)
        k = hp["total_instance"] // hp["num_group"]
        att = torch.empty_like(raw)
        inst = h.new_empty(n, self.n_classes)
        group = torch.empty(n, dtype=torch.long)
        distilled, tier1 = [], []
        for g, idx_cpu in enumerate(pseudo_bag_split(n, hp["num_group"], hp["seed"])):
            idx = idx_cpu.to(h.device)
            a = torch.softmax(raw[idx], dim=0)  # [n_g]
            weighted = h[idx] * a[:, None]  # [n_g, m]
            f = weighted.sum(dim=0)  # [m] (zeros for an empty pseudo-bag)
            tier1.append(self.classifier(f))
            p = torch.softmax(weighted @ w.t(), dim=1)  # [n_g, C]
            att[idx], inst[idx], group[idx_cpu] = a, p, g
            if hp["distill"] == "AFS":
                distilled.append(f[None])
            else:
                order = torch.sort(p[:, -1], descending=True)[1]
                pick = order[:k] if hp["distill"] == "MaxS" else torch.cat([order[:k],
                                                                           order[-k:]])
                distilled.append(h[idx][pick])
        logits, a2 = self.att_classifier(torch.cat(distilled, dim=0))
        sources: dict[str, Tensor] = {}
        if with_sources:
            sources["tier1/attention"] = att
            sources["raw/tier1/attention"] = raw
            for c in range(self.n_classes):
                sources[f"instance/{c}"] = inst[:, c]
        aux = {"pseudo_bag": group, "tier1_logits": torch.stack(tier1), "tier2_attention": a2}
        return MILOutput(logits=logits, sources=sources,
                         default_source=f"instance/{self.n_classes - 1}", aux=aux)

    # -- state dicts ----------------------------------------------------------------------
    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Strip the shared wrapper prefixes, then a DataParallel ``module.`` inside each of
        the four modules (``--isPar True`` wraps each one: ``classifier.module.fc.weight``).
        """
        out, notes = strip_prefixes(sd)
        inner = [m for m in MODULES
                 if any(key.startswith(f"{m}.module.") for key in out)]
        if inner:
            renamed: dict[str, Tensor] = {}
            for key, v in out.items():
                head, _, rest = key.partition(".")
                if head in inner and rest.startswith("module."):
                    key = f"{head}.{rest[len('module.'):]}"
                renamed[key] = v
            out = renamed
            notes.append("stripped the DataParallel 'module.' inside "
                         + ", ".join(repr(m) for m in inner))
        return out, notes

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return all(k in sd for k in ("classifier.fc.weight", "dim_reduction.fc1.weight",
                                     "attention.attention_weights.weight",
                                     "att_classifier.attention.attention_weights.weight",
                                     "att_classifier.classifier.fc.weight"))

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        m_dim, in_dim = _shape(sd, "dim_reduction.fc1.weight", "DTFD")
        k1, attn_dim = _shape(sd, "attention.attention_weights.weight", "DTFD")
        k2, attn_dim2 = _shape(sd, "att_classifier.attention.attention_weights.weight", "DTFD")
        n_classes, m1 = _shape(sd, "classifier.fc.weight", "DTFD")
        n_classes2, m2 = _shape(sd, "att_classifier.classifier.fc.weight", "DTFD")
        if (k1, k2) != (1, 1) or attn_dim2 != attn_dim or n_classes2 != n_classes \
                or {m1, m2} != {m_dim}:
            raise ValueError(
                f"inconsistent DTFD state_dict: attention branches {k1}/{k2}, attention sizes "
                f"{attn_dim}/{attn_dim2}, classes {n_classes}/{n_classes2}, classifier inputs "
                f"{m1}/{m2} vs reduction output {m_dim}")
        return {"in_dim": in_dim, "n_classes": n_classes, "m_dim": m_dim,
                "attn_dim": attn_dim,
                "num_res": _count_indexed(sd, "dim_reduction.resBlocks.")}
