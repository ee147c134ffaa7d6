"""PackMIL (Tang, Fang et al., 2025) with its ABMIL and TransMIL aggregators, at inference.

"Revisiting Data Challenges of Computational Pathology: A Pack-based Multiple Instance
Learning Training Framework" (arXiv 2509.20923); official code ``FangHeng/PackMIL``
(``modules/packmil.py``, ``modules/pack/``). Packing, token dropout and the residual
"hyperslide" branch are training devices; in eval mode the authors' ``PackMIL.forward``
runs the attention-driven downsampler (ADS) without downsampling, then the aggregator
(``MILBase`` + ``DAttention``) and the ``predictor``::

    s   = softmax_N(downsampler.attention(x))                  [N]   (ADS, when present)
    x   = downsampler.downsample(GELU(downsampler.embed(x + s x)))   [N, D]
    h   = act(mil.embed.0(norm(x)))                             [N, L]  (norm: none/LN/BN)
    e   = mil.aggregate.attention(h)  (gated: attention_c(tanh(a h) * sigmoid(b h)))  [N]
    a   = softmax_N(e);  z = norm1(a @ h);  logits = predictor(z)   [C]

With the TransMIL aggregator (``--model transmil``: ``SAttention`` with Nystrom attention and
PPEG, ``forward_ntrans``) the aggregation step is instead::

    t   = [cls_token; h]                                         [1 + N, L]
    t   = t + NystromAttention(LN(t))                            layer1
    t[1:] = PPEG(t[1:])   (bag wrapped to S x S, S = max(ceil(sqrt N), 7), zero-filled to 7 x 7)
    t   = t + NystromAttention(LN(t))                            layers.0, layers.1, ...
    z   = fc_norm(norm(t)[0]);  logits = predictor(z)            [C]

Unlike the original TransMIL the bag is not lengthened before the attention (PPEG wraps and
trims it itself); the Nystrom layers keep the last n rows after front padding (``current``
semantics of :mod:`.nystrom`), 8 heads of ``L // 8``, ``L // 2`` landmarks.

Implemented: ABMIL (``--model abmil``, the one the README trains) and TransMIL. The authors'
DSMIL branch cannot be built at the pinned commit (``PackMIL(mil='dsmil')`` raises TypeError:
``MILBase`` is called without ``n_classes``); ViT-MIL and RRT-MIL are not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._weights import strip_prefixes
from .base import MILModel, MILOutput, _shape, register_model
from .nystrom import NystromAttention
from .transmil import PPEG

__all__ = ["PackMIL"]

_NORMS = (None, "none", "ln", "bn")
_AGGREGATORS = ("abmil", "transmil")


def _norm(kind: str | None, dim: int, bias: bool) -> nn.Module | None:
    if kind == "ln":
        return nn.LayerNorm(dim, bias=bias)
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    return None


class _ADS(nn.Module):
    """The authors' attention-driven downsampler, eval mode (no token is dropped)."""

    def __init__(self, dim: int, attn_dim: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.downsample = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.softmax(self.attention(x)[:, 0], dim=0)  # [N]
        x = x + x * s[:, None]
        return self.downsample(self.embed(x)), s


class _DAttention(nn.Module):
    """``DAttention`` of ``modules/pack/pack_baseline.py`` (hidden size 128, one branch)."""

    def __init__(self, dim: int, gated: bool, bias: bool, cls_norm: str | None) -> None:
        super().__init__()
        self.gated = gated
        if gated:
            self.attention_a = nn.Sequential(nn.Linear(dim, 128, bias=bias), nn.Tanh())
            self.attention_b = nn.Sequential(nn.Linear(dim, 128, bias=bias), nn.Sigmoid())
            self.attention_c = nn.Linear(128, 1, bias=bias)
        else:
            self.attention = nn.Sequential(nn.Linear(dim, 128, bias=bias), nn.Tanh(),
                                           nn.Linear(128, 1, bias=bias))
        self.norm1 = _norm(cls_norm, dim, bias)

    def scores(self, h: Tensor) -> Tensor:
        """Pre-softmax attention [N]."""
        if self.gated:
            return self.attention_c(self.attention_a(h) * self.attention_b(h))[:, 0]
        return self.attention(h)[:, 0]


class _PackPPEG(PPEG):
    """The PPEG of ``modules/emb_position.py`` (keys as :class:`.transmil.PPEG`): it takes the
    instance tokens only, wraps them to S x S (S = ceil(sqrt N)), zero-fills to 7 x 7 when
    S < 7, convolves and trims back to N."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """x: [B, N, dim] -> [B, N, dim]"""
        b, n, c = x.shape
        s = math.isqrt(n)
        s = s if s * s == n else s + 1
        x = torch.cat([x, x[:, :s * s - n]], dim=1)
        if s < 7:
            x = torch.cat([x, x.new_zeros(b, 49 - s * s, c)], dim=1)
            s = 7
        img = x.transpose(1, 2).reshape(b, c, s, s)
        img = img + self.proj(img) + self.proj1(img) + self.proj2(img)
        return img.flatten(2).transpose(1, 2)[:, :n]


class _TransLayer(nn.Module):
    """``x + NystromAttention(LN(x))`` of ``pack_baseline.TransLayer`` (``attn_type='ntrans'``;
    no LayerNorm with ``vit_norm`` off, LN bias follows ``mil_bias``)."""

    def __init__(self, dim: int, bias: bool, vit_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, bias=bias) if vit_norm else nn.Identity()
        self.attn = NystromAttention(dim=dim, heads=8, dim_head=dim // 8,
                                     num_landmarks=dim // 2, pinv_iterations=6, residual=True)

    def forward(self, x: Tensor, with_attn: bool) -> tuple[Tensor, Tensor | None]:
        """x: [1, n, dim] -> (x', class-token attention over the instances [H, n - 1] or None)"""
        if not with_attn:
            return x + self.attn(self.norm(x)), None
        out, f = self.attn(self.norm(x), return_factors=True)
        return x + out, f.row(f.pad)[0, :, f.pad + 1:]


class _SAttention(nn.Module):
    """``SAttention`` of ``pack_baseline.py`` with ``pos='ppeg'``, ``attn_type='ntrans'``,
    ``pool='cls_token'`` (what PackMIL's ``transmil`` branch builds)."""

    def __init__(self, dim: int, n_layers: int, bias: bool, vit_norm: bool,
                 fc_norm: bool) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = _PackPPEG(dim)
        self.norm = nn.LayerNorm(dim, bias=bias) if vit_norm and not fc_norm else None
        self.fc_norm = nn.LayerNorm(dim, bias=bias) if vit_norm and fc_norm else None
        self.layer1 = _TransLayer(dim, bias, vit_norm)
        self.layers = (nn.Sequential(*[_TransLayer(dim, bias, vit_norm)
                                       for _ in range(n_layers - 1)])
                       if n_layers >= 2 else None)

    def forward(self, h: Tensor, with_attn: bool) -> tuple[Tensor, list[Tensor]]:
        """h: [N, dim] -> (pooled class token [dim], per-layer cls attention [H, N] each)"""
        t = torch.cat([self.cls_token[0].to(h.dtype), h], dim=0)[None]  # [1, 1 + N, dim]
        attn = []
        t, a = self.layer1(t, with_attn)
        attn.append(a)
        t = torch.cat([t[:, :1], self.pos_embedding(t[:, 1:])], dim=1)
        for layer in self.layers or ():
            t, a = layer(t, with_attn)
            attn.append(a)
        if self.norm is not None:
            t = self.norm(t)
        z = t[0, 0]
        if self.fc_norm is not None:
            z = self.fc_norm(z)
        return z, attn


class _MILBase(nn.Module):
    def __init__(self, in_dim: int, inner_dim: int, act: str, bias: bool,
                 mil_norm: str | None, embed_norm_pos: int, gated: bool,
                 cls_norm: str | None, aggregator: str = "abmil", n_layers: int = 2,
                 vit_norm: bool = True, fc_norm: bool = True) -> None:
        super().__init__()
        self.norm = _norm(mil_norm, in_dim if embed_norm_pos == 0 else inner_dim, bias)
        self.embed = nn.Sequential(nn.Linear(in_dim, inner_dim, bias=bias),
                                   nn.GELU() if act == "gelu" else nn.ReLU())
        self.aggregate: nn.Module
        if aggregator == "transmil":
            self.aggregate = _SAttention(inner_dim, n_layers, bias, vit_norm, fc_norm)
        else:
            self.aggregate = _DAttention(inner_dim, gated, bias, cls_norm)


@register_model
class PackMIL(MILModel):
    """PackMIL-trained ABMIL or TransMIL (with or without the ADS downsampler), at inference.

    Parameters
    ----------
    in_dim : int
        Feature dimension D (``--input_dim``).
    n_classes : int
        Number of classes C.
    inner_dim : int
        Aggregator width L (``--inner_dim``, 512).
    gated : bool
        Gated attention (``--da_gated``).
    mil_bias : bool
        Biases in the aggregator (``not --no_mil_bias``; True by default).
    mil_norm, cls_norm : {None, "none", "ln", "bn"}
        Feature normalisation before (or after, ``embed_norm_pos=1``) the embedding, and on
        the pooled feature. As in the authors' ``DAttention``, ``cls_norm=None`` follows
        ``mil_norm``; ``"none"`` is no normalisation.
    embed_norm_pos : {0, 1}
        ``--embed_norm_pos``.
    act : {"gelu", "relu"}
        Embedding activation (``--act``; the published configs use ``gelu``). Leaves no trace
        in the weights.
    ads : bool
        The attention-driven downsampler is present (``--pack_downsample_mode ads`` with
        ``--pack_residual_downsample_r`` > 1).
    ads_attn_dim : int
        Hidden size of the ADS attention (128).
    aggregator : {"abmil", "transmil"}
        ``--model``. ``gated`` and ``cls_norm`` concern ABMIL only; ``n_layers``,
        ``vit_norm`` and ``fc_norm`` TransMIL only.
    n_layers : int
        TransMIL Nystrom layers (``--n_layers``, 2): ``layer1`` then ``layers.{0..}``.
    vit_norm, fc_norm : bool
        TransMIL LayerNorms (``--vit_norm``, ``--fc_norm``; both on by default): with
        ``vit_norm`` every layer normalises its input and the class token is normalised at
        the end, by ``fc_norm`` (when ``fc_norm``) or ``norm``.

    State dict (the authors' ``PackMIL`` names; ADS, LN, D 1024, L 512, C 2)
    ------------------------------------------------------------------------
    ``downsampler.attention.{0,2}.{weight,bias}`` [128, 1024] / [1, 128],
    ``downsampler.embed.0.{weight,bias}`` [1024, 1024], ``downsampler.downsample.*``
    [1024, 1024], ``mil.norm.{weight,bias}`` [1024], ``mil.embed.0.{weight,bias}``
    [512, 1024], ``mil.aggregate.attention.{0,2}.*`` [128, 512] / [1, 128] (gated:
    ``attention_a.0``, ``attention_b.0``, ``attention_c``), ``mil.aggregate.norm1.*`` [512],
    ``predictor.{weight,bias}`` [2, 512]. The residual branch's ``predictor_res.*``
    (``--pack_residual_type dual_cls``) is training-only and dropped on loading.
    TransMIL replaces ``mil.aggregate.*`` by ``cls_token`` [1, 1, 512],
    ``pos_embedding.proj{,1,2}.*`` [512, 1, k, k] / [512], ``fc_norm.*`` (or ``norm.*``)
    [512], and per layer (``layer1``, ``layers.{i}``) ``norm.*`` [512],
    ``attn.to_qkv.weight`` [1536, 512], ``attn.to_out.0.*`` [512, 512],
    ``attn.res_conv.weight`` [8, 1, 33, 1].

    Attention sources
    -----------------
    ABMIL: ``"attention"``: the aggregator's softmax attention [N] -- the default;
    ``"raw/attention"``: its logits. TransMIL: ``"layer{l}/head/{h}"`` and
    ``"layer{l}/mean"`` (l = 1 ... n_layers), the class token's row of layer l's Nystrom
    attention over the instances (a Nystrom approximation: rows sum to about 1, entries can
    be slightly negative), as in :mod:`.transmil`; the default is the last layer's mean.
    Both: ``"downsampler/attention"``: the ADS softmax weights [N] (when the model has the
    downsampler).
    """

    arch = "packmil"

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, inner_dim: int = 512,
                 gated: bool = False, mil_bias: bool = True, mil_norm: str | None = None,
                 cls_norm: str | None = None, embed_norm_pos: int = 0, act: str = "gelu",
                 ads: bool = True, ads_attn_dim: int = 128, aggregator: str = "abmil",
                 n_layers: int = 2, vit_norm: bool = True, fc_norm: bool = True) -> None:
        super().__init__()
        if mil_norm not in _NORMS or cls_norm not in _NORMS:
            raise ValueError(f"PackMIL norms must be one of {_NORMS}")
        if aggregator not in _AGGREGATORS:
            raise ValueError(f"PackMIL aggregator must be one of {_AGGREGATORS}")
        if aggregator == "transmil" and (n_layers < 1 or inner_dim % 8):
            raise ValueError("PackMIL TransMIL needs n_layers >= 1 and inner_dim a multiple "
                             "of 8 (8 heads)")
        if act not in ("gelu", "relu") or embed_norm_pos not in (0, 1):
            raise ValueError("PackMIL act must be 'gelu' or 'relu', embed_norm_pos 0 or 1")
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, inner_dim=inner_dim,
                          gated=bool(gated), mil_bias=bool(mil_bias), mil_norm=mil_norm,
                          cls_norm=cls_norm, embed_norm_pos=embed_norm_pos, act=act,
                          ads=bool(ads), ads_attn_dim=ads_attn_dim, aggregator=aggregator)
        if aggregator == "transmil":
            self.hparams.update(n_layers=int(n_layers), vit_norm=bool(vit_norm),
                                fc_norm=bool(fc_norm))
        self.downsampler = _ADS(in_dim, ads_attn_dim) if ads else None
        self.mil = _MILBase(in_dim, inner_dim, act, mil_bias, mil_norm, embed_norm_pos, gated,
                            mil_norm if cls_norm is None else cls_norm, aggregator,
                            n_layers, vit_norm, fc_norm)
        self.predictor = nn.Linear(inner_dim, n_classes)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        sources: dict[str, Tensor] = {}
        if self.downsampler is not None:
            x, s = self.downsampler(x)
            sources["downsampler/attention"] = s
        mil = self.mil
        pos = self.hparams["embed_norm_pos"]
        if mil.norm is not None and pos == 0:
            x = mil.norm(x)
        h = mil.embed(x)  # [N, L]
        if mil.norm is not None and pos == 1:
            h = mil.norm(h)
        if isinstance(mil.aggregate, _SAttention):
            z, attn = mil.aggregate(h, with_sources)
            for i, a in enumerate(attn if with_sources else (), start=1):
                assert a is not None
                for hh in range(a.shape[0]):
                    sources[f"layer{i}/head/{hh}"] = a[hh]
                sources[f"layer{i}/mean"] = a.mean(dim=0)
            return MILOutput(logits=self.predictor(z), sources=sources if with_sources else {},
                             default_source=f"layer{len(attn)}/mean")
        raw = mil.aggregate.scores(h)  # [N]
        a = torch.softmax(raw, dim=0)
        z = a @ h  # [L]
        if mil.aggregate.norm1 is not None:
            z = mil.aggregate.norm1(z[None])[0]
        logits = self.predictor(z)
        sources.update({"attention": a, "raw/attention": raw})
        return MILOutput(logits=logits, sources=sources if with_sources else {},
                         default_source="attention")

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("mil.embed.0.weight" in sd and "predictor.weight" in sd
                and ("mil.aggregate.attention.0.weight" in sd
                     or "mil.aggregate.attention_a.0.weight" in sd
                     or ("mil.aggregate.cls_token" in sd
                         and "mil.aggregate.layer1.attn.to_qkv.weight" in sd)))

    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Strip wrapper prefixes; drop the residual branch's own classifier
        (``predictor_res.*``, training-only), noted."""
        out, notes = strip_prefixes(sd)
        dropped = [k for k in out if k.startswith("predictor_res.")]
        for k in dropped:
            del out[k]
        if dropped:
            notes.append("dropped the PackMIL residual-branch classifier predictor_res.* "
                         "(training-only)")
        return out, notes

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        inner, in_dim = _shape(sd, "mil.embed.0.weight", "PackMIL")
        n_classes, inner2 = _shape(sd, "predictor.weight", "PackMIL")
        if inner2 != inner:
            raise ValueError(f"inconsistent PackMIL state_dict: predictor input {inner2}, "
                             f"embedding output {inner}")
        gated = "mil.aggregate.attention_a.0.weight" in sd

        def kind(prefix: str) -> str:
            if f"{prefix}.running_mean" in sd:
                return "bn"
            return "ln" if f"{prefix}.weight" in sd else "none"

        mil_norm, cls_norm = kind("mil.norm"), kind("mil.aggregate.norm1")
        pos = 0
        if mil_norm != "none":
            (n,) = _shape(sd, "mil.norm.weight", "PackMIL")
            if n not in (in_dim, inner):
                raise ValueError(f"inconsistent PackMIL state_dict: mil.norm of size {n}")
            pos = 0 if n == in_dim else 1
        hp: dict[str, Any] = {"in_dim": in_dim, "n_classes": n_classes, "inner_dim": inner,
                              "gated": gated, "mil_bias": "mil.embed.0.bias" in sd,
                              "mil_norm": mil_norm, "cls_norm": cls_norm,
                              "embed_norm_pos": pos,
                              "ads": "downsampler.attention.0.weight" in sd}
        if "mil.aggregate.cls_token" in sd:
            hp["aggregator"] = "transmil"
            del hp["gated"], hp["cls_norm"]
            qkv, d = _shape(sd, "mil.aggregate.layer1.attn.to_qkv.weight", "PackMIL")
            heads = _shape(sd, "mil.aggregate.layer1.attn.res_conv.weight", "PackMIL")[0]
            if d != inner or qkv != 3 * inner or heads != 8:
                raise ValueError(f"inconsistent PackMIL TransMIL state_dict: to_qkv {qkv}x{d}, "
                                 f"{heads} heads, width {inner} (the authors use 8 heads of "
                                 "width // 8)")
            n = 0
            while f"mil.aggregate.layers.{n}.attn.to_qkv.weight" in sd:
                n += 1
            hp["n_layers"] = 1 + n
            hp["vit_norm"] = "mil.aggregate.layer1.norm.weight" in sd
            hp["fc_norm"] = "mil.aggregate.fc_norm.weight" in sd or not hp["vit_norm"]
        if hp["ads"]:
            hp["ads_attn_dim"], d = _shape(sd, "downsampler.attention.0.weight", "PackMIL")
            if d != in_dim:
                raise ValueError(f"inconsistent PackMIL state_dict: downsampler input {d}, "
                                 f"features {in_dim}")
        return hp
