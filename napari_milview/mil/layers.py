"""Building blocks shared by ABMIL, ACMIL and AEM, with ACMIL's official sub-module names.

Reimplemented from the description in ``reference/algorithms.md`` section 1.1 / 1.3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttentionGated",
    "BagAttention",
    "Classifier1fc",
    "DimReduction",
    "MultiHeadAttention",
    "stkim_mask",
]

#: value given to masked attention logits (as in ACMIL)
MASK_VALUE = -1e9


class DimReduction(nn.Module):
    """ACMIL ``DimReduction``: ``ReLU(fc1(x))``, ``fc1`` without bias.

    Keys: ``fc1.weight`` [inner_dim, in_dim]. (ACMIL's empty ``resBlocks`` holds no
    parameters and is not reproduced.)

    Parameters
    ----------
    in_dim, inner_dim : int
    """

    def __init__(self, in_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, inner_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_dim] -> [..., inner_dim]"""
        return F.relu(self.fc1(x))


class Classifier1fc(nn.Module):
    """ACMIL ``Classifier_1fc``: optional dropout then ``fc`` (Linear with bias).

    Keys: ``fc.weight`` [n_classes, in_dim], ``fc.bias`` [n_classes].
    """

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, n_classes)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_dim] -> [..., n_classes]"""
        return self.fc(self.dropout(x))


class AttentionGated(nn.Module):
    """Ilse et al. attention with ACMIL's names; gated or plain (tanh only).

    Logits ``A = W_w (tanh(V h) * sigmoid(U h))`` (gated) or ``A = W_w tanh(V h)`` (plain),
    returned as ``[K, N]`` (pre-softmax).

    Keys: ``attention_V.0.{weight [D, L], bias [D]}``, ``attention_U.0.*`` (gated only),
    ``attention_weights.{weight [K, D], bias [K]}``.

    Parameters
    ----------
    L : int
        Instance embedding size.
    D : int
        Hidden size of the attention MLP (128 in ACMIL/ABMIL).
    K : int
        Number of attention branches.
    gated : bool
    """

    def __init__(self, L: int, D: int = 128, K: int = 1, gated: bool = True) -> None:
        super().__init__()
        self.gated = gated
        self.attention_V = nn.Sequential(nn.Linear(L, D), nn.Tanh())
        if gated:
            self.attention_U = nn.Sequential(nn.Linear(L, D), nn.Sigmoid())
        self.attention_weights = nn.Linear(D, K)

    def forward(self, h: Tensor) -> Tensor:
        """h: [N, L] -> attention logits [K, N]"""
        a = self.attention_V(h)
        if self.gated:
            a = a * self.attention_U(h)
        return self.attention_weights(a).transpose(0, 1)


def stkim_mask(logits: Tensor, n_masked_patch: int, mask_drop: float) -> Tensor:
    """Stochastic top-K instance masking (ACMIL STKIM), one row at a time.

    For every row (all leading dimensions flattened) take the ``k = min(n_masked_patch, N)``
    largest logits and set ``int(k * mask_drop)`` of them, chosen uniformly at random without
    replacement (argsort of uniform noise), to ``-1e9``. Nothing else changes.

    Parameters
    ----------
    logits : Tensor, shape [..., N]
    n_masked_patch : int
    mask_drop : float

    Returns
    -------
    Tensor, shape [..., N]
        A new tensor (the input is not modified).
    """
    n = logits.shape[-1]
    k = min(int(n_masked_patch), n)
    n_drop = int(k * mask_drop)
    if k <= 0 or n_drop <= 0:
        return logits
    rows = logits.reshape(-1, n)
    top = torch.topk(rows, k, dim=-1).indices  # [R, k]
    pick = torch.argsort(torch.rand(top.shape, device=rows.device), dim=-1)[:, :n_drop]
    drop = torch.gather(top, 1, pick)  # [R, n_drop]
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
    mask.scatter_(1, drop, True)
    return rows.masked_fill(mask, MASK_VALUE).reshape(logits.shape)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, C] -> [B, heads, T, C // heads]"""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, heads, T, c] -> [B, T, heads * c]"""
    b, h, t, c = x.shape
    return x.transpose(1, 2).reshape(b, t, h * c)


class MultiHeadAttention(nn.Module):
    """ACMIL/AEM ``MutiHeadAttention`` (query-vs-instances scaled dot-product attention).

    Keys: ``{q,k,v,out}_proj.{weight [dim, dim], bias [dim]}``, ``layer_norm.{weight,bias}``
    [dim] (LayerNorm eps 1e-6). Output ``LN(Dropout(out_proj(softmax(q k^T / sqrt(d)) v)))``.

    Parameters
    ----------
    dim : int
    heads : int
        8 in ACMIL and AEM.
    dropout : float
        0.1 in ACMIL and AEM (after ``out_proj``).
    n_masked_patch, mask_drop :
        STKIM settings, applied per head and per query in training mode only.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1,
                 n_masked_patch: int = 0, mask_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.n_masked_patch = n_masked_patch
        self.mask_drop = mask_drop
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attend with queries ``q`` over instances ``x``.

        Parameters
        ----------
        q : Tensor, shape [1, Q, dim]
        x : Tensor, shape [1, N, dim]
            Keys and values (the same tensor).

        Returns
        -------
        out : Tensor, shape [Q, dim]
        logits : Tensor, shape [heads, Q, N]
            Scaled pre-softmax logits, after STKIM masking in training mode.
        """
        qh = _split_heads(self.q_proj(q), self.heads)
        kh = _split_heads(self.k_proj(x), self.heads)
        vh = _split_heads(self.v_proj(x), self.heads)
        logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])  # [1, H, Q, N]
        if self.training and self.n_masked_patch > 0:
            logits = stkim_mask(logits, self.n_masked_patch, self.mask_drop)
        out = _merge_heads(torch.softmax(logits, dim=-1) @ vh)
        out = self.layer_norm(self.dropout(self.out_proj(out)))
        return out[0], logits[0]


class BagAttention(nn.Module):
    """ACMIL ``MutiHeadAttention_modify``: pools the instances with given per-head weights.

    Keys: ``v_proj.*``, ``out_proj.*`` ([dim, dim] / [dim]), ``layer_norm.*`` [dim].
    Output ``LN(Dropout(out_proj(a v_proj(x))))`` with ``a`` split over heads.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn: Tensor) -> Tensor:
        """Pool.

        Parameters
        ----------
        x : Tensor, shape [1, N, dim]
        attn : Tensor, shape [heads, Q, N]
            Normalised weights per head.

        Returns
        -------
        Tensor, shape [Q, dim]
        """
        vh = _split_heads(self.v_proj(x), self.heads)  # [1, H, N, d]
        out = _merge_heads(attn.unsqueeze(0) @ vh)  # [1, Q, dim]
        return self.layer_norm(self.dropout(self.out_proj(out)))[0]
