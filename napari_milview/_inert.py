"""Inert stand-ins for the configuration objects that training scripts pickle beside weights.

``torch.load(weights_only=True)`` refuses every global outside its own allowlist, so a
checkpoint that carries its training configuration as an ``addict.Dict``, an
``argparse.Namespace`` or an omegaconf ``DictConfig`` cannot be read, though it holds only
data. :data:`SAFE_GLOBALS` extends the allowlist with stand-ins defined here, registered with
:class:`torch.serialization.safe_globals` as ``(stand-in, "module.name")`` pairs.
:func:`napari_milview._weights.torch_load` is the one reader that uses them
(:func:`load_plain`, :func:`stand_in_problem`).

What is rebuilt as what
-----------------------
* ``addict.addict.Dict`` (also ``addict.Dict``; TransMIL's YAML config in Lightning
  ``hyper_parameters``) and ``easydict.EasyDict`` (:class:`AddictDict`,
  :class:`EasyDictStandIn`) -> dict;
* ``argparse.Namespace`` (:class:`NamespaceStandIn`) and ``utils.utils.Struct``
  (:class:`ACMILStruct`: ACMIL's and AEM's ``{'model', 'optimizer', 'epoch', 'config'}``)
  -> dict of the attributes;
* omegaconf ``DictConfig`` / ``ListConfig`` (:class:`OmegaDictConfig`,
  :class:`OmegaListConfig`) -> dict / list; their ``omegaconf.nodes`` value nodes (``AnyNode``,
  ``StringNode``, ``IntegerNode``, ``FloatNode``, ``BooleanNode``, ``BytesNode``,
  ``PathNode``, ``NoneNode``, ``InterpolationResultNode``) -> their values;
  ``omegaconf.base.Metadata`` / ``ContainerMetadata`` -> dropped;
* ``collections.defaultdict`` (omegaconf's ``resolver_cache``) -> an empty dict;
* ``typing.Any`` and the ``builtins`` types ``dict list int float str bool bytes object
  tuple``, stored as data (omegaconf's ``ref_type``) -> their names;
* ``pathlib`` / ``pathlib._local`` ``PosixPath``, ``WindowsPath``, ``PurePosixPath``,
  ``PureWindowsPath``, ``Path``, ``PurePath`` -> the path's str;
* a stand-in class stored as data (Lightning's ``hparams_type``) -> its registered name.

``collections.OrderedDict`` is already allowed by torch and is left alone.

Why nothing is imported or called
---------------------------------
torch's restricted unpickler matches a global by its ``"module.name"`` string against the
allowlist and hands out the registered object; it never imports the named module, so no
code of ``addict``, ``omegaconf``, ACMIL ... runs, and none of them needs to be installed.
What it hands out is one of the stand-ins below: classes whose ``__new__`` / ``__setstate__``
/ ``__call__`` only check the data they are handed (``(key, value)`` pairs with plain keys, a
dict of str-named attributes, str path parts, no constructor arguments) and store it; the
type names refuse to be called; a ``defaultdict``'s factory is checked, never called. The
post-pass (:func:`load_plain`) then replaces what the stand-ins made by plain dict / list /
str / number values, so nothing of this module leaves a load.

Limits
------
* Only the names listed are accepted, each under its exact ``module.name``; a subclass or a
  look-alike under another name (``myproject.Config``) is refused like any other global.
* A stand-in handed anything but data of the expected shape refuses the whole file
  (``pickle.UnpicklingError`` starting with ``"inert config: "``; :func:`stand_in_problem`
  gives the reader's message); a global nested inside a config is refused by torch as usual.
* The rebuilt data has none of the originals' behaviour: no attribute access on dicts,
  omegaconf interpolations (``"${model.name}"``) and missing values (``"???"``) stay
  unresolved strings, omegaconf flags, metadata and parent links are dropped, paths are
  strings never looked up on disk, a ``defaultdict`` loses its factory.
* What was rebuilt is recorded only during :func:`load_plain`; a stand-in made outside one
  still checks its data but is not turned into plain data.
"""

from __future__ import annotations

import functools
import pickle
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

__all__ = [
    "ACMILStruct",
    "AddictDict",
    "ConfigStruct",
    "EasyDictStandIn",
    "NamespaceStandIn",
    "OmegaDictConfig",
    "OmegaListConfig",
    "SAFE_GLOBALS",
    "load_plain",
    "stand_in_problem",
]


# ----------------------------------------------------------------------------------------
# refusals and the load record
# ----------------------------------------------------------------------------------------

#: the prefix of every refusal raised by a stand-in (torch re-wraps UnpicklingError's text)
_REFUSED = "inert config: "
#: key types a rebuilt mapping may hold
_PLAIN_KEYS = (str, int, float, bool, type(None))


def _refuse(what: str, problem: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{_REFUSED}{what}: {problem}")


@dataclass
class _LoadRecord:
    """What the stand-ins made during one :func:`load_plain` (for the post-pass and notes)."""

    names: dict[str, None] = field(default_factory=dict)  # rebuilt global names, in order
    made: dict[int, tuple[str, Any]] = field(default_factory=dict)  # id -> (name, object)


_LOAD: ContextVar[_LoadRecord | None] = ContextVar("_milview_inert_load", default=None)


def _record(name: str, obj: Any = None, note: bool = True) -> None:
    rec = _LOAD.get()
    if rec is None:
        return
    if note:
        rec.names.setdefault(name, None)
    if obj is not None:
        rec.made[id(obj)] = (name, obj)  # the reference keeps the id unique


# ----------------------------------------------------------------------------------------
# the stand-ins (they check and store data; nothing they are handed is called)
# ----------------------------------------------------------------------------------------


def _attribute_state(what: str, state: Any) -> dict[str, Any]:
    """The ``__dict__`` a BUILD hands over: a dict with str keys (``(dict, None)`` too)."""
    if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
        state = state[0]
    if type(state) is not dict:
        raise _refuse(what, f"expected a dict of attributes, got {type(state).__name__}")
    bad = [type(k).__name__ for k in state if type(k) is not str]
    if bad:
        raise _refuse(what, f"attribute names must be str, got {bad[0]}")
    return state


class _InstanceStandIn:
    """Base of the stand-ins registered as *instances* (not classes).

    A NEWOBJ on one (``obj.__new__(obj, ...)``) is refused in its own words instead of
    failing inside :meth:`object.__new__`.
    """

    __slots__ = ()
    name = "?"

    def __new__(cls, *args: Any) -> Any:  # noqa: D102 - documented on the class
        if not isinstance(cls, type):
            raise _refuse(getattr(cls, "name", "?"), "not a class, refused as NEWOBJ's class")
        return super().__new__(cls)


class _TypeName(_InstanceStandIn):
    """A type or typing name that configs store as *data* (omegaconf's ``ref_type`` ...).

    Registered in place of ``builtins.dict``, ``typing.Any`` ...: the unpickler hands out
    this marker, never the real object, and calling it (a REDUCE or NEWOBJ on it) is
    refused. Rebuilt as its name, e.g. ``"typing.Any"``.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> Any:
        raise _refuse(self.name, "a type name, allowed as data only, not called")

    def __repr__(self) -> str:
        return f"<type name {self.name}>"


class _PathStandIn(_InstanceStandIn):
    """``pathlib.*Path`` reduced as ``(cls, parts)``: the path's str, nothing touched.

    Each part must be a str (Python <= 3.12 pickles the parts, ``('/', 'runs', 'x')``;
    3.13 the raw strings, ``('/runs/x',)``, under ``pathlib._local``). The str is that of
    :class:`pathlib.PurePosixPath` or :class:`pathlib.PureWindowsPath` of the parts (pure
    string parsing, no file system), so it reads as the saved path did.
    """

    __slots__ = ("name", "flavour")

    def __init__(self, name: str, flavour: Any) -> None:
        self.name, self.flavour = name, flavour

    def __call__(self, *parts: Any) -> str:
        bad = [type(p).__name__ for p in parts if type(p) is not str]
        if bad:
            raise _refuse(self.name, f"path parts must be str, got {bad[0]}")
        _record(self.name)
        return str(self.flavour(*parts))

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


class _DefaultDictStandIn(_InstanceStandIn):
    """``collections.defaultdict(factory)`` (omegaconf's ``resolver_cache``): a plain dict.

    The factory must be None or a :class:`_TypeName`; it is never called.
    """

    __slots__ = ()
    name = "collections.defaultdict"

    def __call__(self, *args: Any) -> dict:
        if len(args) > 1 or any(a is not None and not isinstance(a, _TypeName) for a in args):
            raise _refuse(self.name, "expected one type name as its factory, got "
                          + ", ".join(type(a).__name__ for a in args))
        return {}

    def __repr__(self) -> str:
        return f"<inert {self.name}>"


class _MappingStandIn:
    """Base of the stand-ins for ``dict`` subclasses (``addict.Dict``, ``easydict.EasyDict``).

    Pickles of a dict subclass create the object (NEWOBJ with ``(key, value)`` pairs for
    ``addict``, none for ``easydict``), fill it with SETITEMS and hand it a state (BUILD):
    ``addict`` the object itself, ``easydict`` the same entries as attributes. torch's
    restricted unpickler fills only ``dict`` / ``OrderedDict`` / ``Counter`` objects, so
    ``__new__`` returns a :class:`collections.Counter` whose instance attribute
    ``__setstate__`` checks the state (the unpickler calls the instance's
    ``__setstate__`` for an allowlisted type such as ``Counter``); :func:`load_plain`'s
    post-pass turns it into a plain dict. Keys must be str / int / float / bool / None;
    nothing stored is ever called.
    """

    name = "?"

    def __new__(cls, *pairs: Any) -> Any:  # noqa: D102 - documented on the class
        out: Counter = Counter()
        for p in pairs:
            if type(p) is not tuple or len(p) != 2:
                raise _refuse(cls.name, f"expected (key, value) pairs, got {type(p).__name__}")
            if type(p[0]) not in _PLAIN_KEYS:
                raise _refuse(cls.name, f"keys must be plain values, got {type(p[0]).__name__}")
            dict.__setitem__(out, p[0], p[1])
        out.__setstate__ = functools.partial(_mapping_setstate, cls.name, out)
        _record(cls.name, out)
        return out


def _mapping_setstate(name: str, inst: Counter, state: Any) -> None:
    """BUILD of a :class:`_MappingStandIn` object: its own entries, or a dict of attributes."""
    if state is inst:
        return
    _attribute_state(name, state)


class AddictDict(_MappingStandIn):
    """Inert stand-in for ``addict.Dict`` (pickled as ``addict.addict.Dict``): a plain dict."""

    name = "addict.addict.Dict"


class EasyDictStandIn(_MappingStandIn):
    """Inert stand-in for ``easydict.EasyDict``: a plain dict."""

    name = "easydict.EasyDict"


class ConfigStruct:
    """Base of the inert attribute bags: ``argparse.Namespace``-like config objects.

    A plain class pickles as NEWOBJ ``(cls, ())`` then BUILD with its ``__dict__``; the
    stand-in accepts no constructor arguments and, in :meth:`__setstate__`, only a dict with
    str keys. :func:`load_plain` rebuilds it as a plain dict of those attributes.
    """

    name = "?"
    #: the attributes kept (None: all of them)
    keep: tuple[str, ...] | None = None
    #: said in the card's notes (omegaconf's helper objects are not)
    note = True

    def __new__(cls, *args: Any) -> Any:  # noqa: D102 - documented on the class
        if args:
            raise _refuse(cls.name, "takes no constructor arguments, got "
                          + ", ".join(type(a).__name__ for a in args))
        obj = super().__new__(cls)
        _record(cls.name, obj, cls.note)
        return obj

    def __setstate__(self, state: Any) -> None:
        state = _attribute_state(self.name, state)
        if self.keep is not None:
            state = {k: v for k, v in state.items() if k in self.keep}
        self.__dict__.update(state)

    def to_dict(self) -> dict[str, Any]:
        """Return the attributes as a plain dict."""
        return dict(self.__dict__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({inner})"


class ACMILStruct(ConfigStruct):
    """Inert stand-in for ACMIL's ``utils.utils.Struct`` configuration object.

    ACMIL saves its training configuration as an instance of ``utils.utils.Struct``
    (``class Struct: __init__(self, **entries): self.__dict__.update(entries)``).
    ``torch.load(weights_only=True)`` refuses that global. Registering this class with the
    tuple form ``(ACMILStruct, "utils.utils.Struct")`` of
    :class:`torch.serialization.safe_globals` makes the restricted unpickler resolve the
    *name* ``utils.utils.Struct`` to this class: it matches globals by the string
    ``"{module}.{name}"`` and never imports the module, so no ACMIL code runs. The unpickler
    creates the instance with ``__new__`` and hands the saved ``__dict__`` to
    :meth:`__setstate__`, which accepts only a dict with string keys;
    :func:`~napari_milview._weights.torch_load` then returns those attributes as a plain
    dict. AEM (same authors) saves the same class.
    """

    name = "utils.utils.Struct"


class NamespaceStandIn(ConfigStruct):
    """Inert stand-in for ``argparse.Namespace`` (``args`` of many training scripts)."""

    name = "argparse.Namespace"


class _OmegaContainer(ConfigStruct):
    """``omegaconf`` ``DictConfig`` / ``ListConfig``: only ``_content`` is kept.

    Rebuilt as a dict (``DictConfig``) or list (``ListConfig``) of the plain values of its
    nodes; ``None`` or a str (``"???"``, an interpolation) stays as it is. The parent link,
    metadata and flags are dropped.
    """

    keep = ("_content",)


class OmegaDictConfig(_OmegaContainer):
    """Inert stand-in for ``omegaconf.dictconfig.DictConfig``."""

    name = "omegaconf.dictconfig.DictConfig"


class OmegaListConfig(_OmegaContainer):
    """Inert stand-in for ``omegaconf.listconfig.ListConfig``."""

    name = "omegaconf.listconfig.ListConfig"


class _OmegaNode(ConfigStruct):
    """An ``omegaconf.nodes`` value node: only ``_val`` is kept; rebuilt as that value."""

    keep = ("_val",)
    note = False


class _OmegaMetadata(ConfigStruct):
    """``omegaconf.base.Metadata`` / ``ContainerMetadata``: checked, nothing kept."""

    keep = ()
    note = False


def _named(base: type, name: str) -> type:
    """A subclass of ``base`` that says ``name`` (one class per registered name)."""
    return type(name.rsplit(".", 1)[1], (base,), {"name": name, "__module__": __name__,
                                                  "__doc__": f"Inert stand-in for ``{name}``."})


_OMEGA_NODES = tuple(
    _named(_OmegaNode, f"omegaconf.nodes.{n}")
    for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
              "BytesNode", "PathNode", "NoneNode", "InterpolationResultNode")
)
_OMEGA_META = tuple(_named(_OmegaMetadata, f"omegaconf.base.{n}")
                    for n in ("Metadata", "ContainerMetadata"))

# ----------------------------------------------------------------------------------------
# the allowlist (matched by name; nothing named here is ever imported)
# ----------------------------------------------------------------------------------------

_PATH_NAMES = {
    "PosixPath": PurePosixPath, "PurePosixPath": PurePosixPath, "Path": PurePosixPath,
    "PurePath": PurePosixPath, "WindowsPath": PureWindowsPath,
    "PureWindowsPath": PureWindowsPath,
}
#: type names configs store as data (omegaconf metadata, Lightning's ``hparams_type``)
_TYPE_NAMES = ("typing.Any", "builtins.dict", "builtins.list", "builtins.int",
               "builtins.float", "builtins.str", "builtins.bool", "builtins.bytes",
               "builtins.object", "builtins.tuple")

#: the allowlist handed to :class:`torch.serialization.safe_globals`: ``(stand-in, name)``
#: pairs, matched by name; nothing named here is ever imported. ``utils.utils.Struct``
#: (ACMIL, AEM) and ``argparse.Namespace`` -> attribute bags; ``addict.addict.Dict``
#: (``addict.Dict``) and ``easydict.EasyDict`` -> mappings; omegaconf ``DictConfig``,
#: ``ListConfig``, ``omegaconf.nodes.*Node`` (Any, String, Integer, Float, Boolean, Bytes,
#: Path, None, InterpolationResult), ``omegaconf.base.Metadata`` / ``ContainerMetadata``;
#: ``collections.defaultdict`` (-> an empty dict, its factory never called); the type
#: names :data:`_TYPE_NAMES` (data only, never called); ``pathlib`` / ``pathlib._local``
#: ``PosixPath``, ``PurePosixPath``, ``Path``, ``PurePath``, ``WindowsPath``,
#: ``PureWindowsPath`` -> str. :func:`load_plain` turns what they made into plain data.
SAFE_GLOBALS: list[Any] = [
    (ACMILStruct, ACMILStruct.name),
    (NamespaceStandIn, NamespaceStandIn.name),
    (AddictDict, "addict.addict.Dict"),
    (AddictDict, "addict.Dict"),
    (EasyDictStandIn, "easydict.EasyDict"),
    (OmegaDictConfig, OmegaDictConfig.name),
    (OmegaListConfig, OmegaListConfig.name),
    *((c, c.name) for c in _OMEGA_NODES + _OMEGA_META),
    (_DefaultDictStandIn(), "collections.defaultdict"),
    *((_TypeName(n), n) for n in _TYPE_NAMES),
    *((_PathStandIn(f"{m}.{n}", f), f"{m}.{n}")
      for m in ("pathlib", "pathlib._local") for n, f in _PATH_NAMES.items()),
]

#: stand-in classes by identity, for the post-pass (a class stored as data becomes its name)
_STAND_IN_CLASSES: dict[int, str] = {}
for _g in SAFE_GLOBALS:
    if isinstance(_g[0], type):
        _STAND_IN_CLASSES.setdefault(id(_g[0]), _g[1])
del _g


# ----------------------------------------------------------------------------------------
# the post-pass: what the stand-ins made -> plain data
# ----------------------------------------------------------------------------------------


def _plain_config(obj: Any, rec: _LoadRecord) -> Any:
    """Replace what the stand-ins made in a loaded object by plain dicts, lists and strs.

    Containers that hold none are kept as they are (a state_dict's ``OrderedDict`` with its
    ``_metadata``); tensors are not visited. Shared and cyclic references are followed once.

    Raises
    ------
    pickle.UnpicklingError
        A rebuilt mapping with a key that is not a plain value.
    """
    import torch

    memo: dict[int, Any] = {}

    def conv(o: Any) -> Any:
        oid = id(o)
        if oid in memo:
            return memo[oid]
        if isinstance(o, (str, bytes, int, float, bool, type(None), torch.Tensor)):
            return o
        if oid in rec.made and isinstance(o, Counter):  # a _MappingStandIn's dict
            name = rec.made[oid][0]
            out: dict[Any, Any] = {}
            memo[oid] = out
            for k, v in o.items():
                if type(k) not in _PLAIN_KEYS:
                    raise _refuse(name, f"keys must be plain values, got {type(k).__name__}")
                out[k] = conv(v)
            return out
        if isinstance(o, _OmegaContainer):
            content = o.__dict__.get("_content")
            if isinstance(o, OmegaListConfig) and type(content) is list:
                lst: list[Any] = []
                memo[oid] = lst
                lst.extend(conv(v) for v in content)
                return lst
            if isinstance(o, OmegaDictConfig) and type(content) is dict:
                out = {}
                memo[oid] = out
                out.update((k, conv(v)) for k, v in content.items())
                return out
            if content is None or type(content) is str:
                memo[oid] = content
                return content
            raise _refuse(o.name, f"unexpected content {type(content).__name__}")
        if isinstance(o, _OmegaNode):
            memo[oid] = None
            memo[oid] = conv(o.__dict__.get("_val"))
            return memo[oid]
        if isinstance(o, _OmegaMetadata):
            memo[oid] = None
            return None
        if isinstance(o, ConfigStruct):
            out = {}
            memo[oid] = out
            out.update((k, conv(v)) for k, v in o.__dict__.items())
            return out
        if isinstance(o, (_TypeName, _PathStandIn, _DefaultDictStandIn)):
            return o.name
        if isinstance(o, type) and id(o) in _STAND_IN_CLASSES:
            return _STAND_IN_CLASSES[id(o)]
        if type(o) in (dict, OrderedDict, Counter):
            memo[oid] = o
            for k, v in list(o.items()):
                nv = conv(v)
                if nv is not v:
                    o[k] = nv
            return o
        if type(o) is list:
            memo[oid] = o
            for i, v in enumerate(o):
                nv = conv(v)
                if nv is not v:
                    o[i] = nv
            return o
        if type(o) is tuple:
            items = [conv(v) for v in o]
            res = tuple(items) if any(a is not b for a, b in zip(items, o)) else o
            memo[oid] = res
            return res
        return o

    return conv(obj)


def load_plain(load: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Call ``load`` with the stand-ins recording what they make; return it as plain data.

    Parameters
    ----------
    load : callable
        The restricted load itself (``torch.load(..., weights_only=True)`` inside
        ``safe_globals(SAFE_GLOBALS)``), called once with no arguments.

    Returns
    -------
    object : object
        What ``load`` returned, with every object a stand-in made replaced by plain dict /
        list / str / number data (:func:`_plain_config`).
    rebuilt : list of str
        The registered names of the configuration objects rebuilt, in order of first use
        (e.g. ``["addict.addict.Dict", "pathlib.PosixPath"]``; omegaconf's value nodes and
        metadata, the type names and ``defaultdict`` are not named).

    Raises
    ------
    pickle.UnpicklingError
        A rebuilt mapping with a key that is not a plain value; and whatever ``load`` raises
        (a stand-in's refusal among it, see :func:`stand_in_problem`).
    """
    rec = _LoadRecord()
    token = _LOAD.set(rec)
    try:
        obj = load()
        obj = _plain_config(obj, rec)  # also a type name or stand-in class stored alone
    finally:
        _LOAD.reset(token)
    return obj, list(rec.names)


def stand_in_problem(exc: BaseException) -> str:
    """What a stand-in refused (its message after :data:`_REFUSED`), else ``""``."""
    msg = str(exc)
    if _REFUSED not in msg:
        return ""
    return msg.split(_REFUSED, 1)[1].strip().splitlines()[0][:300]
