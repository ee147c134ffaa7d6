"""The one contract every MIL model follows, the model registry and the model card.

Every architecture module (``abmil``, ``clam``, ``acmil``, ``transmil``, ``dsmil``) defines
:class:`MILModel` subclasses whose ``state_dict`` key names are the official ones, so an
official checkpoint loads with ``load_state_dict(strict=True)`` once any container prefix
(``model.``, ``module.``) has been removed and the architecture's own legacy layouts have been
renamed (:meth:`MILModel.remap_keys`, overridden in the architecture's module).

Conventions
-----------
* A bag is a float tensor of shape ``[N, D]`` (``[1, N, D]`` is accepted too): N instances
  (patches) in the order of the feature file, D the feature dimension.
* ``forward(features) -> Tensor[C]``: the slide logits, C classes.
* ``forward_attention(features) -> MILOutput``: the same logits plus every named attention
  *source*, each an ``[N]`` float tensor in bag order.

Attention source names (shared by all models)
---------------------------------------------
``"attention"``
    single-branch softmax attention (sums to 1).
``"branch/{k}"``, ``"branch/mean"``
    per-branch softmax attention and the mean over branches (ACMIL).
``"class/{c}"``
    the softmax attention branch of class ``c`` (CLAM-MB; DSMIL's B-classifier attention).
``"head/{h}"``, ``"head/mean"``
    per-head softmax attention and the mean over heads (multi-head models).
``"branch/{k}/head/{h}"``
    one head of one branch (ACMIL-MHA).
``"layer{l}/head/{h}"``, ``"layer{l}/mean"``
    TransMIL class-token attention row of layer ``l`` (1 or 2), per head and head mean.
``"rollout"``
    TransMIL attention rollout of both layers (an approximation, see ``transmil``).
``"instance/{c}"``
    instance-classifier probability that an instance is positive for class ``c``
    (not an attention: CLAM's training-time instance branch used as an extra overlay;
    DSMIL's instance stream).
``"raw/..."``
    pre-softmax logits of the corresponding source (``"raw/attention"``,
    ``"raw/class/{c}"``, ``"raw/branch/{k}"``, ...), where such logits exist.

Each model documents its exact list in its class docstring.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._weights import strip_prefixes

__all__ = [
    "ALIASES",
    "MODELS",
    "MILModel",
    "MILOutput",
    "ModelCard",
    "available_models",
    "build_from_state_dict",
    "build_model",
    "detect_arch",
    "register_alias",
    "register_model",
    "resolve_arch",
]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
@dataclass
class MILOutput:
    """What ``MILModel.forward_attention`` returns.

    Attributes
    ----------
    logits : Tensor, shape [C]
        Slide (bag) logits; ``softmax(logits)`` are the class probabilities.
    sources : dict[str, Tensor]
        Every named attention source, each of shape ``[N]`` in bag order (float).
    default_source : str
        Key of ``sources`` shown by default (it may depend on the prediction, e.g. CLAM-MB).
    aux : dict[str, Tensor]
        Optional auxiliary outputs (e.g. ACMIL ``"branch_logits"`` of shape ``[K, C]``).
    probabilities : Tensor, shape [C], optional
        Set by a model whose authors score a slide otherwise than by ``softmax(logits)``
        (DSMIL: a per-class sigmoid); :attr:`probs` returns it when set.
    """

    logits: Tensor
    sources: dict[str, Tensor]
    default_source: str
    aux: dict[str, Tensor] = field(default_factory=dict)
    probabilities: Tensor | None = None

    @property
    def probs(self) -> Tensor:
        """Class probabilities, shape ``[C]``: the model's own scoring when it sets
        ``probabilities``, else ``softmax(logits)``."""
        if self.probabilities is not None:
            return self.probabilities
        return torch.softmax(self.logits, dim=-1)

    @property
    def prediction(self) -> int:
        """Index of the predicted class (argmax of the logits)."""
        return int(torch.argmax(self.logits).item())

    def source(self, name: str | None = None) -> Tensor:
        """The source ``name`` (the default source when None), shape ``[N]``."""
        key = self.default_source if name is None else name
        try:
            return self.sources[key]
        except KeyError:
            raise KeyError(f"no attention source {key!r}; available: {sorted(self.sources)}") \
                from None


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------
class MILModel(nn.Module):
    """Base class: a MIL model mapping a bag ``[N, D]`` to slide logits ``[C]``.

    Subclasses set the class attribute ``arch`` (the registry name), call
    ``self._set_hparams(...)`` in ``__init__`` with their constructor arguments (which must
    include ``in_dim`` and ``n_classes``), and implement :meth:`_forward`,
    :meth:`hparams_from_state_dict` and :meth:`matches_state_dict`.

    Models work on CPU and CUDA (no device is hard-coded), in train and eval mode, and
    accept bags of a single instance. Modules start in training mode as any
    ``torch.nn.Module``; :func:`build_model` returns them in eval mode.
    """

    arch: ClassVar[str] = ""

    in_dim: int
    n_classes: int
    hparams: dict[str, Any]

    # -- construction helpers -----------------------------------------------------------------
    def _set_hparams(self, **hparams: Any) -> None:
        self.hparams = dict(hparams)
        self.in_dim = int(hparams["in_dim"])
        self.n_classes = int(hparams["n_classes"])

    @property
    def required_dim(self) -> int:
        """The feature dimension D the model expects."""
        return self.in_dim

    # -- input handling -----------------------------------------------------------------------
    def _as_bag(self, features: Tensor) -> Tensor:
        """Validate a bag and bring it to the model's device and float dtype.

        Parameters
        ----------
        features : Tensor, shape [N, D] or [1, N, D]

        Returns
        -------
        Tensor, shape [N, D]
        """
        if not isinstance(features, Tensor):
            features = torch.as_tensor(features)
        if features.dim() == 3:
            if features.shape[0] != 1:
                raise ValueError(
                    f"{type(self).__name__} takes one bag at a time: got a batch of shape "
                    f"{tuple(features.shape)} (expected [N, D] or [1, N, D])")
            features = features[0]
        if features.dim() != 2:
            raise ValueError(f"a bag must have shape [N, D] or [1, N, D]; got "
                             f"{tuple(features.shape)}")
        n, d = features.shape
        if d != self.in_dim:
            raise ValueError(f"{type(self).__name__} expects features of dimension "
                             f"{self.in_dim}, got {d}")
        if n == 0:
            raise ValueError("empty bag (N = 0 instances)")
        ref = next(self.parameters(), None)
        if ref is not None:
            features = features.to(device=ref.device, dtype=ref.dtype)
        elif not features.is_floating_point():
            features = features.float()
        return features

    # -- the contract -------------------------------------------------------------------------
    def _forward(self, x: Tensor, with_sources: bool) -> MILOutput:
        """Run the model on a validated bag.

        Parameters
        ----------
        x : Tensor, shape [N, D]
        with_sources : bool
            When False, ``sources`` may be left empty (``forward`` only needs logits).

        Returns
        -------
        MILOutput
        """
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        """Slide logits.

        Parameters
        ----------
        features : Tensor, shape [N, D] or [1, N, D]

        Returns
        -------
        Tensor, shape [C]
        """
        return self._forward(self._as_bag(features), with_sources=False).logits

    def forward_attention(self, features: Tensor) -> MILOutput:
        """Slide logits and every named attention source.

        Parameters
        ----------
        features : Tensor, shape [N, D] or [1, N, D]

        Returns
        -------
        MILOutput
            ``logits`` [C]; ``sources`` name -> [N]; ``default_source``. In eval mode the
            sources are detached from the graph.
        """
        out = self._forward(self._as_bag(features), with_sources=True)
        if not self.training:
            out.sources = {k: v.detach() for k, v in out.sources.items()}
        return out

    # -- state-dict introspection -------------------------------------------------------------
    @classmethod
    def hparams_from_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Any]:
        """Constructor hyper-parameters inferred from key names and tensor shapes.

        ``cls(**hparams_from_state_dict(sd))`` has exactly the keys and shapes of ``sd``.
        Hyper-parameters that leave no trace in the weights (dropout, STKIM settings, the
        TransMIL ``nystrom`` variant) are not returned; the constructor defaults apply.

        Raises
        ------
        ValueError
            When a key the inference needs is missing or a shape is inconsistent.
        """
        raise NotImplementedError

    @classmethod
    def matches_state_dict(cls, sd: Mapping[str, Tensor]) -> bool:
        """Whether ``sd`` (prefix-free) has this architecture's layout."""
        raise NotImplementedError

    @classmethod
    def hparams_from_checkpoint(cls, meta: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Hyper-parameters that a checkpoint's container shows and its tensors cannot.

        ``meta`` is :func:`napari_milview._weights.read_state_dict`'s metadata (``format``,
        ``config`` as plain values ...) plus ``prefix``, the wrapper prefix every stored key
        carried (``"model."`` ...) or None. The values are defaults: a stored card, sidecar,
        ``hparams`` argument (or TransMIL's ``nystrom`` argument) overrides them, and the
        notes then say which (and that the container suggests otherwise). A value None says
        the container does not show it: the constructor's default applies, with the notes.
        The base version returns none (CLAM-MB: ACMIL's container selects
        ``attention_norm="softmax_one"``; DSMIL: AEM's scoring; TransMIL: the
        nystrom-attention variant).

        Returns
        -------
        hparams : dict
        notes : list of str
            Why, one line per value (for the model card).
        """
        return {}, []

    @classmethod
    def hparams_from_sidecar_list(cls, values: list[Any]) -> tuple[dict[str, Any], str]:
        """Hyper-parameters from a JSON *list* found where the sidecar is (and a note).

        Only an architecture whose training code writes a list there accepts one (DSMIL:
        its per-class thresholds); the base version refuses it.

        Raises
        ------
        ValueError
            This architecture has no JSON-list sidecar.
        """
        raise ValueError("a sidecar must be a JSON object")

    @classmethod
    def remap_keys(cls, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Map this architecture's legacy / official key layouts onto the class's names.

        The base version strips the wrapper prefixes every key carries (Lightning
        ``model.``, DataParallel ``module.``, ``torch.compile``'s ``_orig_mod.``; see
        :func:`napari_milview._weights.strip_prefixes`). An architecture with layouts of its
        own overrides it in its module and strips the same prefixes (CLAM:
        :func:`napari_milview.mil.clam.remap_clam_keys`: ``instance_loss_fn`` buffers, the
        ``attention_net.module`` infix, the legacy ``attention_net.2`` index).

        Parameters
        ----------
        sd : mapping of str to Tensor
            A state_dict as read from a file (tensors of any shape; they are not copied).

        Returns
        -------
        state_dict : dict of str to Tensor
            The renamed state_dict.
        notes : list of str
            One human-readable line per change (empty when nothing changed).
        """
        return strip_prefixes(sd)

    @classmethod
    def remap_state_dict(cls, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`remap_keys` without the notes."""
        return cls.remap_keys(sd)[0]

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        return ", ".join(f"{k}={v!r}" for k, v in getattr(self, "hparams", {}).items())


def _shape(sd: Mapping[str, Tensor], key: str, arch: str) -> tuple[int, ...]:
    """Shape of ``sd[key]``; a ValueError naming the architecture when it is missing."""
    if key not in sd:
        raise ValueError(f"state_dict is not a {arch} layout: missing key {key!r}")
    return tuple(sd[key].shape)


def _count_indexed(sd: Mapping[str, Tensor], prefix: str) -> int:
    """Number of consecutive integer sub-modules ``{prefix}{i}.`` present (0, 1, ...)."""
    idx = set()
    for k in sd:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                idx.add(int(head))
    n = 0
    while n in idx:
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
MODELS: dict[str, type[MILModel]] = {}
"""Registry name -> model class. Aliases (see :data:`ALIASES`) map to their target class."""

ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}
"""Alias -> (canonical architecture, fixed hyper-parameters)."""

_BUILTIN_MODULES = ("abmil", "clam", "acmil", "transmil", "dtfd", "mhim", "dsmil", "ins",
                    "packmil", "mambamil")


def _ensure_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def register_model(cls: type[MILModel]) -> type[MILModel]:
    """Class decorator: register ``cls`` under ``cls.arch``."""
    name = cls.arch
    if not name:
        raise ValueError(f"{cls.__name__} has no 'arch' name")
    if name in MODELS and MODELS[name] is not cls:
        raise ValueError(f"architecture {name!r} is already registered "
                         f"({MODELS[name].__name__})")
    MODELS[name] = cls
    return cls


def register_alias(alias: str, target: str, **fixed: Any) -> None:
    """Register ``alias`` for the architecture ``target`` with fixed hyper-parameters.

    ``build_model(alias, **hp)`` builds ``target`` with ``fixed`` merged into ``hp``; a
    conflicting value in ``hp`` raises ``ValueError``.
    """
    if target not in MODELS:
        raise ValueError(f"unknown alias target {target!r}")
    ALIASES[alias] = (target, dict(fixed))
    MODELS[alias] = MODELS[target]


def available_models(include_aliases: bool = True) -> list[str]:
    """Names accepted by :func:`build_model` (canonical names first)."""
    _ensure_builtin()
    canon = [k for k in MODELS if k not in ALIASES]
    return canon + ([k for k in MODELS if k in ALIASES] if include_aliases else [])


def resolve_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """Canonical architecture name and fixed hyper-parameters for a name or alias."""
    _ensure_builtin()
    key = arch.strip().lower().replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    if key in MODELS:
        return key, {}
    raise ValueError(f"unknown MIL architecture {arch!r}; known: "
                     f"{', '.join(available_models())}")


def build_model(arch: str, **hparams: Any) -> MILModel:
    """Build a registered model in eval mode.

    Parameters
    ----------
    arch : str
        A canonical name (``available_models(False)``) or an alias (``"aem"``, ...).
    **hparams
        Constructor hyper-parameters, e.g. from ``hparams_from_state_dict``.

    Returns
    -------
    MILModel
        Randomly initialised, in eval mode.
    """
    canon, fixed = resolve_arch(arch)
    for k, v in fixed.items():
        if k in hparams and hparams[k] != v:
            raise ValueError(f"{arch!r} requires {k}={v!r}, got {hparams[k]!r}")
    model = MODELS[canon](**{**hparams, **fixed})
    return model.eval()


def detect_arch(sd: Mapping[str, Tensor]) -> str:
    """Recognise the architecture of a (prefix-free) state_dict from key names and shapes.

    Returns
    -------
    str
        A canonical architecture name.

    Raises
    ------
    ValueError
        When no (or more than one) registered architecture matches; the message lists the
        known architectures.
    """
    _ensure_builtin()
    hits = [name for name, cls in MODELS.items()
            if name not in ALIASES and cls.matches_state_dict(sd)]
    known = ", ".join(available_models(include_aliases=False))
    if len(hits) == 1:
        return hits[0]
    if not hits:
        keys = list(sd)[:6]
        raise ValueError(
            f"unrecognised MIL state_dict (first keys: {keys}{' ...' if len(sd) > 6 else ''}); "
            f"known architectures: {known}. Strip any container prefix ('model.', 'module.') "
            f"first.")
    raise ValueError(f"ambiguous MIL state_dict: matches {hits}; known architectures: {known}")


def build_from_state_dict(sd: Mapping[str, Tensor], arch: str | None = None,
                          strict: bool = True, **overrides: Any) -> MILModel:
    """Detect (unless given), infer hyper-parameters, build and load a model (eval mode).

    Parameters
    ----------
    sd : Mapping[str, Tensor]
        A state_dict (model-specific legacy layouts are normalised with
        ``remap_state_dict``).
    arch : str, optional
        Architecture name or alias; detected when None.
    strict : bool
        Passed to ``load_state_dict``.
    **overrides
        Hyper-parameters that leave no trace in the weights (e.g.
        ``nystrom="0.0.9"``).
    """
    _ensure_builtin()
    if arch is None:
        try:
            arch = detect_arch(sd)
        except ValueError:
            for name, c in MODELS.items():
                if name not in ALIASES and c.matches_state_dict(c.remap_state_dict(sd)):
                    arch = name
                    break
            else:
                raise
    canon, _ = resolve_arch(arch)
    cls = MODELS[canon]
    sd = cls.remap_state_dict(sd)
    hp = {**cls.hparams_from_state_dict(sd), **overrides}
    model = build_model(arch, **hp)
    model.load_state_dict(sd, strict=strict)
    return model


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------
@dataclass
class ModelCard:
    """The metadata a checkpoint needs besides its weights.

    Attributes
    ----------
    arch : str
        Registry name (canonical or alias) of the architecture.
    hparams : dict
        Constructor hyper-parameters (``build_model(arch, **hparams)``).
    classes : list[str]
        Class names in logit order (``len(classes) == n_classes``); may be empty when unknown.
    feature_dim : int or None
        Feature dimension D of the bags the model takes (the encoder's output size).
    encoder : str or None
        Name of the patch encoder that produced the features (e.g. ``"resnet50_trunc"``).
    patch_size_um : float or None
        Side of a patch in microns at which the encoder was run.
    notes : str
        Free text (provenance, legacy switches, remapped keys ...).
    nystrom : str or None
        TransMIL family only: the nystrom-attention release the model reproduces,
        ``"0.0.9"`` (the official TransMIL repository's pin) or ``"current"`` (0.0.10 and
        later); the same value as ``hparams["nystrom"]``. None for other architectures.
        Sidecar JSON key ``"nystrom"``.
    """

    arch: str
    hparams: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    feature_dim: int | None = None
    encoder: str | None = None
    patch_size_um: float | None = None
    notes: str = ""
    nystrom: str | None = None

    def build(self) -> MILModel:
        """``build_model(self.arch, **self.hparams)`` (eval mode, random weights), with
        :attr:`nystrom` when the hyper-parameters do not name the variant."""
        hp = dict(self.hparams)
        if self.nystrom is not None and "nystrom" not in hp \
                and "legacy_nystrom_slice" not in hp:
            hp["nystrom"] = self.nystrom
        return build_model(self.arch, **hp)

    def check(self) -> list[str]:
        """Inconsistencies between the fields (empty when consistent)."""
        problems = []
        in_dim = self.hparams.get("in_dim")
        if self.feature_dim is not None and in_dim is not None and int(in_dim) != int(
                self.feature_dim):
            problems.append(f"feature_dim {self.feature_dim} != hparams in_dim {in_dim}")
        nc = self.hparams.get("n_classes")
        if self.classes and nc is not None and len(self.classes) != int(nc):
            problems.append(f"{len(self.classes)} class names for n_classes={nc}")
        hv = self.hparams.get("nystrom")
        if self.nystrom is not None and hv is not None and str(hv) != str(self.nystrom):
            problems.append(f"nystrom {self.nystrom!r} != hparams nystrom {hv!r}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["hparams"] = dict(kw.get("hparams") or {})
        kw["classes"] = [str(c) for c in (kw.get("classes") or [])]
        return cls(**kw)

