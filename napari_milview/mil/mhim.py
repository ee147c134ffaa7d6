"""MHIM-MIL (Tang et al., ICCV 2023; MHIM-v2, IJCV 2025): the student network at inference.

MHIM-MIL (masked hard instance mining) trains a *student* MIL network on bags from which a
momentum *teacher* masked the instances it found most salient; at inference only the student
runs, with no masking. The authors' repository (DearCaat/MHIM-MIL; default branch
``master`` = MHIM-v2, the ICCV code on branch ``v1``) wraps a backbone in one ``MHIM``
module; its checkpoints ``fold_{k}_model_best.pt`` (v2) / ``fold_{k}_model_best_auc.pt``
(v1) are ``{'model': student, 'teacher': teacher (EMA), 'epoch': e}`` (v2) or
``{'model', 'teacher'}`` (v1); the loader takes ``'model'`` (the student; the teacher is
listed among the file's other entries on the card's notes and not loaded). Their baseline
initialisation checkpoints (``mhim_pure`` / ``pure``) are the same module, no merge.

Reimplemented from reading the authors' code (nothing copied): ``master`` at 9d0c91a
(pinned in ``tests/data/parity/make_mhim.py``, whose cases check it) and ``v1`` at 5377eb6
(the same forward under the ``patch_to_emb`` name, 1024 -> 512 hard-coded, no merge; checked
once against the authors' v1 code with their published ABMIL initialisation checkpoint,
not a committed case: at v1's fixed sizes a case would be several MB).
Forward for a bag ``x`` [N, in_dim]::

    h = act(feature.0 x)                                [N, dim]   (v1 name: patch_to_emb)
    (merge_test only) h = [h; Merge(h)]                 [N + k, dim]
    z = online_encoder(h)                               [dim]
    logits = predictor(z)                               [C]

Backbones (``backbone``, read from the keys; the authors' ``--baseline``)
-----------------------------------------------------------------------
``"attn"`` (ABMIL type, the authors' ``DAttention``): ``e = W2 act(W1 h)`` (both Linear
without bias, 128 hidden), ``a = softmax_N(e)``, ``z = a @ h``.

``"selfattn"`` (TransMIL type, the authors' ``SAttention``): **not** the official TransMIL:
no square padding of the sequence (the sequence is ``[cls; h]``, 1 + N tokens), PPEG pads
*internally* (the first ``S^2 - N`` instances appended again, then zeros up to 7 x 7 when
S < 7), convolves and drops the padding again; the projection (``feature``) and the
classifier (``predictor``) sit outside the backbone; ``dim_head = dim // 8`` whatever
``heads``; Nystrom attention is the authors' own copy, which keeps the **last** n rows (as
``nystrom-attention >= 0.0.10``, our ``legacy_slice=False``)::

    t = [cls; h]; t = t + Nystrom1(LN1(t)); t[1:] = PPEG(t[1:]); t = t + Nystrom2(LN2(t))
    z = LN(t)[cls]

``"dsmil"`` (the authors' ``mhim_modules.baseline.DSMIL``): :mod:`.dsmil`'s dual stream on
``h`` (its B-classifier with the nonlinear 128-wide query and, MHIM's default, the value
projection ``passing_v``; the instance classifier is a bare ``Sequential(Linear)``, keys
``i_classifier.0.*``); ``predictor`` is built but unused. The slide logits are what the
authors' ``validate_func`` scores (``engines/common_mil.py``): the average of the *logits*,
``0.5 bag + 0.5 max_n ins``, then the softmax (cross-entropy training), unlike the original
DSMIL's sigmoids::

    ins = i_classifier(h) [N, C];  bag = B-classifier(h, ins) [C]
    logits = 0.5 bag + 0.5 max_n ins

The merge module (MHIM-v2, ``--merge_enable``) is trained but not run at inference unless
the model was trained with ``--merge_test`` (``merge_test=True`` here): then ``k`` global
query tokens cross-attend to the bag (``Merge.merge``) and are appended to it.

Attention sources
-----------------
``"attn"`` backbone:
    ``"attention"`` softmax attention [N] (the paper's heatmap, "Attention" in the MHIM
    figures; the default); ``"raw/attention"`` the pre-softmax logits.
``"selfattn"`` backbone:
    ``"layer{l}/head/{h}"`` and ``"layer{l}/mean"`` (l = 1, 2): the class-token row of the
    Nystrom attention (``attn1[cls] attn2^+ attn3``) over the N instances, as the authors'
    ``forward_test(return_attn=True)`` returns it; default ``"layer1/mean"``, the layer whose
    class-token attention MHIM itself ranks instances by (``attn_layer = 0``).
``"dsmil"`` backbone (named as :mod:`.dsmil`):
    ``"class/{c}"`` the B-classifier attention of class ``c`` (softmax over the instances;
    default: the class with the highest probability), ``"raw/class/{c}"`` its pre-softmax
    score, ``"instance/{c}"`` ``softmax_C(ins)[:, c]`` (exclusive classes, as trained),
    ``"raw/instance/{c}"`` ``ins[:, c]``; ``"attention"`` / ``"raw/attention"`` the maximum over
    classes of the attention / its pre-softmax score (the authors' ``forward_test(return_attn=
    True)`` without ``attn2score``); ``"pseudo_score"`` ``max_c ins`` (their teacher's
    masking score with ``attn2score``). Aux: ``"bag_logits"``, ``"max_instance_logits"``,
    ``"critical_instance"`` [C].
``"attn"`` and ``"selfattn"``:
    ``"instance/{c}"``: MHIM-v2's instance class probability (``attn2score``, the
    "Tumor Probability" of the paper's figure): ``softmax_C(W_pred (a_n h_n))`` (attn) or
    ``softmax_C(W_pred to_out1(concat_h a1_{h,n} v1_{h,n}))`` (selfattn: layer-1 attention
    and values), ``"pseudo_score"``: its maximum over classes -- the score the v2 teacher
    masks hard instances by. With ``merge_test`` every source covers the N instances only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._weights import strip_prefixes
from .base import MILModel, MILOutput, _shape, register_alias, register_model
from .dsmil import _bag_stream, _BClassifier
from .nystrom import NystromAttention, NystromFactors

__all__ = ["MHIM", "MHIMMerge", "MHIMPPEG"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
_BACKBONES = ("attn", "selfattn", "dsmil")


def _act(name: str, allowed: tuple[str, ...]) -> list[nn.Module]:
    name = str(name).lower()
    if name not in allowed and name != "none":
        raise ValueError(f"activation {name!r} not in {allowed + ('none',)}")
    return [] if name == "none" else [_ACTS[name]()]


class MHIMPPEG(nn.Module):
    """The authors' PPEG on instance tokens only, with its own padding.

    ``S = ceil(sqrt(N))``; the first ``S^2 - N`` tokens are appended again; when S < 7 zero
    tokens pad to 7 x 7; ``y = x + DW7(x) + DW5(x) + DW3(x)`` on the image (row-major);
    the padding is dropped. Keys ``proj.*`` [dim, 1, 7, 7], ``proj1.*`` [dim, 1, 5, 5],
    ``proj2.*`` [dim, 1, 3, 3], biases [dim].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, dim] -> [B, N, dim]"""
        b, n, c = x.shape
        side = math.isqrt(n)
        side = side if side * side == n else side + 1
        x = torch.cat([x, x[:, :side * side - n]], dim=1)
        if side < 7:
            side = 7
            x = torch.cat([x, x.new_zeros(b, 49 - x.shape[1], c)], dim=1)
        img = x.transpose(1, 2).reshape(b, c, side, side)
        img = img + self.proj(img) + self.proj1(img) + self.proj2(img)
        return img.flatten(2).transpose(1, 2)[:, :n]


class _TransLayer(nn.Module):
    """``x + Nystrom(LayerNorm(x))``. Keys ``norm.*``, ``attn.*`` (see :mod:`.nystrom`)."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_landmarks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, heads=heads, dim_head=dim_head,
                                     num_landmarks=num_landmarks, pinv_iterations=6,
                                     residual=True, dropout=0.1)

    def forward(self, x: Tensor, with_factors: bool) -> tuple[Tensor, NystromFactors | None]:
        """x: [B, n, dim] -> ([B, n, dim], factors or None)"""
        if with_factors:
            out, f = self.attn(self.norm(x), return_factors=True)
            return x + out, f
        return x + self.attn(self.norm(x)), None


class _SAttention(nn.Module):
    """The ``selfattn`` backbone. Keys ``norm.*``, ``cls_token`` [1, 1, dim],
    ``layer{1,2}.*``, ``pos_embedding.*``."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_landmarks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = _TransLayer(dim, heads, dim_head, num_landmarks)
        self.layer2 = _TransLayer(dim, heads, dim_head, num_landmarks)
        self.pos_embedding = MHIMPPEG(dim)


class _Attention(nn.Module):
    """The ``attn`` backbone's scorer. Keys ``attention.0.weight`` [attn_dim, dim],
    ``attention.{2|1}.weight`` [1, attn_dim] (no biases; index 1 without activation)."""

    def __init__(self, dim: int, attn_dim: int, act: str) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, attn_dim, bias=False),
                                       *_act(act, ("relu", "gelu", "tanh")),
                                       nn.Linear(attn_dim, 1, bias=False))


class _DAttention(nn.Module):
    """Keys ``attention.attention.*`` (the authors' ``DAttention`` -> ``Attention``)."""

    def __init__(self, dim: int, attn_dim: int, act: str) -> None:
        super().__init__()
        self.attention = _Attention(dim, attn_dim, act)


class _DSMILBackbone(nn.Module):
    """The ``dsmil`` backbone (the authors' ``mhim_modules.baseline.DSMIL``). Keys
    ``i_classifier.0.*`` (a bare ``Sequential(Linear(dim, C))``, no ``fc``) and
    ``b_classifier.{q.0,q.2,v.1,fcc}.*`` (:mod:`.dsmil`'s ``BClassifier`` with the nonlinear
    128-wide query and, the authors' default here, the ``passing_v`` value projection)."""

    def __init__(self, dim: int, n_classes: int, passing_v: bool) -> None:
        super().__init__()
        self.i_classifier = nn.Sequential(nn.Linear(dim, n_classes))
        self.b_classifier = _BClassifier(dim, n_classes, 128, 128, nonlinear=True,
                                         passing_v=passing_v, dropout_v=0.0)


class MHIMMerge(nn.Module):
    """MHIM-v2's merge module at inference: ``k`` global queries cross-attend to the bag.

    ``z = to_out(softmax(q k^T / sqrt(d)) v)`` with ``q = to_q(LN(g))``, ``k, v =
    to_kv(LN(x))`` (the same LayerNorm for both), ``heads`` heads. Keys ``norm.*``,
    ``attn.to_kv.weight`` [2 heads d, dim], ``attn.to_q.weight`` [heads d, dim],
    ``attn.to_out.0.*`` (absent when heads == 1 and d == dim), ``global_q_mm`` [1, k, dim]
    (only when trained with a momentum ``merge_mm`` != 1; without it the authors' module
    cannot merge, so ``merge_test`` needs it).
    """

    def __init__(self, dim: int, k: int, heads: int, dim_head: int, global_q: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.attn.to_q = nn.Linear(dim, inner, bias=False)
        self.attn.to_out = (nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.1))
                            if not (heads == 1 and dim_head == dim) else nn.Identity())
        if global_q:
            self.global_q_mm = nn.Parameter(torch.zeros(1, k, dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, dim] -> merged tokens [k, dim]"""
        if not hasattr(self, "global_q_mm"):
            raise RuntimeError("merge_test needs the merge module's 'global_q_mm' queries, "
                               "which this checkpoint does not have")
        h = self.heads
        kk, v = self.attn.to_kv(self.norm(x)).chunk(2, dim=-1)  # [N, inner] each
        q = self.attn.to_q(self.norm(self.global_q_mm[0].to(x.dtype)))  # [k, inner]
        q, kk, v = (t.reshape(t.shape[0], h, -1).transpose(0, 1) for t in (q, kk, v))
        att = torch.softmax(q @ kk.transpose(-1, -2) * self.scale, dim=-1)  # [H, k, N]
        out = (att @ v).transpose(0, 1).reshape(q.shape[1], -1)  # [k, inner]
        return self.attn.to_out(out)


@register_model
class MHIM(MILModel):
    """The MHIM-MIL student network (ABMIL-, TransMIL- or DSMIL-type backbone).

    Parameters
    ----------
    in_dim : int
        Feature dimension D (``--input_dim``; v1 hard-codes 1024).
    n_classes : int
    dim : int
        Width after the projection (``mlp_dim``, 512).
    backbone : {"attn", "selfattn", "dsmil"}
        ``--baseline``.
    act : {"relu", "gelu", "none"}, optional
        Activation after the projection (``--act``); leaves no trace in the weights.
        Default: ``"gelu"`` for the v2 layout (``config/feat_cls.yaml`` and
        ``feat_surv.yaml``, which every v2 training command uses, set it) and ``"relu"``
        for the v1 layout (``main.py``'s default; the v1 commands do not set it).
    da_act : {"relu", "gelu", "tanh", "none"}
        Activation inside the ``attn`` scorer (``--da_act``, default ``"relu"`` in both
        versions); ``"none"`` is read from the keys (index 1 instead of 2).
    attn_dim : int
        Hidden size of the ``attn`` scorer (128).
    heads : int
        ``selfattn`` heads (``--n_heads``, 8; read from ``res_conv``).
    dim_head : int, optional
        Default ``dim // 8`` (the authors' choice whatever ``heads``).
    num_landmarks : int, optional
        Default ``dim // 2``.
    merge : bool
        Whether the checkpoint holds MHIM-v2's merge module (``--merge_enable``).
    merge_k : int
        Number of merge queries (``--merge_k``; read from ``global_q_mm``).
    merge_heads : int
        Merge cross-attention heads (8, fixed in the authors' code).
    merge_dim_head : int
        Merge head size (64, fixed in the authors' code; read from ``to_q``).
    merge_global_q : bool
        Whether ``merge.global_q_mm`` exists (``--merge_mm`` != 1).
    merge_test : bool
        Run the merge at inference (``--merge_test``; off by default as in the authors'
        code). Leaves no trace in the weights.
    v1_layout : bool
        The v1 (ICCV) name ``patch_to_emb`` for the projection instead of ``feature``.
    passing_v : bool
        ``dsmil`` backbone: the value projection ``Linear(dim, dim) - ReLU`` (the authors'
        ``BClassifier`` default in MHIM; read from ``b_classifier.v.1``).

    State dict (v2; in 1024, dim 512, C classes)
    --------------------------------------------
    ``feature.0.weight`` [512, 1024] / ``.bias`` [512] (v1: ``patch_to_emb.0.*``);
    ``predictor.weight`` [C, 512] / ``.bias`` [C];
    attn: ``online_encoder.attention.attention.0.weight`` [128, 512],
    ``online_encoder.attention.attention.2.weight`` [1, 128];
    selfattn: ``online_encoder.cls_token`` [1, 1, 512], ``online_encoder.norm.*``,
    ``online_encoder.layer{1,2}.norm.*``, ``online_encoder.layer{1,2}.attn.to_qkv.weight``
    [1536, 512], ``...attn.to_out.0.*``, ``...attn.res_conv.weight`` [8, 1, 33, 1],
    ``online_encoder.pos_embedding.proj{,1,2}.*``;
    dsmil: ``online_encoder.i_classifier.0.*`` [C, 512] / [C],
    ``online_encoder.b_classifier.q.0.*`` [128, 512], ``...q.2.*`` [128, 128],
    ``...v.1.*`` [512, 512], ``...fcc.weight`` [C, C, 512] / ``.bias`` [C] (``predictor`` is
    kept, unused, as in the authors' module);
    merge (v2 with ``--merge_enable``): ``merge.norm.*``, ``merge.attn.to_kv.weight``
    [1024, 512], ``merge.attn.to_q.weight`` [512, 512], ``merge.attn.to_out.0.*``,
    ``merge.global_q_mm`` [1, k, 512].

    Attention sources: see the module docstring.
    """

    arch = "mhim"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, dim: int = 512,
                 backbone: str = "selfattn", act: str | None = None, da_act: str = "relu",
                 attn_dim: int = 128, heads: int = 8, dim_head: int | None = None,
                 num_landmarks: int | None = None, merge: bool = False, merge_k: int = 1,
                 merge_heads: int = 8, merge_dim_head: int = 64, merge_global_q: bool = True,
                 merge_test: bool = False, v1_layout: bool = False,
                 passing_v: bool = True) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise ValueError(f"MHIM backbone {backbone!r} not supported (one of {_BACKBONES})")
        act = ("relu" if v1_layout else "gelu") if act is None else str(act).lower()
        dim_head = dim // 8 if dim_head is None else int(dim_head)
        num_landmarks = dim // 2 if num_landmarks is None else int(num_landmarks)
        if merge_test and not (merge and merge_global_q):
            raise ValueError("merge_test needs the merge module with its global queries")
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, dim=dim, backbone=backbone,
                          act=act, da_act=str(da_act).lower(), attn_dim=attn_dim, heads=heads,
                          dim_head=dim_head, num_landmarks=num_landmarks, merge=bool(merge),
                          merge_k=merge_k, merge_heads=merge_heads,
                          merge_dim_head=merge_dim_head, merge_global_q=bool(merge_global_q),
                          merge_test=bool(merge_test), v1_layout=bool(v1_layout),
                          passing_v=bool(passing_v))
        self.backbone = backbone
        self.merge_test = bool(merge_test)
        proj = nn.Sequential(nn.Linear(in_dim, dim), *_act(act, ("relu", "gelu")))
        self._proj_name = "patch_to_emb" if v1_layout else "feature"
        setattr(self, self._proj_name, proj)
        if backbone == "attn":
            self.online_encoder: nn.Module = _DAttention(dim, attn_dim, da_act)
        elif backbone == "dsmil":
            self.online_encoder = _DSMILBackbone(dim, n_classes, passing_v)
        else:
            self.online_encoder = _SAttention(dim, heads, dim_head, num_landmarks)
        self.predictor = nn.Linear(dim, n_classes)
        if merge:
            self.merge = MHIMMerge(dim, merge_k, merge_heads, merge_dim_head, merge_global_q)

    # -- forward -----------------------------------------------------------------------------
    def _class_probs(self, feats: Tensor) -> Tensor:
        """softmax over classes of ``W_pred feats + b_pred[0]`` (the authors add class 0's
        bias to every class, which the softmax ignores). feats [N, dim] -> [C, N]"""
        return torch.softmax(feats @ self.predictor.weight.T, dim=-1).T

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        n = x.shape[0]
        h = getattr(self, self._proj_name)(x)  # [N, dim]
        if self.merge_test:
            h = torch.cat([h, self.merge(h)], dim=0)  # [N + k, dim]
        if self.backbone == "dsmil":
            return self._forward_dsmil(h, n, with_sources)
        sources: dict[str, Tensor] = {}
        default = "attention" if self.backbone == "attn" else "layer1/mean"
        if self.backbone == "attn":
            raw = self.online_encoder.attention.attention(h)[:, 0]  # [N']
            a = torch.softmax(raw, dim=0)
            logits = self.predictor(a @ h)
            if with_sources:
                inst = self._class_probs(a[:n, None] * h[:n])  # [C, N]
                sources = {"attention": a[:n], "raw/attention": raw[:n]}
        else:
            enc = self.online_encoder
            t = torch.cat([enc.cls_token[0].to(h.dtype), h], dim=0).unsqueeze(0)  # [1, 1+N', d]
            t1, f1 = enc.layer1(t, with_sources)
            t1 = torch.cat([t1[:, :1], enc.pos_embedding(t1[:, 1:])], dim=1)
            t2, f2 = enc.layer2(t1, with_sources)
            logits = self.predictor(enc.norm(t2)[0, 0])
            if with_sources:
                assert f1 is not None and f2 is not None
                rows = {}
                for layer, f in ((1, f1), (2, f2)):
                    rows[layer] = f.row(f.pad)[0, :, f.pad + 1:f.pad + 1 + n]  # [H, N]
                    for hh in range(rows[layer].shape[0]):
                        sources[f"layer{layer}/head/{hh}"] = rows[layer][hh]
                    sources[f"layer{layer}/mean"] = rows[layer].mean(dim=0)
                # MHIM-v2's score: layer-1 values weighted by the cls attention, to_out
                att = enc.layer1.attn
                inner = att.heads * att.dim_head
                v = F.linear(enc.layer1.norm(t[0, 1:n + 1]),
                             att.to_qkv.weight[2 * inner:])  # [N, H*dh]
                v = v.reshape(n, att.heads, att.dim_head) * rows[1].T[:, :, None]
                inst = self._class_probs(att.to_out(v.reshape(n, inner)))  # [C, N]
        if not with_sources:
            return MILOutput(logits=logits, sources={}, default_source=default)
        for c in range(inst.shape[0]):
            sources[f"instance/{c}"] = inst[c]
        sources["pseudo_score"] = inst.max(dim=0).values
        return MILOutput(logits=logits, sources=sources, default_source=default)

    def _forward_dsmil(self, h: Tensor, n: int, with_sources: bool) -> MILOutput:
        """The ``dsmil`` backbone on h [N', dim] (N' = N + k with ``merge_test``); sources
        over the first n instances. The slide logits are the authors' evaluation
        ``0.5 bag + 0.5 max_n ins`` (logits averaged, then a softmax as for any MHIM)."""
        enc = self.online_encoder
        ins = enc.i_classifier(h)  # [N', C]
        crit, raw, a, bag = _bag_stream(enc.b_classifier, h, ins)
        max_ins = ins.max(dim=0).values  # [C]
        logits = 0.5 * bag + 0.5 * max_ins
        aux = {"bag_logits": bag, "max_instance_logits": max_ins,
               "critical_instance": crit}
        default = f"class/{int(torch.argmax(logits).item())}"
        if not with_sources:
            return MILOutput(logits=logits, sources={}, default_source=default, aux=aux)
        ins_p = torch.softmax(ins[:n], dim=1)  # [N, C]
        sources: dict[str, Tensor] = {}
        for c in range(ins.shape[1]):
            sources[f"class/{c}"] = a[:n, c]
            sources[f"raw/class/{c}"] = raw[:n, c]
            sources[f"instance/{c}"] = ins_p[:, c]
            sources[f"raw/instance/{c}"] = ins[:n, c]
        sources["attention"] = a[:n].max(dim=1).values
        sources["raw/attention"] = raw[:n].max(dim=1).values
        sources["pseudo_score"] = ins[:n].max(dim=1).values
        return MILOutput(logits=logits, sources=sources, default_source=default, aux=aux)

    # -- state dict ----------------------------------------------------------------------------
    @staticmethod
    def _proj_key(sd: Mapping[str, Tensor]) -> str | None:
        for name in ("feature", "patch_to_emb"):
            if f"{name}.0.weight" in sd:
                return name
        return None

    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Strip wrapper prefixes; drop ``merge.global_q``, the authors' second name of the
        same parameter as ``merge.global_q_mm`` (``Merge`` assigns one Parameter to both
        attributes, so ``state_dict()`` holds it twice)."""
        out, notes = strip_prefixes(sd)
        dup = out.get("merge.global_q")
        ref = out.get("merge.global_q_mm")
        if dup is not None and ref is not None and dup.shape == ref.shape \
                and torch.equal(dup, ref):
            del out["merge.global_q"]
            notes.append("dropped 'merge.global_q' (the same tensor as 'merge.global_q_mm')")
        return out, notes

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return (cls._proj_key(sd) is not None and "predictor.weight" in sd
                and any(k.startswith("online_encoder.") for k in sd))

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        proj = cls._proj_key(sd)
        if proj is None:
            raise ValueError("state_dict is not an MHIM layout: no 'feature.0.weight' "
                             "(v2) or 'patch_to_emb.0.weight' (v1)")
        dim, in_dim = _shape(sd, f"{proj}.0.weight", "MHIM")
        n_classes, dim2 = _shape(sd, "predictor.weight", "MHIM")
        if dim2 != dim:
            raise ValueError(f"inconsistent MHIM state_dict: predictor takes {dim2}, "
                             f"projection gives {dim}")
        hp: dict[str, Any] = {"in_dim": in_dim, "n_classes": n_classes, "dim": dim,
                              "v1_layout": proj == "patch_to_emb"}
        pre = "online_encoder.attention.attention."
        if f"{pre}0.weight" in sd:
            hp["backbone"] = "attn"
            hp["attn_dim"] = _shape(sd, f"{pre}0.weight", "MHIM")[0]
            if f"{pre}1.weight" in sd and f"{pre}2.weight" not in sd:
                hp["da_act"] = "none"
        elif "online_encoder.cls_token" in sd:
            hp["backbone"] = "selfattn"
            heads = _shape(sd, "online_encoder.layer1.attn.res_conv.weight", "MHIM")[0]
            qkv, _ = _shape(sd, "online_encoder.layer1.attn.to_qkv.weight", "MHIM")
            if qkv % (3 * heads):
                raise ValueError(f"inconsistent MHIM state_dict: to_qkv rows {qkv}, "
                                 f"{heads} heads")
            hp["heads"] = heads
            hp["dim_head"] = qkv // (3 * heads)
        elif "online_encoder.i_classifier.0.weight" in sd:
            hp["backbone"] = "dsmil"
            c_ins, d_ins = _shape(sd, "online_encoder.i_classifier.0.weight", "MHIM")
            fcc = _shape(sd, "online_encoder.b_classifier.fcc.weight", "MHIM")
            if (c_ins, d_ins) != (n_classes, dim) or fcc != (n_classes, n_classes, dim):
                raise ValueError(f"inconsistent MHIM DSMIL state_dict: i_classifier "
                                 f"[{c_ins}, {d_ins}], fcc {fcc} for {n_classes} classes "
                                 f"of width {dim}")
            if "online_encoder.b_classifier.q.0.weight" not in sd:
                raise ValueError("MHIM DSMIL without the nonlinear query "
                                 "'b_classifier.q.0' is not the authors' layout")
            hp["passing_v"] = "online_encoder.b_classifier.v.1.weight" in sd
        else:
            raise ValueError("unknown MHIM backbone (no 'attn', 'selfattn' or 'dsmil' "
                             "keys)")
        if "merge.attn.to_q.weight" in sd:
            hp["merge"] = True
            inner = _shape(sd, "merge.attn.to_q.weight", "MHIM")[0]
            if inner % 8:
                raise ValueError(f"MHIM merge: to_q has {inner} rows, not 8 heads")
            hp["merge_dim_head"] = inner // 8  # the authors fix 8 heads
            hp["merge_global_q"] = "merge.global_q_mm" in sd
            if hp["merge_global_q"]:
                hp["merge_k"] = _shape(sd, "merge.global_q_mm", "MHIM")[1]
        return hp


register_alias("mhim_abmil", "mhim", backbone="attn")
register_alias("mhim_transmil", "mhim", backbone="selfattn")
register_alias("mhim_dsmil", "mhim", backbone="dsmil")
