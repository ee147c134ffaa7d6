"""Helpers shared by the encoder families: read local weights, load them strictly."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from napari_milview._weights import WeightsError, key_report, read_state_dict, strip_prefixes

from . import EncoderError, EncoderSpec

__all__ = ["EncoderModule", "load_strict", "read_weights"]


def read_weights(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    """Read a state dict from a local file (safetensors or ``torch.load(weights_only=True)``).

    Parameters
    ----------
    path : str or os.PathLike
        ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` ... in any container
        :func:`napari_milview._weights.read_state_dict` understands.
    what : str
        The encoder name, for messages.

    Returns
    -------
    dict of str to Tensor
        With a shared ``module.`` / ``model.`` / ``_orig_mod.`` prefix stripped.

    Raises
    ------
    EncoderError
        Missing, unreadable or refused file.
    """
    p = Path(path).expanduser()
    try:
        sd, _meta = read_state_dict(p)
    except FileNotFoundError:
        raise EncoderError(f"{what}: weights file not found: {p}") from None
    except WeightsError as exc:
        raise EncoderError(f"{what}: {exc}") from None
    sd, _notes = strip_prefixes(sd)
    return sd


def load_strict(module: nn.Module, sd: Mapping[str, Tensor], what: str, path: object) -> None:
    """``module.load_state_dict(sd, strict=True)``; a mismatch names the keys.

    Raises
    ------
    EncoderError
        ``"{what}: {path}: the weights do not fit (strict load): 3 missing: ...;
        2 unexpected: ...; 1 shape mismatches: ..."``.
    """
    report = key_report(module.state_dict(), sd)
    if report:
        raise EncoderError(f"{what}: {path}: the weights do not fit (strict load): {report}")
    try:
        module.load_state_dict(dict(sd), strict=True)
    except RuntimeError as exc:  # pragma: no cover - the report catches these first
        raise EncoderError(f"{what}: {path}: strict load failed: {exc}") from None


class EncoderModule(nn.Module):
    """An encoder network plus its spec and output post-processing.

    Parameters
    ----------
    net : nn.Module
        Maps ``[B, 3, S, S]`` to its raw output.
    spec : EncoderSpec
    post : callable, optional
        Raw output -> ``[B, spec.dim]`` (default: flatten all but the batch axis).
    """

    def __init__(self, net: nn.Module, spec: EncoderSpec,
                 post: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self._post = post

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, S, S] float (normalised) -> features [B, spec.dim]."""
        out = self.net(x)
        if self._post is not None:
            return self._post(out)
        return torch.flatten(out, 1)
