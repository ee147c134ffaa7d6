"""Load and save MIL models: the architecture, its hyper-parameters and its card.

Reading weight files safely (safetensors, ``torch.load(weights_only=True)`` with a minimal
allowlist, the pickle scan that names what a refused file would run, containers, prefix
stripping, key reports, sidecars) is :mod:`napari_milview._weights`, its inert stand-ins
for configuration objects :mod:`napari_milview._inert`; the names this module used to
define are re-exported here (:func:`read_state_dict`, :func:`unsafe_globals`,
:func:`sidecar_path`, :class:`ACMILStruct`, :data:`SAFE_GLOBALS`, :data:`TORCH_SUFFIXES`,
and :class:`CheckpointError`, the same class as ``_weights.WeightsError``). There is no
unsafe fallback anywhere.

Each architecture's key remaps live in its own module, as its class's
:meth:`~napari_milview.mil.base.MILModel.remap_keys` (CLAM:
:func:`napari_milview.mil.clam.remap_clam_keys`).

:func:`load_model` in steps
---------------------------
1. read (:func:`_read`): the state_dict, its container metadata (stored card, training
   config, epoch), the shared wrapper prefixes stripped, the JSON sidecar;
2. architecture (:func:`_architecture`): the argument, else the sidecar's / stored card's
   ``arch``, else a training config's model name when the layout agrees, else detected from
   the key names and shapes (directly, or after one architecture's own remap);
3. the architecture's own remaps (``cls.remap_keys``);
4. hyper-parameters (:func:`_hyperparameters`): inferred from the tensor shapes
   (``cls.hparams_from_state_dict``), cross-checked with the stored card, the sidecar, the
   ``hparams`` argument, the ``nystrom`` argument (TransMIL) and a stored training config (a
   contradiction raises); what the container shows and the tensors cannot
   (``cls.hparams_from_checkpoint``: ACMIL's CLAM-MB attention, AEM's scoring, TransMIL's
   nystrom-attention variant) where none of those set it;
5. build and load with ``strict=True`` (:func:`_build_and_load`);
6. the card (:func:`_model_card`): classes, feature dimension, encoder, patch size, notes.

:func:`save_model` writes safetensors plus a ``<stem>.json`` sidecar.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._inert import SAFE_GLOBALS, ACMILStruct
from .._io import atomic_write
from .._weights import (
    TORCH_SUFFIXES,
    WeightsError,
    key_report,
    read_sidecar,
    read_state_dict,
    sidecar_path,
    strip_prefixes,
    unsafe_globals,
)
from . import base
from .base import MILModel, ModelCard

__all__ = [
    "ACMILStruct",
    "CheckpointError",
    "SAFE_GLOBALS",
    "TORCH_SUFFIXES",
    "load_model",
    "normalise_keys",
    "read_state_dict",
    "save_model",
    "sidecar_path",
    "unsafe_globals",
]

#: a checkpoint that cannot be read, is refused, or does not fit the model
#: (``_weights.WeightsError``: one class, whichever module raised it)
CheckpointError = WeightsError


# ----------------------------------------------------------------------------------------
# key normalisation
# ----------------------------------------------------------------------------------------


def normalise_keys(
    sd: Mapping[str, Tensor], arch: str | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Map official/legacy key layouts onto the names our model classes use.

    Parameters
    ----------
    sd : mapping of str to Tensor
        A raw state_dict (from :func:`read_state_dict`).
    arch : str, optional
        Architecture name or alias whose remaps apply. Default: the architecture the keys
        show (:func:`napari_milview.mil.base.detect_arch`, else the one architecture whose
        own remap yields its layout); none when no architecture is recognised.

    Returns
    -------
    state_dict : dict of str to Tensor
        The renamed state_dict (tensors are not copied).
    notes : list of str
        One human-readable line per change (empty when nothing changed).

    Raises
    ------
    CheckpointError
        A rename would make two keys collide, or ``arch`` is unknown.

    Notes
    -----
    Wrapper prefixes (``model.``, ``module.``, ``_orig_mod.``) are stripped only when
    *every* key carries them (:func:`napari_milview._weights.strip_prefixes`); the
    architecture's own remaps are its ``remap_keys`` (CLAM:
    :func:`napari_milview.mil.clam.remap_clam_keys`).
    """
    out, notes = strip_prefixes(sd)
    if arch is None:
        arch = _arch_from_layout(out)
    if arch is not None:
        try:
            cls = base.MODELS[base.resolve_arch(arch)[0]]
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        out, more = cls.remap_keys(out)
        notes += [n for n in more if n not in notes]
    return out, notes


def _arch_from_layout(sd: Mapping[str, Tensor]) -> str | None:
    """The architecture of a prefix-free state_dict, or None when none (or several) fit.

    ``detect_arch`` on the keys as they are; when that finds none or several, the one
    registered architecture whose own ``remap_keys`` turns ``sd`` into its layout.
    """
    try:
        return base.detect_arch(sd)
    except ValueError:
        pass
    hits = []
    for name, cls in base.MODELS.items():
        if name in base.ALIASES:
            continue
        try:
            if cls.matches_state_dict(cls.remap_state_dict(sd)):
                hits.append(name)
        except (ValueError, KeyError):
            continue
    return hits[0] if len(hits) == 1 else None


# ----------------------------------------------------------------------------------------
# load_model, step by step
# ----------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    """What :func:`load_model` knows about one file as it goes.

    Attributes
    ----------
    name : str
        The file name, for messages.
    sd : dict of str to Tensor
        The state_dict: wrapper prefixes stripped, then the architecture's remaps applied.
    meta : dict
        :func:`read_state_dict`'s metadata.
    side : dict
        The JSON sidecar (empty when none).
    side_src : str or None
        Where the sidecar came from.
    notes : list of str
        Every remap and the provenance of each card field, in order.
    side_list : list or None
        A JSON list found where the sidecar is (DSMIL's per-class thresholds); only an
        architecture whose ``hparams_from_sidecar_list`` takes it accepts it.
    """

    name: str
    sd: dict[str, Tensor]
    meta: dict[str, Any]
    side: dict[str, Any]
    side_src: str | None
    notes: list[str] = field(default_factory=list)
    side_list: list[Any] | None = None

    @property
    def card(self) -> dict[str, Any]:
        """The model card stored in the file (safetensors metadata ``milview``)."""
        return dict(self.meta.get("card") or {})

    @property
    def config(self) -> dict[str, Any]:
        """The training config stored in the file (ACMIL ``config``, Lightning
        ``hyper_parameters``, ``args`` ...), as plain values."""
        return dict(self.meta.get("config") or {})

    def pick(self, key: str) -> tuple[Any, str | None]:
        """A card field from the sidecar, else the stored card: ``(value, source)``."""
        for src, d in (("sidecar", self.side), ("stored card", self.card)):
            if d.get(key) is not None:
                return d[key], src
        return None, None


def _read(path: Path, sidecar: Any) -> _Checkpoint:
    """Step 1: the tensors (wrapper prefixes stripped), container metadata (with
    ``meta["prefix"]``: the wrapper prefix every stored key carried, ``"model."`` ..., or
    None) and sidecar."""
    raw, meta = read_state_dict(path)
    sd, notes = strip_prefixes(raw)
    side_list = None
    if isinstance(sidecar, (list, tuple)):
        side, side_src, side_list = {}, "sidecar argument", list(sidecar)
    else:
        if sidecar is None and not os.path.lexists(sidecar_path(path)):
            # DSMIL's standalone-test scheme: test/mil_threshold_fold_<k>.json beside
            # test/mil_weights_fold_<k>.pth
            alt = path.with_name(path.stem.replace("mil_weights_fold_", "mil_threshold_fold_")
                                 + ".json")
            if path.stem.startswith("mil_weights_fold_") and alt.is_file():
                sidecar = alt
        side, side_src = read_sidecar(sidecar, path, allow_list=True)
        if isinstance(side, list):
            side, side_list = {}, side
    if meta.get("format") == "modules":
        notes.insert(0, f"container: {len(meta['modules'])} module state_dicts "
                        f"({meta['state_dict_key']}) joined as '<module>.<key>'")
    elif meta.get("format") not in (None, "safetensors", "state_dict"):
        notes.insert(0, f"container: {meta['format']} (state_dict under "
                        f"'{meta.get('state_dict_key')}'"
                        + (f", epoch {meta['epoch']}" if "epoch" in meta else "")
                        + (f"; not loaded: {', '.join(meta['ignored_keys'])}"
                           if meta.get("ignored_keys") else "") + ")")
    if meta.get("rebuilt"):
        notes.insert(1 if notes and notes[0].startswith("container:") else 0,
                     f"config objects rebuilt as plain data: {', '.join(meta['rebuilt'])}")
    heads = {k.split(".", 1)[0] for k in raw}
    meta["prefix"] = (f"{heads.pop()}." if len(heads) == 1 and all("." in k for k in raw)
                      else None)
    return _Checkpoint(path.name, sd, meta, side, side_src, notes, side_list=side_list)


def _sidecar_list(ck: _Checkpoint, arch: str, cls: type[MILModel]) -> None:
    """A JSON list where the sidecar is: the architecture's hyper-parameters (DSMIL's
    per-class thresholds), put into ``ck.side["hparams"]``; refused for any other one.

    Raises
    ------
    CheckpointError
        The architecture takes no list, or the list is not what it expects.
    """
    if ck.side_list is None:
        return
    try:
        extra, note = cls.hparams_from_sidecar_list(list(ck.side_list))
    except ValueError as exc:
        raise CheckpointError(f"{ck.side_src}: {exc} (a JSON list is read only beside a DSMIL "
                              f"checkpoint, as its per-class thresholds; this is {arch})"
                              ) from None
    ck.side = {"hparams": dict(extra)}
    if note:
        ck.notes.append(f"{note} (from {ck.side_src})")


def _architecture(ck: _Checkpoint, arch: str | None) -> tuple[str, type[MILModel], str]:
    """Step 2: the architecture, from the argument, the card, a stored config or the keys.

    Returns
    -------
    arch : str
        The alias as given when it is one, else the canonical name.
    cls : type of MILModel
    source : str
        ``"argument"``, ``"sidecar"``, ``"stored card"``, ``"stored config"`` or
        ``"detected from the weights"``.

    Raises
    ------
    CheckpointError
        An unknown name, or a layout no architecture recognises (the message names the
        closest architecture with its missing and unexpected keys).
    """
    src = "argument"
    if arch is None:
        for where, val in (("sidecar", ck.side.get("arch")), ("stored card", ck.card.get("arch"))):
            if isinstance(val, str) and val:
                arch, src = val, where
                break
    if arch is None and ck.config:
        # a training config's model name is a hint only: used when the layout agrees
        cands = _arch_from_config(ck.config)
        for cand in cands:
            cls_c = base.MODELS[base.resolve_arch(cand)[0]]
            if cls_c.matches_state_dict(cls_c.remap_state_dict(ck.sd)):
                arch, src = cand, "stored config"
                break
        if cands and arch is None:
            ck.notes.append(f"stored config names {' or '.join(map(repr, cands))} but the "
                            "weights do not have that layout; detecting from the weights")
    if arch is None:
        arch, src = _arch_from_layout(ck.sd), "detected from the weights"
        if arch is None:
            raise CheckpointError(f"{ck.name}: unknown layout ({_why_unknown(ck.sd)})"
                                  f"{_closest_hint(ck.sd)}")
    try:
        canon, _fixed = base.resolve_arch(arch)
    except ValueError as exc:
        raise CheckpointError(f"{ck.name}: {exc}") from None
    key = arch.strip().lower().replace("-", "_")
    return (key if key in base.ALIASES else canon), base.MODELS[canon], src


def _why_unknown(sd: Mapping[str, Tensor]) -> str:
    """``detect_arch``'s message (no or several architectures match)."""
    try:
        base.detect_arch(sd)
    except ValueError as exc:
        return str(exc)
    return "ambiguous after the architectures' own remaps"  # pragma: no cover


def _hyperparameters(ck: _Checkpoint, arch: str, cls: type[MILModel],
                     hparams: Mapping[str, Any] | None,
                     nystrom: str | None = None) -> dict[str, Any]:
    """Step 4: constructor hyper-parameters, inferred from shapes and cross-checked.

    ``cls.hparams_from_state_dict(ck.sd)`` gives what the weights determine (e.g.
    ``in_dim`` = ``dimreduction.fc1.weight`` [inner, in_dim] ``.shape[1]``). The stored card,
    the sidecar, ``hparams`` and ``nystrom`` (rising priority; read by :func:`_declared`)
    may add the others (dropout, STKIM settings, TransMIL's ``nystrom`` ...) but never
    contradict the inferred ones; ``cls.hparams_from_checkpoint(ck.meta)`` adds what the
    container shows (ACMIL's container -> CLAM-MB ``attention_norm="softmax_one"``, the
    official TransMIL checkpoint -> ``nystrom="0.0.9"``) and why, unless one of those set it
    (the notes then say which: ``"nystrom 0.0.9 chosen explicitly"``, and that the container
    suggests otherwise); a stored training config is cross-checked field by field
    (:data:`_CONFIG_FIELDS`) and gives the STKIM settings the weights cannot show
    (:data:`_TRAINING_ONLY_FIELDS`).

    Raises
    ------
    CheckpointError
        Not this architecture's layout (with a key report), a contradiction, a
        hyper-parameter the constructor does not take (``nystrom``: TransMIL models only), or
        an unknown nystrom variant.
    """
    accepted = _constructor_params(cls)
    if nystrom is not None and "nystrom" not in accepted:
        raise CheckpointError(f"{ck.name}: the nystrom setting ({nystrom!r}) applies to "
                              f"TransMIL models only, not {cls.arch}")
    inferred = _infer_hparams(ck, arch, cls, hparams)
    hp = dict(inferred)
    given: dict[str, str] = {}  # hyper-parameter -> where it was set, for the notes
    for src, how, card in (("stored card", "from the stored card", ck.card),
                           ("sidecar", "from the sidecar", ck.side),
                           ("hparams argument", "from the hparams argument",
                            {"hparams": hparams}),
                           ("nystrom argument", "chosen explicitly", {"nystrom": nystrom})):
        for k, v in _declared(ck, src, card, accepted).items():
            if k in inferred and not _same(v, inferred[k]):
                raise CheckpointError(f"{ck.name}: {src} says {k}={v!r} but the weights give "
                                      f"{k}={inferred[k]!r}")
            if k not in inferred:
                if k not in accepted:
                    raise CheckpointError(f"{ck.name}: {src} has {k}={v!r}, which "
                                          f"{cls.__name__} does not accept")
                hp[k], given[k] = v, how
    from_container, why = cls.hparams_from_checkpoint(ck.meta)
    for k, v in from_container.items():
        if k not in hp:
            if v is not None:
                hp[k] = v
            ck.notes += [n for n in why if n not in ck.notes]
            continue
        if k in given:
            ck.notes.append(f"{k} {hp[k]} {given[k]}")
        if v is not None and not _same(hp[k], v):
            ck.notes.append(f"{k}={hp[k]!r} as given, although the container suggests {v!r}")
    if ck.config:
        extra, used = _cross_check(inferred, ck.config, accepted, ck.name,
                                   f"the stored {ck.meta.get('config_key', 'config')}")
        for k, v in extra.items():
            hp.setdefault(k, v)
        if used:
            ck.notes.append(f"stored config cross-checked ({', '.join(used)})")
    return hp


def _declared(ck: _Checkpoint, src: str, card: Mapping[str, Any],
              accepted: set[str]) -> dict[str, Any]:
    """The hyper-parameters one source sets: a card-like mapping's ``hparams`` and, for a
    constructor taking it (TransMIL), its top-level ``"nystrom"``, normalised here and only
    here (:func:`~napari_milview.mil.transmil.nystrom_variant`; the older
    ``legacy_nystrom_slice`` True / False -> ``"0.0.9"`` / ``"current"`` unless ``nystrom``).

    Raises
    ------
    CheckpointError
        An unknown nystrom variant, or a top-level ``nystrom`` and ``hparams`` that disagree.
    """
    values = dict(card["hparams"]) if isinstance(card.get("hparams"), Mapping) else {}
    if "nystrom" not in accepted:
        return values
    from .transmil import nystrom_variant

    legacy = values.pop("legacy_nystrom_slice", None)
    inner = values.pop("nystrom", None)
    if inner is None and legacy is not None:
        inner = "0.0.9" if legacy else "current"
    try:
        top, inner = (None if v is None else nystrom_variant(v)
                      for v in (card.get("nystrom"), inner))
    except ValueError as exc:
        raise CheckpointError(f"{ck.name}: {exc}") from None
    if top and inner and top != inner:
        raise CheckpointError(f"{ck.name}: the {src} says nystrom={top!r} but its hparams "
                              f"say {inner!r}")
    if top or inner:
        values["nystrom"] = top or inner
    return values


def _infer_hparams(ck: _Checkpoint, arch: str, cls: type[MILModel],
                   hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cls.hparams_from_state_dict``; failure -> CheckpointError with a key report."""
    try:
        return dict(cls.hparams_from_state_dict(ck.sd))
    except (ValueError, KeyError) as exc:
        try:
            ref = base.build_model(arch, **dict(hparams or {})).state_dict()
            report = "; " + key_report(ref, ck.sd)
        except (TypeError, ValueError, RuntimeError):
            report = ""
        raise CheckpointError(f"{ck.name}: not a {arch} checkpoint ({exc}){report}") from None


def _build_and_load(ck: _Checkpoint, arch: str, hp: Mapping[str, Any]) -> MILModel:
    """Step 5: ``build_model(arch, **hp)`` and ``load_state_dict(ck.sd, strict=True)``.

    Raises
    ------
    CheckpointError
        The model cannot be built with ``hp``, or the keys / shapes do not fit (the message
        lists missing, unexpected and mis-shaped keys).
    """
    try:
        model = base.build_model(arch, **hp)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ck.name}: cannot build {arch} with {dict(hp)}: {exc}") from None
    report = key_report(model.state_dict(), ck.sd)
    if report:
        raise CheckpointError(f"{ck.name}: the weights do not fit {arch} (strict load): {report}")
    try:
        model.load_state_dict(ck.sd, strict=True)
    except RuntimeError as exc:  # pragma: no cover - the report above catches these
        raise CheckpointError(f"{ck.name}: strict load failed: {exc}") from None
    return model


def _classes(ck: _Checkpoint, n_classes: int) -> list[str]:
    """Class names in logit order: sidecar, stored card, stored config, else ``class_i``
    (an empty list counts as none given).

    Raises
    ------
    CheckpointError
        A stored list whose length is not ``n_classes`` (the rows of the classifier weight).
    """
    classes, src = ck.pick("classes")
    if isinstance(classes, (list, tuple)) and not classes:
        classes = None  # a card saved without names ([]): not a claim about the classifier
    if classes is None:
        for view in _config_views(ck.config):
            found = next((view[k] for k in ("classes", "class_names", "label_names")
                          if isinstance(view.get(k), (list, tuple))), None)
            if found is not None:
                classes, src = found, "stored config"
                break
    if classes is None:
        return _default_classes(n_classes)
    if not isinstance(classes, (list, tuple)) or len(classes) != n_classes:
        n = len(classes) if isinstance(classes, (list, tuple)) else 0
        raise CheckpointError(f"{ck.name}: {src} lists {n} class name(s) but the weights have "
                              f"n_classes={n_classes}")
    return [str(c) for c in classes]


def _model_card(ck: _Checkpoint, arch: str, arch_src: str, model: MILModel) -> ModelCard:
    """Step 6: the card: classes, feature dim (= ``in_dim``), encoder, patch size, notes.

    Raises
    ------
    CheckpointError
        Class names or a ``feature_dim`` that contradict the weights.
    """
    classes = _classes(ck, int(model.n_classes))
    feature_dim, src = ck.pick("feature_dim")
    if feature_dim is not None and int(feature_dim) != int(model.in_dim):
        raise CheckpointError(f"{ck.name}: {src} says feature_dim={feature_dim} but the "
                              f"weights take in_dim={model.in_dim}")
    encoder, _ = ck.pick("encoder")
    if encoder is None and isinstance(ck.config.get("pretrain"), str):
        encoder = ck.config["pretrain"]  # ACMIL's --pretrain preset name
    patch_um, _ = ck.pick("patch_size_um")
    stored_notes, _ = ck.pick("notes")
    stored = [p for p in str(stored_notes or "").split("; ") if p]
    notes = list(ck.notes)
    if not stored:  # provenance only for cards we built here (a stored card keeps its own)
        if arch_src != "argument":
            notes.append(f"arch {arch!r} {'from the ' if 'detected' not in arch_src else ''}"
                         f"{arch_src}")
        if ck.side_src:
            notes.append(f"card fields from {ck.side_src}")
    return base.ModelCard(
        arch=arch,
        hparams=dict(model.hparams),
        classes=classes,
        feature_dim=int(model.in_dim),
        encoder=None if encoder is None else str(encoder),
        patch_size_um=None if patch_um is None else float(patch_um),
        notes="; ".join(stored + [n for n in notes if n not in stored]),
        nystrom=model.hparams.get("nystrom"),
    )


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    sidecar: str | os.PathLike | Mapping[str, Any] | list[float] | None = None,
    device: str | torch.device = "cpu",
    nystrom: str | None = None,
) -> tuple[MILModel, ModelCard]:
    """Load a MIL model from a checkpoint file, safely, with ``strict=True``.

    Parameters
    ----------
    path : str or os.PathLike
        Weights: ``.safetensors`` or a ``.pt``/``.pth``/``.ckpt``/``.bin`` file in any
        layout :func:`read_state_dict` and the architectures' remaps understand.
    arch : str, optional
        Architecture name or alias. Default: the sidecar's / stored card's ``arch``,
        else an architecture named in a stored training config, else
        :func:`napari_milview.mil.base.detect_arch` on the key names and shapes.
    hparams : mapping, optional
        Constructor hyper-parameters. Those the weights determine are cross-checked
        (a contradiction raises); the others (``nystrom``, dropout ...) are passed on.
    sidecar : path, mapping or list, optional
        Model-card JSON ``{"classes": [...], "feature_dim", "patch_size_um", "encoder",
        "arch", "nystrom"}``. Default: ``<stem>.json`` next to the weights, when present. A
        JSON list (a file, or a list given here) is accepted beside a DSMIL checkpoint only:
        its training script's per-class thresholds (``card.hparams["thresholds"]``).
    device : str or torch.device
        Where the model is moved.
    nystrom : {"0.0.9", "current"}, optional
        TransMIL family only (an error for other architectures): the nystrom-attention
        release to reproduce. It wins over the sidecar, the stored card and ``hparams``.
        Default: what those say, else what the container shows (the official TransMIL
        Lightning checkpoint -> ``"0.0.9"``, anything else -> ``"current"``); the card's
        notes say which and why.

    Returns
    -------
    model : MILModel
        In eval mode on ``device``; takes bags ``[N, card.feature_dim]``, returns logits
        ``[len(card.classes)]``.
    card : ModelCard
        ``arch``, the full ``hparams``, ``classes`` (default ``class_0 .. class_{C-1}``),
        ``feature_dim`` (= ``in_dim``), ``encoder``, ``patch_size_um`` and ``notes``
        (every remap and the provenance of each field).

    Raises
    ------
    FileNotFoundError
        The weights (or an explicitly named sidecar) do not exist.
    CheckpointError
        The file is unreadable or refused; the layout is unknown (the message lists the
        missing and unexpected keys against the closest architecture); a stored config,
        sidecar or ``hparams`` contradicts the tensor shapes; or the strict load fails.
    """
    ck = _read(Path(path), sidecar)
    arch, cls, arch_src = _architecture(ck, arch)
    ck.sd, remapped = cls.remap_keys(ck.sd)
    ck.notes += [n for n in remapped if n not in ck.notes]
    _sidecar_list(ck, arch, cls)
    hp = _hyperparameters(ck, arch, cls, hparams, nystrom)
    model = _build_and_load(ck, arch, hp).to(device).eval()
    return model, _model_card(ck, arch, arch_src, model)


# ----------------------------------------------------------------------------------------
# stored configs
# ----------------------------------------------------------------------------------------

#: stored-config field -> hyper-parameter names it may correspond to (the first one the
#: weights determine is cross-checked; a contradiction raises)
_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "D_feat": ("in_dim",),
    "in_dim": ("in_dim",),
    "input_dim": ("in_dim",),
    "embed_dim": ("in_dim",),
    "D_inner": ("inner_dim", "hidden_dim", "dim"),
    "inner_dim": ("inner_dim",),
    "n_class": ("n_classes",),
    "n_classes": ("n_classes",),
    "num_classes": ("n_classes",),
    "n_token": ("n_token",),
    "model_size": ("size_arg",),
    "size_arg": ("size_arg",),
}

#: stored-config fields the weights cannot show (ACMIL's STKIM settings): kept and passed
#: to the constructor when the architecture takes them
_TRAINING_ONLY_FIELDS = ("n_masked_patch", "mask_drop")

#: ACMIL's ``--arch`` values -> the architectures they may name, in order: ``mha`` is
#: ACMIL-MHA in ``Step3_WSI_classification_ACMIL.py`` but the single-query ``MHA`` in
#: ``Step3_WSI_classification.py`` and AEM's ``main.py`` (the layout decides)
_CONFIG_ARCH = {"ga": ("acmil_ga",), "mha": ("acmil_mha", "mha")}


def _config_views(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The config itself and, for Lightning-style configs, its ``model`` section."""
    views: list[Mapping[str, Any]] = [config]
    for key in ("model", "Model", "model_args"):
        sub = config.get(key)
        if isinstance(sub, Mapping):
            views.append(sub)
    return views


def _arch_from_config(config: Mapping[str, Any]) -> list[str]:
    """The architectures a training config's model name may mean (known ones; empty when
    it names none)."""
    for view in _config_views(config):
        for key in ("arch", "model_name", "name", "model_type"):
            val = view.get(key)
            if not isinstance(val, str) or not val.strip():
                continue
            known = []
            for cand in _CONFIG_ARCH.get(val.strip().lower(), (val,)):
                try:
                    base.resolve_arch(cand)
                except ValueError:
                    continue
                known.append(cand)
            if known:
                return known
    return []


def _constructor_params(cls: type) -> set[str]:
    import inspect

    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):  # pragma: no cover
        return set()
    return {p for p in sig.parameters if p != "self"}


def _cross_check(hp: Mapping[str, Any], config: Mapping[str, Any], accepted: set[str],
                 name: str, what: str) -> tuple[dict[str, Any], list[str]]:
    """Check ``config`` against the inferred ``hp``; return the training-only fields to keep.

    Returns
    -------
    extra : dict
        :data:`_TRAINING_ONLY_FIELDS` present in the config and taken by the constructor.
    used : list of str
        The config fields that were cross-checked or kept.
    """
    extra: dict[str, Any] = {}
    used: list[str] = []
    for view in _config_views(config):
        for key, hnames in _CONFIG_FIELDS.items():
            if key not in view:
                continue
            hname = next((h for h in hnames if h in hp), None)
            if hname is None:
                continue
            if not _same(view[key], hp[hname]):
                raise CheckpointError(
                    f"{name}: {what} says {key}={view[key]!r} but the weights give "
                    f"{hname}={hp[hname]!r}"
                )
            used.append(key)
        for key in _TRAINING_ONLY_FIELDS:
            if key in view and key in accepted and key not in extra:
                extra[key] = view[key]
                used.append(key)
    return extra, list(dict.fromkeys(used))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    return a == b


def _closest_arch(sd: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """The registered architecture whose default key set overlaps ``sd`` most."""
    best: tuple[float, str, str] | None = None
    for name, cls in base.MODELS.items():
        if name in base.ALIASES:
            continue
        try:
            ref = cls().state_dict()
        except (TypeError, ValueError, RuntimeError):  # pragma: no cover
            continue
        overlap = len(set(ref) & set(sd)) / max(len(set(ref) | set(sd)), 1)
        if best is None or overlap > best[0]:
            best = (overlap, name, key_report(ref, sd))
    if best is None:
        return None
    return best[1], best[2]


def _closest_hint(sd: Mapping[str, Tensor]) -> str:
    """``"; closest architecture 'abmil': 2 missing: ...; 1 unexpected: ..."`` or ``""``."""
    close = _closest_arch(sd)
    return f"; closest architecture {close[0]!r}: {close[1]}" if close else ""


def _default_classes(n: int) -> list[str]:
    return [f"class_{i}" for i in range(n)]


# ----------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_model(model: MILModel, card: ModelCard, path: str | os.PathLike) -> Path:
    """Write a model as safetensors with its card, plus a ``<stem>.json`` sidecar.

    Parameters
    ----------
    model : MILModel
        The model; its ``state_dict`` is written (CPU, contiguous copies).
    card : ModelCard
        Stored as JSON under the safetensors metadata key ``milview`` and in the sidecar.
        Empty ``hparams`` are filled from ``model.hparams``; empty ``classes`` and a
        missing ``feature_dim`` are left as they are.
    path : str or os.PathLike
        Target; should end in ``.safetensors``. Both files are written atomically
        (temporary name in the same folder, then ``os.replace``).

    Returns
    -------
    pathlib.Path
        The weights path.

    Raises
    ------
    CheckpointError
        The card is inconsistent (``ModelCard.check``) or does not match the model, or it
        is not JSON serialisable.
    """
    from safetensors.torch import save_file

    path = Path(path)
    d = card.to_dict() if hasattr(card, "to_dict") else (
        asdict(card) if is_dataclass(card) else dict(card))
    if not d.get("hparams"):
        d["hparams"] = dict(getattr(model, "hparams", {}))
    for k in ("in_dim", "n_classes"):
        mv = getattr(model, k, None)
        if mv is not None and k in d["hparams"] and int(d["hparams"][k]) != int(mv):
            raise CheckpointError(f"card hparams {k}={d['hparams'][k]} but the model has {mv}")
    problems = type(card).from_dict(d).check() if hasattr(card, "check") else []
    if problems:
        raise CheckpointError("inconsistent model card: " + "; ".join(problems))
    try:
        text = json.dumps(d, default=_json_default, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model card is not JSON serialisable: {exc}") from None
    tensors = {k: v.detach().to("cpu").contiguous().clone()
               for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "milview": text}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(sidecar_path(path),
                  lambda tmp: tmp.write_text(json.dumps(d, default=_json_default, indent=2,
                                                        sort_keys=True) + "\n",
                                             encoding="utf-8"))
    return path
