"""A user's TorchScript encoder (``torch.jit.save`` file) with a spec from a sidecar or arguments.

The spec comes from, in order of precedence: keyword arguments, then a JSON sidecar
``<file>.json`` (e.g. ``enc.pt.json``; ``<stem>.json`` such as ``enc.json`` is also
looked for), then defaults. Sidecar / argument fields: ``input_size`` (required),
``dim``, ``mean``, ``std`` (default ImageNet), ``mpp`` (default None), ``patch_px``
(default ``input_size``), ``name`` (default ``"torchscript"``), ``description``.
When ``dim`` is absent it is probed with one forward of a zero batch
``[1, 3, input_size, input_size]`` on the CPU.

The module's output must be ``[B, D]`` (trailing singleton axes, e.g. ``[B, D, 1, 1]``,
are flattened). ``torch.jit.load`` runs the TorchScript program in the file: load only
files you trust as you would any code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._weights import WeightsError, read_json_object
from . import IMAGENET_MEAN, IMAGENET_STD, EncoderError, EncoderSpec
from ._common import EncoderModule

__all__ = ["load", "sidecar_for"]

_FIELDS = ("name", "dim", "input_size", "mean", "std", "mpp", "patch_px", "description")


def sidecar_for(path: str | os.PathLike) -> Path | None:
    """The JSON sidecar of ``path`` (``<file>.json``, else ``<stem>.json``), or None."""
    p = Path(path)
    for cand in (p.with_name(p.name + ".json"), p.with_suffix(".json")):
        if cand != p and cand.is_file():
            return cand
    return None


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_for(path)
    if side is None:
        return {}
    try:
        data = read_json_object(side)
    except WeightsError as exc:
        raise EncoderError(f"torchscript: {exc}") from None
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise EncoderError(f"torchscript: {side}: unknown field(s) {unknown}; "
                           f"known: {', '.join(_FIELDS)}")
    return data


def _triple(value: Any, what: str, where: str) -> tuple[float, float, float]:
    try:
        t = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3:
        raise EncoderError(f"torchscript: {where}: {what} must be 3 numbers, got {value!r}")
    return t  # type: ignore[return-value]


def _flatten_output(out: Any, where: str) -> Tensor:
    """[B, D] or [B, D, 1, ...] -> [B, D]; anything else is refused."""
    if not isinstance(out, Tensor):
        raise EncoderError(f"torchscript: {where}: the module returns a {type(out).__name__}, "
                           "expected one Tensor [B, D]")
    if out.ndim < 2 or (out.ndim > 2 and any(s != 1 for s in out.shape[2:])):
        raise EncoderError(f"torchscript: {where}: the module returns shape "
                           f"{list(out.shape)}, expected [B, D]")
    return out.flatten(1)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu",
         **overrides: Any) -> EncoderModule:
    """Load a TorchScript encoder and its spec.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.jit.save``.
    device : str or torch.device
        Where the module is mapped.
    **overrides
        Spec fields (see the module docstring); they win over the sidecar.

    Returns
    -------
    EncoderModule
        ``forward(x [B, 3, input_size, input_size]) -> [B, dim]``, eval mode.

    Raises
    ------
    EncoderError
        Missing or unreadable file, bad sidecar, no ``input_size``, a module whose output
        is not ``[B, D]``, or a ``dim`` that contradicts the probed output.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise EncoderError(f"torchscript: file not found: {p}")
    bad = sorted(set(overrides) - set(_FIELDS))
    if bad:
        raise EncoderError(f"torchscript: unknown option(s) {bad}; known: {', '.join(_FIELDS)}")
    fields = {**_read_sidecar(p), **{k: v for k, v in overrides.items() if v is not None}}
    where = str(p)
    if fields.get("input_size") is None:
        raise EncoderError(f"torchscript: {where}: input_size unknown; give it as an argument "
                           f"or in the sidecar {p.name}.json")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates torch.jit
            warnings.filterwarnings("ignore", r".*torch\.jit.* is deprecated",
                                    DeprecationWarning)
            net = torch.jit.load(str(p), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(f"torchscript: {where}: not a loadable TorchScript file "
                           f"({msg[:200]})") from None
    net.eval()
    size = int(fields["input_size"])
    dim = fields.get("dim")
    if dim is None:
        with torch.inference_mode():
            probe = _flatten_output(net(torch.zeros(1, 3, size, size)), where)
        dim = int(probe.shape[1])
    spec = EncoderSpec(
        name=str(fields.get("name") or "torchscript"), dim=int(dim), input_size=size,
        mean=_triple(fields.get("mean", IMAGENET_MEAN), "mean", where),
        std=_triple(fields.get("std", IMAGENET_STD), "std", where),
        mpp=None if fields.get("mpp") is None else float(fields["mpp"]),
        patch_px=int(fields.get("patch_px") or size),
        description=str(fields.get("description") or f"TorchScript file {p.name}"),
        family="torchscript",
    )

    def post(out: Any) -> Tensor:
        feats = _flatten_output(out, where)
        if feats.shape[1] != spec.dim:
            raise EncoderError(f"torchscript: {where}: output has {feats.shape[1]} features "
                               f"but the spec says dim={spec.dim}")
        return feats

    return EncoderModule(net, spec, post).to(torch.device(device)).eval()
