"""DSMIL: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021), as in ``binli123/dsmil-wsi``.

The authors' ``MILNet(i_classifier, b_classifier)`` on a bag of features ``x`` [N, D]::

    c = i_classifier.fc.0 x                              [N, C]  instance logits (stream 1)
    m_c = argmax_n c[n, c]                               the critical instance of each class
    Q = q(x) [N, Dq];  q_max = q(x[m]) [C, Dq];  V = v(x) [N, D]
    A = softmax_N(Q q_max^T / sqrt(Dq))                  [N, C]  attention per class
    B = A^T V                                            [C, D]  bag embedding per class
    bag = fcc(B)  (Conv1d C -> C, kernel D)              [C]     bag logits (stream 2)

``q`` is ``Linear(D, 128) - ReLU - Linear(128, 128) - Tanh`` (``nonlinear``, the default of
the training script) or one ``Linear(D, 128)``; ``v`` is the identity, or (``passing_v``)
``Dropout - Linear(D, D) - ReLU``. ``C`` is the number of *positive* classes
(``--num_classes``; 1 for a binary task such as Camelyon16, where the negative class is
"no class positive"), so each class is scored on its own with a sigmoid.

Scoring (``scoring``)
---------------------
``"bag"`` (default)
    ``sigmoid(bag)``: what ``train_tcga.py`` evaluates with at the pinned commit (its
    ``--average`` is off by default), and what ``attention_map.py`` / ``testing_c16.py``
    compare with the per-class thresholds.
``"mean_bag_max_instance"``
    ``0.5 sigmoid(bag) + 0.5 sigmoid(max_n c[n])``: ``train_tcga.py`` before 2024-03
    (always, then behind ``--average``, default on) and ``testing_tcga.py --average``.
    (``train_tcga.py --average`` at the pinned commit sums the two sigmoids instead, so its
    thresholds are on a 0..2 scale: halve them for this scoring.)
``"softmax_bag_max_instance"``
    ``0.5 softmax(max_n c[n]) + 0.5 softmax(bag)``: AEM's ``main.py`` evaluation of its DSMIL
    copy (mutually exclusive classes trained with cross-entropy). Chosen automatically for a
    checkpoint whose stored config is AEM's.

The logits stay the raw bag prediction ``bag`` [C]; the probabilities are set on
:attr:`MILOutput.probabilities`.

Thresholds
----------
``train_tcga.py`` writes ``<name>.json`` beside ``<name>.pth``: a JSON *list* of per-class
thresholds (``roc_curve``'s optimum on the validation fold; ``test/mil_threshold_fold_<k>.json``
beside ``test/mil_weights_fold_<k>.pth`` for its standalone-test scheme). The loader reads such
a list as the ``thresholds`` hyper-parameter. A class is positive when its probability is
``>= threshold`` (0.5 without thresholds); ``aux["positive"]`` [C] holds 1.0 / 0.0.

AEM (``dazhangyu123/AEM`` ``architecture/dsmil.py``)
-----------------------------------------------------
The same key names; its ``main.py`` builds ``BClassifier(conf, nonlinear=False)`` whose query
is ``Linear(D_feat, D_inner)`` (so ``q_dim = D_inner``, scale ``sqrt(D_inner)``) and saves
``{'model', 'optimizer', 'epoch', 'config'}``. Its attention output is pre-softmax and
transposed [C, N]; the softmax over instances is the same as here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import MILModel, MILOutput, _shape, register_model

__all__ = ["DSMIL", "SCORINGS"]

#: the slide scorings the authors' scripts use (see the module docstring)
SCORINGS = ("bag", "mean_bag_max_instance", "softmax_bag_max_instance")
#: scorings whose classes are mutually exclusive (softmax over the classes)
_EXCLUSIVE = ("softmax_bag_max_instance",)


class _FCLayer(nn.Module):
    """The authors' ``FCLayer``: ``fc = Sequential(Linear(D, C))`` (keys ``fc.0.*``)."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class _BClassifier(nn.Module):
    """The authors' ``BClassifier``: ``q``, ``v`` and the ``fcc`` Conv1d."""

    def __init__(self, in_dim: int, n_classes: int, q_dim: int, q_hidden: int,
                 nonlinear: bool, passing_v: bool, dropout_v: float) -> None:
        super().__init__()
        if nonlinear:
            self.q: nn.Module = nn.Sequential(nn.Linear(in_dim, q_hidden), nn.ReLU(),
                                              nn.Linear(q_hidden, q_dim), nn.Tanh())
        else:
            self.q = nn.Linear(in_dim, q_dim)
        if passing_v:
            self.v: nn.Module = nn.Sequential(nn.Dropout(dropout_v), nn.Linear(in_dim, in_dim),
                                              nn.ReLU())
        else:
            self.v = nn.Identity()
        self.fcc = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)


def _bag_stream(bc: _BClassifier, x: Tensor, ins: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The B-classifier stream (also MHIM-MIL's DSMIL backbone, :mod:`.mhim`).

    x [N, D], instance logits ins [N, C] -> critical instances [C], pre-softmax attention
    [N, C], attention (softmax over the instances) [N, C], bag logits [C].
    """
    crit = torch.argmax(ins, dim=0)  # [C]
    q = bc.q(x)  # [N, Dq]
    q_max = bc.q(x[crit])  # [C, Dq]
    raw = (q @ q_max.T) / math.sqrt(q.shape[1])  # [N, C]
    a = torch.softmax(raw, dim=0)  # [N, C]
    b = a.T @ bc.v(x)  # [C, D]
    return crit, raw, a, bc.fcc(b.unsqueeze(0)).reshape(-1)


@register_model
class DSMIL(MILModel):
    """Dual-stream MIL: max-instance stream plus critical-instance attention stream.

    Parameters
    ----------
    in_dim : int
        Feature dimension D (``--feats_size``; AEM ``D_feat``).
    n_classes : int
        Number of positive classes C (``--num_classes``; 1 for a binary task).
    nonlinear : bool
        Two-layer tanh query (``--non_linearity``, default) or one linear layer (AEM).
    q_dim : int
        Query size Dq (128 in the authors' code; AEM's linear query: ``D_inner``).
    q_hidden : int
        Hidden size of the nonlinear query (128); unused when ``nonlinear`` is False.
    passing_v : bool
        Value projection ``Dropout - Linear(D, D) - ReLU`` instead of the identity.
    dropout_v : float
        Dropout of that projection (``--dropout_node``); no parameters.
    scoring : str
        One of :data:`SCORINGS` (module docstring); ``"bag"`` by default.
    thresholds : sequence of float, optional
        Per-class decision thresholds on the probabilities (the training script's JSON list);
        0.5 each when None.

    State dict (D 512, C 2, nonlinear, as ``train_tcga.py`` saves it)
    ------------------------------------------------------------------
    ``i_classifier.fc.0.weight`` [2, 512], ``i_classifier.fc.0.bias`` [2],
    ``b_classifier.q.0.weight`` [128, 512], ``b_classifier.q.0.bias`` [128],
    ``b_classifier.q.2.weight`` [128, 128], ``b_classifier.q.2.bias`` [128],
    ``b_classifier.fcc.weight`` [2, 2, 512], ``b_classifier.fcc.bias`` [2].
    Linear query: ``b_classifier.q.weight`` [Dq, 512], ``b_classifier.q.bias`` [Dq].
    ``passing_v`` adds ``b_classifier.v.1.weight`` [512, 512], ``b_classifier.v.1.bias``.
    The ``IClassifier`` name ``i_classifier.fc.weight`` (``attention_map.py``) is renamed to
    ``i_classifier.fc.0.weight`` on load.

    Attention sources
    -----------------
    ``"class/{c}"``: the B-classifier attention of class ``c``, ``A[:, c]`` (softmax over the
    instances, sums to 1) -- the heatmap of the authors' ``attention_map.py``, drawn for each
    class whose probability reaches its threshold and min-max rescaled for display;
    ``"raw/class/{c}"``: its pre-softmax score ``Q q_max_c / sqrt(Dq)``;
    ``"instance/{c}"``: the instance classifier's probability ``sigmoid(c[:, c])`` (with the
    softmax scoring of AEM: ``softmax(c, dim=1)[:, c]``, its classes being exclusive);
    ``"raw/instance/{c}"``: the instance logit ``c[:, c]``.
    Default: ``"class/{c}"`` for the positive class with the highest probability, else (no
    class positive) for the class with the highest probability.

    Auxiliary outputs
    -----------------
    ``"instance_logits"`` [N, C]; ``"max_instance_logits"`` [C]; ``"critical_instance"`` [C]
    (the index of each class's critical instance); ``"thresholds"`` [C]; ``"positive"`` [C]
    (1.0 where ``probs >= thresholds``). The last two only where each class is decided on its
    own: not with AEM's softmax scoring (exclusive classes, argmax) unless thresholds are given.
    """

    arch = "dsmil"

    def __init__(self, in_dim: int = 512, n_classes: int = 2, nonlinear: bool = True,
                 q_dim: int = 128, q_hidden: int = 128, passing_v: bool = False,
                 dropout_v: float = 0.0, scoring: str = "bag",
                 thresholds: Sequence[float] | None = None) -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"DSMIL scoring must be one of {SCORINGS}, got {scoring!r}")
        if thresholds is not None:
            thresholds = [float(t) for t in thresholds]
            if len(thresholds) != int(n_classes):
                raise ValueError(f"{len(thresholds)} DSMIL threshold(s) for "
                                 f"n_classes={n_classes}")
            if not all(math.isfinite(t) for t in thresholds):
                raise ValueError(f"DSMIL thresholds must be finite numbers: {thresholds}")
        self._set_hparams(in_dim=in_dim, n_classes=n_classes, nonlinear=bool(nonlinear),
                          q_dim=q_dim, q_hidden=q_hidden, passing_v=bool(passing_v),
                          dropout_v=dropout_v, scoring=scoring, thresholds=thresholds)
        self.i_classifier = _FCLayer(in_dim, n_classes)
        self.b_classifier = _BClassifier(in_dim, n_classes, q_dim, q_hidden, bool(nonlinear),
                                         bool(passing_v), dropout_v)

    @property
    def thresholds(self) -> list[float]:
        """Per-class thresholds on the probabilities (0.5 each when none were given)."""
        t = self.hparams.get("thresholds")
        return list(t) if t is not None else [0.5] * self.n_classes

    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        ins = self.i_classifier(x)  # [N, C]
        crit, raw, a, logits = _bag_stream(self.b_classifier, x, ins)
        max_ins = ins.max(dim=0).values  # [C]
        probs = self._score(logits, max_ins)
        thr = torch.tensor(self.thresholds, dtype=probs.dtype, device=probs.device)
        positive = (probs >= thr).to(probs.dtype)
        aux = {"instance_logits": ins, "max_instance_logits": max_ins,
               "critical_instance": crit}
        if self.hparams["scoring"] not in _EXCLUSIVE or self.hparams.get("thresholds"):
            aux.update(thresholds=thr, positive=positive)  # classes decided one by one
        sources: dict[str, Tensor] = {}
        if with_sources:
            ins_p = (torch.softmax(ins, dim=1) if self.hparams["scoring"] in _EXCLUSIVE
                     else torch.sigmoid(ins))  # [N, C]
            for c in range(self.n_classes):
                sources[f"class/{c}"] = a[:, c]
                sources[f"raw/class/{c}"] = raw[:, c]
                sources[f"instance/{c}"] = ins_p[:, c]
                sources[f"raw/instance/{c}"] = ins[:, c]
        ranked = probs.detach().clone()
        if bool(positive.any()):
            ranked[positive == 0] = -math.inf
        default = f"class/{int(torch.argmax(ranked).item())}"
        return MILOutput(logits=logits, sources=sources, default_source=default, aux=aux,
                         probabilities=probs)

    def _score(self, bag: Tensor, max_ins: Tensor) -> Tensor:
        """Slide probabilities [C] from the bag logits [C] and max instance logits [C]."""
        scoring = self.hparams["scoring"]
        if scoring == "bag":
            return torch.sigmoid(bag)
        if scoring == "mean_bag_max_instance":
            return 0.5 * torch.sigmoid(bag) + 0.5 * torch.sigmoid(max_ins)
        return 0.5 * torch.softmax(max_ins, dim=-1) + 0.5 * torch.softmax(bag, dim=-1)

    # -- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        return ("i_classifier.fc.0.weight" in sd and "b_classifier.fcc.weight" in sd
                and ("b_classifier.q.weight" in sd or "b_classifier.q.0.weight" in sd))

    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        out, notes = super().remap_keys(sd)
        old = [k for k in ("i_classifier.fc.weight", "i_classifier.fc.bias") if k in out]
        if old and not any(k.startswith("i_classifier.fc.0.") for k in out):
            for k in old:
                out[k.replace(".fc.", ".fc.0.")] = out.pop(k)
            notes.append("DSMIL IClassifier names i_classifier.fc.* renamed to the FCLayer "
                         "names i_classifier.fc.0.* (as attention_map.py does)")
        return out, notes

    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        n_classes, in_dim = _shape(sd, "i_classifier.fc.0.weight", "DSMIL")
        fcc = _shape(sd, "b_classifier.fcc.weight", "DSMIL")
        if fcc != (n_classes, n_classes, in_dim):
            raise ValueError(f"inconsistent DSMIL state_dict: fcc weight {fcc} for "
                             f"{n_classes} classes of dimension {in_dim}")
        nonlinear = "b_classifier.q.0.weight" in sd
        if nonlinear:
            q_hidden, d0 = _shape(sd, "b_classifier.q.0.weight", "DSMIL")
            q_dim, h2 = _shape(sd, "b_classifier.q.2.weight", "DSMIL")
            if d0 != in_dim or h2 != q_hidden:
                raise ValueError(f"inconsistent DSMIL query: q.0 [{q_hidden}, {d0}], "
                                 f"q.2 [{q_dim}, {h2}] for features of dimension {in_dim}")
        else:
            q_dim, d0 = _shape(sd, "b_classifier.q.weight", "DSMIL")
            q_hidden = 128
            if d0 != in_dim:
                raise ValueError(f"inconsistent DSMIL query: q [{q_dim}, {d0}] for features "
                                 f"of dimension {in_dim}")
        return {"in_dim": in_dim, "n_classes": n_classes, "nonlinear": nonlinear,
                "q_dim": q_dim, "q_hidden": q_hidden,
                "passing_v": "b_classifier.v.1.weight" in sd}

    @classmethod
    def hparams_from_sidecar_list(cls, values: list[Any]) -> tuple[dict[str, Any], str]:
        """A JSON list beside a DSMIL checkpoint: ``train_tcga.py``'s per-class thresholds."""
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in values):
            raise ValueError("a DSMIL thresholds list must hold numbers (one per class)")
        thr = [float(v) for v in values]
        return ({"thresholds": thr},
                "DSMIL per-class thresholds " + ", ".join(f"{t:.4g}" for t in thr)
                + ", train_tcga.py's JSON list")

    @classmethod
    def hparams_from_checkpoint(cls, meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """AEM's container (a stored config with ``arch='dsmil'`` and its ``lamda``) -> AEM's
        scoring, ``"softmax_bag_max_instance"``."""
        config = meta.get("config")
        if (isinstance(config, Mapping) and str(config.get("arch", "")).lower() == "dsmil"
                and "lamda" in config):
            return ({"scoring": "softmax_bag_max_instance"},
                    [f"AEM DSMIL (stored config, lamda={config['lamda']}): scored as AEM "
                     "evaluates, 0.5 softmax(max instance) + 0.5 softmax(bag)"])
        return {}, []
