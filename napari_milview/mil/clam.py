"""CLAM-SB and CLAM-MB (mahmoodlab/CLAM, current layout), gated attention.

Reimplemented from ``reference/algorithms.md`` section 2.2-2.4 (CLAM is GPLv3: no code
was copied). Forward for a bag ``x`` [N, in_dim]::

    h     = Dropout(ReLU(attention_net.0 x))                           [N, hidden]
    A_raw = attention_c(tanh(attention_a h) * sigmoid(attention_b h))^T   [K, N]
    A     = norm_N(A_raw);  M = A h                                     [K, hidden]
    SB: logits = classifiers(M[0])                 (K = 1)
    MB: logits[c] = classifiers[c](M[c])           (K = n_classes)

CLAM's own heatmaps use the *raw* scores (``A_raw``; for MB the predicted class's row,
``create_heatmaps.infer_single_slide``) converted to rank percentiles, so raw sources are
exposed next to the normalised ones. A rank percentile is the same for ``A_raw`` and for
``softmax_N(A_raw)`` (a monotone map per branch), so the default softmax source gives CLAM's
percentile heatmap too.

Attention normalisation (``attention_norm``)
--------------------------------------------
``"softmax"`` (default, mahmoodlab/CLAM): ``A = exp(A_raw) / sum_N exp(A_raw)``, sums to 1.

``"softmax_one"`` (ACMIL's copy of CLAM-MB, ``architecture/clam.py`` of dazhangyu123/ACMIL,
which calls its ``utils.utils.softmax_one``): ``A = exp(A_raw) / (1 + sum_N exp(A_raw))``,
i.e. ``softmax(A_raw) * S / (1 + S)`` with ``S = sum_N exp(A_raw)``: every branch sums to
``S / (1 + S) < 1`` and ``M = A h`` shrinks by that factor, so the *logits* change
(``logits[c] - bias[c]`` is scaled by ``S_c / (1 + S_c)``). Affected sources: the
normalised ``"attention"`` / ``"class/{c}"`` (the pooling weights, which no longer sum to
1); unaffected: ``"raw/..."`` (``A_raw`` is computed before the normalisation) and
``"instance/{c}"`` (from ``h`` only). ACMIL's copy of CLAM-SB uses plain softmax. The
authors compute ``exp(A_raw)`` without subtracting a maximum (``inf``/``nan`` once a logit
passes ~88 in float32); ours subtracts ``max(0, max A_raw)`` from numerator and the ``1``
alike, which is the same value wherever theirs is finite.

The weights cannot show which normalisation a checkpoint was trained with:
:func:`napari_milview.mil.checkpoint.load_model` picks ``"softmax_one"`` for a CLAM-MB saved
in ACMIL's container (``{'model', 'optimizer', 'epoch', 'config'}``) whose config says
``arch: 'clam_mb'``, as ACMIL's ``Step3_WSI_classification.py`` saves it (see
:meth:`CLAM_MB.hparams_from_checkpoint`; ACMIL's MHIM script trains yet another CLAM copy,
``modules/clam.py``, with plain softmax); otherwise pass
``hparams={"attention_norm": "softmax_one"}`` or put it in the sidecar's ``hparams``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._weights import rename_prefix, strip_prefixes
from .base import MILModel, MILOutput, _count_indexed, _shape, register_model

__all__ = ["ATTENTION_NORMS", "CLAM_MB", "CLAM_SB", "CLAM_SIZES", "remap_clam_keys",
           "softmax_one"]

#: ``size_arg`` -> (hidden, attention) sizes of the official code
CLAM_SIZES: dict[str, tuple[int, int]] = {"small": (512, 256), "big": (512, 384)}

_GATED = "attention_net.3"

#: accepted values of ``attention_norm`` (see the module docstring)
ATTENTION_NORMS = ("softmax", "softmax_one")


def softmax_one(x: Tensor, dim: int = -1) -> Tensor:
    """``exp(x) / (1 + sum(exp(x), dim))`` (ACMIL's ``softmax_one``), computed stably.

    With ``m = max(0, max(x, dim))``: ``exp(x - m) / (exp(-m) + sum(exp(x - m)))``, equal to
    the plain formula wherever that is finite, and finite where it overflows.

    Parameters
    ----------
    x : Tensor
        Logits, any shape.
    dim : int
        The dimension normalised over (N for CLAM's ``[K, N]`` attention).

    Returns
    -------
    Tensor
        Same shape as ``x``; positive, summing to less than 1 along ``dim``.
    """
    m = x.amax(dim=dim, keepdim=True).clamp_min(0)
    e = torch.exp(x - m)
    return e / (torch.exp(-m) + e.sum(dim=dim, keepdim=True))


def remap_clam_keys(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map CLAM's official and legacy key layouts onto the names of :class:`CLAM_SB` / ``MB``.

    The one CLAM remap (``reference/algorithms.md`` section 2.2), each step noted:

    1. drop CLAM's ``instance_loss_fn.*`` buffers (``SmoothTop1SVM.labels`` [2]);
    2. strip a wrapper prefix shared by all keys (``module.`` of a DataParallel-wrapped
       model, Lightning ``model.``, ``_orig_mod.``);
    3. the multi-GPU infix of old CLAM runs, whose ``relocate()`` wrapped only the attention
       net in DataParallel: ``attention_net.module.*`` -> ``attention_net.*``. Only that
       infix: CLAM's own loader does a blanket ``key.replace('.module', '')``, which would
       also rename the real sub-module ``module`` of CLAM's non-gated ``Attn_Net``
       (``attention_net.3.module.0.weight``) and break that checkpoint's strict load;
    4. CLAM before April 2024 trained without ``--drop_out`` had no Dropout layer, so its
       gated attention net sat at ``attention_net.2.*``: moved to ``attention_net.3.*``
       (only when there is no ``attention_net.3.*``);
    5. ACMIL's copy of CLAM is recognised from the shapes (attention hidden size
       ``attention_a.0.weight`` [D, L] with D not 256/384 or L not 512, or a CLAM-SB with
       ``attention_c.weight`` [K, D], K > 1, i.e. ``n_token > 1``) and noted: its keys are
       CLAM's, but its CLAM_MB normalises attention with ``softmax_one``
       (``exp / (1 + sum exp)``), which the shapes cannot show.

    Parameters
    ----------
    sd : mapping of str to Tensor
        A state_dict as read from a file.

    Returns
    -------
    state_dict : dict of str to Tensor
        Renamed (tensors are not copied).
    notes : list of str
        One line per change (empty when nothing changed).

    Raises
    ------
    napari_milview._weights.WeightsError
        A rename would make two keys collide.
    """
    out = dict(sd)
    notes: list[str] = []
    dropped = [k for k in out if "instance_loss_fn" in k.split(".")]
    if dropped:
        for k in dropped:
            del out[k]
        notes.append(f"dropped {len(dropped)} CLAM training-loss buffer(s) "
                     f"({', '.join(dropped[:3])})")
    out, stripped = strip_prefixes(out)
    notes += stripped
    if any(k.startswith("attention_net.module.") for k in out):
        out = rename_prefix(out, "attention_net.module.", "attention_net.")
        notes.append("CLAM multi-GPU layout: 'attention_net.module.*' -> 'attention_net.*'")
    if (any(k.startswith("attention_net.2.") for k in out)
            and not any(k.startswith(f"{_GATED}.") for k in out)):
        out = rename_prefix(out, "attention_net.2.", f"{_GATED}.")
        notes.append("legacy CLAM layout (no dropout layer): 'attention_net.2.*' -> "
                     "'attention_net.3.*'")
    note = _acmil_copy_note(out)
    if note:
        notes.append(note)
    return out, notes


def _acmil_copy_note(sd: Mapping[str, Tensor]) -> str | None:
    """A note when a CLAM layout has ACMIL's CLAM-copy shapes (see :func:`remap_clam_keys`)."""
    a_w = sd.get(f"{_GATED}.attention_a.0.weight")  # [D, L]
    c_w = sd.get(f"{_GATED}.attention_c.weight")  # [K, D]
    if a_w is None or a_w.ndim != 2:
        return None
    d_attn, l_dim = int(a_w.shape[0]), int(a_w.shape[1])
    sb_multi = "classifiers.weight" in sd and c_w is not None and c_w.shape[0] > 1
    why = []
    if d_attn not in (256, 384):
        why.append(f"attention hidden size {d_attn} (official CLAM: 256/384)")
    if l_dim != 512:
        why.append(f"embedding size {l_dim} (official CLAM: 512)")
    if sb_multi:
        why.append(f"CLAM-SB with {int(c_w.shape[0])} attention rows (n_token > 1)")
    if not why:
        return None
    return ("looks like ACMIL's copy of CLAM (" + "; ".join(why) + "); same keys as CLAM, but "
            "ACMIL's CLAM_MB uses softmax_one instead of softmax, which the shapes cannot show "
            "(ACMIL's own checkpoint container selects it; otherwise pass "
            "hparams={'attention_norm': 'softmax_one'})")


class _GatedAttentionNet(nn.Module):
    """CLAM ``Attn_Net_Gated``: keys ``attention_a.0.*``, ``attention_b.0.*`` ([D, L] / [D]),
    ``attention_c.*`` ([K, D] / [K]). Returns raw logits ``[N, K]``."""

    def __init__(self, L: int, D: int, K: int, dropout: float) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(D, K)

    def forward(self, h: Tensor) -> Tensor:
        """h: [N, L] -> logits [N, K]"""
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class _ClamBase(MILModel):
    multi_branch: bool = False

    def __init__(self, in_dim: int, n_classes: int, size_arg: str, hidden_dim: int | None,
                 attn_dim: int | None, dropout: float, k_sample: int,
                 attention_norm: str = "softmax") -> None:
        super().__init__()
        if size_arg not in CLAM_SIZES:
            raise ValueError(f"size_arg must be one of {sorted(CLAM_SIZES)}, got {size_arg!r}")
        if attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"attention_norm must be one of {ATTENTION_NORMS}, got "
                             f"{attention_norm!r}")
        hid, att = CLAM_SIZES[size_arg]
        hid = hid if hidden_dim is None else int(hidden_dim)
        att = att if attn_dim is None else int(attn_dim)
        hp: dict[str, Any] = {"in_dim": in_dim, "n_classes": n_classes, "size_arg": size_arg}
        if (hid, att) != CLAM_SIZES[size_arg]:
            hp.update(hidden_dim=hid, attn_dim=att)
        hp.update(dropout=dropout, k_sample=k_sample)
        if attention_norm != "softmax":  # the default stays out of existing cards
            hp["attention_norm"] = attention_norm
        self._set_hparams(**hp)
        self.hidden_dim, self.attn_dim, self.k_sample = hid, att, k_sample
        self.attention_norm = attention_norm
        k = n_classes if self.multi_branch else 1
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, hid), nn.ReLU(), nn.Dropout(dropout),
            _GatedAttentionNet(hid, att, k, dropout))
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(hid, 1) for _ in range(n_classes))
        else:
            self.classifiers = nn.Linear(hid, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hid, 2) for _ in range(n_classes))

    # -- pieces -----------------------------------------------------------------------------
    def _attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [N, in_dim] -> (A_raw [K, N], h [N, hidden])"""
        h = self.attention_net[2](self.attention_net[1](self.attention_net[0](x)))
        return self.attention_net[3](h).transpose(0, 1), h

    def _normalise(self, raw: Tensor) -> Tensor:
        """raw [K, N] -> pooling weights [K, N] over N (``attention_norm``)."""
        if self.attention_norm == "softmax_one":
            return softmax_one(raw, dim=1)
        return torch.softmax(raw, dim=1)

    def _instance_sources(self, h: Tensor) -> dict[str, Tensor]:
        out = {}
        for c, clf in enumerate(self.instance_classifiers):
            out[f"instance/{c}"] = torch.softmax(clf(h), dim=-1)[:, 1]
        return out

    # -- state dict -------------------------------------------------------------------------
    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """CLAM's layouts onto the current names (:func:`remap_clam_keys`)."""
        return remap_clam_keys(sd)

    @classmethod
    def _common_hparams(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        name = cls.__name__
        hid, in_dim = _shape(sd, "attention_net.0.weight", name)
        att, hid2 = _shape(sd, f"{_GATED}.attention_a.0.weight", name)
        k, att2 = _shape(sd, f"{_GATED}.attention_c.weight", name)
        if hid2 != hid or att2 != att:
            raise ValueError(f"inconsistent {name} state_dict shapes")
        size = next((s for s, v in CLAM_SIZES.items() if v == (hid, att)), None)
        hp: dict[str, Any] = {"in_dim": in_dim}
        if size is None:  # e.g. ACMIL's CLAM copy: [D_feat, D_inner, 128]
            hp.update(size_arg="small", hidden_dim=hid, attn_dim=att)
        else:
            hp.update(size_arg=size)
        hp["_k"] = k
        return hp


@register_model
class CLAM_SB(_ClamBase):
    """CLAM single-branch (gated attention).

    Parameters
    ----------
    in_dim : int
        Feature dimension (CLAM ``embed_dim``, 1024 for ResNet50-trunc).
    n_classes : int
    size_arg : {"small", "big"}
        (hidden, attention) = (512, 256) or (512, 384).
    hidden_dim, attn_dim : int, optional
        Override the sizes (e.g. ACMIL's CLAM copy uses (D_inner, 128)).
    dropout : float
        Dropout after the first layer and in the attention branches (eval: off).
    k_sample : int
        Instances sampled for the (training-only) instance loss; not used at inference.
    attention_norm : {"softmax", "softmax_one"}
        How the raw attention is normalised over N (module docstring). ``"softmax"`` is
        CLAM's (and ACMIL's CLAM-SB copy's); ``"softmax_one"`` is ACMIL's CLAM-MB copy.

    State dict (in 1024, small, C 2)
    --------------------------------
    ``attention_net.0.weight`` [512, 1024], ``attention_net.0.bias`` [512],
    ``attention_net.3.attention_a.0.weight`` [256, 512], ``...attention_a.0.bias`` [256],
    ``attention_net.3.attention_b.0.weight`` [256, 512], ``...attention_b.0.bias`` [256],
    ``attention_net.3.attention_c.weight`` [1, 256], ``attention_net.3.attention_c.bias`` [1],
    ``classifiers.weight`` [2, 512], ``classifiers.bias`` [2],
    ``instance_classifiers.{c}.weight`` [2, 512], ``instance_classifiers.{c}.bias`` [2].

    Attention sources
    -----------------
    ``"attention"`` softmax attention (default; the pooling weights, ``softmax_one`` when
    ``attention_norm`` says so); ``"raw/attention"`` the pre-softmax score CLAM stores in its
    blockmaps (``A_raw``, the paper's heatmap before its rank-percentile conversion);
    ``"instance/{c}"`` instance-classifier probability of class ``c`` (an extra overlay, not
    CLAM's heatmap).
    """

    arch = "clam_sb"
    multi_branch = False

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, size_arg: str = "small",
                 hidden_dim: int | None = None, attn_dim: int | None = None,
                 dropout: float = 0.0, k_sample: int = 8,
                 attention_norm: str = "softmax") -> None:
        super().__init__(in_dim, n_classes, size_arg, hidden_dim, attn_dim, dropout, k_sample,
                         attention_norm)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        raw, h = self._attention(x)  # [1, N], [N, hid]
        a = self._normalise(raw)
        logits = self.classifiers(a @ h)[0]  # [C]
        sources: dict[str, Tensor] = {}
        if with_sources:
            sources = {"attention": a[0], "raw/attention": raw[0], **self._instance_sources(h)}
        return MILOutput(logits=logits, sources=sources, default_source="attention")

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("attention_net.0.weight" in sd and f"{_GATED}.attention_c.weight" in sd
                and "classifiers.weight" in sd)

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        hp = cls._common_hparams(sd)
        k = hp.pop("_k")
        n_classes, _ = _shape(sd, "classifiers.weight", "CLAM_SB")
        if k != 1:
            raise ValueError(f"CLAM_SB state_dict with {k} attention branches (a multi-token "
                             "variant such as ACMIL's CLAM copy is not supported)")
        hp["n_classes"] = n_classes
        return hp


@register_model
class CLAM_MB(_ClamBase):
    """CLAM multi-branch: one gated attention branch and one Linear(hidden, 1) per class.

    Parameters are those of :class:`CLAM_SB`.

    State dict (in 1024, small, C classes)
    --------------------------------------
    As CLAM_SB except ``attention_net.3.attention_c.weight`` [C, 256] / ``.bias`` [C],
    ``classifiers.{c}.weight`` [1, 512], ``classifiers.{c}.bias`` [1].

    Attention sources
    -----------------
    ``"class/{c}"`` softmax (or ``softmax_one``) attention of class ``c``'s branch;
    ``"raw/class/{c}"`` its pre-softmax score (CLAM's heatmap is ``A_raw[Y_hat]``, i.e.
    ``"raw/class/{predicted}"``, as rank percentiles); ``"instance/{c}"`` as CLAM_SB.
    Default: ``"class/{argmax logits}"``, the predicted class's branch (as CLAM's heatmap
    script; same percentiles as the raw row).
    """

    arch = "clam_mb"
    multi_branch = True

    def __init__(self, in_dim: int = 1024, n_classes: int = 2, size_arg: str = "small",
                 hidden_dim: int | None = None, attn_dim: int | None = None,
                 dropout: float = 0.0, k_sample: int = 8,
                 attention_norm: str = "softmax") -> None:
        super().__init__(in_dim, n_classes, size_arg, hidden_dim, attn_dim, dropout, k_sample,
                         attention_norm)

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        raw, h = self._attention(x)  # [C, N], [N, hid]
        a = self._normalise(raw)
        m = a @ h  # [C, hid]
        w = torch.cat([c.weight for c in self.classifiers], dim=0)  # [C, hid]
        b = torch.cat([c.bias for c in self.classifiers], dim=0)  # [C]
        logits = (m * w).sum(dim=1) + b
        pred = int(torch.argmax(logits).item())
        sources: dict[str, Tensor] = {}
        if with_sources:
            for c in range(self.n_classes):
                sources[f"class/{c}"] = a[c]
            for c in range(self.n_classes):
                sources[f"raw/class/{c}"] = raw[c]
            sources.update(self._instance_sources(h))
        return MILOutput(logits=logits, sources=sources, default_source=f"class/{pred}")

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("attention_net.0.weight" in sd and f"{_GATED}.attention_c.weight" in sd
                and "classifiers.0.weight" in sd)

    @classmethod
    def hparams_from_checkpoint(cls, meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``attention_norm="softmax_one"`` for a CLAM-MB in ACMIL's checkpoint container.

        ACMIL's ``save_model`` writes ``{'model', 'optimizer', 'epoch', 'config'}`` (read as
        ``meta["format"] == "acmil"``). ``Step3_WSI_classification.py --arch clam_mb``
        builds ACMIL's own CLAM_MB copy (``architecture/clam.py``), whose attention is
        ``softmax_one``, and its config holds ``arch: 'clam_mb'``: that pair selects it.
        ACMIL's ``Step3_WSI_classification_MHIM.py --model clam_mb`` saves the same container
        for another copy (``modules/clam.py``, plain softmax, config ``model`` not ``arch``),
        and mahmoodlab/CLAM saves a bare state_dict: neither selects it.
        """
        if meta.get("format") != "acmil":
            return {}, []
        cfg = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
        named = cfg.get("arch")
        if not isinstance(named, str) or named.strip().lower() not in ("clam_mb", "clam-mb"):
            return {}, []
        return ({"attention_norm": "softmax_one"},
                ["attention_norm='softmax_one': a CLAM-MB in ACMIL's checkpoint container "
                 "{'model', 'optimizer', 'epoch', 'config'} with config arch 'clam_mb' is "
                 "ACMIL's CLAM copy (Step3_WSI_classification.py), whose "
                 "attention is exp / (1 + sum exp) (ACMIL architecture/clam.py), not CLAM's "
                 "softmax"])

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        hp = cls._common_hparams(sd)
        k = hp.pop("_k")
        n_cls = _count_indexed(sd, "classifiers.")
        if n_cls != k:
            raise ValueError(f"CLAM_MB state_dict: {k} attention branches but {n_cls} "
                             "classifiers")
        hp["n_classes"] = k
        return hp
