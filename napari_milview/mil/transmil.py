"""TransMIL (Shao et al., NeurIPS 2021) with class-token attention sources.

Reimplemented from ``reference/algorithms.md`` section 3 (the official repository has no
licence: nothing was copied). Forward for a bag ``x`` [N, in_dim]::

    h = ReLU(_fc1.0 x)                                       [N, dim]
    S = ceil(sqrt(N)); the first S^2 - N instances are appended again (wrap-around)
    h = [cls_token; h]                                       [1 + S^2, dim]
    h = h + NystromAttention(LayerNorm(h))                   layer1
    h = PPEG(h, S)  (cls kept, S^2 tokens as an S x S image, row-major in bag order)
    h = h + NystromAttention(LayerNorm(h))                   layer2
    logits = _fc2(norm(h)[cls])                               [C]

Attention sources
-----------------
For each layer l the class-token row of the Nystrom attention matrix, computed as
``attn1[p] @ attn2^+ @ attn3`` (O(L m), the (n+p) x (n+p) matrix is never built), where
n = 1 + S^2 tokens enter the attention and p = (m - n mod m) mod m pad rows are prepended,
so the cls row is at padded index p and the instances are columns p+1 ... p+S^2. Pad
columns and the cls column are dropped. Duplicated instances (columns p+1+N ... p+S^2,
copies of instances 0 ... S^2-N-1) are **folded back by adding** their attention onto the
originals: an instance's score is the total attention the class token pays to all copies
of it, so the folded row keeps the row's total mass. Values are Nystrom approximations:
rows sum to about 1 and entries can be slightly negative, so do not re-softmax them
(rank-percentile or min-max for display).

* ``"layer{l}/head/{h}"`` (l = 1, 2; h = 0 ... heads-1) and ``"layer{l}/mean"`` (mean over
  heads); default ``"layer2/mean"`` (the layer feeding the classifier).
* ``"rollout"``: the cls row of ``(I + A2)/2 @ (I + A1)/2`` with ``A_l`` the head-mean
  attention of layer l (attention rollout), folded the same way, computed in O(L m). It
  ignores PPEG's spatial mixing between the layers (and, with ``nystrom="0.0.9"``, the
  row shift): a heuristic summary, not an exact attribution. Set ``model.with_rollout =
  False`` to skip it (it keeps layer 1's factors alive: about 8 KiB per instance).

The cls row is always the class token's own query row (padded index p). With
``nystrom="0.0.9"`` and p > 0 the output row that 0.0.9 writes into the class
token's position is pad row 0, not the cls row (see :mod:`.nystrom`); the sources still
report the class token's attention.

Nystrom variant
---------------
The ``nystrom`` hyper-parameter names which ``nystrom-attention`` release the weights were
trained with: ``"0.0.9"`` (pinned by the official repository) or ``"current"`` (0.0.10 and
later, e.g. ACMIL's copy pins 0.0.12). Both pad the sequence at the front; 0.0.9 then keeps
the first n output rows (the pad rows), later releases the last n (the real tokens). The
weights cannot show which one was used; :meth:`TransMIL.nystrom_from_container` picks a
default from the checkpoint's container and the loader records why in the card's notes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .base import MILModel, MILOutput, _shape, register_model
from .nystrom import NystromAttention, NystromFactors, nystrom_padding

__all__ = ["NYSTROM_VARIANTS", "PPEG", "TransLayer", "TransMIL", "fold_duplicates",
           "nystrom_variant", "square_side"]

#: the values of TransMIL's ``nystrom`` hyper-parameter: the nystrom-attention release
#: whose row slicing the model reproduces
NYSTROM_VARIANTS = ("0.0.9", "current")


def nystrom_variant(value: object) -> str:
    """Normalise a ``nystrom`` setting: ``"0.0.9"`` or ``"current"``.

    Accepts the two names (case and surrounding blanks ignored) and, as aliases, ``"legacy"``
    for 0.0.9 and a release number ``"0.0.10"`` or later for ``"current"``.

    Raises
    ------
    ValueError
        Anything else.
    """
    text = str(value).strip().lower()
    if text in ("0.0.9", "legacy"):
        return "0.0.9"
    if text == "current":
        return "current"
    m = re.fullmatch(r"0\.0\.(\d+)", text)
    if m and int(m.group(1)) >= 10:
        return "current"
    raise ValueError(f"unknown nystrom variant {value!r}: use '0.0.9' (nystrom-attention "
                     f"0.0.9, the official TransMIL) or 'current' (0.0.10 and later)")


def square_side(n: int) -> int:
    """S = ceil(sqrt(n)) (exact for any int)."""
    s = math.isqrt(n)
    return s if s * s == n else s + 1


def fold_duplicates(cols: Tensor, n: int) -> Tensor:
    """Fold the wrap-around duplicates of a squared bag back onto the originals (adding).

    Parameters
    ----------
    cols : Tensor, shape [..., S^2]
        Values for the S^2 squared tokens (token t is instance ``t mod n``).
    n : int
        Number of real instances N.

    Returns
    -------
    Tensor, shape [..., n]
    """
    idx = torch.arange(cols.shape[-1], device=cols.device) % n
    out = torch.zeros(*cols.shape[:-1], n, device=cols.device, dtype=cols.dtype)
    return out.index_add_(cols.dim() - 1, idx, cols)


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` (no feed-forward). Keys ``norm.*``, ``attn.*``."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_landmarks: int,
                 pinv_iterations: int, dropout: float, legacy_slice: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, heads=heads, dim_head=dim_head,
                                     num_landmarks=num_landmarks,
                                     pinv_iterations=pinv_iterations, residual=True,
                                     dropout=dropout, legacy_slice=legacy_slice)

    def forward(self, x: Tensor, return_factors: bool = False
                ) -> tuple[Tensor, NystromFactors | None]:
        """x: [B, n, dim] -> ([B, n, dim], factors or None)"""
        if return_factors:
            out, f = self.attn(self.norm(x), return_factors=True)
            return x + out, f
        return x + self.attn(self.norm(x)), None


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``y = x + DW7(x) + DW5(x) + DW3(x)`` on the
    S x S token image (depth-wise, 'same' padding), class token passed through.

    Keys ``proj.*`` [dim, 1, 7, 7], ``proj1.*`` [dim, 1, 5, 5], ``proj2.*`` [dim, 1, 3, 3],
    biases [dim].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x: [B, 1 + S^2, dim] -> [B, 1 + S^2, dim]"""
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        img = feat.transpose(1, 2).reshape(b, c, side, side)
        img = img + self.proj(img) + self.proj1(img) + self.proj2(img)
        return torch.cat([cls, img.flatten(2).transpose(1, 2)], dim=1)


@register_model
class TransMIL(MILModel):
    """TransMIL with Nystrom attention and PPEG.

    Parameters
    ----------
    in_dim : int
        Feature dimension (1024 in the official code; ACMIL's copy: ``D_feat``).
    n_classes : int
    dim : int
        Model width (512; ACMIL's copy: ``D_inner``).
    heads : int
        8.
    dim_head : int, optional
        Default ``dim // heads`` (64).
    num_landmarks : int, optional
        Default ``dim // 2`` (256) as the official code.
    pinv_iterations : int
        6.
    dropout : float
        Nystrom ``to_out`` dropout (0.1; off in eval).
    nystrom : {"current", "0.0.9"}
        Which nystrom-attention release to reproduce. ``"0.0.9"`` (pinned by the official
        repository, so its checkpoints need it) keeps the first n rows after front
        padding; ``"current"`` (0.0.10 and later, ACMIL's copy) the last n. With m = 256
        the two always differ, since (S^2 + 1) mod 256 is never 0 (a square is 0 or 1
        mod 4). Stored in ``hparams["nystrom"]``.
    legacy_nystrom_slice : bool, optional
        The older spelling: ``True`` = ``nystrom="0.0.9"``, ``False`` = ``"current"``
        (a contradiction with ``nystrom`` raises). Not stored.

    State dict (in 1024, dim 512, heads 8, C classes)
    --------------------------------------------------
    ``pos_layer.proj.weight`` [512, 1, 7, 7] / ``.bias`` [512];
    ``pos_layer.proj1.weight`` [512, 1, 5, 5] / ``.bias`` [512];
    ``pos_layer.proj2.weight`` [512, 1, 3, 3] / ``.bias`` [512];
    ``_fc1.0.weight`` [512, 1024] / ``.bias`` [512]; ``cls_token`` [1, 1, 512];
    ``layer{1,2}.norm.weight`` / ``.bias`` [512];
    ``layer{1,2}.attn.to_qkv.weight`` [1536, 512] (no bias);
    ``layer{1,2}.attn.to_out.0.weight`` [512, 512] / ``.bias`` [512];
    ``layer{1,2}.attn.res_conv.weight`` [8, 1, 33, 1];
    ``norm.weight`` / ``.bias`` [512]; ``_fc2.weight`` [C, 512] / ``.bias`` [C].
    The official checkpoints are PyTorch Lightning ``.ckpt`` files whose keys carry
    ``model.``: a wrapper prefix, stripped by the inherited :meth:`MILModel.remap_keys`;
    TransMIL has no layout of its own to remap.

    Attention sources: see the module docstring (``"layer{l}/head/{h}"``,
    ``"layer{l}/mean"``, ``"rollout"``; default ``"layer2/mean"``).
    """

    arch = "transmil"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, dim: int = 512,
                 heads: int = 8, dim_head: int | None = None,
                 num_landmarks: int | None = None, pinv_iterations: int = 6,
                 dropout: float = 0.1, nystrom: str | None = None,
                 legacy_nystrom_slice: bool | None = None) -> None:
        super().__init__()
        variant = "current" if nystrom is None else nystrom_variant(nystrom)
        if legacy_nystrom_slice is not None:
            old = "0.0.9" if legacy_nystrom_slice else "current"
            if nystrom is not None and old != variant:
                raise ValueError(f"nystrom={nystrom!r} contradicts "
                                 f"legacy_nystrom_slice={legacy_nystrom_slice!r}")
            variant = old
        legacy = variant == "0.0.9"
        dim_head = dim // heads if dim_head is None else int(dim_head)
        num_landmarks = dim // 2 if num_landmarks is None else int(num_landmarks)
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, dim=dim, heads=heads,
                          dim_head=dim_head, num_landmarks=num_landmarks,
                          pinv_iterations=pinv_iterations, dropout=dropout,
                          nystrom=variant)
        self.heads = heads
        self.num_landmarks = num_landmarks
        self.with_rollout = True
        self.pos_layer = PPEG(dim)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        kw = {"dim": dim, "heads": heads, "dim_head": dim_head, "num_landmarks": num_landmarks,
                  "pinv_iterations": pinv_iterations, "dropout": dropout,
                  "legacy_slice": legacy}
        self.layer1 = TransLayer(**kw)
        self.layer2 = TransLayer(**kw)
        self.norm = nn.LayerNorm(dim)
        self._fc2 = nn.Linear(dim, n_classes)

    # -- the legacy switch can be flipped after loading ---------------------------------------
    @property
    def legacy_nystrom_slice(self) -> bool:
        """Whether both Nystrom layers keep the first n rows (nystrom-attention 0.0.9)."""
        return self.layer1.attn.legacy_slice

    @legacy_nystrom_slice.setter
    def legacy_nystrom_slice(self, value: bool) -> None:
        self.layer1.attn.legacy_slice = self.layer2.attn.legacy_slice = bool(value)
        self.hparams["nystrom"] = "0.0.9" if value else "current"

    @property
    def nystrom(self) -> str:
        """The nystrom-attention variant reproduced: ``"0.0.9"`` or ``"current"``."""
        return "0.0.9" if self.legacy_nystrom_slice else "current"

    @nystrom.setter
    def nystrom(self, value: str) -> None:
        self.legacy_nystrom_slice = nystrom_variant(value) == "0.0.9"

    @classmethod
    def nystrom_from_container(cls, meta: Mapping[str, Any], prefix: str | None
                               ) -> tuple[str, str]:
        """The variant a checkpoint's container points to, and why.

        Parameters
        ----------
        meta : mapping
            :func:`napari_milview._weights.read_state_dict`'s metadata (``format``,
            ``config_key``, ``ignored_keys`` ...).
        prefix : str or None
            The wrapper prefix every key carried (``"model."``), if any.

        Returns
        -------
        variant : str
            ``"0.0.9"`` for the official repository's PyTorch Lightning checkpoint (a
            ``state_dict`` whose keys carry ``model.``, with ``hyper_parameters`` and
            ``pytorch-lightning_version``), ``"current"`` otherwise.
        reason : str
            One line for the card's notes.
        """
        fmt = meta.get("format")
        extra = set(meta.get("ignored_keys") or ()) | {meta.get("config_key")}
        if (fmt == "lightning" and prefix == "model." and "hyper_parameters" in extra
                and "pytorch-lightning_version" in extra):
            return "0.0.9", ("nystrom 0.0.9: an official TransMIL PyTorch Lightning checkpoint "
                             "(state_dict 'model.*', hyper_parameters, "
                             "pytorch-lightning_version); szc19990412/TransMIL pins "
                             "nystrom-attention 0.0.9")
        if fmt == "acmil":
            return "current", ("nystrom current: an ACMIL checkpoint container (ACMIL pins "
                               "nystrom-attention 0.0.12)")
        return "current", ("nystrom current: the checkpoint does not show the "
                           "nystrom-attention release (nystrom-attention >= 0.0.10 assumed; "
                           "choose 0.0.9 for weights trained with the official repository)")

    # -- geometry helpers ----------------------------------------------------------------------
    def token_layout(self, n_instances: int) -> dict[str, int]:
        """Where things are for a bag of ``n_instances``.

        Returns
        -------
        dict
            ``side`` S, ``added`` S^2 - N duplicated instances, ``tokens`` n = 1 + S^2,
            ``pad`` p front pad rows, ``cls_index`` p (padded index of the class token),
            ``first_instance`` p + 1.
        """
        s = square_side(n_instances)
        n = 1 + s * s
        p = nystrom_padding(n, self.num_landmarks)
        return {"side": s, "added": s * s - n_instances, "tokens": n, "pad": p, "cls_index": p,
                    "first_instance": p + 1}

    def _instance_cols(self, rows: Tensor, f: NystromFactors, n_inst: int) -> Tensor:
        """rows [..., L] (padded) -> folded instance values [..., N]"""
        s2 = f.n - 1
        return fold_duplicates(rows[..., f.pad + 1:f.pad + 1 + s2], n_inst)

    # -- forward -----------------------------------------------------------------------------
    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        n_inst = x.shape[0]
        h = self._fc1(x)  # [N, dim]
        side = square_side(n_inst)
        idx = torch.arange(side * side, device=h.device) % n_inst  # wrap-around duplication
        h = torch.cat([self.cls_token[0].to(h.dtype), h[idx]], dim=0).unsqueeze(0)
        h, f1 = self.layer1(h, return_factors=with_sources)
        h = self.pos_layer(h, side)
        h, f2 = self.layer2(h, return_factors=with_sources)
        logits = self._fc2(self.norm(h)[:, 0])[0]
        sources: dict[str, Tensor] = {}
        if with_sources:
            assert f1 is not None and f2 is not None
            rows = {}
            for layer, f in ((1, f1), (2, f2)):
                rows[layer] = f.row(f.pad)[0]  # [H, L]
                per_head = self._instance_cols(rows[layer], f, n_inst)  # [H, N]
                for hh in range(per_head.shape[0]):
                    sources[f"layer{layer}/head/{hh}"] = per_head[hh]
                sources[f"layer{layer}/mean"] = per_head.mean(dim=0)
            if self.with_rollout:
                r = 0.5 * rows[2].mean(dim=0)  # [L]
                r[f2.pad] += 0.5
                r = 0.5 * f1.vecmat(r.view(1, 1, -1))[0].mean(dim=0) + 0.5 * r
                sources["rollout"] = self._instance_cols(r, f1, n_inst)
        return MILOutput(logits=logits, sources=sources, default_source="layer2/mean")

    # -- state dict ----------------------------------------------------------------------------
    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("cls_token" in sd and "pos_layer.proj.weight" in sd
                and "layer1.attn.to_qkv.weight" in sd and "_fc2.weight" in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        dim, in_dim = _shape(sd, "_fc1.0.weight", "TransMIL")
        n_classes, _ = _shape(sd, "_fc2.weight", "TransMIL")
        heads = _shape(sd, "layer1.attn.res_conv.weight", "TransMIL")[0]
        qkv, dim2 = _shape(sd, "layer1.attn.to_qkv.weight", "TransMIL")
        if dim2 != dim or qkv % (3 * heads):
            raise ValueError(f"inconsistent TransMIL state_dict: to_qkv {qkv}x{dim2}, "
                             f"dim {dim}, heads {heads}")
        return {"in_dim": in_dim, "n_classes": n_classes, "dim": dim, "heads": heads,
                    "dim_head": qkv // (3 * heads)}
