"""Nystrom attention (Xiong et al. 2021) with the key names TransMIL's checkpoints use.

Reimplemented from ``reference/algorithms.md`` section 3.1/3.3 (the behaviour of the
``nystrom-attention`` package that TransMIL uses, versions 0.0.9 and >= 0.0.10).

For a sequence ``x`` [B, n, dim] and m landmarks:

1. ``p = (m - n mod m) mod m`` zero rows are **prepended** (front padding), L = n + p.
2. ``q, k, v = to_qkv(x)`` split into ``heads`` of ``dim_head``; ``q *= dim_head**-0.5``.
3. Landmarks: means of ``l = ceil(n / m)`` consecutive rows of q and k (pad rows included).
4. ``attn1 = softmax(q k~^T)`` [L, m], ``attn2 = softmax(q~ k~^T)`` [m, m],
   ``attn3 = softmax(q~ k^T)`` [m, L]; ``attn2^+`` by 6 Newton-Schulz iterations.
5. ``out = attn1 attn2^+ (attn3 v) + res_conv(v)``, heads merged, ``to_out``.
6. n rows are kept: the **last** n (``>= 0.0.10``) or the **first** n (``0.0.9``, the
   ``legacy_slice`` switch: it keeps the p pad rows and drops the last p real rows).

The approximated attention matrix ``attn1 attn2^+ attn3`` ([L, L] per head) is never built
here; :class:`NystromFactors` gives single rows in O(L m) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NystromAttention", "NystromFactors", "moore_penrose_iter_pinv", "nystrom_padding"]


def nystrom_padding(n: int, num_landmarks: int) -> int:
    """Number of zero rows prepended to a length-``n`` sequence: ``(m - n % m) % m``."""
    return (num_landmarks - n % num_landmarks) % num_landmarks


def moore_penrose_iter_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Iterative Moore-Penrose pseudo-inverse (Razavi et al.), as used by Nystromformer.

    ``z0 = x^T / (max_i sum_j |x_ij| * max_j sum_i |x_ij|)`` where both maxima are taken
    over the **whole tensor** (all batches and heads, as the reference package does), then
    ``z <- z (13 I - xz (15 I - xz (7 I - xz))) / 4`` ``iters`` times.

    Parameters
    ----------
    x : Tensor, shape [..., m, m]
    iters : int

    Returns
    -------
    Tensor, shape [..., m, m]
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (col.max() * row.max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


@dataclass
class NystromFactors:
    """The three factors of the Nystrom attention matrix ``attn1 @ attn2_inv @ attn3``.

    Indices are in the **padded** sequence (length L = n + pad; real token t is at
    ``pad + t``).

    Attributes
    ----------
    attn1 : Tensor, shape [B, H, L, m]
    attn2_inv : Tensor, shape [B, H, m, m]
    attn3 : Tensor, shape [B, H, m, L]
    pad : int
        Number of zero rows prepended.
    n : int
        Unpadded sequence length.
    """

    attn1: Tensor
    attn2_inv: Tensor
    attn3: Tensor
    pad: int
    n: int

    def row(self, index: int) -> Tensor:
        """Row ``index`` (padded indexing) of the attention matrix, O(L m).

        Returns
        -------
        Tensor, shape [B, H, L]
        """
        r = self.attn1[:, :, index:index + 1, :]  # [B, H, 1, m]
        return ((r @ self.attn2_inv) @ self.attn3).squeeze(-2)

    def vecmat(self, r: Tensor) -> Tensor:
        """Row vector(s) times the attention matrix, O(L m).

        Parameters
        ----------
        r : Tensor, shape [B, H, L] or [B, 1, L]

        Returns
        -------
        Tensor, shape [B, H, L]
        """
        return (((r.unsqueeze(-2) @ self.attn1) @ self.attn2_inv) @ self.attn3).squeeze(-2)

    def full(self) -> Tensor:
        """The whole matrix (tests and small sequences only).

        Returns
        -------
        Tensor, shape [B, H, L, L]
        """
        return self.attn1 @ self.attn2_inv @ self.attn3


class NystromAttention(nn.Module):
    """Nystrom self-attention.

    Keys: ``to_qkv.weight`` [3 * heads * dim_head, dim] (no bias),
    ``to_out.0.weight`` [dim, heads * dim_head], ``to_out.0.bias`` [dim],
    ``res_conv.weight`` [heads, 1, kernel, 1] (residual only).

    Parameters
    ----------
    dim : int
    heads : int
    dim_head : int
    num_landmarks : int
        m (TransMIL: ``dim // 2`` = 256).
    pinv_iterations : int
        6.
    residual : bool
        Add a depth-wise (heads-grouped) ``Conv2d`` with kernel ``(33, 1)`` over the values.
    residual_conv_kernel : int
        33.
    dropout : float
        In ``to_out`` (TransMIL: 0.1; off in eval).
    legacy_slice : bool
        Keep the first n rows (nystrom-attention 0.0.9, pinned by TransMIL) instead of the
        last n (>= 0.0.10).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True,
                 residual_conv_kernel: int = 33, dropout: float = 0.0,
                 legacy_slice: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head ** -0.5
        self.legacy_slice = legacy_slice
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual = residual
        if residual:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads,
                                      bias=False)

    def forward(self, x: Tensor, return_factors: bool = False
                ) -> Tensor | tuple[Tensor, NystromFactors]:
        """Attend.

        Parameters
        ----------
        x : Tensor, shape [B, n, dim]
        return_factors : bool
            Also return the :class:`NystromFactors` of the attention matrix.

        Returns
        -------
        out : Tensor, shape [B, n, dim]
        factors : NystromFactors, only when ``return_factors``
        """
        b, n, _ = x.shape
        m, h = self.num_landmarks, self.heads
        pad = nystrom_padding(n, m)
        if pad:
            x = F.pad(x, (0, 0, pad, 0), value=0.0)
        length = n + pad
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, length, h, -1).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        seg = math.ceil(n / m)  # rows per landmark; length == m * seg
        q_l = q.reshape(b, h, m, seg, -1).sum(dim=3) / seg
        k_l = k.reshape(b, h, m, seg, -1).sum(dim=3) / seg
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # [B, H, L, m]
        attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # [B, H, m, m]
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # [B, H, m, L]
        attn2_inv = moore_penrose_iter_pinv(attn2, self.pinv_iterations)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.residual:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, length, -1))
        out = out[:, :n] if self.legacy_slice else out[:, length - n:]
        if return_factors:
            return out, NystromFactors(attn1, attn2_inv, attn3, pad, n)
        return out
